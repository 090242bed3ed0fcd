"""Checks on images and labels before any work starts; each failure is an InputError naming file, field and values."""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from ..base.errors import InputError
from ..storage.volumes import Volume

# Tolerances follow what Slicer and ITK treat as "the same geometry" for resampling-free overlay.
SPACING_RTOL = 1e-4
ORIGIN_ATOL_MM = 1e-3
DIRECTION_ATOL = 1e-4


def check_image(image: Volume) -> None:
    """A usable intensity volume: 3D, at least 2 voxels along each axis, numeric and finite."""
    if image.array.ndim != 3:
        raise InputError(f"expected a 3D volume, got shape {image.array.shape}", image.path, "dimension")
    if min(image.shape) < 2:
        raise InputError(
            f"expected a 3D volume, got size {image.shape} (a single slice is a 2D image)", image.path, "dimension"
        )
    if not (np.issubdtype(image.array.dtype, np.number) or image.array.dtype == bool):
        raise InputError(f"expected numeric voxels, got dtype {image.array.dtype}", image.path, "dtype")
    if np.issubdtype(image.array.dtype, np.floating):
        bad = ~np.isfinite(image.array)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            raise InputError(
                f"{int(bad.sum())} non-finite intensities (NaN or infinity), first at voxel {first}",
                image.path,
                "intensity",
            )


def check_same_geometry(image: Volume, label: Volume) -> None:
    """The label lies on the image's voxel grid: same size, spacing, origin and direction."""
    fields = (
        ("size", image.shape, label.shape, lambda a, b: tuple(a) == tuple(b)),
        ("spacing", image.spacing, label.spacing, lambda a, b: np.allclose(a, b, rtol=SPACING_RTOL, atol=0)),
        ("origin", image.origin, label.origin, lambda a, b: np.allclose(a, b, rtol=0, atol=ORIGIN_ATOL_MM)),
        ("direction", image.direction, label.direction,
         lambda a, b: np.allclose(a, b, rtol=0, atol=DIRECTION_ATOL)),
    )
    for name, a, b, same in fields:
        if not same(a, b):
            raise InputError(
                f"label {label.path} does not match image {image.path}: {name} is {_fmt(a)} in the image "
                f"but {_fmt(b)} in the label",
                label.path,
                name,
            )


def check_label(
    label: Volume,
    classes: Iterable[int],
    image: Optional[Volume] = None,
    require_foreground: bool = True,
) -> None:
    """A label map of integer class values from ``classes`` (0 = background), on the image's grid, not empty."""
    allowed = sorted({int(c) for c in classes} | {0})
    arr = label.array
    if arr.ndim != 3:
        raise InputError(f"expected a 3D label map, got shape {arr.shape}", label.path, "dimension")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError("label values must be whole numbers (class indices)", label.path, "label values")
    elif not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise InputError(f"expected integer labels, got dtype {arr.dtype}", label.path, "dtype")
    if image is not None:
        check_same_geometry(image, label)
    present = np.unique(arr)
    unexpected = [int(v) for v in present if int(v) not in allowed]
    if unexpected:
        raise InputError(
            f"label values {unexpected} are outside the declared classes {allowed}", label.path, "label values"
        )
    if require_foreground and not np.any(arr != 0):
        raise InputError(
            "the label is empty (only background 0) but the case is declared labeled; remove the label or "
            "draw the segments",
            label.path,
            "label values",
        )


def _fmt(value) -> str:
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 2:
        return "[" + ", ".join(_fmt(row) for row in arr) + "]"
    return "(" + ", ".join(f"{v:.6g}" for v in arr.ravel()) + ")"
