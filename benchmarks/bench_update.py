"""Correct and retrain on real LA scans at the ``cpu`` preset: the full run's time, the update's time after correcting
the least confident unlabeled case, and the mean Dice on held-out cases before and after.

Split (as ``bench_accuracy.py``): the first ``--labeled`` cases of ``train.list`` labeled, the next ``--unlabeled``
unlabeled, the last ``--dev-test`` held out (never trained on; the standard ``test.list`` cases are not on this
machine). Steps, each ``python -m SFRSegmentLib run`` in its own process (wall time, peak resident memory):

1. the full run from scratch;
2. the confidence of each unlabeled case under the full run's V-Net (mean over voxels of the largest class
   probability, as the SFR+ confidence); the least confident case gets its true label, standing in for a
   clinician's correction;
3. the update: ``run --from FULL`` on the corrected cohort.

Both runs are scored on the same held-out cases; the two times come from the same invocation, side by side.

Usage (about 25 min on 2 CPU cores; finished runs in ``--out`` are reused)::

    .venv/bin/python benchmarks/bench_update.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, Tuple

REPO = Path(__file__).resolve().parents[1]
LA_DIR = REPO.parent / "shared" / "data" / "LA"


def _run(cohort: Path, out: Path, *extra: str) -> Tuple[float, float]:
    """Wall seconds and peak MiB of one ``run --preset cpu``. A finished run folder is reused: then the seconds are
    the sum its ``timings.json`` recorded for its stages, and the peak is unknown (0)."""
    from SFRSegmentLib.reproduce import measured_run
    from SFRSegmentLib.runfolder import RunFolder

    if (out / "report.html").is_file():
        return sum(json.loads(RunFolder(out).timings.read_text()).values()), 0.0
    preset = [] if "--from" in extra else ["--preset", "cpu"]
    seconds, peak, status = measured_run([sys.executable, "-m", "SFRSegmentLib", "run", "--cohort", str(cohort),
                                          "--out", str(out), *preset, "--progress", "none", *extra])
    if status:
        raise SystemExit(f"run {out} failed with exit status {status}")
    return seconds, peak


def least_confident(run: Path, cohort: Path) -> Tuple[str, Dict[str, float]]:
    """The unlabeled case the run's V-Net is least sure of, and every unlabeled case's confidence."""
    from SFRSegmentLib.config import RunConfig
    from SFRSegmentLib.config_io import with_overrides
    from SFRSegmentLib.data import discover_cohort
    from SFRSegmentLib.inference import predict_volume
    from SFRSegmentLib.runfolder import RunFolder
    from SFRSegmentLib.sfrplus import volume_confidence
    from SFRSegmentLib.vnet import load_vnet
    from SFRSegmentLib.volumes import read_volume

    folder = RunFolder(run)
    config = with_overrides(RunConfig(), json.loads(folder.config.read_text()))
    model, info = load_vnet(folder.vnet_weights)
    inference = config.inference.for_model(info.patch_size)
    confidences = {}
    for case in discover_cohort(cohort).unlabeled:
        _, probabilities = predict_volume(model, read_volume(case.image), inference, info.classes, info.spacing)
        confidences[case.name] = volume_confidence(probabilities)
    return min(confidences, key=confidences.get), confidences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=LA_DIR)
    parser.add_argument("--out", type=Path, default=REPO / "bench-update")
    parser.add_argument("--labeled", type=int, default=4)
    parser.add_argument("--unlabeled", type=int, default=16)
    parser.add_argument("--dev-test", type=int, default=16)
    args = parser.parse_args()

    from SFRSegmentLib.pipeline import mean_dice
    from SFRSegmentLib.reproduce import LA_LABEL, cell_cohort, la_split
    from SFRSegmentLib.runfolder import RunFolder

    args.out.mkdir(parents=True, exist_ok=True)
    cohort = cell_cohort(la_split(args.data, dev_test=args.dev_test), args.labeled, args.unlabeled)
    full_cohort = args.out / "cohort.json"
    full_cohort.write_text(json.dumps(cohort, indent=2))
    full_s, full_mib = _run(full_cohort, args.out / "full")

    corrected, confidences = least_confident(args.out / "full", full_cohort)
    for entry in cohort["cases"]:
        if entry["name"] == corrected:
            entry["label"] = str(args.data / corrected / LA_LABEL)
    corrected_cohort = args.out / "cohort-corrected.json"
    corrected_cohort.write_text(json.dumps(cohort, indent=2))
    update_s, update_mib = _run(corrected_cohort, args.out / "update", "--from", str(args.out / "full"))

    before, after = (mean_dice(RunFolder(args.out / name).metrics, "test") for name in ("full", "update"))
    print(f"split: {args.labeled} labeled, {args.unlabeled} unlabeled, {args.dev_test} held-out test cases "
          f"(last of train.list); preset cpu")
    print(f"least confident unlabeled case: {corrected} ({confidences[corrected]:.4f}; others "
          f"{min(v for k, v in confidences.items() if k != corrected):.4f} to {max(confidences.values()):.4f}); "
          "its true label stands in for the correction")
    for name, seconds, mib, dice in (("full run", full_s, full_mib, before), ("update", update_s, update_mib, after)):
        peak = f"peak {mib / 1024:.2f} GiB" if mib else "reused: its timings.json"
        print(f"{name + ':':<10}{seconds / 60:.1f} min ({peak}), held-out mean Dice {dice:.4f}")
    if full_s and update_s:
        print(f"update / full time: {update_s / full_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
