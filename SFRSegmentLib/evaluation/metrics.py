"""Dice, Jaccard, HD95 and ASD per class, in voxels (the literature's unit) and in millimetres.

Definitions are those of MedPy 0.5 (``medpy.metric.binary``), the metric of record of UA-MT, DTC, MC-Net, BCP and
SFR, reproduced here with scipy so that MedPy is not a runtime dependency:

* Dice ``2|P∩T| / (|P|+|T|)`` and Jaccard ``|P∩T| / |P∪T|``, as fractions in [0, 1];
* the surface of a mask is the mask minus its erosion by the face-connected (6-neighbour) structure, voxels
  outside the array counting as background;
* the directed distances P→T are the Euclidean distances from each surface voxel of P to the nearest surface voxel
  of T (a distance transform, with the voxel spacing for millimetres);
* HD95 is the 95th percentile (linear interpolation) of the directed distances of **both** directions pooled;
  MONAI's ``HausdorffDistanceMetric(percentile=95)`` takes the larger of the two directed percentiles instead, which
  differs when one mask has outliers;
* ASD is the mean of the **directed** distances prediction → truth only (MedPy's ``asd(pred, truth)``; its
  symmetric ``assd`` is a different number).

Empty masks (MedPy raises, the reference code scores an empty prediction as 0 everywhere, which rewards it on HD95
and ASD). Here, per class:

* empty prediction or empty truth, not both: Dice 0, Jaccard 0, HD95 and ASD NaN (undefined), flagged by
  ``pred_empty`` / ``truth_empty``; :func:`summarise` leaves NaN out of the distance means and counts such cases;
* both empty (a correctly absent class): Dice 1, Jaccard 1, HD95 0, ASD 0.

Distances are computed on the joint bounding box of the two masks, which gives exactly the full-array result at a
fraction of the cost (see ``_joint_box``).

A run scores two **splits** (:data:`SPLITS`): the held-out ``test`` cases, never trained on, and the ``unlabeled``
cases whose images trained the model (transductive, when their true labels are given). Its table has a ``split``
column before :data:`CSV_COLUMNS`; :func:`summarise_splits` summarises each split apart.
"""

from __future__ import annotations

import csv
import io as text_io
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..base.errors import InputError, PathLike
from ..data.validation import check_same_geometry
from ..storage.atomic import atomic_write_text
from ..storage.volumes import IMAGE_SUFFIXES, Volume, read_volume, volume_files, volume_stem

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("case", "class", "dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm")
SPLIT_COLUMN = "split"
TEST_SPLIT = "test"
UNLABELED_SPLIT = "unlabeled"
SPLITS = (TEST_SPLIT, UNLABELED_SPLIT)
"""The splits of a run's metrics, in the order they are reported: held-out test cases first."""
SPLIT_DESCRIPTIONS = {TEST_SPLIT: "held-out test cases", UNLABELED_SPLIT: "unlabeled cases (transductive)"}
"""What each split's cases are, as reports and messages name them."""
METRIC_NAMES = ("dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm", "asd_mm")
HD_PERCENTILE = 95.0
CASE_FOLDER_LABEL_STEM = "label"
"""In a case folder ``<case>/``, the label map is the file ``label.<suffix>``."""


@dataclass(frozen=True)
class ClassMetrics:
    """The metrics of one class in one case (see the module docstring for the definitions and empty masks)."""

    class_value: int
    dice: float
    jaccard: float
    hd95_vox: float
    asd_vox: float
    hd95_mm: float
    asd_mm: float
    pred_empty: bool
    truth_empty: bool


@dataclass(frozen=True)
class MetricRow:
    """One line of the metrics table: a case name, the metrics of one class in it, and (in a run) its split."""

    case: str
    metrics: ClassMetrics
    split: Optional[str] = None


@dataclass(frozen=True)
class MetricStat:
    """Mean and sample standard deviation (ddof = 1; NaN below 2 values) over the ``n`` cases where it is defined."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class ClassSummary:
    """Per-class summary over cases; distance statistics leave out the cases where one mask is empty.

    ``n_pred_empty`` counts cases where the class is in the truth but not predicted, ``n_truth_empty`` the reverse
    (cases where the class is absent from both are scored as perfect and counted in neither).
    """

    class_value: int
    n_cases: int
    n_pred_empty: int
    n_truth_empty: int
    dice: MetricStat
    jaccard: MetricStat
    hd95_vox: MetricStat
    asd_vox: MetricStat
    hd95_mm: MetricStat
    asd_mm: MetricStat


# ---------------------------------------------------------------------------------------------------------------
# One case


def case_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], classes: Iterable[int]
) -> List[ClassMetrics]:
    """Metrics of each class value in ``classes`` (in that order) between two label maps on the same grid.

    ``spacing`` is the voxel size along each array axis, in mm, for the ``*_mm`` distances.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise InputError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    sampling = _sampling(spacing, truth.ndim)
    return [_class_metrics(pred == c, truth == c, sampling, int(c)) for c in classes]


def _sampling(spacing: Sequence[float], ndim: int) -> Tuple[float, ...]:
    sampling = tuple(float(s) for s in spacing)
    if len(sampling) != ndim or not all(math.isfinite(s) and s > 0 for s in sampling):
        raise InputError(f"spacing must be {ndim} positive finite voxel sizes, got {tuple(spacing)}")
    return sampling


def _class_metrics(pred: np.ndarray, truth: np.ndarray, sampling: Tuple[float, ...], class_value: int) -> ClassMetrics:
    n_pred, n_truth = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
    if n_pred == 0 and n_truth == 0:
        return _absent_in_both(class_value)
    if n_pred == 0 or n_truth == 0:
        nan = float("nan")
        return ClassMetrics(class_value, 0.0, 0.0, nan, nan, nan, nan, pred_empty=n_pred == 0, truth_empty=n_truth == 0)
    overlap = int(np.count_nonzero(pred & truth))
    dice = 2.0 * overlap / (n_pred + n_truth)
    jaccard = overlap / (n_pred + n_truth - overlap)
    box = _joint_box(pred, truth)
    pred_surface, truth_surface = _surface(pred[box]), _surface(truth[box])
    hd95_vox, asd_vox = _hd95_and_asd(pred_surface, truth_surface, None)
    hd95_mm, asd_mm = _hd95_and_asd(pred_surface, truth_surface, sampling)
    return ClassMetrics(class_value, dice, jaccard, hd95_vox, asd_vox, hd95_mm, asd_mm, False, False)


def _absent_in_both(class_value: int) -> ClassMetrics:
    """A class correctly absent from prediction and truth: perfect overlap, no distance."""
    return ClassMetrics(class_value, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, pred_empty=True, truth_empty=True)


def _joint_box(a: np.ndarray, b: np.ndarray) -> Tuple[slice, ...]:
    """The bounding box of ``a | b``.

    Cropping to it changes no surface voxel: a mask voxel on a face of the box has its outward neighbour outside
    both masks, so it is surface in the whole array too, and the distances only involve voxels inside the box.
    """
    either = a | b
    box = []
    for axis in range(either.ndim):
        other_axes = tuple(ax for ax in range(either.ndim) if ax != axis)
        present = np.flatnonzero(either.any(axis=other_axes))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (or on the array border): MedPy's 1-voxel border."""
    face_connected = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=face_connected, iterations=1)


def _hd95_and_asd(
    pred_surface: np.ndarray, truth_surface: np.ndarray, sampling: Optional[Tuple[float, ...]]
) -> Tuple[float, float]:
    """HD95 of both directed surface distances pooled, and the mean of the pred → truth ones (units of sampling)."""
    pred_to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=sampling)[pred_surface]
    truth_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[truth_surface]
    hd95 = float(np.percentile(np.concatenate((pred_to_truth, truth_to_pred)), HD_PERCENTILE))
    return hd95, float(pred_to_truth.mean())


# ---------------------------------------------------------------------------------------------------------------
# Folders of cases


def evaluate_folders(
    pred_dir: PathLike, truth_dir: PathLike, classes: Optional[Iterable[int]] = None
) -> List[MetricRow]:
    """Metrics of every prediction against the truth of the same case name, case by case, class by class.

    Each folder holds ``<case><suffix>`` files (``.nii.gz``, ``.nrrd``, ``.seg.nrrd``, …) and/or case folders
    ``<case>/label<suffix>`` (case folders without a label are skipped, as unlabeled cases of a cohort). Every
    prediction needs a truth of the same name (InputError otherwise); truths without a prediction are left out
    (and logged), so a folder of test predictions can be scored against a whole labeled cohort. Prediction and truth
    must share the voxel grid; distances in mm use the truth's spacing.

    ``classes=None`` scores every non-zero value found in any truth or prediction; a class absent from both in a case
    gets the both-empty row (Dice 1, distances 0). Rows are ordered by case name, then class.
    """
    predictions = find_label_files(Path(pred_dir), "prediction")
    truths = find_label_files(Path(truth_dir), "truth")
    if not predictions:
        raise InputError(f"no prediction files found (expected <case>{{{', '.join(IMAGE_SUFFIXES)}}} files or "
                         f"<case>/{CASE_FOLDER_LABEL_STEM}.* folders)", pred_dir)
    unmatched = sorted(set(predictions) - set(truths))
    if unmatched:
        raise InputError(
            f"{len(unmatched)} prediction(s) without a truth of the same case name in {truth_dir}: "
            f"{', '.join(unmatched)}",
            pred_dir,
        )
    unscored = sorted(set(truths) - set(predictions))
    if unscored:
        logger.info("%d truth case(s) have no prediction and are not scored: %s", len(unscored), ", ".join(unscored))

    return evaluate_cases({case: (predictions[case], truths[case]) for case in predictions}, classes)


def evaluate_cases(
    cases: Mapping[str, Tuple[Path, Path]], classes: Optional[Iterable[int]] = None, split: Optional[str] = None
) -> List[MetricRow]:
    """Metrics of each case's prediction against its truth (``cases``: name → (prediction file, truth file)), rows
    marked with ``split``; ``classes`` and the order of the rows as in :func:`evaluate_folders`."""
    fixed_classes = None if classes is None else [int(c) for c in classes]
    per_case: Dict[str, List[ClassMetrics]] = {}
    for case in sorted(cases):
        prediction_file, truth_file = cases[case]
        truth, pred = read_volume(truth_file), read_volume(prediction_file)
        check_same_geometry(truth, pred)
        truth_labels, pred_labels = _label_array(truth), _label_array(pred)
        case_classes = fixed_classes if fixed_classes is not None else _foreground_values(truth_labels, pred_labels)
        per_case[case] = case_metrics(pred_labels, truth_labels, truth.spacing, case_classes)

    if fixed_classes is None:
        all_classes = sorted({m.class_value for metrics in per_case.values() for m in metrics})
        for case, metrics in per_case.items():
            scored = {m.class_value: m for m in metrics}
            per_case[case] = [scored[c] if c in scored else _absent_in_both(c) for c in all_classes]
    return [MetricRow(case, m, split) for case, metrics in per_case.items() for m in metrics]


def _foreground_values(*label_arrays: np.ndarray) -> List[int]:
    return sorted({int(v) for labels in label_arrays for v in np.unique(labels) if v != 0})


def _label_array(volume: Volume) -> np.ndarray:
    """The volume's voxels as integer class values; InputError for fractional or non-finite ones."""
    array = volume.array
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array
    whole = np.issubdtype(array.dtype, np.floating) and np.all(np.isfinite(array)) and np.all(array == np.round(array))
    if not whole:
        raise InputError(f"expected a label map of whole class numbers, got {array.dtype} values", volume.path,
                         "labels")
    return array.astype(np.int64)


def find_label_files(folder: Path, role: str) -> Dict[str, Path]:
    """Case name → label file for ``<case><suffix>`` files and ``<case>/label<suffix>`` folders in ``folder``."""
    if not folder.is_dir():
        raise InputError(f"{role} folder not found", folder)
    found: Dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # hidden files and the staging folders of atomic writes
        if entry.is_dir():
            case, labels = entry.name, volume_files(entry, CASE_FOLDER_LABEL_STEM)
            if len(labels) > 1:
                raise InputError(f"several label files in one case folder: {', '.join(p.name for p in labels)}",
                                 entry, role)
            if not labels:
                continue
            path = labels[0]
        else:
            case = volume_stem(entry.name)
            if case is None:
                continue
            path = entry
        if case in found:
            if entry.is_dir() or found[case].parent != folder:
                raise InputError(f"case {case!r} appears twice: {found[case]} and {path}", folder, role)
            # The same case in several formats (``predict`` writes .seg.nrrd and .nii.gz): read the preferred one.
            path = min(found[case], path, key=_suffix_rank)
        found[case] = path
    return found


def _suffix_rank(path: Path) -> int:
    """Position of the file's ending in IMAGE_SUFFIXES (.seg.nrrd first): lower is preferred."""
    lower = path.name.lower()
    return next(i for i, suffix in enumerate(IMAGE_SUFFIXES) if lower.endswith(suffix))


# ---------------------------------------------------------------------------------------------------------------
# Table and summary


def write_metrics_csv(rows: Iterable[MetricRow], path: PathLike) -> Path:
    """Write the rows atomically as CSV with the columns of :data:`CSV_COLUMNS`, preceded by :data:`SPLIT_COLUMN`
    when the rows have splits (a run's table); NaN is written as ``nan``."""
    rows = list(rows)
    with_split = any(row.split is not None for row in rows)
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(((SPLIT_COLUMN,) if with_split else ()) + CSV_COLUMNS)
    for row in rows:
        m = row.metrics
        writer.writerow(([row.split or ""] if with_split else []) + [row.case, m.class_value]
                        + [repr(float(getattr(m, name))) for name in METRIC_NAMES])
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def summarise(rows: Iterable[MetricRow]) -> List[ClassSummary]:
    """Per class (ascending): mean and std (ddof = 1) of each metric over the cases where it is defined,
    and how many cases had an empty prediction or an empty truth."""
    by_class: Dict[int, List[ClassMetrics]] = {}
    for row in rows:
        by_class.setdefault(row.metrics.class_value, []).append(row.metrics)
    return [
        ClassSummary(
            class_value=value,
            n_cases=len(metrics),
            n_pred_empty=sum(m.pred_empty and not m.truth_empty for m in metrics),
            n_truth_empty=sum(m.truth_empty and not m.pred_empty for m in metrics),
            **{name: _stat([getattr(m, name) for m in metrics]) for name in METRIC_NAMES},
        )
        for value, metrics in sorted(by_class.items())
    ]


def summarise_splits(rows: Iterable[MetricRow]) -> Dict[Optional[str], List[ClassSummary]]:
    """:func:`summarise` of each split's rows apart, the splits in the order of :data:`SPLITS` (others after)."""
    by_split: Dict[Optional[str], List[MetricRow]] = {}
    for row in rows:
        by_split.setdefault(row.split, []).append(row)
    return {split: summarise(by_split[split]) for split in sorted(by_split, key=split_rank)}


def split_rank(split: Optional[str]) -> int:
    """Sort key that puts splits in the order of :data:`SPLITS`, any other after them."""
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)


def _stat(values: Sequence[float]) -> MetricStat:
    defined = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if defined.size == 0:
        return MetricStat(float("nan"), float("nan"), 0)
    std = float(np.std(defined, ddof=1)) if defined.size > 1 else float("nan")
    return MetricStat(float(defined.mean()), std, int(defined.size))


def scored_split(metrics_csv: Path) -> str:
    """The split a run is judged on: ``test`` when its metrics table has held-out test rows, else ``unlabeled``
    (also for tables from before splits, which scored only the unlabeled cases)."""
    return TEST_SPLIT if TEST_SPLIT in _dice_by_split(metrics_csv) else UNLABELED_SPLIT


def mean_dice(metrics_csv: Path, split: Optional[str] = None) -> float:
    """Mean Dice over the cases and classes of one split of a metrics table (default: :func:`scored_split`)."""
    values = _dice_by_split(metrics_csv)[split or scored_split(metrics_csv)]
    return sum(values) / len(values)


def _dice_by_split(metrics_csv: Path) -> Dict[str, List[float]]:
    by_split: Dict[str, List[float]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            by_split.setdefault(row.get("split") or UNLABELED_SPLIT, []).append(float(row["dice"]))
    return by_split
