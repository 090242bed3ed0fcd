"""Metrics: MedPy parity (the metric of record) on real LA labels and synthetic cases, empty masks, folders, CSV."""

from __future__ import annotations

import csv
import logging
import math
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest
from medpy.metric import binary as medpy
from scipy import ndimage

from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.volumes import Volume, read_volume, write_volume
from SFRSegmentLib.evaluation.metrics import (
    CSV_COLUMNS,
    SPLIT_COLUMN,
    TEST_SPLIT,
    UNLABELED_SPLIT,
    ClassMetrics,
    MetricRow,
    case_metrics,
    evaluate_cases,
    evaluate_folders,
    summarise,
    summarise_splits,
    write_metrics_csv,
)

LA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"
LA_CASES = ("06SR5RBREL16DQ6M8LWS", "0RZDK210BSMWAA6467LU")
needs_la = pytest.mark.skipif(
    not all((LA_ROOT / case / "label.nrrd").is_file() for case in LA_CASES), reason="../shared/data/LA is not present"
)
LA_MARGIN = 12
"""Voxels kept around the atrium's bounding box: more than any shift below, so np.roll never wraps foreground."""
RTOL = 1e-6


def _medpy_metrics(pred: np.ndarray, truth: np.ndarray, spacing) -> Tuple[float, ...]:
    """The reference numbers, in the order of ClassMetrics."""
    return (
        medpy.dc(pred, truth), medpy.jc(pred, truth),
        medpy.hd95(pred, truth), medpy.asd(pred, truth),
        medpy.hd95(pred, truth, voxelspacing=spacing), medpy.asd(pred, truth, voxelspacing=spacing),
    )


def _ours(metrics: ClassMetrics) -> Tuple[float, ...]:
    return (metrics.dice, metrics.jaccard, metrics.hd95_vox, metrics.asd_vox, metrics.hd95_mm, metrics.asd_mm)


def _assert_matches_medpy(pred: np.ndarray, truth: np.ndarray, spacing) -> ClassMetrics:
    (metrics,) = case_metrics(pred.astype(np.uint8), truth.astype(np.uint8), spacing, [1])
    np.testing.assert_allclose(_ours(metrics), _medpy_metrics(pred, truth, spacing), rtol=RTOL, atol=0)
    assert not metrics.pred_empty and not metrics.truth_empty
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# MedPy parity


def _with_corner_blob(mask: np.ndarray) -> np.ndarray:
    """A spurious 6³ blob in the array corner, far from the atrium and touching the array border."""
    out = mask.copy()
    out[:6, :6, :6] = True
    return out


PERTURBATIONS: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "shifted": lambda m: np.roll(m, (3, -2, 2), axis=(0, 1, 2)),
    "dilated": lambda m: ndimage.binary_dilation(m, iterations=2),
    "eroded": lambda m: ndimage.binary_erosion(m, iterations=2),
    "blob": _with_corner_blob,
}


@pytest.fixture(scope="module")
def la_labels() -> Dict[str, Tuple[np.ndarray, Tuple[float, float, float]]]:
    """The two LA labels as boolean masks cropped to the atrium's bounding box plus a margin, with their spacing."""
    labels = {}
    for case in LA_CASES:
        volume = read_volume(LA_ROOT / case / "label.nrrd")
        mask = volume.array == 1
        lo = np.argwhere(mask).min(axis=0) - LA_MARGIN
        hi = np.argwhere(mask).max(axis=0) + LA_MARGIN + 1
        box = tuple(slice(max(int(a), 0), int(b)) for a, b in zip(lo, hi))
        labels[case] = (mask[box], volume.spacing)
    return labels


@needs_la
@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
@pytest.mark.parametrize("case", LA_CASES)
def test_la_metrics_equal_medpy(la_labels, case: str, perturbation: str) -> None:
    truth, spacing = la_labels[case]
    assert spacing == (0.625, 0.625, 0.625)
    pred = PERTURBATIONS[perturbation](truth)
    metrics = _assert_matches_medpy(pred, truth, spacing)
    assert 0.5 < metrics.dice < 1.0
    np.testing.assert_allclose(metrics.hd95_mm, 0.625 * metrics.hd95_vox, rtol=RTOL)


@needs_la
def test_la_metrics_equal_medpy_with_anisotropic_spacing(la_labels) -> None:
    truth, _ = la_labels[LA_CASES[0]]
    pred = _with_corner_blob(np.roll(truth, (2, 0, -1), axis=(0, 1, 2)))
    _assert_matches_medpy(pred, truth, (0.6, 0.9, 2.5))


def test_pooled_hd95_differs_from_the_larger_directed_percentile() -> None:
    """An outlying blob makes MedPy's pooled HD95 and MONAI's larger directed one disagree; ours must be MedPy's."""
    truth = np.zeros((60, 40, 40), dtype=bool)
    truth[5:25, 10:30, 10:30] = True
    pred = truth.copy()
    pred[45:53, 16:24, 16:24] = True  # 12 % of the prediction's surface, 6 % of both surfaces pooled
    (metrics,) = case_metrics(pred, truth, (1, 1, 1), [1])
    pred_to_truth = ndimage.distance_transform_edt(~_surface(truth))[_surface(pred)]
    truth_to_pred = ndimage.distance_transform_edt(~_surface(pred))[_surface(truth)]
    larger_directed = max(np.percentile(pred_to_truth, 95), np.percentile(truth_to_pred, 95))
    assert 0.0 < metrics.hd95_vox < larger_directed - 1.0
    assert metrics.hd95_vox == pytest.approx(medpy.hd95(pred, truth), rel=RTOL)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1))


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grid = np.indices(shape, dtype=float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


@pytest.mark.parametrize("spacing", [(0.7, 1.3, 3.0), (1.0, 1.0, 1.0)])
def test_synthetic_anisotropic_and_border_touching_cases_equal_medpy(spacing) -> None:
    shape = (40, 36, 20)
    truth = _ellipsoid(shape, (20, 18, 10), (12, 9, 6))
    pred = _ellipsoid(shape, (23, 16, 11), (11, 10, 5))
    pred[30:40, 0:5, 15:20] = True  # a blob in a corner, on the array border
    _assert_matches_medpy(pred, truth, spacing)
    clipped = _ellipsoid(shape, (5, 18, 10), (12, 9, 6))  # cut by the array border, which is surface
    _assert_matches_medpy(clipped, truth, spacing)


def test_hand_computed_single_voxels() -> None:
    truth = np.zeros((5, 5, 8), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[2, 2, 2] = 1
    pred[2, 2, 5] = 1
    (metrics,) = case_metrics(pred, truth, (0.5, 0.5, 2.0), [1])
    assert (metrics.dice, metrics.jaccard) == (0.0, 0.0)
    assert (metrics.hd95_vox, metrics.asd_vox) == (3.0, 3.0)
    assert (metrics.hd95_mm, metrics.asd_mm) == (6.0, 6.0)


def test_asd_is_directed_from_prediction_to_truth() -> None:
    truth = np.zeros((30, 30, 30), dtype=np.uint8)
    truth[5:25, 5:25, 5:25] = 1
    pred = truth.copy()
    pred[0, 0, 0] = 1  # an outlier on the prediction side only
    (with_outlier,) = case_metrics(pred, truth, (1, 1, 1), [1])
    (reversed_roles,) = case_metrics(truth, pred, (1, 1, 1), [1])
    assert with_outlier.asd_vox > 0.0
    assert reversed_roles.asd_vox == 0.0  # every truth surface voxel is on the prediction's surface
    assert with_outlier.hd95_vox == reversed_roles.hd95_vox  # HD95 is symmetric


# ---------------------------------------------------------------------------------------------------------------
# Several classes, empty masks, summary


def _three_class_case() -> Tuple[np.ndarray, np.ndarray]:
    shape = (32, 32, 16)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[_ellipsoid(shape, (10, 10, 8), (6, 6, 4))] = 1
    truth[_ellipsoid(shape, (22, 22, 8), (7, 5, 4))] = 2
    truth[26:30, 2:6, 2:6] = 3
    pred = np.zeros_like(truth)
    pred[_ellipsoid(shape, (11, 9, 8), (6, 7, 4))] = 1
    pred[_ellipsoid(shape, (21, 22, 9), (6, 5, 4))] = 2
    return pred, truth  # class 3 is missed by the prediction


def test_multi_class_rows_per_class_in_the_order_asked() -> None:
    pred, truth = _three_class_case()
    spacing = (0.8, 0.8, 2.0)
    rows = case_metrics(pred, truth, spacing, [2, 1, 3, 4])
    assert [m.class_value for m in rows] == [2, 1, 3, 4]
    for m in rows[:2]:
        c = m.class_value
        np.testing.assert_allclose(_ours(m), _medpy_metrics(pred == c, truth == c, spacing), rtol=RTOL)
    missed, absent = rows[2], rows[3]
    assert (missed.dice, missed.jaccard, missed.pred_empty, missed.truth_empty) == (0.0, 0.0, True, False)
    assert all(math.isnan(v) for v in _ours(missed)[2:])
    assert _ours(absent) == (1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    assert absent.pred_empty and absent.truth_empty


def test_empty_truth_with_a_prediction() -> None:
    truth = np.zeros((8, 8, 8), dtype=np.uint8)
    pred = truth.copy()
    pred[2:4, 2:4, 2:4] = 1
    (m,) = case_metrics(pred, truth, (1, 1, 1), [1])
    assert (m.dice, m.jaccard, m.pred_empty, m.truth_empty) == (0.0, 0.0, False, True)
    assert all(math.isnan(v) for v in (m.hd95_vox, m.asd_vox, m.hd95_mm, m.asd_mm))


def test_summary_means_stds_and_empty_counts() -> None:
    def metrics(dice: float, hd95: float, pred_empty: bool = False, truth_empty: bool = False) -> ClassMetrics:
        return ClassMetrics(1, dice, dice / 2, hd95, hd95 / 3, hd95 * 2, hd95 / 6, pred_empty, truth_empty)

    nan = float("nan")
    rows = [
        MetricRow("a", metrics(0.9, 3.0)),
        MetricRow("b", metrics(0.7, 5.0)),
        MetricRow("c", metrics(0.0, nan, pred_empty=True)),
        MetricRow("a", ClassMetrics(2, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, True, True)),
    ]
    first, second = summarise(rows)
    assert (first.class_value, first.n_cases, first.n_pred_empty, first.n_truth_empty) == (1, 3, 1, 0)
    assert first.dice.mean == pytest.approx(1.6 / 3) and first.dice.n == 3
    assert first.dice.std == pytest.approx(np.std([0.9, 0.7, 0.0], ddof=1))
    assert (first.hd95_vox.mean, first.hd95_vox.n) == (4.0, 2)  # the empty prediction's NaN is left out
    assert first.hd95_vox.std == pytest.approx(np.sqrt(2.0))
    assert first.hd95_mm.mean == 8.0 and first.asd_vox.mean == pytest.approx(4.0 / 3)
    assert (second.class_value, second.n_cases, second.n_pred_empty) == (2, 1, 0)  # correctly absent: not counted
    assert second.dice.mean == 1.0 and math.isnan(second.dice.std)  # one value: no sample std


def test_case_metrics_refuses_mismatched_input() -> None:
    with pytest.raises(InputError, match="shape"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1), [1])
    with pytest.raises(InputError, match="spacing"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1), [1])
    with pytest.raises(InputError, match="spacing"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1), [1])


# ---------------------------------------------------------------------------------------------------------------
# Folders and CSV

SPACING = (0.8, 0.8, 2.0)
FILE_RTOL = 1e-6
"""NIfTI and .seg.nrrd keep the spacing in single precision, so mm distances from files differ in the 8th digit."""


def _write(path: Path, array: np.ndarray, spacing=SPACING) -> None:
    write_volume(Volume(array=array, spacing=spacing, origin=(1.0, -2.0, 3.0)), path)


@pytest.fixture()
def folders(tmp_path: Path) -> Tuple[Path, Path, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """A truth cohort of case folders (one unlabeled, one without prediction) and a folder of prediction files."""
    pred_a, truth_a = _three_class_case()
    truth_b = np.zeros_like(truth_a)
    truth_b[4:12, 4:12, 4:10] = 1
    pred_b = np.roll(truth_b, 2, axis=0)
    truth_dir, pred_dir = tmp_path / "truth", tmp_path / "pred"
    _write(truth_dir / "caseA" / "label.nrrd", truth_a)
    _write(truth_dir / "caseA" / "image.nrrd", truth_a.astype(np.int16) * 100)
    _write(truth_dir / "caseB" / "label.nii.gz", truth_b)
    _write(truth_dir / "caseC" / "label.nrrd", truth_b)  # no prediction: not scored
    _write(truth_dir / "unlabeled" / "image.nrrd", truth_b.astype(np.int16))
    _write(pred_dir / "caseA.seg.nrrd", pred_a)
    _write(pred_dir / "caseB.nii.gz", pred_b)
    (pred_dir / "notes.txt").write_text("not an image")
    return pred_dir, truth_dir, {"caseA": (pred_a, truth_a), "caseB": (pred_b, truth_b)}


def test_evaluate_folders_matches_cases_and_scores_every_class(folders, caplog) -> None:
    pred_dir, truth_dir, arrays = folders
    with caplog.at_level(logging.INFO, logger="SFRSegmentLib.evaluation.metrics"):
        rows = evaluate_folders(pred_dir, truth_dir)
    assert "not scored: caseC" in caplog.text
    assert [(r.case, r.metrics.class_value) for r in rows] == [
        ("caseA", 1), ("caseA", 2), ("caseA", 3), ("caseB", 1), ("caseB", 2), ("caseB", 3)
    ]
    for row in rows:
        pred, truth = arrays[row.case]
        (expected,) = case_metrics(pred, truth, SPACING, [row.metrics.class_value])
        np.testing.assert_allclose(_ours(row.metrics), _ours(expected), rtol=FILE_RTOL)
    assert rows[2].metrics.pred_empty and not rows[2].metrics.truth_empty  # caseA misses class 3
    assert _ours(rows[4].metrics) == (1.0, 1.0, 0.0, 0.0, 0.0, 0.0)  # caseB has no class 2 anywhere
    assert [r.metrics.class_value for r in evaluate_folders(pred_dir, truth_dir, classes=[2])] == [2, 2]


def test_evaluate_folders_reads_prediction_case_folders(folders) -> None:
    _, truth_dir, arrays = folders
    pred_dir = truth_dir.parent / "pred_folders"
    _write(pred_dir / "caseB" / "label.seg.nrrd", arrays["caseB"][0])
    (row,) = evaluate_folders(pred_dir, truth_dir, classes=[1])
    (expected,) = case_metrics(*arrays["caseB"], SPACING, [1])
    assert row.case == "caseB" and _ours(row.metrics) == pytest.approx(_ours(expected), rel=FILE_RTOL)


def test_prediction_without_truth_is_an_input_error(folders) -> None:
    pred_dir, truth_dir, arrays = folders
    _write(pred_dir / "caseZ.nrrd", arrays["caseB"][0])
    with pytest.raises(InputError, match="without a truth.*caseZ"):
        evaluate_folders(pred_dir, truth_dir)


def test_geometry_mismatch_is_an_input_error(folders) -> None:
    pred_dir, truth_dir, arrays = folders
    _write(pred_dir / "caseB.nii.gz", arrays["caseB"][0], spacing=(1.0, 0.8, 2.0))
    with pytest.raises(InputError, match="spacing"):
        evaluate_folders(pred_dir, truth_dir)


def test_ambiguous_case_names_are_input_errors(folders) -> None:
    pred_dir, truth_dir, arrays = folders
    _write(pred_dir / "caseB" / "label.nrrd", arrays["caseB"][0])
    with pytest.raises(InputError, match="caseB.*twice"):
        evaluate_folders(pred_dir, truth_dir)
    shutil.rmtree(pred_dir / "caseB")
    _write(truth_dir / "caseA" / "label.seg.nrrd", arrays["caseA"][1])
    with pytest.raises(InputError, match="several label files"):
        evaluate_folders(pred_dir, truth_dir)


def test_a_case_written_in_two_formats_is_read_from_the_seg_nrrd(folders) -> None:
    pred_dir, truth_dir, arrays = folders
    baseline = {(r.case, r.metrics.class_value): r.metrics.dice for r in evaluate_folders(pred_dir, truth_dir)}
    # `predict` writes <case>.seg.nrrd and <case>.nii.gz; a perfect .seg.nrrd must be the one scored.
    _write(pred_dir / "caseB.seg.nrrd", arrays["caseB"][1])
    rows = evaluate_folders(pred_dir, truth_dir)
    assert {r.metrics.dice for r in rows if r.case == "caseB"} == {1.0}
    assert all(r.metrics.dice == baseline[(r.case, r.metrics.class_value)] for r in rows if r.case != "caseB")
    assert any(d < 1.0 for (case, _), d in baseline.items() if case == "caseB")


def test_empty_prediction_folder_is_an_input_error(tmp_path: Path, folders) -> None:
    _, truth_dir, _ = folders
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no prediction files"):
        evaluate_folders(tmp_path / "empty", truth_dir)


def test_csv_has_the_columns_and_reads_back(folders, tmp_path: Path) -> None:
    pred_dir, truth_dir, _ = folders
    rows = evaluate_folders(pred_dir, truth_dir)
    path = write_metrics_csv(rows, tmp_path / "out" / "metrics.csv")
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.csv"]  # no staging leftovers
    with open(path, newline="") as handle:
        table: List[List[str]] = list(csv.reader(handle))
    assert tuple(table[0]) == CSV_COLUMNS == ("case", "class", "dice", "jaccard", "hd95_vox", "asd_vox", "hd95_mm",
                                              "asd_mm")
    assert len(table) == 1 + len(rows)
    for line, row in zip(table[1:], rows):
        assert line[:2] == [row.case, str(row.metrics.class_value)]
        read_back = [float(v) for v in line[2:]]
        np.testing.assert_array_equal(read_back, _ours(row.metrics))  # NaN read back as NaN, floats exactly
        assert 0.0 <= read_back[0] <= 1.0 and 0.0 <= read_back[1] <= 1.0
    assert table[3][4:] == ["nan"] * 4  # caseA, class 3: missed, distances undefined


def test_a_runs_table_has_a_split_column_and_summaries_per_split(folders, tmp_path: Path) -> None:
    pred_dir, truth_dir, arrays = folders
    unlabeled = evaluate_cases({"caseB": (pred_dir / "caseB.nii.gz", truth_dir / "caseB" / "label.nii.gz")}, [1],
                               UNLABELED_SPLIT)
    test = evaluate_cases({"caseA": (pred_dir / "caseA.seg.nrrd", truth_dir / "caseA" / "label.nrrd"),
                           "caseB": (pred_dir / "caseB.nii.gz", truth_dir / "caseB" / "label.nii.gz")}, [1],
                          TEST_SPLIT)
    assert [(r.case, r.split) for r in test] == [("caseA", TEST_SPLIT), ("caseB", TEST_SPLIT)]
    (expected,) = case_metrics(*arrays["caseA"], SPACING, [1])
    assert _ours(test[0].metrics) == pytest.approx(_ours(expected), rel=FILE_RTOL)

    path = write_metrics_csv(unlabeled + test, tmp_path / "metrics.csv")
    with open(path, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == [SPLIT_COLUMN, *CSV_COLUMNS]
    assert [(r["split"], r["case"]) for r in table] == [("unlabeled", "caseB"), ("test", "caseA"), ("test", "caseB")]

    summaries = summarise_splits(unlabeled + test)
    assert list(summaries) == [TEST_SPLIT, UNLABELED_SPLIT], "held-out test cases first"
    (test_summary,) = summaries[TEST_SPLIT]
    dices = [test[0].metrics.dice, test[1].metrics.dice]
    assert test_summary.n_cases == 2 and test_summary.dice.mean == pytest.approx(np.mean(dices))
    assert test_summary.dice.std == pytest.approx(np.std(dices, ddof=1)) and test_summary.dice.std > 0
    assert summaries[UNLABELED_SPLIT][0].dice.mean == unlabeled[0].metrics.dice


def test_float_predictions_must_hold_whole_class_values(folders) -> None:
    pred_dir, truth_dir, arrays = folders
    pred_b, truth_b = arrays["caseB"]
    (pred_dir / "caseA.seg.nrrd").unlink()
    _write(pred_dir / "caseB.nii.gz", pred_b.astype(np.float32))  # whole values stored as floats: accepted
    (row,) = evaluate_folders(pred_dir, truth_dir, classes=[1])
    (expected,) = case_metrics(pred_b, truth_b, SPACING, [1])
    assert _ours(row.metrics) == pytest.approx(_ours(expected), rel=FILE_RTOL)
    _write(pred_dir / "caseB.nii.gz", pred_b.astype(np.float32) * 0.5)
    with pytest.raises(InputError, match="whole class numbers"):
        evaluate_folders(pred_dir, truth_dir)
