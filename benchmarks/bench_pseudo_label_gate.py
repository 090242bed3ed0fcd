"""What ``retrain.pseudo_label_min_volume`` would leave out of SFR's term, against the truth: for each unlabeled
volume of a run whose cohort has true labels on disk (LA, ACDC: ``<case>/label.nrrd`` beside each image), the Dice
of its pseudo-label per class, its share of the smallest labeled volume of each class, and whether the rule at
``--min-volume`` keeps it; then the mean Dice of all, of the kept and of the left-out pseudo-labels.

    python benchmarks/bench_pseudo_label_gate.py --run acc300/la_l4_sfr_mt_s1337 --cohort acc300/la_l4_sfr_mt_s1337/cohort.json
    python benchmarks/bench_pseudo_label_gate.py --run acdc/sfr --cohort acdc/cohort.json --min-volume 0.5

The run needs its pseudo-labels only (``run`` may be stopped once pseudo-labelling has finished).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from SFRSegmentLib import RunFolder, discover_cohort, read_volume  # noqa: E402
from SFRSegmentLib.stages.retrain import class_volumes, plausible_pseudo_labels  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="the run folder holding pseudolabels/")
    parser.add_argument("--cohort", type=Path, required=True, help="the run's cohort (folder or manifest)")
    parser.add_argument("--min-volume", type=float, default=0.5, help="retrain.pseudo_label_min_volume to try")
    args = parser.parse_args()

    cohort, run = discover_cohort(args.cohort), RunFolder(args.run)
    classes = sorted(int(value) for value in cohort.classes)
    smallest = {value: min(class_volumes(case.label, classes)[value] for case in cohort.labeled) for value in classes}
    paths = {case.name: run.pseudo_label(case.name) for case in cohort.unlabeled if run.pseudo_label(case.name).is_file()}
    kept = plausible_pseudo_labels(cohort, paths, args.min_volume)
    means = {}
    for case in cohort.unlabeled:
        if case.name not in paths:
            continue
        predicted = read_volume(paths[case.name]).array
        truth = read_volume(Path(case.image).parent / "label.nrrd").array
        dice = [2.0 * np.count_nonzero((predicted == v) & (truth == v))
                / max(np.count_nonzero(predicted == v) + np.count_nonzero(truth == v), 1) for v in classes]
        volumes = class_volumes(paths[case.name], classes)
        means[case.name] = float(np.mean(dice))
        print(f"{case.name}: Dice {' '.join(f'{d:.2f}' for d in dice)} (mean {means[case.name]:.3f}); share of the "
              f"smallest labeled volume {' '.join(f'{volumes[v] / smallest[v]:.2f}' for v in classes)}; "
              f"{'kept' if case.name in kept else 'LEFT OUT'}")
    for title, names in (("all", list(means)), ("kept", [n for n in means if n in kept]),
                         ("left out", [n for n in means if n not in kept])):
        shown = f"{np.mean([means[n] for n in names]):.3f}" if names else "-"
        print(f"{title}: {len(names)} pseudo-labels, mean Dice {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
