"""Volume I/O and validation: geometry kept exactly, segments kept, bad input named clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SFRSegmentLib.storage.atomic import atomic_path
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.volumes import Segment, Volume, read_volume, write_volume
from SFRSegmentLib.data.validation import check_image, check_label

LA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "LA"
LA_CASE = LA_ROOT / "06SR5RBREL16DQ6M8LWS"
needs_la = pytest.mark.skipif(not LA_CASE.is_dir(), reason="../shared/data/LA is not present")


def _rotation(angle_deg: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(a / 2), 0, np.sin(a / 2)], [0, 1, 0], [-np.sin(a / 2), 0, np.cos(a / 2)]])
    return rz @ ry


def _oblique_volume(dtype=np.int16) -> Volume:
    rng = np.random.default_rng(3)
    return Volume(
        array=rng.integers(-100, 900, size=(7, 5, 4)).astype(dtype),
        spacing=(0.7, 1.1, 2.5),
        origin=(-12.5, 30.25, 7.0),
        direction=_rotation(30.0),
    )


def _assert_same_geometry(a: Volume, b: Volume, atol: float = 0.0) -> None:
    assert a.shape == b.shape
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=atol)


@needs_la
def test_la_case_is_read_in_ijk_order_with_slices_last():
    image = read_volume(LA_CASE / "image.nrrd")
    label = read_volume(LA_CASE / "label.nrrd")
    assert image.shape[2] == 88 and label.shape == image.shape
    assert image.spacing == pytest.approx((0.625, 0.625, 0.625))
    assert image.closest_axis_to_superior == 2
    # pynrrd reads in the same (Fortran, IJK) order: an independent check of the axis order.
    import nrrd

    raw, header = nrrd.read(str(LA_CASE / "image.nrrd"))
    np.testing.assert_array_equal(image.array, raw)
    assert set(np.unique(label.array)) == {0, 1}


@needs_la
@pytest.mark.parametrize("suffix", [".nii.gz", ".seg.nrrd"])
def test_la_case_round_trip_keeps_voxels_and_geometry_exactly(tmp_path, suffix):
    source = LA_CASE / ("label.nrrd" if suffix == ".seg.nrrd" else "image.nrrd")
    original = read_volume(source)
    if suffix == ".seg.nrrd":
        original.segments = [Segment(1, "left atrium", (0.8, 0.2, 0.3))]
    written = write_volume(original, tmp_path / f"case{suffix}")
    back = read_volume(written)
    np.testing.assert_array_equal(back.array, original.array)
    assert back.array.dtype == original.array.dtype
    _assert_same_geometry(back, original)
    if suffix == ".seg.nrrd":
        assert back.segments == [Segment(1, "left atrium", (0.8, 0.2, 0.3))]


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha", ".mhd", ".seg.nrrd"])
def test_oblique_geometry_round_trips_in_every_format(tmp_path, suffix):
    vol = _oblique_volume(np.uint8 if suffix == ".seg.nrrd" else np.int16)
    if suffix == ".seg.nrrd":
        vol.array = (vol.array % 3).astype(np.uint8)
    back = read_volume(write_volume(vol, tmp_path / f"v{suffix}"))
    np.testing.assert_array_equal(back.array, vol.array)
    # NIfTI stores the affine in float32.
    _assert_same_geometry(back, vol, atol=1e-5 if suffix.startswith(".nii") else 1e-9)
    np.testing.assert_allclose(back.ijk_to_lps, vol.ijk_to_lps, atol=1e-4)
    if suffix == ".mhd":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mhd", "v.zraw"]


def test_ijk_to_ras_matches_simpleitk_physical_points():
    vol = _oblique_volume()
    image = sitk.GetImageFromArray(np.transpose(vol.array, (2, 1, 0)))
    image.SetSpacing(vol.spacing)
    image.SetOrigin(vol.origin)
    image.SetDirection(tuple(vol.direction.ravel()))
    for ijk in [(0, 0, 0), (6, 4, 3), (2, 1, 3)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(ijk))
        np.testing.assert_allclose((vol.ijk_to_lps @ [*ijk, 1])[:3], lps, atol=1e-9)
        np.testing.assert_allclose((vol.ijk_to_ras @ [*ijk, 1])[:3], lps * [-1, -1, 1], atol=1e-9)


def test_with_axial_last_keeps_every_voxel_in_place():
    vol = _oblique_volume()
    # Make array axis 0 point along S: rotate the axes so that direction column 0 is (0, 0, 1).
    vol.direction = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert vol.closest_axis_to_superior == 0
    moved = vol.with_axial_last()
    assert moved.closest_axis_to_superior == 2
    assert moved.shape == (vol.shape[1], vol.shape[2], vol.shape[0])
    for ijk in [(1, 2, 3), (6, 4, 0), (0, 0, 0)]:
        new_ijk = (ijk[1], ijk[2], ijk[0])
        assert moved.array[new_ijk] == vol.array[ijk]
        np.testing.assert_allclose(moved.ijk_to_lps @ [*new_ijk, 1], vol.ijk_to_lps @ [*ijk, 1], atol=1e-12)


def test_segmentation_without_segments_gets_default_names(tmp_path):
    vol = Volume(np.zeros((4, 4, 4), np.uint8))
    vol.array[1, 1, 1] = 2
    back = read_volume(write_volume(vol, tmp_path / "s.seg.nrrd"))
    assert [(s.value, s.name) for s in back.segments] == [(2, "Segment_2")]


# --------------------------------------------------------------------------------------------------------------
# Bad input


def test_missing_and_unsupported_files_are_named(tmp_path):
    with pytest.raises(InputError, match="nope.nrrd: file not found"):
        read_volume(tmp_path / "nope.nrrd")
    (tmp_path / "scan.png").write_bytes(b"x")
    with pytest.raises(InputError, match=r"scan.png: unsupported file type; expected one of .*\.nii\.gz"):
        read_volume(tmp_path / "scan.png")


@pytest.mark.parametrize("name", ["broken.nrrd", "broken.nii.gz", "broken.seg.nrrd"])
def test_corrupt_file_is_reported(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n" + b"\0" * 7)
    with pytest.raises(InputError) as info:
        read_volume(path)
    assert name in str(info.value) and "unreadable or corrupt" in str(info.value)


def test_2d_and_4d_and_vector_images_are_rejected(tmp_path):
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(tmp_path / "flat.nrrd"))
    with pytest.raises(InputError, match=r"flat.nrrd: expected a 3D volume, got a 2D image"):
        read_volume(tmp_path / "flat.nrrd")
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkFloat32), str(tmp_path / "time.nii.gz"))
    with pytest.raises(InputError, match=r"time.nii.gz: expected a 3D volume, got a 4D image"):
        read_volume(tmp_path / "time.nii.gz")
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), str(tmp_path / "rgb.mha"))
    with pytest.raises(InputError, match=r"rgb.mha: expected one value per voxel, got 3 components"):
        read_volume(tmp_path / "rgb.mha")
    with pytest.raises(InputError, match=r"a single slice is a 2D image"):
        check_image(Volume(np.zeros((8, 8, 1), np.float32)))


def test_non_finite_intensities_are_located(tmp_path):
    vol = Volume(np.zeros((4, 5, 6), np.float32))
    vol.array[1, 2, 3] = np.nan
    vol.array[3, 4, 5] = np.inf
    back = read_volume(write_volume(vol, tmp_path / "nan.nrrd"))
    with pytest.raises(InputError) as info:
        check_image(back)
    message = str(info.value)
    assert "nan.nrrd" in message and "2 non-finite intensities" in message and "(1, 2, 3)" in message
    assert info.value.field == "intensity"


@pytest.mark.parametrize(
    "field, change, shown",
    [
        ("spacing", dict(spacing=(0.7, 1.1, 3.0)), ["(0.7, 1.1, 2.5)", "(0.7, 1.1, 3)"]),
        ("origin", dict(origin=(-12.5, 30.25, 8.0)), ["(-12.5, 30.25, 7)", "(-12.5, 30.25, 8)"]),
        ("direction", dict(direction=np.eye(3)), ["[(1, 0, 0), (0, 1, 0), (0, 0, 1)]"]),
    ],
)
def test_geometry_mismatch_names_both_files_the_field_and_both_values(tmp_path, field, change, shown):
    image = read_volume(write_volume(_oblique_volume(), tmp_path / "image.nrrd"))
    label_vol = _oblique_volume(np.uint8)
    label_vol.array = np.ones(label_vol.shape, np.uint8)
    for key, value in change.items():
        setattr(label_vol, key, value)
    label_vol.__post_init__()
    label = read_volume(write_volume(label_vol, tmp_path / "label.nrrd"))
    with pytest.raises(InputError) as info:
        check_label(label, [1], image)
    message = str(info.value)
    assert "label.nrrd" in message and "image.nrrd" in message and f"{field} is" in message
    for value in shown:
        assert value in message
    assert info.value.field == field


def test_size_mismatch_is_reported():
    image = Volume(np.zeros((4, 4, 4), np.float32), path=Path("a/image.nrrd"))
    label = Volume(np.ones((4, 4, 5), np.uint8), path=Path("a/label.nrrd"))
    with pytest.raises(InputError, match=r"size is \(4, 4, 4\) in the image but \(4, 4, 5\) in the label"):
        check_label(label, [1], image)


def test_label_values_outside_classes_and_empty_labels_are_rejected():
    label = Volume(np.zeros((4, 4, 4), np.uint8), path=Path("case7/label.nrrd"))
    label.array[0, 0, 0] = 1
    label.array[1, 1, 1] = 3
    with pytest.raises(InputError, match=r"case7/label.nrrd: label values \[3\] are outside the declared classes \[0, 1\]"):
        check_label(label, [1])
    empty = Volume(np.zeros((4, 4, 4), np.uint8), path=Path("case8/label.nrrd"))
    with pytest.raises(InputError, match=r"case8/label.nrrd: the label is empty"):
        check_label(empty, [1])
    fractional = Volume(np.full((4, 4, 4), 0.5, np.float32), path=Path("case9/label.nrrd"))
    with pytest.raises(InputError, match="whole numbers"):
        check_label(fractional, [1])


# --------------------------------------------------------------------------------------------------------------
# Atomic writes


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_partial(tmp_path):
    target = tmp_path / "result.nrrd"
    first = Volume(np.full((3, 3, 3), 7, np.int16))
    write_volume(first, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            raise RuntimeError("disk full")
    np.testing.assert_array_equal(read_volume(target).array, first.array)
    assert [p.name for p in tmp_path.iterdir()] == ["result.nrrd"]
