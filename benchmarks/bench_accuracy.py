"""Accuracy of the ``cpu`` preset on real LA scans, measured on held-out cases: Dice, Jaccard, 95HD, ASD, time per
stage and peak memory, for several labeled counts and methods.

It runs the engine's own ``reproduce`` command (:mod:`SFRSegmentLib.research.reproduce`) on the LA folder with a development
split, so the numbers come from exactly what users run: the first N cases of ``train.list`` labeled, the next
``--unlabeled`` cases unlabeled, and the **last ``--dev-test`` cases of train.list held out** as the test set (never
used by any stage; the standard ``test.list`` cases are not on this machine). Each cell is a ``run --preset cpu``
in its own process (wall time and peak resident memory per cell); the test predictions are scored on each case's
own 0.625 mm grid. Then it prints each cell's time per stage (``RUN/timings.json``) and, for every cell of an SFR
method, the fine-tuned SAM's own pseudo-labels of the held-out cases scored the same way (the paper's SFR_FT row:
SAM alone, before re-training; written to ``CELL/sam-alone/``, reused when done). With ``--sam-stages`` it prints
the time the preset's SAM stages take on this machine by the engine's run-time estimate (random weights of the
same architecture).

Usage (about 25 min per cell on 2 CPU cores; cells already finished in ``--out`` are reused)::

    .venv/bin/python benchmarks/bench_accuracy.py                       # 1 and 4 labeled × mt and supervised
    .venv/bin/python benchmarks/bench_accuracy.py --labeled 1 4 --methods sfr_mt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

REPO = Path(__file__).resolve().parents[1]
LA_DIR = REPO.parent / "shared" / "data" / "LA"


def run_grid(args: argparse.Namespace) -> int:
    """The ``reproduce`` grid at ``--preset cpu``; it prints its own table."""
    command = [sys.executable, "-m", "SFRSegmentLib", "reproduce", "--data", str(args.data), "--out", str(args.out),
               "--preset", "cpu", "--dev-test", str(args.dev_test), "--unlabeled", str(args.unlabeled),
               "--labeled", *map(str, args.labeled), "--methods", *args.methods, "--seeds", *map(str, args.seeds),
               "--progress", "none"]
    return subprocess.call(command, cwd=REPO)


def print_stage_times(out: Path) -> None:
    """Each finished cell's seconds per pipeline stage, from its ``timings.json``."""
    rows: List[Sequence[str]] = []
    stages: List[str] = []
    for timings in sorted(out.glob("*/timings.json")):
        seconds = json.loads(timings.read_text())
        stages += [stage for stage in seconds if stage not in stages]
        rows.append((timings.parent.name, seconds))
    if not rows:
        return
    print("\nSeconds per stage (the run's last invocation; a resumed stage counts only its own part):")
    print("| cell | " + " | ".join(stages) + " | total |")
    print("|---" * (len(stages) + 2) + "|")
    for name, seconds in rows:
        print(f"| {name} | " + " | ".join(f"{seconds.get(s, 0):.0f}" for s in stages)
              + f" | {sum(seconds.values()):.0f} |")


def print_sam_alone(out: Path) -> None:
    """Score the fine-tuned SAM of every finished SFR cell on the cell's held-out cases (SFR_FT)."""
    import time

    from SFRSegmentLib.base.config import RunConfig
    from SFRSegmentLib.base.config_io import with_overrides
    from SFRSegmentLib.data.cohort import discover_cohort
    from SFRSegmentLib.evaluation.metrics import evaluate_cases, summarise
    from SFRSegmentLib.stages.pseudolabel import pseudolabel
    from SFRSegmentLib.storage.runfolder import RunFolder

    lines = []
    for weights in sorted(out.glob("*/finetune/sam_trainable.pt")):
        cell = weights.parents[1]
        cohort = discover_cohort(cell / "cohort.json")
        config = with_overrides(RunConfig(), json.loads((cell / "config.json").read_text()))
        alone = RunFolder(cell / "sam-alone")
        started = time.perf_counter()
        pseudolabel(cohort, alone, config.pseudolabel, cases=cohort.test, sam_weights=weights)
        seconds = time.perf_counter() - started
        rows = evaluate_cases({case.name: (alone.pseudo_label(case.name), case.label) for case in cohort.test},
                              sorted(cohort.classes))
        for summary in summarise(rows):
            lines.append(f"| {cell.name} SAM alone | {summary.class_value} | {summary.n_cases} | "
                         f"{100 * summary.dice.mean:.2f} ± {100 * summary.dice.std:.2f} | "
                         f"{100 * summary.jaccard.mean:.2f} | {summary.hd95_vox.mean:.2f} | {summary.asd_vox.mean:.2f} "
                         f"| {seconds:.0f} |")
    if lines:
        print("\nThe fine-tuned SAM alone on the held-out cases (SFR_FT; Dice and Jaccard in %, 95HD and ASD in "
              "voxels; s: pseudo-labelling them, a few when reused):")
        print("| cell | class | cases | Dice | Jaccard | 95HD | ASD | s |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(lines))


def print_sam_stages(args: argparse.Namespace) -> None:
    """What fine-tuning and pseudo-labelling with the preset's SAM would add to a cell with 4 labeled volumes."""
    from SFRSegmentLib.base.config import preset
    from SFRSegmentLib.data.cohort import discover_cohort
    from SFRSegmentLib.run.estimate import estimate_run
    from SFRSegmentLib.run.stages import remaining_work
    from SFRSegmentLib.research.reproduce import cell_cohort, la_split
    from SFRSegmentLib.storage.runfolder import RunFolder

    folder = args.out / "sam-stages"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "cohort.json"
    manifest.write_text(json.dumps(cell_cohort(la_split(args.data, dev_test=args.dev_test), 4, args.unlabeled)))
    cohort = discover_cohort(manifest)
    config = preset("cpu").resolved(len(cohort.classes))  # sfr_mt: both SAM stages, timed with random weights
    estimate = estimate_run(cohort, config, remaining_work(cohort, RunFolder(folder / "run"), config))
    sam = config.finetune.sam
    print(f"\nSAM stages of the cpu preset ({sam.arch}, {sam.image_size}² mosaics of "
          f"{'×'.join(map(str, config.finetune.patch_size))} patches; random weights of the same architecture), "
          f"4 labeled + {args.unlabeled} unlabeled LA volumes:")
    for stage in estimate.stages:
        print("  " + stage.describe())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=LA_DIR, help="LA folder with train.list (default: ../shared)")
    parser.add_argument("--out", type=Path, default=REPO / "bench-accuracy", help="grid folder (cells are reused)")
    parser.add_argument("--labeled", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--methods", nargs="+", default=["mt", "supervised"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument("--unlabeled", type=int, default=16, help="unlabeled volumes after the labeled ones")
    parser.add_argument("--dev-test", type=int, default=16, help="last cases of train.list held out as test set")
    parser.add_argument("--sam-stages", action="store_true", help="also time the preset's SAM stages")
    args = parser.parse_args()
    status = run_grid(args)
    print_stage_times(args.out)
    print_sam_alone(args.out)
    if args.sam_stages:
        print_sam_stages(args)
    sys.exit(status)


if __name__ == "__main__":
    main()
