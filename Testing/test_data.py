"""Cohort discovery (case folders, Decathlon, manifest), checked loading, and the numpy training steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import pytest

from SFRSegmentLib.data.cohort import Case, Cohort, discover_cohort, load_case, validate_cohort
from SFRSegmentLib.data.patches import (
    center_crop_start,
    crop,
    pad_to_shape,
    random_crop_start,
    random_rot_flip,
    sample_patch,
    zscore,
)
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.volumes import Segment, Volume, write_volume

LA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "LA"
"""The shared LA cases beside the repository: case folders plus ``train.list`` and ``README.md``."""
SHAPE = (12, 10, 6)
SPACING = (0.8, 0.8, 1.6)
ORIGIN = (-5.0, 3.0, 12.5)


def _label_array(values=(1,), shape=SHAPE) -> np.ndarray:
    """A label with one small box per value, side by side."""
    array = np.zeros(shape, dtype=np.uint8)
    for n, value in enumerate(values):
        array[1 + 3 * n: 3 + 3 * n, 2:6, 1:4] = value
    return array


def _write_image(path: Path, shape=SHAPE, spacing=SPACING) -> Path:
    array = np.random.default_rng(0).normal(100, 10, shape).astype(np.float32)
    return write_volume(Volume(array, spacing, ORIGIN), path)


def _write_label(path: Path, values=(1,), shape=SHAPE, spacing=SPACING, segments=None) -> Path:
    return write_volume(Volume(_label_array(values, shape), spacing, ORIGIN, segments=segments), path)


def _write_case(root: Path, name: str, labeled: bool = True, values=(1,), label_name: str = "label.nrrd") -> Path:
    _write_image(root / name / "image.nrrd")
    if labeled:
        _write_label(root / name / label_name, values)
    return root / name


def _write_json(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def _raises(path, match: str, field: Optional[str] = None) -> InputError:
    """discover_cohort(path) raises an InputError whose message matches and which names ``field``."""
    with pytest.raises(InputError, match=match) as info:
        discover_cohort(path)
    if field is not None:
        assert info.value.field == field
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# Case folders


def test_case_folders_with_classes_json(tmp_path):
    for name, labeled in (("b", False), ("a", True), ("c", True)):
        _write_case(tmp_path, name, labeled)
    _write_json(tmp_path / "classes.json", {"1": "left atrium"})
    (tmp_path / "notes").mkdir()  # no volume files: not a case
    (tmp_path / "notes" / "readme.txt").write_text("x")
    cohort = discover_cohort(tmp_path)
    assert cohort.source == "case-folders"
    assert cohort.root == tmp_path
    assert [c.name for c in cohort.cases] == ["a", "b", "c"]
    assert [c.name for c in cohort.labeled] == ["a", "c"]
    assert [c.name for c in cohort.unlabeled] == ["b"]
    assert cohort.cases[0] == Case("a", tmp_path / "a" / "image.nrrd", tmp_path / "a" / "label.nrrd")
    assert cohort.cases[1].label is None and not cohort.cases[1].labeled
    assert cohort.classes == {1: "left atrium"}
    assert cohort.ignored == ["notes"]
    summary = cohort.summary().splitlines()
    assert summary[0] == f"Cohort {tmp_path} (case-folders): 3 cases, 2 labeled, 1 unlabeled"
    assert summary[1:] == [
        "Classes: 0 = background, 1 = left atrium",
        "Labeled (2): a, c",
        "Unlabeled (1): b",
        "Ignored folders (no volume file inside): notes",
    ]


def test_case_folder_classes_from_label_values(tmp_path):
    _write_case(tmp_path, "a", values=(1, 3))
    _write_case(tmp_path, "b", values=(2,))
    assert discover_cohort(tmp_path).classes == {1: "class_1", 2: "class_2", 3: "class_3"}


def test_case_folder_classes_from_seg_nrrd_segment_names(tmp_path):
    segments = [Segment(1, "liver", (1.0, 0.0, 0.0)), Segment(2, "spleen", (0.0, 1.0, 0.0))]
    _write_image(tmp_path / "a" / "image.nii.gz")
    _write_label(tmp_path / "a" / "label.seg.nrrd", values=(1, 2), segments=segments)
    cohort = discover_cohort(tmp_path)
    assert cohort.cases[0].label == tmp_path / "a" / "label.seg.nrrd"
    assert cohort.classes == {1: "liver", 2: "spleen"}
    image, label = load_case(cohort.cases[0], cohort.classes)
    assert label.array.dtype == np.uint8
    np.testing.assert_array_equal(label.array, _label_array((1, 2)))
    assert [s.name for s in label.segments] == ["liver", "spleen"]
    assert image.shape == SHAPE


def test_conflicting_segment_names_are_refused(tmp_path):
    for name, segment_name in (("a", "liver"), ("b", "spleen")):
        _write_image(tmp_path / name / "image.nrrd")
        _write_label(tmp_path / name / "label.seg.nrrd", segments=[Segment(1, segment_name, (1.0, 0.0, 0.0))])
    error = _raises(tmp_path, "segment value 1 is 'spleen' here but 'liver' in", "segments")
    assert error.path == tmp_path / "b" / "label.seg.nrrd"


@pytest.mark.skipif(not LA_ROOT.is_dir(), reason="the shared LA data is not available")
def test_la_folder():
    cohort = discover_cohort(LA_ROOT)
    listed = (LA_ROOT / "train.list").read_text().split()
    assert cohort.source == "case-folders" and not cohort.ignored and not cohort.test
    assert [c.name for c in cohort.cases] == sorted(listed)  # the loose train.list and README.md are not cases
    assert len(cohort.labeled) == len(listed) and not cohort.unlabeled
    assert cohort.classes == {1: "class_1"}
    image, label = load_case(cohort.cases[0], cohort.classes)
    assert image.shape == label.shape and image.shape[2] == 88
    assert image.spacing == pytest.approx((0.625, 0.625, 0.625))
    assert label.array.dtype == np.uint8 and set(np.unique(label.array)) == {0, 1}


# ---------------------------------------------------------------------------------------------------------------
# Decathlon


def test_decathlon_msd_nifti(tmp_path):
    for name in ("la_003", "la_004"):
        _write_image(tmp_path / "imagesTr" / f"{name}.nii.gz")
        _write_label(tmp_path / "labelsTr" / f"{name}.nii.gz")
    _write_image(tmp_path / "imagesTs" / "la_001.nii.gz")
    _write_json(tmp_path / "dataset.json", {
        "name": "LeftAtrium",
        "labels": {"0": "background", "1": "left atrium"},
        "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                     for n in ("la_004", "la_003")],
        "test": ["./imagesTs/la_001.nii.gz"],
    })
    for path in (tmp_path, tmp_path / "dataset.json"):
        cohort = discover_cohort(path)
        assert cohort.source == "decathlon" and cohort.root == tmp_path
        assert cohort.classes == {1: "left atrium"}
        assert [(c.name, c.labeled) for c in cohort.cases] == [("la_004", True), ("la_003", True), ("la_001", False)]
        assert cohort.cases[1].label == tmp_path / "./labelsTr/la_003.nii.gz"
    image, label = load_case(cohort.cases[0], cohort.classes)
    assert image.spacing == pytest.approx(SPACING) and image.origin == pytest.approx(ORIGIN)
    np.testing.assert_array_equal(label.array, _label_array())


def test_decathlon_nnunet_v2_pairs_folders(tmp_path):
    _write_image(tmp_path / "imagesTr" / "heart_001_0000.nii.gz")
    _write_label(tmp_path / "labelsTr" / "heart_001.nii.gz", values=(1, 2))
    _write_image(tmp_path / "imagesTr" / "heart_002_0000.nii.gz")  # no label: unlabeled
    _write_image(tmp_path / "imagesTs" / "heart_009_0000.nii.gz")
    _write_json(tmp_path / "dataset.json", {
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "atrium": 1, "ventricle": 2},
        "numTraining": 1, "file_ending": ".nii.gz",
    })
    cohort = discover_cohort(tmp_path)
    assert cohort.classes == {1: "atrium", 2: "ventricle"}
    assert [(c.name, c.labeled) for c in cohort.cases] == [
        ("heart_001", True), ("heart_002", False), ("heart_009", False)]
    assert cohort.cases[0].label == tmp_path / "labelsTr" / "heart_001.nii.gz"


# ---------------------------------------------------------------------------------------------------------------
# Manifest


def test_manifest(tmp_path):
    _write_image(tmp_path / "data" / "a" / "img.nrrd")
    _write_label(tmp_path / "data" / "a" / "lab.nrrd")
    _write_image(tmp_path / "data" / "b.nii.gz")
    manifest = _write_json(tmp_path / "data" / "cohort.json", {
        "classes": {"1": "left atrium"},
        "cases": [{"name": "a", "image": "a/img.nrrd", "label": "a/lab.nrrd"}, {"image": "b.nii.gz"}],
    })
    cohort = discover_cohort(manifest)
    assert cohort.source == "manifest" and cohort.root == tmp_path / "data"
    assert cohort.cases == [
        Case("a", tmp_path / "data" / "a" / "img.nrrd", tmp_path / "data" / "a" / "lab.nrrd"),
        Case("b", tmp_path / "data" / "b.nii.gz", None),
    ]
    assert cohort.classes == {1: "left atrium"}


def test_manifest_without_classes_takes_them_from_the_labels(tmp_path):
    _write_case(tmp_path, "a", values=(2,))
    manifest = _write_json(tmp_path / "m.json", {"cases": [{"image": "a/image.nrrd", "label": "a/label.nrrd"}]})
    cohort = discover_cohort(manifest)
    assert [c.name for c in cohort.cases] == ["image"]
    assert cohort.classes == {2: "class_2"}


# ---------------------------------------------------------------------------------------------------------------
# Held-out test cases


def _cohort_and_test_folders(tmp_path: Path) -> Tuple[Path, Path]:
    """A cohort (a labeled, b unlabeled) and a test folder (t1, t2 labeled), each with loose non-volume files."""
    cohort, test = tmp_path / "cohort", tmp_path / "test"
    _write_case(cohort, "a")
    _write_case(cohort, "b", labeled=False)
    _write_json(cohort / "classes.json", {"1": "left atrium"})
    for name in ("t1", "t2"):
        _write_case(test, name)
    for root in (cohort, test):
        (root / "README.md").write_text("notes")
        (root / "train.list").write_text("a\nb\n")
    return cohort, test


def test_test_folder_of_case_folders(tmp_path):
    cohort_dir, test_dir = _cohort_and_test_folders(tmp_path)
    cohort = discover_cohort(cohort_dir, test=test_dir)
    assert [c.name for c in cohort.cases] == ["a", "b"], "test cases are not training cases"
    assert [c.name for c in cohort.labeled] == ["a"] and [c.name for c in cohort.unlabeled] == ["b"]
    assert cohort.test == [Case(n, test_dir / n / "image.nrrd", test_dir / n / "label.nrrd") for n in ("t1", "t2")]
    assert cohort.classes == {1: "left atrium"} and not cohort.ignored
    summary = cohort.summary().splitlines()
    assert summary[0].endswith("2 cases, 1 labeled, 1 unlabeled, and 2 held-out test cases")
    assert summary[-1] == "Test, held out (2): t1, t2"
    validate_cohort(cohort)
    assert discover_cohort(cohort_dir).test == []


def test_test_folder_in_nnunet_layout(tmp_path):
    cohort_dir, _ = _cohort_and_test_folders(tmp_path)
    test_dir = tmp_path / "nnunet"
    _write_json(test_dir / "dataset.json", {"labels": {"background": 0, "left atrium": 1}})
    _write_image(test_dir / "imagesTr" / "t9_0000.nii.gz")
    _write_label(test_dir / "labelsTr" / "t9.nii.gz")
    cohort = discover_cohort(cohort_dir, test=test_dir)
    assert cohort.test == [Case("t9", test_dir / "imagesTr" / "t9_0000.nii.gz", test_dir / "labelsTr" / "t9.nii.gz")]


def test_manifest_test_list(tmp_path):
    for name in ("a", "t"):
        _write_case(tmp_path, name)
    _write_case(tmp_path, "b", labeled=False)
    manifest = _write_json(tmp_path / "m.json", {
        "cases": [{"name": "a", "image": "a/image.nrrd", "label": "a/label.nrrd"},
                  {"name": "b", "image": "b/image.nrrd"}],
        "test": [{"name": "t", "image": "t/image.nrrd", "label": "t/label.nrrd"}],
    })
    cohort = discover_cohort(manifest)
    assert [c.name for c in cohort.cases] == ["a", "b"]
    assert cohort.test == [Case("t", tmp_path / "t" / "image.nrrd", tmp_path / "t" / "label.nrrd")]
    _write_json(manifest, {"cases": [{"name": "a", "image": "a/image.nrrd", "label": "a/label.nrrd"}],
                           "test": [{"name": "t", "image": "t/image.nrrd", "label": "t/missing.nrrd"}]})
    error = _raises(manifest, r"test\[0\].label: file not found", "test[0].label")
    assert error.path == manifest


def test_unlabeled_test_case_is_refused_naming_its_image(tmp_path):
    cohort_dir, test_dir = _cohort_and_test_folders(tmp_path)
    _write_case(test_dir, "t3", labeled=False)
    with pytest.raises(InputError, match="test case 't3' has no label") as info:
        discover_cohort(cohort_dir, test=test_dir)
    assert info.value.path == test_dir / "t3" / "image.nrrd" and info.value.field == "label"
    manifest = _write_json(tmp_path / "m.json", {"cases": [{"image": "cohort/a/image.nrrd",
                                                            "label": "cohort/a/label.nrrd"}],
                                                  "test": ["test/t3/image.nrrd"]})
    error = _raises(manifest, "test case 'image' has no label", "label")
    assert error.path == test_dir / "t3" / "image.nrrd"


def test_test_case_named_like_a_cohort_case_is_refused_naming_both(tmp_path):
    cohort_dir, test_dir = _cohort_and_test_folders(tmp_path)
    _write_case(test_dir, "b")
    with pytest.raises(InputError, match="test case 'b'.*has the same name as the case 'b'") as info:
        discover_cohort(cohort_dir, test=test_dir)
    assert str(test_dir / "b" / "image.nrrd") in str(info.value) and str(cohort_dir / "b" / "image.nrrd") in str(
        info.value)
    assert info.value.field == "name"
    with pytest.raises(InputError, match="has the same image file as the case 'a'") as info:
        discover_cohort(cohort_dir, test=_write_json(tmp_path / "m.json", {
            "test": [], "cases": [{"name": "copy", "image": "cohort/a/image.nrrd", "label": "cohort/a/label.nrrd"}]}))
    assert info.value.path == cohort_dir / "a" / "image.nrrd"


def test_test_classes_must_be_the_cohorts(tmp_path):
    cohort_dir, test_dir = _cohort_and_test_folders(tmp_path)
    classes = _write_json(test_dir / "classes.json", {"1": "left atrium", "2": "scar"})
    with pytest.raises(InputError, match=r"test classes \[2\] are not among the cohort's classes 1 = left atrium") \
            as info:
        discover_cohort(cohort_dir, test=test_dir)
    assert info.value.path == classes and info.value.field == "classes"
    classes.unlink()
    _write_label(test_dir / "t2" / "label.nrrd", values=(1, 2))  # undeclared: found when the labels are read
    cohort = discover_cohort(cohort_dir, test=test_dir)
    with pytest.raises(InputError) as info:
        validate_cohort(cohort)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{cohort_dir}: 1 of 4 cases have problems:"
    assert lines[1].startswith("  t2 (test): ") and str(test_dir / "t2" / "label.nrrd") in lines[1]
    assert "label values [2] are outside the declared classes [0, 1]" in lines[1]


# ---------------------------------------------------------------------------------------------------------------
# Discovery errors


def test_missing_folder_or_file(tmp_path):
    error = _raises(tmp_path / "nowhere", "no such folder or file")
    assert error.path == tmp_path / "nowhere"


def test_case_folder_without_image(tmp_path):
    _write_case(tmp_path, "a")
    _write_label(tmp_path / "b" / "label.nrrd")
    error = _raises(tmp_path, r"case folder has no image file \(expected image\.<ext>.*found label\.nrrd", "image")
    assert error.path == tmp_path / "b"


def test_misnamed_image_is_reported_not_skipped(tmp_path):
    _write_image(tmp_path / "a" / "img.nrrd")
    _raises(tmp_path, "found img.nrrd", "image")


def test_two_images_in_one_case(tmp_path):
    _write_case(tmp_path, "a")
    _write_image(tmp_path / "a" / "image.nii.gz")
    error = _raises(tmp_path, r"2 image files \(image.nii.gz, image.nrrd\); keep exactly one", "image")
    assert error.path == tmp_path / "a"


def test_no_cases(tmp_path):
    (tmp_path / "truth").mkdir()
    _raises(tmp_path, r"no case folders found.*ignored folders without volume files: truth", "cases")


def test_no_labeled_case(tmp_path):
    _write_case(tmp_path, "a", labeled=False)
    _raises(tmp_path, "no labeled case among the 1 cases", "label")


def test_bad_classes_json(tmp_path):
    _write_case(tmp_path, "a")
    _write_json(tmp_path / "classes.json", {"one": "left atrium"})
    error = _raises(tmp_path, "class value 'one' is not a whole number", "classes")
    assert error.path == tmp_path / "classes.json"
    _write_json(tmp_path / "classes.json", {"300": "too big"})
    _raises(tmp_path, r"class values \[300\] are outside 1..255", "classes")
    (tmp_path / "classes.json").write_text("{not json")
    _raises(tmp_path, "not valid JSON", "json")


def test_dataset_json_without_labels(tmp_path):
    spec = _write_json(tmp_path / "dataset.json", {"training": []})
    error = _raises(tmp_path, 'missing key "labels"', "labels")
    assert error.path == spec


def test_dataset_json_without_training_or_images(tmp_path):
    _write_json(tmp_path / "dataset.json", {"labels": {"0": "background", "1": "atrium"}})
    _raises(tmp_path, 'no "training" list and no imagesTr folder', "training")


def test_dataset_json_region_labels(tmp_path):
    _write_json(tmp_path / "dataset.json", {"labels": {"background": 0, "whole tumour": [1, 2, 3]}})
    _raises(tmp_path, "region-based labels", "labels")


def test_nnunet_second_channel_is_refused(tmp_path):
    _write_image(tmp_path / "imagesTr" / "x_0001.nii.gz")
    _write_json(tmp_path / "dataset.json", {"labels": {"background": 0, "a": 1}})
    error = _raises(tmp_path, "channel 0001: only single-channel images", "channel")
    assert error.path == tmp_path / "imagesTr" / "x_0001.nii.gz"


def test_nnunet_label_without_image(tmp_path):
    _write_image(tmp_path / "imagesTr" / "x_0000.nii.gz")
    _write_label(tmp_path / "labelsTr" / "y.nii.gz")
    _write_json(tmp_path / "dataset.json", {"labels": {"background": 0, "a": 1}})
    _raises(tmp_path, "labels without an image in imagesTr: y", "image")


def test_dataset_json_referenced_file_missing(tmp_path):
    _write_image(tmp_path / "imagesTr" / "a.nii.gz")
    spec = _write_json(tmp_path / "dataset.json", {
        "labels": {"0": "background", "1": "atrium"},
        "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
    })
    error = _raises(tmp_path, r"training\[0\].label: file not found: .*labelsTr/a.nii.gz", "training[0].label")
    assert error.path == spec


def test_manifest_errors(tmp_path):
    _write_case(tmp_path, "a")
    entry = {"name": "a", "image": "a/image.nrrd", "label": "a/label.nrrd"}
    manifest = tmp_path / "m.json"
    _raises(manifest, "no such folder or file")
    _write_json(manifest, {"classes": {"1": "x"}})
    _raises(manifest, 'missing key "cases"', "cases")
    _write_json(manifest, {"cases": [entry, {"image": "b/image.nrrd"}]})
    error = _raises(manifest, r"cases\[1\].image: file not found: .*b/image.nrrd", "cases[1].image")
    assert error.path == manifest
    _write_json(manifest, {"cases": [entry, dict(entry, label=None)]})
    _raises(manifest, "duplicate case names: a; each case needs its own name", "name")
    _write_json(manifest, {"cases": [entry, {"label": "a/label.nrrd"}]})
    _raises(manifest, r'cases\[1\]: expected an image path or an object with "image"', "cases[1]")
    _write_json(manifest, {"cases": []})
    _raises(manifest, "no cases listed", "cases")
    _raises(tmp_path / "a" / "image.nrrd", "expected a cohort folder, a dataset.json or a manifest .json file")


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _cohort_with_label(tmp_path, label: Volume, image: Optional[Volume] = None) -> Cohort:
    image = image or Volume(np.ones(SHAPE, np.float32), SPACING, ORIGIN)
    write_volume(image, tmp_path / "a" / "image.nrrd")
    write_volume(label, tmp_path / "a" / "label.nrrd")
    return Cohort(tmp_path, [Case("a", tmp_path / "a" / "image.nrrd", tmp_path / "a" / "label.nrrd")],
                  {1: "atrium"}, "case-folders")


def test_load_case_returns_checked_volumes(tmp_path):
    _write_image(tmp_path / "a" / "image.nrrd")
    write_volume(Volume(_label_array().astype(np.int16), SPACING, ORIGIN), tmp_path / "a" / "label.nrrd")
    _write_case(tmp_path, "b", labeled=False)
    cohort = discover_cohort(tmp_path)
    image, label = load_case(cohort.cases[0], cohort.classes)
    assert image.path == tmp_path / "a" / "image.nrrd" and image.array.dtype == np.float32
    assert label.path == tmp_path / "a" / "label.nrrd" and label.array.dtype == np.uint8
    np.testing.assert_array_equal(label.array, _label_array())
    assert label.spacing == pytest.approx(SPACING) and label.origin == pytest.approx(ORIGIN)
    assert [(s.value, s.name) for s in label.segments] == [(1, "class_1")]
    assert load_case(cohort.cases[1], cohort.classes)[1] is None
    validate_cohort(cohort)


@pytest.mark.parametrize(
    "label, image, message, field",
    [
        (Volume(_label_array(), (0.8, 0.8, 2.0), ORIGIN), None,
         r"spacing is \(0.8, 0.8, 1.6\) in the image but \(0.8, 0.8, 2\) in the label", "spacing"),
        (Volume(_label_array((1, 2)), SPACING, ORIGIN), None,
         r"label values \[2\] are outside the declared classes \[0, 1\]", "label values"),
        (Volume(np.zeros(SHAPE, np.uint8), SPACING, ORIGIN), None, "the label is empty", "label values"),
        (Volume(_label_array(), SPACING, ORIGIN),
         Volume(np.where(_label_array() > 0, np.nan, 1.0).astype(np.float32), SPACING, ORIGIN),
         r"24 non-finite intensities \(NaN or infinity\), first at voxel \(1, 2, 1\)", "intensity"),
    ],
    ids=["geometry", "values-outside-classes", "empty-label", "non-finite-image"],
)
def test_load_case_errors(tmp_path, label, image, message, field):
    cohort = _cohort_with_label(tmp_path, label, image)
    with pytest.raises(InputError, match=message) as info:
        load_case(cohort.cases[0], cohort.classes)
    assert info.value.field == field
    assert str(tmp_path / "a") in str(info.value)


def test_validate_cohort_lists_every_bad_case(tmp_path):
    _write_case(tmp_path, "good")
    _write_case(tmp_path, "bad1", values=(1, 2))
    _write_image(tmp_path / "bad2" / "image.nrrd")
    write_volume(Volume(np.zeros(SHAPE, np.uint8), SPACING, ORIGIN), tmp_path / "bad2" / "label.nrrd")
    _write_json(tmp_path / "classes.json", {"1": "atrium"})
    with pytest.raises(InputError) as info:
        validate_cohort(discover_cohort(tmp_path))
    lines = str(info.value).splitlines()
    assert lines[0] == f"{tmp_path}: 2 of 3 cases have problems:"
    assert lines[1].startswith("  bad1: ") and "label values [2] are outside" in lines[1]
    assert lines[2].startswith("  bad2: ") and "the label is empty" in lines[2]


def test_load_case_refuses_class_values_beyond_uint8(tmp_path):
    case = Case("a", _write_image(tmp_path / "image.nrrd"), None)
    with pytest.raises(InputError, match=r"class values \[256\] are outside 1..255"):
        load_case(case, {256: "too big"})


# ---------------------------------------------------------------------------------------------------------------
# Numerics


def test_zscore():
    array = np.random.default_rng(1).integers(0, 255, (20, 18, 7)).astype(np.uint8)
    out = zscore(array)
    assert out.dtype == np.float32 and out.shape == array.shape
    assert abs(float(out.mean(dtype=np.float64))) < 1e-6
    assert float(out.std(dtype=np.float64)) == pytest.approx(1.0, abs=1e-6)
    expected = (array - array.mean()) / array.std()
    np.testing.assert_allclose(out, expected, atol=1e-5)
    constant = np.full((4, 4, 4), 7.0)
    np.testing.assert_array_equal(zscore(constant), np.zeros((4, 4, 4), np.float32))
    assert constant[0, 0, 0] == 7.0  # the input is untouched


def test_pad_to_shape():
    array = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5) + 1
    padded = pad_to_shape(array, (6, 4, 2), value=-1)
    assert padded.shape == (6, 4, 5)
    np.testing.assert_array_equal(padded[1:4], array)  # 3 missing: 1 before, 2 after
    assert np.all(padded[[0, 4, 5]] == -1)
    assert pad_to_shape(array, (3, 4, 5)) is array
    with pytest.raises(ValueError, match="has 2 axes but the array has 3"):
        pad_to_shape(array, (3, 4))


def test_crop_and_crop_starts():
    array = np.arange(10 * 8 * 6).reshape(10, 8, 6)
    block = crop(array, (2, 1, 3), (4, 5, 2))
    np.testing.assert_array_equal(block, array[2:6, 1:6, 3:5])
    assert np.shares_memory(block, array)
    with pytest.raises(ValueError, match=r"crop of size \(4, 5, 4\) at \(2, 1, 3\) does not fit"):
        crop(array, (2, 1, 3), (4, 5, 4))
    assert center_crop_start((10, 8, 6), (4, 5, 6)) == (3, 1, 0)
    rng = np.random.default_rng(0)
    starts = np.array([random_crop_start((10, 8, 6), (4, 5, 6), rng) for _ in range(400)])
    assert starts.min(axis=0).tolist() == [0, 0, 0] and starts.max(axis=0).tolist() == [6, 3, 0]
    with pytest.raises(ValueError, match="does not fit in shape"):
        random_crop_start((10, 8, 6), (11, 5, 6), rng)


def _rot_flips(array: np.ndarray):
    """All 8 in-plane rot90-then-flip transforms of an array."""
    return [np.flip(np.rot90(array, k, axes=(0, 1)), axis) for k in range(4) for axis in (0, 1)]


def test_random_rot_flip_keeps_image_and_label_aligned():
    label = np.random.default_rng(2).integers(0, 3, (6, 5, 4)).astype(np.uint8)
    image = label * 10.0 + np.arange(4)[None, None, :] * 0.1  # slice index encoded in the image
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(64):
        out_image, out_label = random_rot_flip(image, label, rng)
        np.testing.assert_array_equal(out_image, out_label * 10.0 + np.arange(4)[None, None, :] * 0.1)
        assert any(np.array_equal(t, out_label) for t in _rot_flips(label)), "not an in-plane rot90 + flip"
        seen.add(out_label.shape)
    assert seen == {(6, 5, 4), (5, 6, 4)}  # odd k swaps the in-plane axes
    out_image, out_label = random_rot_flip(image, None, rng)
    assert out_label is None and out_image.shape[2] == 4


def test_sample_patch():
    rng = np.random.default_rng(4)
    label = rng.integers(0, 2, (14, 9, 7)).astype(np.uint8)
    image = zscore(label * 5.0 + rng.uniform(0, 1, label.shape))  # foreground > 0 > background, padding = 0
    for _ in range(8):
        patch_image, patch_label = sample_patch(image, label, (8, 12, 6), rng)
        assert patch_image.shape == (8, 12, 6) and patch_label.shape == (8, 12, 6)
        assert patch_image.dtype == np.float32 and patch_label.dtype == np.uint8
        assert patch_image.flags.c_contiguous and patch_label.flags.c_contiguous
        np.testing.assert_array_equal(patch_image > 0, patch_label == 1)  # aligned, padding is background


def test_sample_patch_without_augmentation_is_a_plain_crop():
    rng = np.random.default_rng(5)
    image = np.arange(10 * 9 * 8, dtype=np.float32).reshape(10, 9, 8)
    patch, none = sample_patch(image, None, (4, 5, 6), rng, augment=False)
    assert none is None
    start = np.unravel_index(int(patch[0, 0, 0]), image.shape)
    np.testing.assert_array_equal(patch, crop(image, start, (4, 5, 6)))
    patch[...] = -1
    assert image.min() == 0  # a copy, not a view
    with pytest.raises(ValueError, match="label shape"):
        sample_patch(image, np.zeros((10, 9, 7), np.uint8), (4, 5, 6), rng)

