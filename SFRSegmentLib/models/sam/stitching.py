"""Stitching: lay a 3D patch out slice by slice as tiles of 2D mosaics for SAM, and take it back exactly.

SFR (Li et al., IEEE TMI 2025) feeds SAM one 2D image per 3D patch: the slices along the third array axis (the
slice axis of :class:`SFRSegmentLib.storage.volumes.Volume`) are laid out as tiles of a ``canvas``×``canvas`` mosaic at their
native in-plane resolution. The geometry follows the official code's formulas (docs/sfr-method.md §1.2):

* A patch has shape (H, W, D). The grid comes from the in-plane size: ``n_rows = canvas // H``,
  ``n_cols = canvas // W``. Tiles are **not** transposed: tile rows follow the H axis, tile columns the W axis.
* Each slice gets a gutter ``gutter_h = round((canvas / n_rows - H) / 2)`` (Python's ``round``, as the official
  code) above and below, ``gutter_w`` likewise left and right; the tile is ``H + 2·gutter_h`` by ``W + 2·gutter_w``.
* The grid is centred: ``offset = (canvas - n_rows·tile_h) // 2``. It may be negative (LA 112×112×80: −1); then
  the outer tiles lose outer gutter pixels, never slice pixels.
* Slice order is row-major, slice 0 top-left. A mosaic holding ``c`` slices has ``capacity - c`` empty tiles:
  ``depth_padding="centre"`` (the official code) puts ``(capacity - c) // 2`` of them before the slices and the rest
  after; ``"end"`` (the paper's text) puts all of them after.
* Gutters and empty tiles hold 0 in images and :data:`IGNORE_LABEL` (255) in labels.

Examples on the 1024 canvas: 112×112×80 → 9×9 tiles of 114, gutter 1, offset −1, 0 empty tiles before and 1
after; 96×96×96 → 10×10 tiles of 102, gutter 3, offset 2, slice k in tile k + 2; 128×128×64 → 8×8 tiles of 128,
no gutter, exact fit.

Decisions where this module differs from the official code, deliberately:

* **No slice is ever dropped.** The official code silently drops the slices beyond the grid's capacity (and
  un-stitches them as background). Here a patch with D > capacity is split into ``ceil(D / capacity)`` mosaics:
  slices ``[m·capacity, (m+1)·capacity)`` go to mosaic m, each mosaic padded by the rule above. So 128×128×128
  gives 2 mosaics of 64 slices each.
* **No slice pixel is ever cropped.** For some in-plane sizes the rounded gutter makes the grid wider than the
  canvas by more than twice the gutter, and the official centre-crop would cut slice pixels (e.g. 80×80 on 1024:
  gutter 3, 12 tiles of 86 = 1032 px). Only for those sizes the gutter is rounded down instead
  (80×80 → gutter 2, tiles of 84, offset 8); every size where the official geometry is lossless keeps it.
* Label mosaics are ``uint8`` for numpy (compact, and what rendering and PNG files want) and ``int64`` for torch
  (the target dtype of ``cross_entropy(..., ignore_index=IGNORE_LABEL)``).

Stitching is one vectorised scatter of the patch voxels into a canvas filled with the fill value, and un-stitching
one gather, through a flat index (cached per layout) that maps every voxel (h, w, d) to its mosaic pixel. Both
accept any leading dimensions (batch, channels) and keep the array type, dtype and device; with torch both are
differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple, TypeVar

import numpy as np
import torch
from PIL import Image

from ...base.choices import DEPTH_PADDINGS
from ...base.errors import PathLike
from ...storage.atomic import atomic_path
from ...storage.volumes import default_segments

IGNORE_LABEL = 255
"""Label value of gutters and empty tiles; losses ignore it."""

DEFAULT_CANVAS = 1024
"""Side of SAM's native input image."""

NON_SLICE_GREY = (48, 48, 48)
"""RGB of rendered gutters and empty tiles: dark enough to show the grid, distinct from black tissue."""

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _axis_geometry(side: int, canvas: int) -> Tuple[int, int, int]:
    """(number of tiles, gutter, outer offset) along one in-plane axis of ``side`` pixels.

    The official rounded gutter, unless it would push slice pixels off the canvas; then the gutter rounded down,
    which always fits (see the module docstring).
    """
    n_tiles = canvas // side
    gutter = round((canvas / n_tiles - side) / 2)
    offset = (canvas - n_tiles * (side + 2 * gutter)) // 2
    if offset + gutter < 0:
        gutter = (canvas // n_tiles - side) // 2
        offset = (canvas - n_tiles * (side + 2 * gutter)) // 2
    return n_tiles, gutter, offset


@dataclass(frozen=True)
class MosaicLayout:
    """Where every voxel of a patch of shape ``patch_shape`` = (H, W, D) lies in its ``n_mosaics`` mosaics.

    Build it with :func:`mosaic_layout` (cached). The fields after ``depth_padding`` are derived; see the module
    docstring for the rules.
    """

    patch_shape: Tuple[int, int, int]
    canvas: int = DEFAULT_CANVAS
    depth_padding: str = "centre"
    n_rows: int = field(init=False)
    n_cols: int = field(init=False)
    gutter_h: int = field(init=False)
    gutter_w: int = field(init=False)
    offset_h: int = field(init=False)
    offset_w: int = field(init=False)
    n_mosaics: int = field(init=False)

    def __post_init__(self) -> None:
        shape = tuple(self.patch_shape) if np.iterable(self.patch_shape) else ()
        if len(shape) != 3 or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                                      for s in shape):
            raise ValueError(f"patch shape must be 3 positive integers (H, W, D), got {self.patch_shape!r}")
        if not isinstance(self.canvas, (int, np.integer)) or isinstance(self.canvas, bool) or self.canvas <= 0:
            raise ValueError(f"canvas must be a positive integer, got {self.canvas!r}")
        if self.depth_padding not in DEPTH_PADDINGS:
            raise ValueError(f"depth_padding must be one of {DEPTH_PADDINGS}, got {self.depth_padding!r}")
        height, width, depth = (int(s) for s in shape)
        canvas = int(self.canvas)
        if height > canvas or width > canvas:
            raise ValueError(
                f"patch in-plane size {height}×{width} does not fit the {canvas}×{canvas} canvas; "
                "crop the patch to at most the canvas size"
            )
        n_rows, gutter_h, offset_h = _axis_geometry(height, canvas)
        n_cols, gutter_w, offset_w = _axis_geometry(width, canvas)
        derived = dict(
            patch_shape=(height, width, depth), canvas=canvas, n_rows=n_rows, n_cols=n_cols, gutter_h=gutter_h,
            gutter_w=gutter_w, offset_h=offset_h, offset_w=offset_w, n_mosaics=math.ceil(depth / (n_rows * n_cols)),
        )
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        # Invariant: the slice pixels of the first and last tile of each axis lie inside the canvas.
        assert offset_h + gutter_h >= 0 and offset_h + n_rows * self.tile_h - gutter_h <= canvas
        assert offset_w + gutter_w >= 0 and offset_w + n_cols * self.tile_w - gutter_w <= canvas

    @property
    def tile_h(self) -> int:
        """Tile height: slice height plus a gutter above and below."""
        return self.patch_shape[0] + 2 * self.gutter_h

    @property
    def tile_w(self) -> int:
        """Tile width: slice width plus a gutter left and right."""
        return self.patch_shape[1] + 2 * self.gutter_w

    @property
    def capacity(self) -> int:
        """Tiles (slices) per mosaic."""
        return self.n_rows * self.n_cols

    @property
    def mosaic_shape(self) -> Tuple[int, int, int]:
        """Trailing shape of stitched arrays: (n_mosaics, canvas, canvas)."""
        return (self.n_mosaics, self.canvas, self.canvas)

    def slices_in_mosaic(self, mosaic: int) -> int:
        """Number of patch slices in mosaic ``mosaic`` (all but the last mosaic are full)."""
        if not 0 <= mosaic < self.n_mosaics:
            raise IndexError(f"mosaic {mosaic} out of range 0..{self.n_mosaics - 1}")
        return min(self.capacity, self.patch_shape[2] - mosaic * self.capacity)

    def empty_tiles_before(self, mosaic: int) -> int:
        """Number of empty tiles before the first slice of mosaic ``mosaic`` (the rest of its empty tiles follow)."""
        empty = self.capacity - self.slices_in_mosaic(mosaic)
        return empty // 2 if self.depth_padding == "centre" else 0

    def slice_tiles(self) -> np.ndarray:
        """(D, 3) int array: the (mosaic, tile row, tile column) of every slice along the third patch axis."""
        slice_index = np.arange(self.patch_shape[2])
        mosaic = slice_index // self.capacity
        before = np.array([self.empty_tiles_before(m) for m in range(self.n_mosaics)])[mosaic]
        tile = before + slice_index % self.capacity
        return np.stack([mosaic, tile // self.n_cols, tile % self.n_cols], axis=1)

    def valid_mask(self) -> np.ndarray:
        """Read-only bool array of shape ``mosaic_shape``: True where a mosaic pixel carries a patch voxel."""
        return _valid_mask(self)


def mosaic_layout(
    patch_shape: Sequence[int], canvas: int = DEFAULT_CANVAS, depth_padding: str = "centre"
) -> MosaicLayout:
    """The (cached) :class:`MosaicLayout` of a patch of shape (H, W, D); ValueError if it cannot be laid out."""
    return _cached_layout(tuple(patch_shape) if np.iterable(patch_shape) else patch_shape, canvas, depth_padding)


@lru_cache(maxsize=64)
def _cached_layout(patch_shape: Tuple[int, ...], canvas: int, depth_padding: str) -> MosaicLayout:
    return MosaicLayout(patch_shape, canvas, depth_padding)


@lru_cache(maxsize=16)
def _voxel_index(layout: MosaicLayout) -> np.ndarray:
    """Read-only int64 index into the flattened mosaics of every patch voxel, in the patch's C order (h, w, d)."""
    height, width, _ = layout.patch_shape
    mosaic, row, col = layout.slice_tiles().T
    top = layout.offset_h + row * layout.tile_h + layout.gutter_h
    left = layout.offset_w + col * layout.tile_w + layout.gutter_w
    h = np.arange(height)[:, None, None]
    w = np.arange(width)[None, :, None]
    index = ((mosaic * layout.canvas + top + h) * layout.canvas + left + w).astype(np.int64).ravel()
    index.flags.writeable = False
    return index


@lru_cache(maxsize=16)
def _torch_voxel_index(layout: MosaicLayout, device: torch.device) -> torch.Tensor:
    """:func:`_voxel_index` as a tensor on ``device``, so that it is moved there once."""
    return torch.tensor(_voxel_index(layout), dtype=torch.long, device=device)


@lru_cache(maxsize=16)
def _valid_mask(layout: MosaicLayout) -> np.ndarray:
    mask = np.zeros(math.prod(layout.mosaic_shape), dtype=bool)
    mask[_voxel_index(layout)] = True
    mask = mask.reshape(layout.mosaic_shape)
    mask.flags.writeable = False
    return mask


def _leading_shape(array: Array, trailing: Tuple[int, ...], what: str) -> Tuple[int, ...]:
    """The leading (batch, channel) dims of ``array``, after checking that it ends with ``trailing``."""
    shape = tuple(array.shape)
    if len(shape) < len(trailing) or shape[len(shape) - len(trailing):] != trailing:
        raise ValueError(f"{what} of shape {shape} does not end with {trailing}")
    return shape[: len(shape) - len(trailing)]


def stitch(patch: Array, layout: MosaicLayout, fill: float) -> Array:
    """Mosaics (..., n_mosaics, canvas, canvas) of a patch (..., H, W, D); gutters and empty tiles hold ``fill``.

    A numpy array stays numpy, a tensor stays a tensor on its device; the dtype is kept.
    """
    leading = _leading_shape(patch, layout.patch_shape, "patch")
    n_voxels, n_pixels = math.prod(layout.patch_shape), math.prod(layout.mosaic_shape)
    if isinstance(patch, torch.Tensor):
        flat = patch.reshape(-1, n_voxels)
        mosaics = flat.new_full((flat.shape[0], n_pixels), fill)
        mosaics = mosaics.index_copy(1, _torch_voxel_index(layout, patch.device), flat)
    else:
        flat = patch.reshape(-1, n_voxels)
        mosaics = np.full((flat.shape[0], n_pixels), fill, dtype=patch.dtype)
        mosaics[:, _voxel_index(layout)] = flat
    return mosaics.reshape(leading + layout.mosaic_shape)


def unstitch(mosaics: Array, layout: MosaicLayout) -> Array:
    """The patch (..., H, W, D) of mosaics (..., n_mosaics, canvas, canvas): the exact inverse of :func:`stitch`.

    Works for images, labels and multi-channel maps (e.g. class probabilities (B, K, n_mosaics, canvas, canvas)).
    """
    leading = _leading_shape(mosaics, layout.mosaic_shape, "mosaics")
    flat_shape = (-1, math.prod(layout.mosaic_shape))
    if isinstance(mosaics, torch.Tensor):
        patch = mosaics.reshape(flat_shape).index_select(1, _torch_voxel_index(layout, mosaics.device))
    else:
        patch = np.take(mosaics.reshape(flat_shape), _voxel_index(layout), axis=1)
    return patch.reshape(leading + layout.patch_shape)


def stitch_image(patch: Array, layout: MosaicLayout) -> Array:
    """Image mosaics: :func:`stitch` with gutters and empty tiles 0."""
    return stitch(patch, layout, 0)


def stitch_label(label: Array, layout: MosaicLayout) -> Array:
    """Label mosaics: gutters and empty tiles :data:`IGNORE_LABEL`; uint8 for numpy, int64 for torch.

    Labels must be integers (or bool) in [0, IGNORE_LABEL), else ValueError: a voxel labelled 255 would be
    indistinguishable from a gutter.
    """
    if isinstance(label, torch.Tensor):
        if label.dtype.is_floating_point or label.dtype.is_complex:
            raise ValueError(f"labels must be integers, got dtype {label.dtype}")
        label = label.long()
    elif not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
        raise ValueError(f"labels must be integers, got dtype {label.dtype}")
    if math.prod(label.shape):
        low, high = int(label.min()), int(label.max())
        if low < 0 or high >= IGNORE_LABEL:
            raise ValueError(f"label values must lie in [0, {IGNORE_LABEL - 1}], got [{low}, {high}]")
    if isinstance(label, np.ndarray):
        label = label.astype(np.uint8, copy=False)
    return stitch(label, layout, IGNORE_LABEL)


def render_mosaic(
    image_mosaic: np.ndarray,
    label_mosaic: Optional[np.ndarray] = None,
    colors: Optional[Mapping[int, Tuple[float, float, float]]] = None,
    alpha: float = 0.45,
) -> np.ndarray:
    """An RGB uint8 picture (canvas × canvas × 3) of one image mosaic, with its label mosaic overlaid, for reports.

    Intensities are windowed to the 1st–99th percentile of the slice pixels, i.e. where the label is not
    :data:`IGNORE_LABEL` (all pixels without a label). Each foreground class is blended with weight ``alpha`` in its
    colour (``colors``: class value → RGB in [0, 1]; Slicer's default segment colours for classes not given).
    Gutters and empty tiles are drawn in :data:`NON_SLICE_GREY`, so that the grid shows. To show the grid under a
    prediction, set its non-slice pixels to IGNORE_LABEL first (``np.where(layout.valid_mask()[m], pred, 255)``).
    """
    image = np.asarray(image_mosaic, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected one 2D image mosaic, got shape {image.shape}")
    if label_mosaic is None:
        label = np.zeros(image.shape, dtype=np.int64)
        slice_pixels = np.ones(image.shape, dtype=bool)
    else:
        label = np.asarray(label_mosaic)
        if label.shape != image.shape:
            raise ValueError(f"label mosaic shape {label.shape} differs from the image mosaic's {image.shape}")
        slice_pixels = label != IGNORE_LABEL
    values = image[slice_pixels]
    low, high = np.percentile(values, [1, 99]) if values.size else (0.0, 0.0)
    grey = np.clip((image - low) / (high - low if high > low else 1.0), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    classes = [int(v) for v in np.unique(label[slice_pixels]) if v != 0]
    palette = {segment.value: segment.color for segment in default_segments(classes)}
    palette.update(colors or {})
    for value in classes:
        foreground = label == value
        rgb[foreground] = (1.0 - alpha) * rgb[foreground] + alpha * np.asarray(palette[value], dtype=np.float64)
    picture = np.rint(rgb * 255.0).astype(np.uint8)
    picture[~slice_pixels] = NON_SLICE_GREY
    return picture


def save_png(rgb: np.ndarray, path: PathLike) -> Path:
    """Write an RGB uint8 picture (height × width × 3) as a PNG file, atomically. Returns the path written."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array of shape (height, width, 3), got {rgb.dtype} {rgb.shape}")
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
    return path
