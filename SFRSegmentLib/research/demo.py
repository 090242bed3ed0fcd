"""The built-in demo (``python -m SFRSegmentLib demo``): the whole SFR pipeline on a synthetic cohort, on a CPU.

It writes a synthetic cohort (2 labeled, 4 unlabeled cases whose true labels are kept aside), runs the ``small``
preset (fine-tune SAM → pseudo-label → re-train SFR_MT, plus a supervised-only baseline), predicts and evaluates the
unlabeled cases and writes the HTML report. When the LA sample cases are present it also writes the stitch preview
of a real left-atrium MRI at the paper's 112×112×80 patch. Rerunning resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Optional

from ..base.config import preset
from ..base.progress import Cancellation, Progress, TqdmReporter
from ..evaluation.metrics import mean_dice
from ..run.pipeline import run_pipeline
from .preview import write_stitch_preview
from .synthetic import TRUTH_FOLDER, make_synthetic_cohort

LA_ENV = "SFRSEGMENT_LA_DIR"


def find_la_cases() -> Optional[Path]:
    """The LA sample cases: ``$SFRSEGMENT_LA_DIR``, else ``../shared/data/LA`` beside the repository."""
    candidates = [Path(os.environ[LA_ENV])] if LA_ENV in os.environ else []
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "LA")
    return next((c for c in candidates if c.is_dir()), None)


def run_demo(out: Path, progress: Optional[Progress] = None) -> None:
    """Run the demo into ``out``; prints where the report is and supervised-only versus SFR Dice."""
    started = time.perf_counter()
    cohort_dir = out / "synthetic"
    if not cohort_dir.is_dir():
        make_synthetic_cohort(cohort_dir, n_cases=6, n_labeled=2, n_classes=1, seed=0)
    la_root = find_la_cases()
    if la_root is not None:
        la_case = sorted(p for p in la_root.iterdir() if (p / "image.nrrd").is_file())[0]
        la_png = write_stitch_preview(la_case / "image.nrrd", out / "la_mosaic.png",
                                      label_path=la_case / "label.nrrd")
        print(f"LA stitch preview ({la_case.name}, 112x112x80 patch, 9x9 grid in 1024²): {la_png}")

    config = dataclasses.replace(preset("small"), baseline_method="supervised",
                                 truth_dir=str(cohort_dir / TRUTH_FOLDER))
    cancellation = Cancellation()
    with cancellation.on_signals():
        result = run_pipeline(cohort_dir, out / "run", config, progress=progress or TqdmReporter(),
                              cancellation=cancellation)
    print(result.cohort.summary())
    print(f"report: {result.report}")
    print(f"mean Dice on the {len(result.cohort.unlabeled)} unlabeled synthetic cases (their kept-aside truth): "
          f"supervised only {mean_dice(result.baseline_metrics):.4f}, "
          f"SFR ({config.retrain.method}) {mean_dice(result.metrics):.4f}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
