"""Stitch previews: the SAM mosaic of a volume's central patch, with its label overlaid, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..base.config import PATCH_SIZE
from ..base.errors import PathLike
from ..data.patches import center_crop_start, crop, pad_to_shape, zscore
from ..data.validation import check_image, check_label
from ..models.sam.stitching import DEFAULT_CANVAS, mosaic_layout, render_mosaic, save_png, stitch_image, stitch_label
from ..storage.volumes import read_volume


def central_patch(array: np.ndarray, patch: Tuple[int, int, int], pad_value: float = 0) -> np.ndarray:
    """The ``patch``-sized block at the centre of ``array``, zero-padded first where the array is smaller."""
    padded = pad_to_shape(array, patch, value=pad_value)
    return crop(padded, center_crop_start(padded.shape, patch), patch)


def write_stitch_preview(
    image_path: PathLike,
    out: PathLike,
    label_path: Optional[PathLike] = None,
    patch: Tuple[int, int, int] = PATCH_SIZE,
    canvas: int = DEFAULT_CANVAS,
) -> Path:
    """Read, validate and z-score a volume, stitch its central patch as SFR does and write the mosaic(s) as a PNG.

    Several mosaics (a patch deeper than one canvas holds) are placed side by side.
    """
    image = read_volume(image_path)
    check_image(image)
    layout = mosaic_layout(patch, canvas=canvas)
    mosaics = stitch_image(central_patch(zscore(image.array), patch), layout)
    labels = [None] * layout.n_mosaics
    colors = None
    if label_path is not None:
        label = read_volume(label_path)
        check_label(label, np.unique(label.array), image, require_foreground=False)
        labels = stitch_label(central_patch(label.array.astype(np.uint8), patch), layout)
        colors = {s.value: s.color for s in label.segments} if label.segments else None
    rgb = np.concatenate([render_mosaic(m, lab, colors=colors) for m, lab in zip(mosaics, labels)], axis=1)
    return save_png(rgb, out)
