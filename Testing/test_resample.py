"""Resampling to a working spacing and back (SFRSegmentLib.data.resample): geometry, values and round trips."""

import numpy as np
import pytest
import torch

from SFRSegmentLib.base.config import check_spacing
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.volumes import Volume
from SFRSegmentLib.data.resample import to_native_grid, to_working_grid, working_shape


def _rotation() -> np.ndarray:
    angle = np.deg2rad(30)
    return np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])


def _box_corners(volume: Volume) -> np.ndarray:
    """Physical positions of the outer corners of the first and last voxel (the box the grid covers)."""
    lo = -0.5 * np.ones(3)
    hi = np.asarray(volume.shape) - 0.5
    return np.stack([volume.origin + volume.direction @ (np.asarray(volume.spacing) * c) for c in (lo, hi)])


def test_working_grid_covers_the_same_box_with_the_target_spacing():
    image = Volume(np.zeros((201, 150, 88), np.float32), spacing=(0.625, 0.625, 0.625), origin=(10.0, -5.0, 3.0),
                   direction=_rotation())
    working = to_working_grid(image, (1.25, 1.25, 1.25))
    assert working.shape == working_shape(image, (1.25, 1.25, 1.25)) == (100, 75, 44)
    np.testing.assert_allclose(_box_corners(working), _box_corners(image), atol=1e-9)
    np.testing.assert_allclose(working.spacing, (201 * 0.625 / 100, 1.25, 1.25))
    np.testing.assert_array_equal(working.direction, image.direction)


def test_a_linear_ramp_is_sampled_at_the_working_voxel_centres():
    # A ramp in physical x is reproduced exactly by trilinear interpolation inside the box.
    spacing = (0.5, 1.0, 2.0)
    i = np.arange(40, dtype=np.float32)
    image = Volume(np.broadcast_to(i[:, None, None] * spacing[0], (40, 6, 5)).copy(), spacing=spacing)
    working = to_working_grid(image, (2.0, 1.0, 2.0))
    assert working.shape == (10, 6, 5)
    centres = (np.arange(10) * working.spacing[0] + working.origin[0])
    np.testing.assert_allclose(working.array[1:-1, 0, 0], centres[1:-1], atol=1e-5)


def test_label_maps_keep_their_values_and_the_native_grid_is_unchanged():
    label = np.zeros((64, 64, 32), np.uint8)
    label[16:48, 20:40, 8:24] = 3
    volume = Volume(label, spacing=(0.625,) * 3)
    working = to_working_grid(volume, (1.25,) * 3, labels=True)
    assert working.array.dtype == np.uint8 and set(np.unique(working.array)) == {0, 3}
    assert working.array.sum() == pytest.approx(label.sum() / 8, rel=0.05)
    assert to_working_grid(volume, (0.625,) * 3) is volume


def test_probabilities_come_back_on_the_image_grid():
    truth = np.zeros((90, 70, 40), bool)
    truth[20:70, 15:55, 10:30] = True
    image = Volume(truth.astype(np.float32), spacing=(0.625,) * 3)
    working = to_working_grid(image, (1.25,) * 3)
    foreground = torch.from_numpy(working.array)
    probabilities = to_native_grid(torch.stack([1 - foreground, foreground]), image.shape)
    assert tuple(probabilities.shape) == (2, 90, 70, 40)
    back = probabilities.argmax(0).numpy().astype(bool)
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.98


@pytest.mark.parametrize("bad", [(1.0, 1.0), (1.0, 0.0, 1.0), (-1.0, 1.0, 1.0)])
def test_bad_spacings_are_refused_with_the_field_named(bad):
    with pytest.raises(InputError, match="retrain.spacing needs 3 positive") as raised:
        check_spacing(bad, "retrain.spacing")
    assert raised.value.field == "retrain.spacing"
