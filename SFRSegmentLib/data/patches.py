"""The numpy intensity and patch steps of training and prediction.

The intensity and augmentation steps follow the reference SFR/UA-MT LA loader: a per-volume z-score of the whole
volume before cropping, the 3D ``RandomRotFlip`` (rot90 in the (i, j) plane, then always a flip of axis 0 or 1) and a
random crop, padding first where the volume is smaller than the patch. They work on plain arrays in the canonical
``[i, j, k]`` order (k = slice axis) and allocate only what they return.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from ..base.choices import SAM_INPUT_SCALINGS



def zscore(array: np.ndarray) -> np.ndarray:
    """A float32 copy with zero mean and unit standard deviation over the whole volume (all zeros if constant).

    Statistics accumulate in float64, so large volumes lose no precision.
    """
    out = np.array(array, dtype=np.float32)
    out -= np.float32(out.mean(dtype=np.float64))
    std = float(np.sqrt(np.mean(np.square(out), dtype=np.float64)))
    if std > 0:
        out /= np.float32(std)
    return out


def normalize_intensities(array: np.ndarray, window: Optional[Sequence[float]] = None) -> np.ndarray:
    """The V-Net's input: :func:`zscore` over the volume without ``window`` (MRI and other relative intensities),
    or for absolute units (CT's Hounsfield units) a float32 copy clipped to ``window``'s (low, high) and
    standardised with its (mean, std), the cohort's foreground statistics (nnU-Net's CT normalisation)."""
    if window is None:
        return zscore(array)
    low, high, mean, std = (np.float32(value) for value in window)
    out = np.clip(np.asarray(array, dtype=np.float32), low, high)
    out -= mean
    out /= std
    return out


UNIT_RANGE_PERCENTILES = (0.5, 99.5)
"""The intensity window :func:`unit_range` maps to [0, 1]: MedSAM's preprocessing of MR and other non-CT images."""


def unit_range(array: np.ndarray) -> np.ndarray:
    """A float32 copy clipped to the volume's 0.5 and 99.5 percentiles and scaled to [0, 1] (all zeros if
    constant): the input convention LiteMedSAM was trained with."""
    low, high = (np.float32(value) for value in np.percentile(array, UNIT_RANGE_PERCENTILES))
    out = np.clip(np.asarray(array, dtype=np.float32), low, high)
    out -= low
    if high > low:
        out /= high - low
    return out


def scale_intensities(array: np.ndarray, scaling: str) -> np.ndarray:
    """``array`` as a network expects it: ``zscore`` (:func:`zscore`) or ``unit_range`` (:func:`unit_range`)."""
    if scaling == "unit_range":
        return unit_range(array)
    if scaling == "zscore":
        return zscore(array)
    raise ValueError(f"unknown intensity scaling {scaling!r}; expected one of {', '.join(SAM_INPUT_SCALINGS)}")


def pad_to_shape(array: np.ndarray, min_shape: Sequence[int], value: float = 0) -> np.ndarray:
    """Pad with ``value``, equally on both sides of each axis (the odd voxel after), until every axis reaches
    ``min_shape``; the array itself when it is already large enough.

    The reference LA loader pads 3 voxels more than needed on each side; the exact amount is enough for cropping.
    """
    _check_rank(array.shape, min_shape)
    missing = [max(int(m) - s, 0) for s, m in zip(array.shape, min_shape)]
    if not any(missing):
        return array
    return np.pad(array, [(m // 2, m - m // 2) for m in missing], mode="constant", constant_values=value)


def crop(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """The block ``array[start : start + size]`` along every axis, as a view."""
    _check_rank(array.shape, size)
    _check_rank(array.shape, start)
    if any(b < 0 or n < 1 or b + n > s for s, b, n in zip(array.shape, start, size)):
        raise ValueError(f"crop of size {tuple(size)} at {tuple(start)} does not fit in shape {array.shape}")
    return array[tuple(slice(int(b), int(b) + int(n)) for b, n in zip(start, size))]


def random_crop_start(shape: Sequence[int], size: Sequence[int], rng: np.random.Generator) -> Tuple[int, ...]:
    """A uniformly random corner for a ``size`` crop inside ``shape``."""
    _check_fits(shape, size)
    return tuple(int(rng.integers(0, s - n + 1)) for s, n in zip(shape, size))


def center_crop_start(shape: Sequence[int], size: Sequence[int]) -> Tuple[int, ...]:
    """The corner of the centred ``size`` crop inside ``shape`` (the odd voxel left over goes after)."""
    _check_fits(shape, size)
    return tuple((int(s) - int(n)) // 2 for s, n in zip(shape, size))


def random_rot_flip(
    image: np.ndarray, label: Optional[np.ndarray], rng: np.random.Generator
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The reference ``RandomRotFlip``: rot90 by k ∈ {0..3} in the (i, j) plane, then a flip of axis 0 or 1.

    The same transform is applied to the image and the label (which may be None). The slice axis k is untouched.
    Returns views (no copy); :func:`sample_patch` copies only the patch.
    """
    k = int(rng.integers(0, 4))
    axis = int(rng.integers(0, 2))

    def transform(array: np.ndarray) -> np.ndarray:
        return np.flip(np.rot90(array, k, axes=(0, 1)), axis=axis)

    return transform(image), None if label is None else transform(label)


def sample_patch(
    image: np.ndarray,
    label: Optional[np.ndarray],
    patch_size: Sequence[int],
    rng: np.random.Generator,
    augment: bool = True,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """A training patch: (rot/flip when ``augment``) → zero-pad to ``patch_size`` → random crop.

    ``image`` should already be z-scored (the reference normalises the whole volume before cropping), so padding
    with 0 pads with the mean; the label is padded with background. Rotating before padding keeps a non-square
    patch size valid after a 90° turn. Returns C-contiguous copies, ready for ``torch.from_numpy``.
    """
    if label is not None and label.shape != image.shape:
        raise ValueError(f"label shape {label.shape} differs from image shape {image.shape}")
    if augment:
        image, label = random_rot_flip(image, label, rng)
    image = pad_to_shape(image, patch_size)
    start = random_crop_start(image.shape, patch_size, rng)
    image_patch = np.array(crop(image, start, patch_size), order="C")
    if label is None:
        return image_patch, None
    return image_patch, np.array(crop(pad_to_shape(label, patch_size), start, patch_size), order="C")


def _check_rank(shape: Sequence[int], other: Sequence[int]) -> None:
    if len(other) != len(shape):
        raise ValueError(f"{tuple(other)} has {len(other)} axes but the array has {len(shape)}")


def _check_fits(shape: Sequence[int], size: Sequence[int]) -> None:
    _check_rank(shape, size)
    if any(n < 1 or n > s for s, n in zip(shape, size)):
        raise ValueError(f"a crop of size {tuple(size)} does not fit in shape {tuple(shape)}")


def synthetic_case(shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """A z-scored-like random image and a label with a centred box of class 1 (class indices), of ``shape``: what
    the stages time their steps on (a step's time does not depend on the voxels)."""
    image = np.random.default_rng(0).standard_normal(tuple(shape)).astype(np.float32)
    label = np.zeros(tuple(shape), dtype=np.uint8)
    label[tuple(slice(size // 4, size - size // 4) for size in shape)] = 1
    return image, label
