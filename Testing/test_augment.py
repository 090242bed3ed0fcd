"""The ``strong`` crop augmentation (SFRSegmentLib.data.augment): geometry, reproducibility, and its place in training."""

import numpy as np
import pytest
import torch

from SFRSegmentLib.data import augment
from SFRSegmentLib.base.choices import AUGMENTATIONS
from SFRSegmentLib.base.config import RetrainConfig, parse_method
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.stages.retrain import TrainingCase, TwoStreamSampler, draw_batch


class _Fixed:
    """A stand-in generator that always draws the upper bound (to build one known transform)."""

    def uniform(self, low, high, size=None):
        return high if size is None else np.full(size, 1.0)


def test_rotation_about_the_slice_axis_keeps_lengths_in_the_plane():
    bar = np.zeros((64, 64, 32), np.float32)
    bar[8:56, 30:34, 14:18] = 1  # 48 voxels along i
    theta = augment._affine(bar.shape, _Fixed())  # +20° about k, +5° about i and j, scale 1
    turned = augment._resample(torch.from_numpy(bar), theta, "bilinear").numpy()
    i, j, k = np.nonzero(turned > 0.5)
    assert (j.max() - j.min()) > 4 + 48 * np.sin(np.radians(15))  # the bar now runs across j too
    assert turned.sum() == pytest.approx(bar.sum(), rel=0.05)  # volume kept: rotation, no scaling
    identity = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(augment._resample(torch.from_numpy(bar), identity, "nearest").numpy(), bar)


def test_augmented_crops_are_reproducible_and_targets_stay_class_indices():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(48, 48, 32)).astype(np.float32)
    target = np.zeros((48, 48, 32), np.uint8)
    target[10:30, 12:36, 8:24] = 2
    first = augment.augment_crop(image, target, np.random.default_rng(7))
    again = augment.augment_crop(image, target, np.random.default_rng(7))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    changed = 0
    for seed in range(12):
        out_image, out_target = augment.augment_crop(image, target, np.random.default_rng(seed))
        assert out_image.shape == image.shape and out_image.dtype == np.float32 and out_image.flags.c_contiguous
        assert out_target.dtype == np.uint8 and set(np.unique(out_target)) <= {0, 2}
        changed += not np.array_equal(out_image, image)
    assert changed >= 10  # with these probabilities almost every crop is altered
    alone, none = augment.augment_crop(image, None, np.random.default_rng(7))
    assert none is None and np.array_equal(alone, first[0])  # a crop without target draws the same transform


def test_strong_augmentation_changes_batches_but_not_their_shapes():
    rng = np.random.default_rng(1)
    case = TrainingCase("a", rng.normal(size=(40, 40, 20)).astype(np.float32),
                        (rng.random((40, 40, 20)) > 0.5).astype(np.uint8))
    batches = {}
    for kind in AUGMENTATIONS:
        config = RetrainConfig(**parse_method("supervised"), patch_size=(32, 32, 16), augmentation=kind)
        sampler = TwoStreamSampler(1, 0, 2, 0)
        batches[kind] = draw_batch([case], [], sampler, np.random.default_rng(3), config, False, torch.device("cpu"))
    reference, strong = batches["reference"], batches["strong"]
    assert strong.images.shape == reference.images.shape == (2, 1, 32, 32, 16)
    assert strong.labels.shape == reference.labels.shape and not torch.equal(strong.images, reference.images)
    with pytest.raises(InputError, match="unknown augmentation .heavy.; expected one of reference, strong"):
        RetrainConfig(augmentation="heavy")


def test_in_plane_only_never_mixes_thick_slices():
    """Each slice of a thick-slice crop holds its own class; augmented in-plane only, every output slice holds only
    its own class (or the zero fill), while the full 3D affine mixes neighbouring slices."""
    target = np.broadcast_to(np.arange(1, 9, dtype=np.uint8), (48, 48, 8)).copy()
    image = target.astype(np.float32)
    mixed = False
    for seed in range(12):
        _, flat = augment.augment_crop(image, target, np.random.default_rng(seed), in_plane_only=True)
        for k in range(8):
            assert set(np.unique(flat[:, :, k])) <= {0, k + 1}
        _, free = augment.augment_crop(image, target, np.random.default_rng(seed))
        mixed |= any(set(np.unique(free[:, :, k])) - {0, k + 1} for k in range(8))
    assert mixed
