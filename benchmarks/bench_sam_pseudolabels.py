"""How good SAM's pseudo-labels are on real LA scans for one fine-tuning recipe: fine-tune at the cpu preset (plus
``--config`` overrides) on the first ``--labeled`` cases of ``train.list``, pseudo-label held-out cases (the last 16
of ``train.list``, the first ``--cases`` of them) as if they were unlabeled, and score them against their labels.

    python benchmarks/bench_sam_pseudolabels.py --out bench-sam-pl/base
    python benchmarks/bench_sam_pseudolabels.py --out bench-sam-pl/long --config '{"finetune": {"iterations": 300}}'

Prints the Dice of each case, the mean, and the seconds of each stage. Rerunning with the same ``--out`` reuses what
is current (the run folder's provenance), so a pseudo-labelling option alone re-runs only pseudo-labelling.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from SFRSegmentLib import RunFolder, discover_cohort, finetune, load_overrides, preset, pseudolabel  # noqa: E402
from SFRSegmentLib import read_volume, with_overrides  # noqa: E402
from SFRSegmentLib.research.reproduce import cell_cohort, la_split  # noqa: E402

LA = Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"
DEV_TEST = 16


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--la", type=Path, default=LA, help="the LA folder (default: ../shared/data/LA)")
    parser.add_argument("--labeled", type=int, default=4, help="labeled cases SAM is fine-tuned on")
    parser.add_argument("--cases", type=int, default=6, help="held-out cases to pseudo-label and score")
    parser.add_argument("--config", default="{}", help="overrides of the cpu preset: JSON text or a JSON file")
    parser.add_argument("--out", type=Path, required=True, help="folder for the cohort manifest and the run")
    args = parser.parse_args()

    overrides = load_overrides(args.config) if Path(args.config).is_file() else json.loads(args.config)
    manifest = cell_cohort(la_split(args.la, dev_test=DEV_TEST), args.labeled, 1)
    manifest["test"] = manifest["test"][:args.cases]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cohort.json").write_text(json.dumps(manifest, indent=2))
    cohort = discover_cohort(args.out / "cohort.json")
    config = with_overrides(preset("cpu"), overrides).resolved(len(cohort.classes))
    run = RunFolder(args.out / "run")

    start = time.perf_counter()
    finetune(cohort, run, config.finetune)
    tuned = time.perf_counter()
    pseudolabel(cohort, run, config.pseudolabel, cases=list(cohort.test))
    labelled = time.perf_counter()

    dices = []
    for case in cohort.test:
        predicted = read_volume(run.pseudo_label(case.name)).array > 0
        truth = read_volume(case.label).array > 0
        dices.append(2.0 * np.count_nonzero(predicted & truth) / (predicted.sum() + truth.sum()))
        print(f"{case.name}: Dice {dices[-1]:.3f}")
    print(f"mean Dice {np.mean(dices):.4f} over {len(dices)} held-out cases; fine-tuning {tuned - start:.0f} s, "
          f"pseudo-labelling {labelled - tuned:.0f} s (0 when reused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
