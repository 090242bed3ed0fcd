"""Accuracy of the ``cpu`` preset on real LA scans, measured on held-out cases: Dice, Jaccard, 95HD, ASD, time per
stage and peak memory, for several labeled counts and methods.

It runs the engine's own ``reproduce`` command (:mod:`SFRSegmentLib.reproduce`) on the LA folder with a development
split, so the numbers come from exactly what users run: the first N cases of ``train.list`` labeled, the next
``--unlabeled`` cases unlabeled, and the **last ``--dev-test`` cases of train.list held out** as the test set (never
used by any stage; the standard ``test.list`` cases are not on this machine). Each cell is a ``run --preset cpu``
in its own process (wall time and peak resident memory per cell); the test predictions are scored on each case's
own 0.625 mm grid. Then it prints each cell's time per stage (``RUN/timings.json``) and, with ``--sam-stages``, the
time that the SAM stages of the preset (fine-tuning and pseudo-labelling, ViT-B at 256²) would add on this machine,
measured by the engine's run-time estimate with randomly initialised weights of the same architecture (no
pretrained SAM weights exist here; the time does not depend on the weights).

Usage (about 20 min per cell on 2 CPU cores; cells already finished in ``--out`` are reused)::

    .venv/bin/python benchmarks/bench_accuracy.py                       # 1 and 4 labeled × mt and supervised
    .venv/bin/python benchmarks/bench_accuracy.py --labeled 4 --methods mt --sam-stages
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


def print_sam_stages(args: argparse.Namespace) -> None:
    """What fine-tuning and pseudo-labelling with the preset's SAM would add to a cell with 4 labeled volumes."""
    from SFRSegmentLib.config import preset
    from SFRSegmentLib.data import discover_cohort
    from SFRSegmentLib.estimate import estimate_run
    from SFRSegmentLib.pipeline import remaining_work
    from SFRSegmentLib.reproduce import cell_cohort, la_split
    from SFRSegmentLib.runfolder import RunFolder

    folder = args.out / "sam-stages"
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "cohort.json"
    manifest.write_text(json.dumps(cell_cohort(la_split(args.data, dev_test=args.dev_test), 4, args.unlabeled)))
    cohort = discover_cohort(manifest)
    config = preset("cpu").resolved(len(cohort.classes))  # sfr_mt: both SAM stages, timed with random ViT-B weights
    estimate = estimate_run(cohort, config, remaining_work(cohort, RunFolder(folder / "run"), config))
    print("\nSAM stages of the cpu preset (ViT-B, 256² mosaics of 64×64×16 patches; random weights of the same "
          "architecture), 4 labeled + {} unlabeled LA volumes:".format(args.unlabeled))
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
    if args.sam_stages:
        print_sam_stages(args)
    sys.exit(status)


if __name__ == "__main__":
    main()
