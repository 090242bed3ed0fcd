"""Correct and retrain on real LA scans at the ``cpu`` preset: the full run's time, the update's time after correcting
the least confident unlabeled case, and the mean Dice on held-out cases before and after.

Split (as ``bench_accuracy.py``): the first ``--labeled`` cases of ``train.list`` labeled, the next ``--unlabeled``
unlabeled, the last ``--dev-test`` held out (never trained on; the standard ``test.list`` cases are not on this
machine). Steps, each ``python -m SFRSegmentLib run`` in its own process (wall time, peak resident memory):

1. the full run from scratch;
2. the least confident unlabeled case, as the full run ranks its predictions (``predictions/confidence.csv``, the
   review queue), gets its true label, standing in for a clinician's correction;
3. the update: ``run --from FULL`` on the corrected cohort, once per ``--seeds`` value (the re-training seed: the
   update's batches, crops and augmentation), so that the change of Dice can be told from the seed's noise.

Every run is scored on the same held-out cases; the times come from the same invocation, side by side.

Usage (about 12 min on 2 CPU cores, plus 2.5 min per seed; finished runs in ``--out`` are reused)::

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
    from SFRSegmentLib.research.reproduce import measured_run
    from SFRSegmentLib.storage.runfolder import RunFolder

    if (out / "report.html").is_file():
        return sum(json.loads(RunFolder(out).timings.read_text()).values()), 0.0
    preset = [] if "--from" in extra else ["--preset", "cpu"]
    seconds, peak, status = measured_run([sys.executable, "-m", "SFRSegmentLib", "run", "--cohort", str(cohort),
                                          "--out", str(out), *preset, "--progress", "none", *extra])
    if status:
        raise SystemExit(f"run {out} failed with exit status {status}")
    return seconds, peak


def least_confident(run: Path, cohort: Path) -> Tuple[str, Dict[str, float]]:
    """The unlabeled case whose prediction the run is least sure of (its review queue's first row), and every
    unlabeled case's confidence."""
    from SFRSegmentLib.stages.confidence import read_table
    from SFRSegmentLib.data.cohort import discover_cohort
    from SFRSegmentLib.storage.runfolder import RunFolder

    unlabeled = {case.name for case in discover_cohort(cohort).unlabeled}
    confidences = {name: value for name, value in read_table(RunFolder(run).prediction_confidence)
                   if name in unlabeled}
    return min(confidences, key=confidences.get), confidences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=LA_DIR)
    parser.add_argument("--out", type=Path, default=REPO / "bench-update")
    parser.add_argument("--labeled", type=int, default=4)
    parser.add_argument("--unlabeled", type=int, default=16)
    parser.add_argument("--dev-test", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2],
                        help="re-training seeds of the update, one update each (the full run's is 1337)")
    args = parser.parse_args()

    from SFRSegmentLib.evaluation.metrics import mean_dice
    from SFRSegmentLib.research.reproduce import LA_LABEL, cell_cohort, la_split
    from SFRSegmentLib.storage.runfolder import RunFolder

    args.out.mkdir(parents=True, exist_ok=True)
    cohort = cell_cohort(la_split(args.data, dev_test=args.dev_test), args.labeled, args.unlabeled)
    full_cohort = args.out / "cohort.json"
    full_cohort.write_text(json.dumps(cohort, indent=2))
    full = args.out / "full"
    full_s, full_mib = _run(full_cohort, full)

    corrected, confidences = least_confident(full, full_cohort)
    for entry in cohort["cases"]:
        if entry["name"] == corrected:
            entry["label"] = str(args.data / corrected / LA_LABEL)
    corrected_cohort = args.out / "cohort-corrected.json"
    corrected_cohort.write_text(json.dumps(cohort, indent=2))
    updates = []
    for seed in args.seeds:
        settings = args.out / f"update-seed{seed}.json"
        settings.write_text(json.dumps({"retrain": {"seed": seed}}))
        out = args.out / f"update-seed{seed}"
        updates.append((seed, out, *_run(corrected_cohort, out, "--from", str(full), "--config", str(settings))))

    def dice(run: Path) -> float:
        return mean_dice(RunFolder(run).metrics, "test")

    before = dice(full)
    print(f"split: {args.labeled} labeled, {args.unlabeled} unlabeled, {args.dev_test} held-out test cases "
          f"(last of train.list); preset cpu")
    print(f"least confident unlabeled case: {corrected} ({confidences[corrected]:.4f}; others "
          f"{min(v for k, v in confidences.items() if k != corrected):.4f} to {max(confidences.values()):.4f}); "
          "its true label stands in for the correction")
    rows = [("full run", full_s, full_mib, before)]
    rows += [(f"update, seed {seed}", seconds, mib, dice(out)) for seed, out, seconds, mib in updates]
    for name, seconds, mib, value in rows:
        peak = f"peak {mib / 1024:.2f} GiB" if mib else "reused: its timings.json"
        change = "" if name == "full run" else f" ({value - before:+.4f})"
        print(f"{name + ':':<20}{seconds / 60:.1f} min ({peak}), held-out mean Dice {value:.4f}{change}")
    after = [value for *_, value in rows[1:]]
    print(f"updates: held-out mean Dice {sum(after) / len(after):.4f} on average, {min(after):.4f} at worst "
          f"(full run {before:.4f})")
    if full_s:
        print("update / full time: " + ", ".join(f"{seconds / full_s:.2f}" for _, _, seconds, _ in updates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
