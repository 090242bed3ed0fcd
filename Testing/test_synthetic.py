"""The synthetic cohort generator: geometry, classes, determinism, the written layout and its discovery."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from SFRSegmentLib.data.cohort import load_case, validate_cohort
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.volumes import read_volume
from SFRSegmentLib.research.synthetic import make_synthetic_cohort, make_synthetic_volume

SIZES = ((40, 48), (40, 48), (20, 24))
SPACING = (0.8, 0.8, 1.6)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    make_synthetic_cohort(out, n_cases=4, n_labeled=2, n_classes=2, seed=7, size_range=SIZES, spacing=SPACING)
    return out


@pytest.mark.parametrize("n_classes", [1, 3])
def test_volume_geometry_and_classes(n_classes):
    image, label = make_synthetic_volume((48, 44, 24), SPACING, n_classes, np.random.default_rng(n_classes))
    assert image.array.dtype == np.float32 and label.array.dtype == np.uint8
    assert image.shape == label.shape == (48, 44, 24)
    assert image.spacing == label.spacing == SPACING
    assert image.origin == label.origin == pytest.approx((-19.2, -17.6, -19.2))
    np.testing.assert_array_equal(image.direction, np.eye(3))
    assert np.all(np.isfinite(image.array))
    assert set(np.unique(label.array)) == set(range(n_classes + 1))
    for value in range(1, n_classes + 1):
        mask = label.array == value
        assert ndimage.label(mask)[1] == 1, f"class {value} is not one connected blob"
        assert mask.sum() > 50
        assert not (mask[[0, -1]].any() or mask[:, [0, -1]].any() or mask[:, :, [0, -1]].any()), "touches border"
    means = [float(image.array[label.array == v].mean()) for v in range(n_classes + 1)]
    assert means == sorted(means) and min(np.diff(means)) > 20  # each class stands out from the one below


def test_shapes_are_defined_in_millimetres():
    """Half the slices at twice the thickness give the same physical blob (the same draws, resampled)."""
    fine = make_synthetic_volume((40, 40, 40), (1.0, 1.0, 1.0), 1, np.random.default_rng(11))[1].array
    thick = make_synthetic_volume((40, 40, 20), (1.0, 1.0, 2.0), 1, np.random.default_rng(11))[1].array
    same_slices = fine[:, :, ::2] > 0
    dice = 2 * np.sum(same_slices & (thick > 0)) / (same_slices.sum() + (thick > 0).sum())
    assert dice > 0.9


def test_volume_is_deterministic_per_seed():
    first = make_synthetic_volume((40, 40, 20), SPACING, 2, np.random.default_rng(3))
    again = make_synthetic_volume((40, 40, 20), SPACING, 2, np.random.default_rng(3))
    other = make_synthetic_volume((40, 40, 20), SPACING, 2, np.random.default_rng(4))
    assert first[0].array.tobytes() == again[0].array.tobytes()
    assert first[1].array.tobytes() == again[1].array.tobytes()
    assert not np.array_equal(first[1].array, other[1].array)


def test_cohort_layout_and_discovery(cohort_dir):
    names = [f"case_{i:03d}" for i in range(4)]
    assert sorted(p.name for p in cohort_dir.iterdir()) == names + ["classes.json", "synthetic.json", "truth"]
    assert json.loads((cohort_dir / "classes.json").read_text()) == {"1": "organ 1", "2": "organ 2"}
    assert json.loads((cohort_dir / "synthetic.json").read_text())["seed"] == 7
    for name in names[:2]:
        assert sorted(p.name for p in (cohort_dir / name).iterdir()) == ["image.nrrd", "label.nrrd"]
    for name in names[2:]:
        assert sorted(p.name for p in (cohort_dir / name).iterdir()) == ["image.nrrd"]
        assert (cohort_dir / "truth" / name / "label.nrrd").is_file()
    assert sorted(p.name for p in (cohort_dir / "truth").iterdir()) == names[2:]

    cohort = make_synthetic_cohort(cohort_dir, n_cases=4, n_labeled=2, n_classes=2, seed=7, size_range=SIZES,
                                   spacing=SPACING)  # regenerating into its own folder is allowed
    assert cohort.source == "case-folders" and cohort.root == cohort_dir
    assert [c.name for c in cohort.labeled] == names[:2]
    assert [c.name for c in cohort.unlabeled] == names[2:]
    assert cohort.classes == {1: "organ 1", 2: "organ 2"}
    assert cohort.ignored == ["truth"]
    validate_cohort(cohort)


def test_cohort_files_have_sizes_spacing_and_classes(cohort_dir):
    shapes = set()
    for name in [f"case_{i:03d}" for i in range(4)]:
        image = read_volume(cohort_dir / name / "image.nrrd")
        label_path = cohort_dir / name / "label.nrrd"
        label = read_volume(label_path if label_path.exists() else cohort_dir / "truth" / name / "label.nrrd")
        assert image.spacing == pytest.approx(SPACING) and label.spacing == pytest.approx(SPACING)
        assert image.origin == pytest.approx(label.origin) and any(o != 0 for o in image.origin)
        assert all(low <= n <= high for n, (low, high) in zip(image.shape, SIZES)), image.shape
        assert label.shape == image.shape
        assert image.array.dtype == np.float32 and label.array.dtype == np.uint8
        assert set(np.unique(label.array)) == {0, 1, 2}
        shapes.add(image.shape)
    assert len(shapes) > 1  # sizes vary per case


def test_cohort_is_byte_identical_per_seed(cohort_dir, tmp_path):
    again = make_synthetic_cohort(tmp_path / "again", n_cases=4, n_labeled=2, n_classes=2, seed=7,
                                  size_range=SIZES, spacing=SPACING)
    other = make_synthetic_cohort(tmp_path / "other", n_cases=4, n_labeled=2, n_classes=2, seed=8,
                                  size_range=SIZES, spacing=SPACING)
    for case, other_case in zip(again.cases, other.cases):
        image = read_volume(case.image).array
        assert image.tobytes() == read_volume(cohort_dir / case.name / "image.nrrd").array.tobytes()
        assert not (image.shape == read_volume(other_case.image).array.shape
                    and np.array_equal(image, read_volume(other_case.image).array))
    labeled = again.labeled[0]
    assert np.array_equal(load_case(labeled, again.classes)[1].array,
                          read_volume(cohort_dir / labeled.name / "label.nrrd").array)


def test_cohort_refuses_foreign_folder_and_bad_parameters(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty and holds no synthetic cohort") as info:
        make_synthetic_cohort(tmp_path, n_cases=2, n_labeled=1, size_range=SIZES)
    assert info.value.field == "out_dir" and (tmp_path / "mine.txt").read_text() == "keep me"
    with pytest.raises(InputError, match=r"n_labeled must be between 1 and n_cases \(2\), got 3"):
        make_synthetic_cohort(tmp_path / "new", n_cases=2, n_labeled=3)
    with pytest.raises(InputError, match="size_range needs"):
        make_synthetic_cohort(tmp_path / "new", size_range=((40, 30), (40, 48), (20, 24)))
    assert not (tmp_path / "new").exists()
