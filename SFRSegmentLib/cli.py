"""The command line: one subcommand per user task, each a thin call into the engine's modules.

Exit status: 0 on success, 2 on bad input (the message names the file and the field), 1 on other failures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .atomic import WriteError
from .choices import PRESETS
from .errors import InputError
from .progress import REPORTER_KINDS, Cancelled

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 130
"""A stage stopped on request (SIGINT/SIGTERM) after saving its checkpoint; rerunning resumes it."""
PAPER_PATCH = (112, 112, 80)


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import read_volume
    from .validation import check_image, check_label

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
    from .preview import write_stitch_preview

    written = write_stitch_preview(args.image, args.out, label_path=args.label, patch=tuple(args.patch),
                                   canvas=args.canvas)
    print(f"wrote {written}")
    return 0


def _cmd_cohort(args: argparse.Namespace) -> int:
    from .data import discover_cohort, validate_cohort

    cohort = discover_cohort(args.path, test=args.test)
    print(cohort.summary())
    if args.validate:
        validate_cohort(cohort)
        print(f"all {len(cohort.cases) + len(cohort.test)} cases are valid")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic import make_synthetic_cohort

    cohort = make_synthetic_cohort(args.out, n_cases=args.cases, n_labeled=args.labeled, n_classes=args.classes,
                                   seed=args.seed)
    print(cohort.summary())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out))
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from .config_io import load_overrides, with_overrides
    from .data import discover_cohort
    from .distributed import on_main_rank
    from .progress import Cancellation, make_reporter
    from .retrain import RetrainConfig, retrain
    from .runfolder import RunFolder

    options = {"method": args.method, "iterations": args.iterations, "batch_labeled": args.batch_labeled,
               "batch_unlabeled": args.batch_unlabeled, "lr": args.lr, "lr_schedule": args.lr_schedule,
               "seed": args.seed, "checkpoint_every": args.checkpoint_every, "device": args.device,
               "precision": args.precision, "patch_size": args.patch}
    config = RetrainConfig()
    if args.config:
        config = with_overrides(config, load_overrides(args.config), args.config)
    config = with_overrides(config, {name: value for name, value in options.items() if value is not None})
    run = RunFolder(args.out)
    with Cancellation().on_signals() as cancellation, on_main_rank(run.exclusive()):
        weights = retrain(discover_cohort(args.cohort), run, config, progress=make_reporter(args.progress),
                          cancellation=cancellation)
    print(f"wrote {weights}", file=sys.stderr if args.progress == "jsonl" else sys.stdout)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .inference import InferenceConfig, load_vnet, predict_to_folder, resolve_device
    from .progress import make_reporter

    model, info = load_vnet(args.model, resolve_device(args.device))
    config = InferenceConfig(patch_size=tuple(args.patch or info.patch_size), stride_xy=args.stride_xy,
                             stride_z=args.stride_z, sw_batch_size=args.sw_batch_size,
                             largest_component=args.largest_component, device=args.device,
                             precision=args.precision)
    out = sys.stderr if args.progress == "jsonl" else sys.stdout
    for path in predict_to_folder(model, info, args.images, args.out, config, make_reporter(args.progress)):
        print(f"wrote {path}", file=out)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate_folders, summarise, write_metrics_csv

    rows = evaluate_folders(args.pred, args.truth, args.classes)
    write_metrics_csv(rows, args.out)
    print(f"wrote {args.out} ({len({row.case for row in rows})} cases)")
    print(f"{'class':>5} {'cases':>5} {'dice':>15} {'jaccard':>15} {'hd95 vox':>15} {'asd vox':>15} {'empty pred':>10}")
    for s in summarise(rows):
        stats = " ".join(f"{m.mean:>7.4f}±{m.std:<7.4f}" for m in (s.dice, s.jaccard, s.hd95_vox, s.asd_vox))
        print(f"{s.class_value:>5} {s.n_cases:>5} {stats} {s.n_pred_empty:>10}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import preset
    from .config_io import load_overrides, to_dict, with_overrides
    from .metrics import SPLIT_DESCRIPTIONS
    from .pipeline import mean_dice, run_pipeline, scored_split
    from .progress import Cancellation, make_reporter

    config = preset(args.preset)
    if args.config:
        config = with_overrides(config, load_overrides(args.config), source=args.config)
    given = (("device", args.device), ("truth_dir", args.truth and str(args.truth)),
             ("estimate", False if args.no_estimate else None))
    overrides = {k: v for k, v in given if v is not None}
    config = with_overrides(config, overrides)
    if args.print_config:
        import json

        print(json.dumps(to_dict(config), indent=2))
        return 0
    cancellation = Cancellation()
    with cancellation.on_signals():
        result = run_pipeline(args.cohort, args.out, config, progress=make_reporter(args.progress),
                              cancellation=cancellation, redo=args.redo, test=args.test)
    lines = [f"report: {result.report}"]
    used = result.config
    for method, metrics in ((used.retrain.method, result.metrics), (used.baseline_method, result.baseline_metrics)):
        if metrics:
            split = scored_split(metrics)
            lines.append(f"mean Dice on the {SPLIT_DESCRIPTIONS[split]} ({method}): {mean_dice(metrics, split):.4f}")
    print("\n".join(lines), file=sys.stderr if args.progress == "jsonl" else sys.stdout)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .config_io import load_overrides
    from .reproduce import RESULTS_CSV, RESULTS_MD, CellFailed, Protocol, grid, la_split, run_grid, write_table

    if not args.table_only:
        if args.data is None:
            raise InputError("--data (the LA folder) is required unless --table-only is given", field="data")
        protocol = Protocol(la_split(args.data, args.test_list, args.dev_test), args.preset,
                            load_overrides(args.config) if args.config else {}, args.unlabeled, args.config)
        try:
            run_grid(protocol, grid(args.labeled, args.methods, args.seeds), args.out, args.device, args.progress)
        except CellFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_status
    print(write_table(args.out), end="", file=sys.stderr if args.progress == "jsonl" else sys.stdout)
    print(f"wrote {args.out / RESULTS_CSV} and {args.out / RESULTS_MD}", file=sys.stderr)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from .config_io import load_overrides, with_overrides
    from .data import discover_cohort
    from .distributed import on_main_rank
    from .progress import Cancellation, make_reporter
    from .runfolder import RunFolder
    from .sam.finetune import FinetuneConfig, finetune

    cohort = discover_cohort(args.cohort)
    preset = FinetuneConfig.small if args.preset == "small" else FinetuneConfig.paper
    config = preset(len(cohort.classes))
    if args.config:
        config = with_overrides(config, load_overrides(args.config), args.config)
    options = {"iterations": args.iterations, "batch_size": args.batch_size, "lr": args.lr, "patch_size": args.patch,
               "seed": args.seed, "checkpoint_every": args.checkpoint_every, "device": args.device,
               "bezier_p": args.bezier_p, "base_checkpoint": args.checkpoint}
    given = {name: value for name, value in options.items() if value is not None}
    if args.random_init:
        given.update(base_checkpoint=None, allow_random_init=True)
    if args.no_mosaic_rot_flip:
        given["mosaic_rot_flip"] = False
    if args.gradient_checkpointing:
        given["sam"] = {"gradient_checkpointing": True}
    config = with_overrides(config, given)
    run = RunFolder(args.out)
    with Cancellation().on_signals() as cancellation, on_main_rank(run.exclusive()):
        weights = finetune(cohort, run, config, make_reporter(args.progress), cancellation)
    print(f"wrote {weights}", file=sys.stderr if args.progress == "jsonl" else sys.stdout)
    return 0


def _cmd_pseudolabel(args: argparse.Namespace) -> int:
    from .config_io import load_overrides, with_overrides
    from .data import discover_cohort
    from .distributed import on_main_rank
    from .progress import Cancellation, make_reporter
    from .runfolder import RunFolder
    from .sam.pseudolabel import PseudoLabelConfig, pseudolabel

    cohort = discover_cohort(args.cohort)
    config = PseudoLabelConfig.small() if args.preset == "small" else PseudoLabelConfig()
    if args.config:
        config = with_overrides(config, load_overrides(args.config), args.config)
    options = {"window": args.window, "overlap": args.overlap, "windows_per_batch": args.windows_per_batch,
               "device": args.device, "redo": args.redo or None}
    config = with_overrides(config, {name: value for name, value in options.items() if value is not None})
    run = RunFolder(args.out)
    with Cancellation().on_signals() as cancellation, on_main_rank(run.exclusive()):
        table = pseudolabel(cohort, run, config, make_reporter(args.progress), cancellation)
    out = sys.stderr if args.progress == "jsonl" else sys.stdout
    print(f"wrote the pseudo-labels of {len(cohort.unlabeled)} cases to {run.pseudolabel_dir}", file=out)
    print(f"confidence (least confident first), {table}:\n{table.read_text(encoding='utf-8')}", end="", file=out)
    return 0


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
    p.add_argument("--patch", type=int, nargs=3, default=list(PAPER_PATCH), metavar=("H", "W", "D"),
                   help="patch size in voxels (default: the paper's LA patch 112 112 80)")
    p.add_argument("--canvas", type=int, default=1024, help="mosaic side in pixels (SAM's input size)")
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
    p.add_argument("--preset", choices=PRESETS, default="paper",
                   help="paper: the paper's settings (a GPU); cpu: real scans on a computer without a GPU (about 20 "
                   "min for 20 volumes); small: toy size for tests and demos, not for real data")
    p.add_argument("--config", type=Path, help="JSON file of option overrides, e.g. {\"retrain\": {\"method\": "
                   "\"sfr_acmt\"}}")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--truth", type=Path, help="folder of true labels of the unlabeled cases, to evaluate against "
                   "(transductive: their images are trained on)")
    _add_test_option(p)
    p.add_argument("--progress", choices=REPORTER_KINDS, default="bar",
                   help="jsonl: one JSON object per line on stdout (the Slicer module's protocol)")
    p.add_argument("--redo", action="append", default=[], metavar="STAGE",
                   help="delete this stage's outputs and those after it, then run (repeatable)")
    p.add_argument("--no-estimate", action="store_true", help="skip timing a few steps of each stage to estimate "
                   "the run time before training (the estimate warns when it exceeds estimate_warn_hours, default 3)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
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
    p.add_argument("--methods", nargs="+", default=["sfr_mt"], choices=_EngineChoices(_method_names),
                   metavar="METHOD", help="re-training methods (several; default sfr_mt): %(choices)s")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337], metavar="SEED",
                   help="seeds of fine-tuning and re-training (several; default 1337)")
    p.add_argument("--unlabeled", type=int, metavar="N", help="cap the unlabeled pool at its first N cases")
    p.add_argument("--preset", choices=PRESETS, default="paper",
                   help="paper: exactly the paper's protocol (a GPU job); another preset runs the same protocol at "
                   "its size, labelled as such in the table")
    p.add_argument("--config", type=Path, help="JSON file of option overrides for every cell, as in run")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
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
    p.add_argument("--method", help="supervised, mt, uamt, acmt, or sfr / sfr_mt / sfr_uamt / sfr_acmt (with the "
                   "cached pseudo-labels; default sfr_mt, the paper's code)")
    p.add_argument("--iterations", type=int, help="default: 6000")
    p.add_argument("--patch", type=int, nargs=3, metavar=("H", "W", "D"), help="default: 112 112 80")
    p.add_argument("--batch-labeled", type=int, help="labeled crops per batch (default 2)")
    p.add_argument("--batch-unlabeled", type=int, help="unlabeled crops per batch (default 2)")
    p.add_argument("--lr", type=float, help="initial learning rate (default 0.01)")
    p.add_argument("--lr-schedule", choices=("step", "poly"), help="default: step (x0.1 every 2500 iterations)")
    p.add_argument("--seed", type=int, help="default: 1337")
    p.add_argument("--checkpoint-every", type=int, help="default: 1000 iterations")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="default: auto (bf16 autocast on CUDA, float32 on the CPU)")
    p.add_argument("--config", type=Path, help="JSON file of RetrainConfig options (the flags above win)")
    _add_progress_option(p)
    p.set_defaults(func=_cmd_retrain)

    p = sub.add_parser("predict", help="segment images with a trained V-Net (sliding window)")
    p.add_argument("--model", type=Path, required=True, help="run folder (its retrain/vnet.pt) or a vnet .pt file")
    p.add_argument("--images", type=Path, nargs="+", required=True, help="image files and/or cohort folders")
    p.add_argument("--out", type=Path, required=True, help="folder for <case>.seg.nrrd and <case>.nii.gz")
    p.add_argument("--patch", type=int, nargs=3, metavar=("H", "W", "D"), help="window (default: training patch)")
    p.add_argument("--stride-xy", type=int, default=18, help="in-plane window stride (default 18)")
    p.add_argument("--stride-z", type=int, default=4, help="slice-axis window stride (default 4)")
    p.add_argument("--sw-batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--largest-component", action="store_true", help="keep each class's largest component")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32 reproduces the reference; bf16 is faster on recent CPUs and GPUs")
    _add_progress_option(p)
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
    p.add_argument("--preset", choices=("paper", "small"), default="paper",
                   help="paper: ViT-B 1024², patches 112 112 80, 6000 iterations, SAM checkpoint sam_vit_b (GPU); "
                   "small: 256² CPU model, patches 64 64 16, 200 iterations, random initialisation (demo/test only)")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--checkpoint", help="base SAM checkpoint: catalog model id or .pth file (default: sam_vit_b "
                      "for --preset paper)")
    base.add_argument("--random-init", action="store_true", help="no SAM checkpoint: random weights (demo/test only)")
    p.add_argument("--iterations", type=int, help="default: 6000 (paper), 200 (small)")
    p.add_argument("--batch-size", type=int, help="patches per iteration (default 2)")
    p.add_argument("--lr", type=float, help="initial AdamW learning rate, poly decay (default 0.001)")
    p.add_argument("--patch", type=int, nargs=3, metavar=("H", "W", "D"), help="patch size (default 112 112 80)")
    p.add_argument("--bezier-p", type=float, help="per-slice Bézier intensity probability (default 0; the "
                   "official code uses 0.5)")
    p.add_argument("--no-mosaic-rot-flip", action="store_true", help="no rot90 + flip of the whole mosaic")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute encoder blocks in the backward "
                   "pass (less memory, more time)")
    p.add_argument("--seed", type=int, help="default: 1337")
    p.add_argument("--checkpoint-every", type=int, help="iterations between resumable checkpoints (default 500)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    p.add_argument("--config", type=Path, help="JSON file of FinetuneConfig options (the flags above win)")
    _add_progress_option(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("pseudolabel", help="pseudo-label the unlabeled cases with the fine-tuned SAM (stage P), "
                       "whole volumes by sliding windows; cached")
    _add_cohort_option(p)
    _add_run_folder_option(p, "(reads its finetune/, writes pseudolabels/)")
    p.add_argument("--preset", choices=("paper", "small"), default="paper",
                   help="window size of the matching finetune preset (112 112 80 or 64 64 16)")
    p.add_argument("--window", type=int, nargs=3, metavar=("H", "W", "D"), help="window size (the re-training "
                   "patch size)")
    p.add_argument("--overlap", type=float, help="fraction of a window shared with its neighbour (default 0.5)")
    p.add_argument("--windows-per-batch", type=int, help="windows per SAM pass (default 2)")
    p.add_argument("--redo", action="store_true", help="recompute cases whose pseudo-labels exist")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    p.add_argument("--config", type=Path, help="JSON file of PseudoLabelConfig options (the flags above win)")
    _add_progress_option(p)
    p.set_defaults(func=_cmd_pseudolabel)
    return parser


class _EngineChoices(Sequence[str]):
    """Option choices from one of the engine's lists, read when an option is checked or help is shown: importing
    where a list lives (the methods' registry, :mod:`SFRSegmentLib.ssl`) takes MONAI, about 2 s, which the other
    commands need not pay."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load

    def __getitem__(self, index):  # type: ignore[override]
        return self._load()[index]

    def __len__(self) -> int:
        return len(self._load())


def _method_names() -> Sequence[str]:
    from .ssl import method_names

    return method_names()


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
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WriteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Cancelled:
        print("cancelled: the last checkpoint is saved; rerun the same command to resume", file=sys.stderr)
        return EXIT_CANCELLED


@contextlib.contextmanager
def _torchrun_group(args: argparse.Namespace) -> Iterator[None]:
    """Under torchrun, join the process group for the command, and let only rank 0 print on stdout (its JSON lines
    stay the one stream a caller parses); errors still reach stderr from every rank."""
    from .distributed import launched_by_torchrun, process_group

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
