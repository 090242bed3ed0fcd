"""Accuracy of the ``cpu`` preset on real cine cardiac MRI (ACDC: right-ventricle cavity, myocardium, left-ventricle
cavity), measured on held-out patients: per-class and mean Dice and 95HD, time and peak memory per method.

Protocol (the semi-supervised literature's ACDC split, ``../shared/data/ACDC/README.md``): the first ``--labeled``
patients of ``train.list`` (both frames of each, so 7 patients = 14 volumes) are labeled, the next
``--unlabeled`` patients unlabeled, and the 10 patients of ``val.list`` (20 volumes) are the held-out test set; a
patient's two frames are always on the same side. Each method is one ``run --preset cpu`` of the engine in its own
process (wall time and peak resident memory from :func:`SFRSegmentLib.research.reproduce.measured_run`); its test predictions
are scored by the run on each volume's own grid (``RUN/metrics.csv``; 95HD in mm, the literature's unit for ACDC).
Finished runs in ``--out`` are reused.

Usage::

    .venv/bin/python benchmarks/bench_acdc.py --methods mt            # 7 labeled + 8 unlabeled patients
    .venv/bin/python benchmarks/bench_acdc.py --methods mt sfr_mt --labeled 3
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from SFRSegmentLib.research.reproduce import measured_run  # noqa: E402

CLASSES = {"1": "right ventricle", "2": "myocardium", "3": "left ventricle"}
LITERATURE = ("Literature, 7 labeled patients, 2D U-Nets on this split (ACDC README): semi-supervised methods 0.85 to "
              "0.90 mean Dice, a fully supervised 2D U-Net with all 70 patients about 0.91.")


def patients(volumes: Sequence[str]) -> List[str]:
    """The patients of a list of ``<patient>_<frame>`` volumes, in the order they first appear."""
    return list(dict.fromkeys(name.split("_")[0] for name in volumes))


def cohort_manifests(data: Path, labeled: int, unlabeled: int, folder: Path) -> Dict[str, Path]:
    """The training cohort and the held-out test manifest of the protocol, written into ``folder``."""
    train = (data / "train.list").read_text().split()
    order = patients(train)
    if labeled + unlabeled > len(order):
        raise SystemExit(f"train.list has {len(order)} patients, fewer than {labeled} + {unlabeled}")
    role = {p: "label" for p in order[:labeled]} | {p: "image" for p in order[labeled:labeled + unlabeled]}

    def entry(name: str, with_label: bool) -> Dict[str, str]:
        found = {"name": name, "image": str(data / name / "image.nrrd")}
        return found | ({"label": str(data / name / "label.nrrd")} if with_label else {})

    cases = [entry(name, role[name.split("_")[0]] == "label") for name in train if name.split("_")[0] in role]
    test = [entry(name, True) for name in (data / "val.list").read_text().split()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"cohort": folder / "cohort.json", "test": folder / "test.json"}
    for key, listed in (("cohort", cases), ("test", test)):
        paths[key].write_text(json.dumps({"classes": CLASSES, "cases": listed}, indent=1))
    return paths


def run_method(method: str, manifests: Dict[str, Path], out: Path) -> Dict[str, float]:
    """One ``run --preset cpu`` with ``method`` (reused when its metrics exist): wall seconds and peak MiB."""
    run = out / method
    record = out / f"{method}.json"
    if record.is_file() and (run / "metrics.csv").is_file():
        return json.loads(record.read_text())
    overrides = out / f"{method}.overrides.json"
    overrides.write_text(json.dumps({"retrain": {"method": method}}))
    command = [sys.executable, "-m", "SFRSegmentLib", "run", "--cohort", str(manifests["cohort"]), "--test",
               str(manifests["test"]), "--out", str(run), "--preset", "cpu", "--config", str(overrides),
               "--progress", "none"]
    wall_s, peak_mib, status = measured_run(command)
    if status:
        raise SystemExit(f"{method}: the run exited with status {status}")
    measured = {"wall_s": wall_s, "peak_rss_mib": peak_mib}
    record.write_text(json.dumps(measured))
    return measured


def summarise(method: str, run: Path, measured: Dict[str, float]) -> List[str]:
    """Table rows of one method: per class and the mean over classes of Dice and 95HD (mm) over the test volumes."""
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r["split"] == "test"]
    timings = json.loads((run / "timings.json").read_text())
    lines, dice_means = [], []
    for value, name in CLASSES.items():
        dice = [float(r["dice"]) for r in rows if r["class"] == value]
        hd95 = [float(r["hd95_mm"]) for r in rows if r["class"] == value and r["hd95_mm"] not in ("", "nan")]
        dice_means.append(statistics.mean(dice))
        lines.append(f"| {method} | {name} | {len(dice)} | {statistics.mean(dice):.4f} ± {statistics.stdev(dice):.4f} "
                     f"| {statistics.mean(hd95) if hd95 else float('nan'):.2f} | | |")
    stages = ", ".join(f"{stage} {seconds / 60:.1f}" for stage, seconds in timings.items() if seconds >= 30)
    lines.append(f"| {method} | **mean** | | **{statistics.mean(dice_means):.4f}** | | "
                 f"{measured['wall_s'] / 60:.1f} ({stages}) | {measured['peak_rss_mib'] / 1024:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "ACDC")
    parser.add_argument("--out", type=Path, default=REPO / "bench-acdc")
    parser.add_argument("--labeled", type=int, default=7, help="labeled patients (both frames each)")
    parser.add_argument("--unlabeled", type=int, default=8, help="unlabeled patients after them")
    parser.add_argument("--methods", nargs="+", default=["mt"])
    args = parser.parse_args()
    out = args.out / f"acdc_l{args.labeled}_u{args.unlabeled}"
    manifests = cohort_manifests(args.data, args.labeled, args.unlabeled, out)
    lines = ["| method | class | test volumes | Dice | 95HD mm | time (min; stages) | peak (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for method in args.methods:
        lines += summarise(method, out / method, run_method(method, manifests, out))
    print(f"ACDC, preset cpu: {args.labeled} labeled + {args.unlabeled} unlabeled patients of train.list, "
          f"test: the 10 patients of val.list (20 volumes)")
    print("\n".join(lines))
    print(LITERATURE)


if __name__ == "__main__":
    main()
