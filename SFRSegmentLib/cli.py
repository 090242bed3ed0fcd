"""The command line: one subcommand per user task, each a thin call into the engine's modules.

Exit status: 0 on success, 2 on bad input (the message names the file and the field), 1 on other failures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np

from .base.choices import METHODS, PRESET_DESCRIPTIONS, PRESETS, STAGES
from .base.errors import ERROR_PREFIX, EXIT_BAD_INPUT, InputError
from .base.progress import REPORTER_KINDS, Cancelled
from .jobserver.protocol import DEFAULT_HOST, DEFAULT_PORT, ServerError, add_server_options
from .storage.atomic import WriteError

EXIT_FAILURE = 1
EXIT_CANCELLED = 130
"""A stage stopped on request (SIGINT/SIGTERM) after saving its checkpoint; rerunning resumes it."""


def _cmd_info(args: argparse.Namespace) -> int:
    from .storage.volumes import read_volume
    from .data.validation import check_image, check_label

    image = read_volume(args.image)
    check_image(image)
    arr = image.array
    print(f"file:       {image.path}")
    print(f"shape:      {' x '.join(map(str, image.shape))} (i, j, k; slices along k: {image.shape[2]})")
    print(f"spacing:    {', '.join(f'{s:g}' for s in image.spacing)} mm")
    print(f"origin:     {', '.join(f'{o:g}' for o in image.origin)} mm (LPS)")
    print(f"axial axis: {'ijk'[image.closest_axis_to_superior]} (closest to superior)")
    print(f"dtype:      {arr.dtype}")
    print(f"intensity:  min {arr.min():g}, max {arr.max():g}, mean {arr.mean():.4g}, std {arr.std():.4g}")
    if args.label:
        label = read_volume(args.label)
        values, counts = np.unique(label.array, return_counts=True)
        names = {s.value: s.name for s in (label.segments or [])}
        check_label(label, [int(v) for v in values], image, require_foreground=False)
        print(f"label:      {label.path}")
        for value, count in zip(values, counts):
            name = names.get(int(value), "background" if value == 0 else f"class_{int(value)}")
            print(f"  class {int(value):>3} {name:<24} {int(count):>10} voxels ({count / label.array.size:.2%})")
    return 0


def _cmd_stitch_preview(args: argparse.Namespace) -> int:
    from .research.preview import write_stitch_preview

    written = write_stitch_preview(args.image, args.out, label_path=args.label, patch=tuple(args.patch),
                                   canvas=args.canvas)
    print(f"wrote {written}")
    return 0


def _cmd_cohort(args: argparse.Namespace) -> int:
    from .data.cohort import discover_cohort, validate_cohort

    cohort = discover_cohort(args.path, test=args.test)
    print(cohort.summary())
    if args.validate:
        validate_cohort(cohort)
        print(f"all {len(cohort.cases) + len(cohort.test)} cases are valid")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .research.synthetic import make_synthetic_cohort

    cohort = make_synthetic_cohort(args.out, n_cases=args.cases, n_labeled=args.labeled, n_classes=args.classes,
                                   seed=args.seed)
    print(cohort.summary())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .research.demo import run_demo

    run_demo(Path(args.out))
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from .data.cohort import discover_cohort
    from .base.distributed import on_main_rank
    from .base.progress import Cancellation, make_reporter
    from .stages.retrain import retrain
    from .storage.runfolder import RunFolder

    config = _stage_config(args, "retrain")
    run = RunFolder(args.out)
    with Cancellation().on_signals() as cancellation, on_main_rank(run.exclusive()):
        weights = retrain(discover_cohort(args.cohort), run, config, progress=make_reporter(args.progress),
                          cancellation=cancellation)
    print(f"wrote {weights}", file=sys.stderr if args.progress == "jsonl" else sys.stdout)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.server:
        from .base.config_io import load_overrides
        from .base.config_io import merged
        from .jobserver.remote import predict_remotely

        given = _given_options(args)
        section = merged(load_overrides(args.config) if args.config else {}, given.get("inference", {}))
        return predict_remotely(args, section, given.get("device"))
    from .base.device import resolve_device
    from .stages.inference import predict_to_folder
    from .models.vnet import load_vnet
    from .base.progress import make_reporter

    config = _stage_config(args, "inference")
    model, info = load_vnet(args.model, resolve_device(config.device))
    out = sys.stderr if args.progress == "jsonl" else sys.stdout
    for path in predict_to_folder(model, info, args.images, args.out, config, make_reporter(args.progress)):
        print(f"wrote {path}", file=out)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation.metrics import evaluate_folders, summarise, write_metrics_csv

    rows = evaluate_folders(args.pred, args.truth, args.classes)
    write_metrics_csv(rows, args.out)
    print(f"wrote {args.out} ({len({row.case for row in rows})} cases)")
    print(f"{'class':>5} {'cases':>5} {'dice':>15} {'jaccard':>15} {'hd95 vox':>15} {'asd vox':>15} {'empty pred':>10}")
    for s in summarise(rows):
        stats = " ".join(f"{m.mean:>7.4f}±{m.std:<7.4f}" for m in (s.dice, s.jaccard, s.hd95_vox, s.asd_vox))
        print(f"{s.class_value:>5} {s.n_cases:>5} {stats} {s.n_pred_empty:>10}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    if args.plan_only and args.server:
        raise InputError("--plan-only plans and times the run on this computer: leave out --server", field="--server")
    if args.plan_only and args.parent:
        raise InputError("--plan-only plans a new run; an update (--from) keeps its parent's plan", field="--from")
    from .base.config import preset, starting_preset
    from .base.config_io import given_paths, load_overrides, to_dict, with_overrides
    from .run.pipeline import run_pipeline
    from .base.progress import Cancellation, make_reporter
    from .run.update import parent_overrides

    overrides = load_overrides(args.config) if args.config else {}
    remote = args.server and not args.print_config  # the server's engine resolves the configuration as below
    if args.parent and not remote:  # an update starts from its parent's configuration
        parent = parent_overrides(args.parent)
        config = with_overrides(preset(starting_preset(args.preset, parent, args.parent)), parent, args.parent)
        config = with_overrides(config, overrides, args.config)
    elif not args.parent:  # checked here first, also before a cohort is sent to a server
        config = with_overrides(preset(starting_preset(args.preset, overrides, args.config)), overrides, args.config)
    if remote:  # with a server, --from names the server's job: its configuration is read there
        from .jobserver.remote import run_remotely

        return run_remotely(args, overrides, _given_options(args), _downloaded_run_summary)
    config = with_overrides(config, _given_options(args))
    # What the user set by hand (an update: its parent's whole configuration) is never planned over.
    given = given_paths(overrides) | given_paths(_given_options(args)) | (given_paths(parent) if args.parent
                                                                         else frozenset())
    if args.print_config:
        import json

        from .data.cohort import discover_cohort
        from .run.plan import plan_config

        if config.plan.enabled and args.cohort.exists():
            config, plan, _ = plan_config(config, discover_cohort(args.cohort), given)
            print(f"plan from the cohort: {plan.summary()}", file=sys.stderr)
        print(json.dumps(to_dict(config.resolved()), indent=2))
        return 0
    if args.plan_only:
        from .run.pipeline import plan_run
        from .storage.runfolder import RunFolder

        plan_run(args.cohort, args.out, config, progress=make_reporter(args.progress), test=args.test, given=given)
        print(f"plan and estimate: {RunFolder(args.out).plan}", file=sys.stderr if args.progress == "jsonl"
              else sys.stdout)
        return 0
    cancellation = Cancellation()
    with cancellation.on_signals():
        result = run_pipeline(args.cohort, args.out, config, progress=make_reporter(args.progress),
                              cancellation=cancellation, redo=args.redo, test=args.test, parent=args.parent,
                              given=given)
    used = result.config
    print(_run_summary(result.report, ((used.retrain.method, result.metrics),
                                       (used.baseline_method, result.baseline_metrics))),
          file=sys.stderr if args.progress == "jsonl" else sys.stdout)
    return 0


def _run_summary(report: Path, metrics_by_method: Sequence[Tuple[Optional[str], Optional[Path]]]) -> str:
    """What ``run`` prints at its end: the report, and the mean Dice of each method's metrics table."""
    from .evaluation.metrics import SPLIT_DESCRIPTIONS
    from .evaluation.metrics import mean_dice, scored_split

    lines = [f"report: {report}"]
    for method, metrics in metrics_by_method:
        if metrics:
            split = scored_split(metrics)
            lines.append(f"mean Dice on the {SPLIT_DESCRIPTIONS[split]} ({method}): {mean_dice(metrics, split):.4f}")
    return "\n".join(lines)


def _downloaded_run_summary(out: Path) -> str:
    """:func:`_run_summary` of a run folder downloaded from a server (its config.json, metrics tables)."""
    from .base.config import RunConfig
    from .base.config_io import load_overrides, with_overrides
    from .storage.runfolder import RunFolder

    run = RunFolder(out)
    used = with_overrides(RunConfig(), load_overrides(run.config), run.config)
    present = lambda path: path if path.is_file() else None  # noqa: E731
    return _run_summary(run.report, ((used.retrain.method, present(run.metrics)),
                                     (used.baseline_method, present(run.baseline.metrics))))


def _cmd_serve(args: argparse.Namespace) -> int:
    from .jobserver.serve import serve

    return serve(args.host, args.port, args.data, args.token_file, args.slots, args.gpus or (),
                 args.processes_per_job, args.ssl_certfile, args.ssl_keyfile, args.max_file_mb, args.max_job_gb)


def _cmd_jobs(args: argparse.Namespace) -> int:
    from .jobserver.remote import jobs_command

    return jobs_command(args)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .base.config import starting_preset
    from .base.config_io import load_overrides
    from .research.reproduce import (
        RESULTS_CSV,
        RESULTS_MD,
        CellFailed,
        Protocol,
        grid,
        la_split,
        run_grid,
        write_table,
    )

    if not args.table_only:
        if args.data is None:
            raise InputError("--data (the LA folder) is required unless --table-only is given", field="data")
        overrides = load_overrides(args.config) if args.config else {}
        protocol = Protocol(la_split(args.data, args.test_list, args.dev_test),
                            starting_preset(args.preset, overrides, args.config), overrides, args.unlabeled,
                            args.config)
        try:
            run_grid(protocol, grid(args.labeled, args.methods, args.seeds), args.out,
                     _given_options(args).get("device"), args.progress)
        except CellFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_status
    print(write_table(args.out), end="", file=sys.stderr if args.progress == "jsonl" else sys.stdout)
    print(f"wrote {args.out / RESULTS_CSV} and {args.out / RESULTS_MD}", file=sys.stderr)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .data.cohort import discover_cohort
    from .base.distributed import on_main_rank
    from .base.progress import Cancellation, make_reporter
    from .storage.runfolder import RunFolder
    from .stages.finetune import finetune

    cohort = discover_cohort(args.cohort)
    random_init = {"finetune": {"base_checkpoint": None, "allow_random_init": True}} if args.random_init else {}
    config = _stage_config(args, "finetune", len(cohort.classes), random_init)
    run = RunFolder(args.out)
    with Cancellation().on_signals() as cancellation, on_main_rank(run.exclusive()):
        weights = finetune(cohort, run, config, make_reporter(args.progress), cancellation)
    print(f"wrote {weights}", file=sys.stderr if args.progress == "jsonl" else sys.stdout)
    return 0


def _cmd_pseudolabel(args: argparse.Namespace) -> int:
    from .data.cohort import discover_cohort
    from .base.distributed import on_main_rank
    from .base.progress import Cancellation, make_reporter
    from .storage.runfolder import RunFolder
    from .stages.pseudolabel import pseudolabel

    cohort = discover_cohort(args.cohort)
    config = _stage_config(args, "pseudolabel")
    run = RunFolder(args.out)
    with Cancellation().on_signals() as cancellation, on_main_rank(run.exclusive()):
        table = pseudolabel(cohort, run, config, make_reporter(args.progress), cancellation)
    out = sys.stderr if args.progress == "jsonl" else sys.stdout
    print(f"wrote the pseudo-labels of {len(cohort.unlabeled)} cases to {run.pseudolabel_dir}", file=out)
    print(f"confidence (least confident first), {table}:\n{table.read_text(encoding='utf-8')}", end="", file=out)
    return 0


def _stage_config(args: argparse.Namespace, section: str, n_classes: Optional[int] = None,
                  overrides: Mapping[str, Any] = {}) -> Any:
    """The ``section`` of the run configuration that a one-stage command runs with: ``--preset``'s, changed by the
    ``--config`` file (the section's options), then by the flags given and ``overrides``, resolved as a run resolves
    it (``n_classes``: the cohort's foreground classes). Its device is checked on this machine at once."""
    from .base.config import preset
    from .base.config_io import load_overrides, with_overrides
    from .base.device import resolve_device

    config = preset(args.preset)
    if args.config:
        config = with_overrides(config, {section: load_overrides(args.config)}, args.config)
    config = with_overrides(with_overrides(config, _given_options(args)), overrides)
    resolve_device(config.device)
    return getattr(config.resolved(n_classes), section)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfrsegment",
        description="SFRSegment engine: semi-supervised 3D segmentation with SAM (Stitching, Fine-tuning, "
        "Re-training).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="print shape, geometry, intensity range and label classes of a volume")
    p.add_argument("image", type=Path, help="volume file (.nrrd, .nii, .nii.gz, .mha, .mhd)")
    p.add_argument("--label", type=Path, help="label map or .seg.nrrd on the same grid")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("stitch-preview", help="write the SAM mosaic of a volume's central patch as a PNG")
    p.add_argument("image", type=Path)
    p.add_argument("--label", type=Path, help="label map to overlay")
    p.add_argument("--out", type=Path, required=True, help="PNG file to write")
    patch, canvas = _paper_value("patch_size"), _paper_value("finetune.sam.image_size")
    p.add_argument("--patch", type=int, nargs=3, default=list(patch), metavar=("H", "W", "D"),
                   help=f"patch size in voxels (default: the paper's {_shown(patch)})")
    p.add_argument("--canvas", type=int, default=canvas, help=f"mosaic side in pixels (default: SAM's {canvas})")
    p.set_defaults(func=_cmd_stitch_preview)

    p = sub.add_parser("cohort", help="discover a cohort and report its labeled and unlabeled cases")
    p.add_argument("path", type=Path, help="folder of case folders, Decathlon folder, or manifest .json")
    p.add_argument("--validate", action="store_true", help="also read and check every image and label")
    _add_test_option(p)
    p.set_defaults(func=_cmd_cohort)

    p = sub.add_parser("synth", help="write a deterministic synthetic cohort (for tests and trials)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--labeled", type=int, default=2)
    p.add_argument("--classes", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("run", help="the whole SFR pipeline on a cohort: fine-tune SAM, pseudo-label, re-train, "
                       "predict, evaluate, report (resumes an interrupted run)")
    _add_cohort_option(p)
    p.add_argument("--out", type=Path, required=True, help="run folder (created; rerun to resume)")
    _add_preset_option(p, "the configuration to start from (default: the one the --config file names, else "
                          "paper)")
    p.add_argument("--config", type=Path, help="JSON file of option overrides, e.g. {\"retrain\": {\"method\": "
                   "\"sfr_acmt\"}} (--print-config shows every option)")
    _add_config_options(p, {"--device": "device", "--patch": "patch_size", "--truth": "truth_dir",
                            "--estimate": "estimate"})
    _add_test_option(p)
    p.add_argument("--from", dest="parent", type=Path, metavar="PARENT_RUN",
                   help="update this finished run (it is never changed): its configuration, its fine-tuned SAM and "
                        "V-Net continued on the cohort's new labels with short schedules (update.*_fraction), what "
                        "did not change taken over")
    p.add_argument("--progress", choices=REPORTER_KINDS, default="bar",
                   help="jsonl: one JSON object per line on stdout (the Slicer module's protocol)")
    p.add_argument("--redo", action="append", default=[], metavar="STAGE", choices=STAGES,
                   help="delete this stage's outputs and those after it, then run (repeatable): %(choices)s")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--plan-only", action="store_true",
                   help="validate the cohort, plan from it and time a few steps of each stage on this computer, "
                        "write both to OUT/plan.json and exit without training (a later run in OUT keeps the plan)")
    add_server_options(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("reproduce", help="the paper's LA protocol: a grid of runs (labeled N x method x seed) scored "
                       "on the test cases, and one table beside the paper's numbers (resumes unfinished cells)")
    p.add_argument("--data", type=Path, help="LA folder: <ID>/image.nrrd, <ID>/label.nrrd, train.list, test.list")
    p.add_argument("--out", type=Path, required=True, help="folder of the cell run folders and results.csv / .md")
    test = p.add_mutually_exclusive_group()
    test.add_argument("--test-list", type=Path, help="the test cases' list (default: DATA/test.list)")
    test.add_argument("--dev-test", type=int, metavar="N", help="hold the last N cases of train.list out as the test "
                      "set instead (a development split; they leave the unlabeled pool)")
    p.add_argument("--labeled", type=int, nargs="+", default=[16], metavar="N",
                   help="labeled cases: the first N of train.list (several: 1 4 8 16; default 16)")
    method = _paper_value("retrain.method")
    p.add_argument("--methods", nargs="+", default=[method], choices=METHODS, metavar="METHOD",
                   help=f"re-training methods (several; default {method}): %(choices)s")
    seed = _paper_value("retrain.seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[seed], metavar="SEED",
                   help=f"seeds of fine-tuning and re-training (several; default {seed})")
    p.add_argument("--unlabeled", type=int, metavar="N", help="cap the unlabeled pool at its first N cases")
    _add_preset_option(p, "paper (the default, unless the --config file names another) is exactly the paper's "
                          "protocol, a GPU job; another preset runs the same protocol at its size, labelled as such in "
                          "the table")
    p.add_argument("--config", type=Path, help="JSON file of option overrides for every cell, as in run")
    _add_config_options(p, {"--device": "device"})
    p.add_argument("--progress", choices=REPORTER_KINDS, default="bar",
                   help="the cells' progress, as in run (jsonl: JSON lines on stdout, the table on stderr)")
    p.add_argument("--table-only", action="store_true", help="run nothing: rebuild the table from the finished "
                   "cells in --out")
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("demo", help="run the built-in demo on synthetic data (and the LA cases when present)")
    p.add_argument("--out", type=Path, default=Path("demo-output"))
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("retrain", help="re-train the V-Net (stage R) with a semi-supervised method; resumes a "
                       "stopped run")
    _add_cohort_option(p)
    _add_run_folder_option(p, "(sfr* methods read its pseudolabels/; writes retrain/)")
    _add_stage_options(p, "retrain", {
        "--ssl-method": "retrain.ssl_method", "--pseudo-labels": "retrain.pseudo_labels",
        "--iterations": "retrain.iterations", "--patch": "retrain.patch_size",
        "--batch-labeled": "retrain.batch_labeled", "--batch-unlabeled": "retrain.batch_unlabeled",
        "--lr": "retrain.lr", "--lr-schedule": "retrain.lr_schedule", "--seed": "retrain.seed",
        "--checkpoint-every": "retrain.checkpoint_every", "--device": "device", "--precision": "retrain.precision"})
    p.add_argument("--method", dest=_OPTION_DEST + "retrain.method", choices=METHODS, help="both of the above by "
                   "one name, as the paper names methods: sfr_<method> is <method> with SAM's pseudo-labels, sfr is "
                   "supervised with them, <method> is without (%(choices)s)")
    p.set_defaults(func=_cmd_retrain)

    p = sub.add_parser("predict", help="segment images with a trained V-Net (sliding window)")
    p.add_argument("--model", type=Path, required=True, help="run folder (its retrain/vnet.pt) or a vnet .pt file")
    p.add_argument("--images", type=Path, nargs="+", required=True, help="image files and/or cohort folders")
    p.add_argument("--out", type=Path, required=True, help="folder for <case>.seg.nrrd and <case>.nii.gz")
    _add_stage_options(p, "inference", {
        "--patch": "inference.patch_size", "--stride-xy": "inference.stride_xy", "--stride-z": "inference.stride_z",
        "--sw-batch-size": "inference.sw_batch_size", "--largest-component": "inference.largest_component",
        "--device": "device", "--precision": "inference.precision"})
    add_server_options(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="Dice, Jaccard, HD95, ASD of predictions against truth, per case and class")
    p.add_argument("--pred", type=Path, required=True, help="folder of <case>.<ext> predictions")
    p.add_argument("--truth", type=Path, required=True, help="folder of <case>.<ext> or <case>/label.<ext> truths")
    p.add_argument("--out", type=Path, required=True, help="CSV file to write")
    p.add_argument("--classes", type=int, nargs="+", help="class values to score (default: all found)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("finetune", help="fine-tune SAM on the stitched labeled cases (stage F); resumes a stopped "
                       "run")
    _add_cohort_option(p)
    _add_run_folder_option(p, "(writes its finetune/)")
    base = p.add_mutually_exclusive_group()
    _add_config_options(base, {"--checkpoint": "finetune.base_checkpoint"})
    base.add_argument("--random-init", action="store_true", help="no SAM checkpoint: random weights (demo/test only)")
    _add_stage_options(p, "finetune", {
        "--iterations": "finetune.iterations", "--batch-size": "finetune.batch_size", "--lr": "finetune.lr",
        "--patch": "finetune.patch_size", "--bezier-p": "finetune.bezier_p",
        "--mosaic-rot-flip": "finetune.mosaic_rot_flip",
        "--gradient-checkpointing": "finetune.sam.gradient_checkpointing", "--seed": "finetune.seed",
        "--checkpoint-every": "finetune.checkpoint_every", "--device": "device",
        "--precision": "finetune.precision"})
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("pseudolabel", help="pseudo-label the unlabeled cases with the fine-tuned SAM (stage P), "
                       "whole volumes by sliding windows of the patch SAM was fine-tuned on; cached")
    _add_cohort_option(p)
    _add_run_folder_option(p, "(reads its finetune/, writes pseudolabels/)")
    _add_stage_options(p, "pseudolabel", {
        "--overlap": "pseudolabel.overlap", "--windows-per-batch": "pseudolabel.windows_per_batch",
        "--redo": "pseudolabel.redo", "--device": "device", "--precision": "pseudolabel.precision"})
    p.set_defaults(func=_cmd_pseudolabel)

    p = sub.add_parser("serve", help="the job server: runs this engine's jobs for clients (run/predict/jobs --server, "
                       "the Slicer module) on this machine, one at a time per slot, behind a token")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default %(default)s: this machine only; "
                   "another address without TLS is warned about)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default %(default)s)")
    p.add_argument("--data", type=Path, required=True, help="folder of the server's jobs (created)")
    p.add_argument("--token-file", type=Path, metavar="FILE", help="the access token's file, created with a new "
                   "token (mode 0600) when missing (default DATA/token)")
    p.add_argument("--slots", type=int, default=1, help="jobs run at once (default 1; the others wait in the queue)")
    p.add_argument("--gpus", nargs="+", metavar="GPU", help="one slot per GPU: each job sees only its slot's GPU "
                   "(CUDA_VISIBLE_DEVICES), e.g. --gpus 0 1 2 3")
    p.add_argument("--processes-per-job", type=int, default=1, metavar="N", help="run each job under torchrun with N "
                   "processes (all GPUs for one job: --processes-per-job 4; see Scaling out)")
    p.add_argument("--ssl-certfile", type=Path, metavar="FILE", help="TLS certificate (PEM): serve https")
    p.add_argument("--ssl-keyfile", type=Path, metavar="FILE", help="TLS private key (PEM)")
    p.add_argument("--max-file-mb", type=float, default=4096, help="largest uploaded file (default %(default)g MiB)")
    p.add_argument("--max-job-gb", type=float, default=64, help="largest total upload of one job (default "
                   "%(default)g GiB)")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("jobs", help="a job server's jobs: list, show, follow, cancel, resume, download, delete")
    p.add_argument("action", choices=("list", "show", "follow", "cancel", "resume", "download", "delete"))
    p.add_argument("job", nargs="?", help="the job id (jobs list shows them)")
    p.add_argument("--out", type=Path, help="download: the folder for its results (follow, resume: download them "
                   "there when the job finishes)")
    _add_progress_option(p)
    add_server_options(p, required=True)
    p.set_defaults(func=_cmd_jobs)
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Options of the configuration (SFRSegmentLib.base.config): their types, choices, help and defaults come from there

_OPTION_DEST = "option:"
"""The argparse destination of a configuration flag is this prefix and the field's dotted path in RunConfig."""


def _add_config_options(parser: Any, flags: Mapping[str, str]) -> None:
    """One flag per configuration field (flag → dotted path in :class:`~SFRSegmentLib.base.config.RunConfig`), typed,
    checked and explained as the field is, showing each preset's value as its default. A flag not given leaves the
    value to the preset and the ``--config`` file (:func:`_given_options`)."""
    for flag, path in flags.items():
        spec, hint = _config_field(path)
        kwargs: Dict[str, Any] = {"dest": _OPTION_DEST + path, "default": None,
                                  "help": f"{spec.metadata['help']} ({_preset_defaults(path)})".replace("%", "%%")}
        if spec.metadata.get("choices"):
            kwargs["choices"] = spec.metadata["choices"]
        elif hint is not bool:
            kwargs["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        if spec.metadata.get("device"):
            kwargs.update(type=_device_name, metavar="DEVICE")
        elif hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            item = typing.get_args(hint)[0]
            kwargs.update(nargs=len(typing.get_args(hint)), type=item, metavar=("H", "W", "D") if item is int else None)
        elif hint in (int, float):
            kwargs["type"] = hint
        parser.add_argument(flag, **kwargs)


def _add_stage_options(parser: argparse.ArgumentParser, section: str, flags: Mapping[str, str],
                       progress: bool = True) -> None:
    """What a one-stage command shares: ``--preset``, ``--config`` (the ``section``'s options), the flags (which win
    over both) and ``--progress``."""
    _add_preset_option(parser, "the configuration whose values the options below start from")
    parser.set_defaults(preset="paper")
    parser.add_argument("--config", type=Path, help=f"JSON file of options of the run configuration's {section} "
                        "section (--print-config of run shows them); the flags win")
    _add_config_options(parser, flags)
    if progress:
        _add_progress_option(parser)


def _given_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The configuration flags given on the command line, as nested overrides (``{"retrain": {"lr": 0.02}}``)."""
    from .base.config_io import set_option

    overrides: Dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith(_OPTION_DEST) and value is not None:
            set_option(overrides, dest[len(_OPTION_DEST):], value)
    return overrides


def _config_field(path: str) -> Tuple[dataclasses.Field, Any]:
    """The dataclass field at ``path`` in RunConfig and its type, without ``Optional``."""
    from .base.config import RunConfig

    owner: Any = RunConfig
    for name in path.split("."):
        spec = {f.name: f for f in dataclasses.fields(owner)}[name]
        hint = typing.get_type_hints(owner)[name]
        owner = hint
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(arguments) == 1:
        hint = arguments[0]
    return spec, hint


def _preset_defaults(path: str) -> str:
    """Each preset's resolved value at ``path``: ``default X`` when they agree, else ``default: paper X, cpu Y,
    small Z``."""
    from .base.config import preset

    values = {name: _shown(_value_at(preset(name).resolved(), path)) for name in PRESETS}
    if len(set(values.values())) == 1:
        return f"default {values['paper']}"
    return "default: " + ", ".join(f"{name} {value}" for name, value in values.items())


def _paper_value(path: str) -> Any:
    from .base.config import preset

    return _value_at(preset("paper").resolved(), path)


def _value_at(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def _device_name(text: str) -> str:
    """A device name for argparse: its spelling is checked here, whether the machine has it where it is used."""
    from .base.config import check_device

    try:
        return check_device(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_preset_option(parser: argparse.ArgumentParser, what: str) -> None:
    described = "; ".join(f"{name}: {text}" for name, text in PRESET_DESCRIPTIONS.items())
    parser.add_argument("--preset", choices=PRESETS, help=f"{what} ({described})")


def _add_cohort_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort", type=Path, required=True, help="cohort folder, Decathlon folder or manifest .json")


def _add_test_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--test", type=Path, metavar="DIR", help="held-out test cases, never trained on: a folder of "
                        "<case>/image.* + <case>/label.* (or a Decathlon folder or manifest .json), each labeled; "
                        "predicted and scored after training")


def _add_run_folder_option(parser: argparse.ArgumentParser, what: str) -> None:
    # Named as `run --out`. Not `--run`: under `torchrun -m SFRSegmentLib …` torchrun's own parser reads our
    # options too, and `--run` is an ambiguous prefix of its `--run-path`.
    parser.add_argument("--out", type=Path, required=True, metavar="RUN", help=f"the run folder {what}")


def _add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=REPORTER_KINDS, default="bar",
                        help="progress as a bar on stderr, JSON lines on stdout, or none")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _torchrun_group(args):
            return int(args.func(args))
    except InputError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WriteError as exc:
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Cancelled:
        print("cancelled: the last checkpoint is saved; rerun the same command to resume", file=sys.stderr)
        return EXIT_CANCELLED
    except ServerError as exc:  # refused by the server (4xx: what the user sent), or not reached
        print(f"{ERROR_PREFIX}{exc}", file=sys.stderr)
        return EXIT_BAD_INPUT if 400 <= exc.status < 500 else EXIT_FAILURE


@contextlib.contextmanager
def _torchrun_group(args: argparse.Namespace) -> Iterator[None]:
    """Under torchrun, join the process group for the command, and let only rank 0 print on stdout (its JSON lines
    stay the one stream a caller parses); errors still reach stderr from every rank."""
    from .base.distributed import launched_by_torchrun, process_group

    if not launched_by_torchrun():
        yield
        return
    import torch

    use_cuda = torch.cuda.is_available() and getattr(args, "device", None) != "cpu"
    with process_group(use_cuda) as here:
        if here.is_main:
            yield
            return
        with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere):
            yield
