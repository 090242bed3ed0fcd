"""Per-case confidence: the mean over a volume's voxels of its largest class probability, and the tables of it.

The paper's SFR+ confidence (docs/sfr-method.md §5, Eq. 8) ranks volumes by how sure a model is of its own
segmentation. A run keeps two tables, least confident first (ties by case name):

* ``RUN/pseudolabels/confidence.csv``: SAM's pseudo-labels (:mod:`SFRSegmentLib.stages.pseudolabel`);
* ``<predictions>/confidence.csv``: the V-Net's predictions (:mod:`SFRSegmentLib.stages.inference`), the review queue a
  clinician corrects from (the least confident prediction first) before an update (:mod:`SFRSegmentLib.run.update`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import numpy as np

from ..base.errors import InputError, PathLike
from ..storage.atomic import atomic_write_text

HEADER = ("case", "confidence")


def volume_confidence(probabilities: np.ndarray, voxels: str = "all") -> float:
    """Mean over voxels of the largest class probability (probabilities (C, ...)); ``foreground`` averages only
    over voxels whose argmax is not the background (0 if there is none)."""
    top = probabilities.max(axis=0)
    if voxels == "all":
        return float(top.mean(dtype=np.float64))
    foreground = probabilities.argmax(axis=0) > 0
    return float(top[foreground].mean(dtype=np.float64)) if foreground.any() else 0.0


def read_table(path: PathLike) -> List[Tuple[str, float]]:
    """The (case, confidence) rows of a confidence table, least confident first (ties by name); InputError naming
    the file when it lacks a column or holds a value that is not a number."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            missing = [name for name in HEADER if name not in (reader.fieldnames or ())]
            if missing:
                raise InputError(f"the confidence table lacks the column(s) {', '.join(missing)}", path,
                                 "confidence")
            rows = [(row["case"], float(row["confidence"])) for row in reader]
    except (ValueError, TypeError, UnicodeDecodeError) as error:
        raise InputError(f"the confidence table cannot be read ({error}): expected the columns case,confidence "
                         "with a number per case", path, "confidence") from None
    return sorted(rows, key=lambda row: (row[1], row[0]))


def write_table(path: PathLike, confidences: Mapping[str, float]) -> None:
    """Write the table of ``confidences`` atomically, unless ``path`` holds exactly it already (a rerun that changed
    nothing leaves the file and its time alone)."""
    path = Path(path)
    rows = sorted(confidences.items(), key=lambda row: (row[1], row[0]))
    text = ",".join(HEADER) + "\n" + "".join(f"{name},{confidence:.6f}\n" for name, confidence in rows)
    if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
        atomic_write_text(path, text)


def recorded(path: PathLike) -> Dict[str, float]:
    """Case → confidence of the table at ``path``; empty when there is none or it cannot be read (its cases are then
    computed again)."""
    try:
        return dict(read_table(path)) if Path(path).is_file() else {}
    except InputError:
        return {}
