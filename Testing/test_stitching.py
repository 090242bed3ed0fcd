"""Stitching: the paper geometries exactly, every voxel once, exact inverse, rendering and PNG output."""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from SFRSegmentLib.models.sam.stitching import (
    DEFAULT_CANVAS,
    IGNORE_LABEL,
    NON_SLICE_GREY,
    MosaicLayout,
    mosaic_layout,
    render_mosaic,
    save_png,
    stitch,
    stitch_image,
    stitch_label,
    unstitch,
)

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _numbered_patch(shape: Tuple[int, int, int]) -> np.ndarray:
    """A float patch whose voxels are 1, 2, ... in C order: every voxel unique and different from the fill 0."""
    return np.arange(1, math.prod(shape) + 1, dtype=np.float64).reshape(shape)


def _slice_box(offset: int, tile: int, gutter: int, tile_row: int, tile_col: int, height: int, width: int):
    """Canvas slices of the slice pixels in tile (row, col), from the spec's geometry (square tiles)."""
    top = offset + tile_row * tile + gutter
    left = offset + tile_col * tile + gutter
    return slice(top, top + height), slice(left, left + width)


def _tile_box(offset: int, tile: int, tile_row: int, tile_col: int, canvas: int):
    """Canvas slices of a whole tile (gutters included), clipped to the canvas."""
    top, left = offset + tile_row * tile, offset + tile_col * tile
    return slice(max(top, 0), min(top + tile, canvas)), slice(max(left, 0), min(left + tile, canvas))


# ---------------------------------------------------------------------------------------------------------------
# The geometries of the paper (docs/sfr-method.md §1.2)


def test_la_112x112x80_geometry():
    layout = mosaic_layout((112, 112, 80))
    assert (layout.n_rows, layout.n_cols, layout.capacity, layout.n_mosaics) == (9, 9, 81, 1)
    assert (layout.tile_h, layout.tile_w, layout.gutter_h, layout.gutter_w) == (114, 114, 1, 1)
    assert (layout.offset_h, layout.offset_w) == (-1, -1)
    assert layout.empty_tiles_before(0) == 0 and layout.slices_in_mosaic(0) == 80

    patch = _numbered_patch((112, 112, 80))
    image = stitch_image(patch, layout)
    label = stitch_label((patch % 3).astype(np.int64), layout)
    assert image.shape == (1, 1024, 1024) and image.dtype == patch.dtype
    assert label.shape == (1, 1024, 1024) and label.dtype == np.uint8

    # Slice 0 fills the top-left corner (its outer gutter is cropped away); tiles are not transposed.
    np.testing.assert_array_equal(image[0][_slice_box(-1, 114, 1, 0, 0, 112, 112)], patch[:, :, 0])
    assert _slice_box(-1, 114, 1, 0, 0, 112, 112) == (slice(0, 112), slice(0, 112))
    # Slice 1 is the next tile to the right, after a 2-pixel gutter (1 from each tile).
    np.testing.assert_array_equal(image[0, 0:112, 114:226], patch[:, :, 1])
    assert np.all(image[0, 0:112, 112:114] == 0) and np.all(label[0, 0:112, 112:114] == IGNORE_LABEL)
    # Slice 9 starts the second row.
    np.testing.assert_array_equal(image[0, 114:226, 0:112], patch[:, :, 9])
    # Slice 79 is in tile 79 = row 8, column 7, flush with the bottom edge of the canvas.
    np.testing.assert_array_equal(image[0][_slice_box(-1, 114, 1, 8, 7, 112, 112)], patch[:, :, 79])
    assert _slice_box(-1, 114, 1, 8, 7, 112, 112)[0] == slice(912, 1024)
    np.testing.assert_array_equal(label[0][_slice_box(-1, 114, 1, 8, 7, 112, 112)], patch[:, :, 79] % 3)
    # Tile 80 (row 8, column 8) is the one empty tile.
    empty = _tile_box(-1, 114, 8, 8, 1024)
    assert np.all(image[0][empty] == 0) and np.all(label[0][empty] == IGNORE_LABEL)
    assert int((label[0] != IGNORE_LABEL).sum()) == 112 * 112 * 80


def test_brats_96_cubed_geometry():
    layout = mosaic_layout((96, 96, 96))
    assert (layout.n_rows, layout.n_cols, layout.capacity, layout.n_mosaics) == (10, 10, 100, 1)
    assert (layout.tile_h, layout.tile_w, layout.gutter_h, layout.gutter_w) == (102, 102, 3, 3)
    assert (layout.offset_h, layout.offset_w) == (2, 2)
    assert layout.empty_tiles_before(0) == 2

    patch = _numbered_patch((96, 96, 96))
    image = stitch_image(patch, layout)[0]
    label = stitch_label(np.ones((96, 96, 96), dtype=np.int16), layout)[0]
    # Slice k sits in tile k + 2: slice 0 in row 0, column 2; slice 95 in tile 97 = row 9, column 7.
    np.testing.assert_array_equal(image[_slice_box(2, 102, 3, 0, 2, 96, 96)], patch[:, :, 0])
    assert _slice_box(2, 102, 3, 0, 2, 96, 96) == (slice(5, 101), slice(209, 305))
    np.testing.assert_array_equal(image[_slice_box(2, 102, 3, 9, 7, 96, 96)], patch[:, :, 95])
    assert _slice_box(2, 102, 3, 9, 7, 96, 96) == (slice(923, 1019), slice(719, 815))
    for tile in (0, 1, 98, 99):
        box = _tile_box(2, 102, tile // 10, tile % 10, 1024)
        assert np.all(image[box] == 0) and np.all(label[box] == IGNORE_LABEL), tile
    # 2-pixel outer margin on every side, 3-pixel gutters around each slice.
    for margin in (label[:2], label[-2:], label[:, :2], label[:, -2:]):
        assert np.all(margin == IGNORE_LABEL)
    tile_2 = label[_tile_box(2, 102, 0, 2, 1024)]
    assert np.all(tile_2[:3] == IGNORE_LABEL) and np.all(tile_2[-3:] == IGNORE_LABEL)
    assert np.all(tile_2[:, :3] == IGNORE_LABEL) and np.all(tile_2[:, -3:] == IGNORE_LABEL)
    assert np.all(tile_2[3:-3, 3:-3] == 1)
    assert int((label == 1).sum()) == 96 ** 3 and int((image != 0).sum()) == 96 ** 3


def test_128x128x64_fits_exactly_without_gutters():
    layout = mosaic_layout((128, 128, 64))
    assert (layout.n_rows, layout.n_cols, layout.tile_h, layout.gutter_h, layout.offset_h) == (8, 8, 128, 0, 0)
    assert layout.valid_mask().all()
    patch = _numbered_patch((128, 128, 64))
    image = stitch_image(patch, layout)[0]
    for k in (0, 7, 8, 63):
        np.testing.assert_array_equal(image[_slice_box(0, 128, 0, k // 8, k % 8, 128, 128)], patch[:, :, k])


def test_128_cubed_gives_two_full_mosaics_and_drops_nothing():
    layout = mosaic_layout((128, 128, 128))
    assert layout.n_mosaics == 2 and [layout.slices_in_mosaic(m) for m in (0, 1)] == [64, 64]
    patch = _numbered_patch((128, 128, 128))
    image = stitch_image(patch, layout)
    assert image.shape == (2, 1024, 1024)
    np.testing.assert_array_equal(image[1, 0:128, 0:128], patch[:, :, 64])
    np.testing.assert_array_equal(image[1, 896:1024, 896:1024], patch[:, :, 127])
    np.testing.assert_array_equal(unstitch(image, layout), patch)


def test_last_partial_mosaic_is_centred():
    layout = mosaic_layout((128, 128, 130))
    assert layout.n_mosaics == 3 and layout.slices_in_mosaic(2) == 2
    assert [layout.empty_tiles_before(m) for m in range(3)] == [0, 0, 31]
    image = stitch_image(_numbered_patch((128, 128, 130)), layout)
    # Slice 128 is the first of mosaic 2, in tile 31 = row 3, column 7; slice 129 in tile 32 = row 4, column 0.
    np.testing.assert_array_equal(image[2, 384:512, 896:1024], _numbered_patch((128, 128, 130))[:, :, 128])
    np.testing.assert_array_equal(image[2, 512:640, 0:128], _numbered_patch((128, 128, 130))[:, :, 129])
    assert int((image[2] != 0).sum()) == 2 * 128 * 128


def test_end_depth_padding_puts_every_empty_tile_after_the_slices():
    layout = mosaic_layout((96, 96, 96), depth_padding="end")
    assert layout.empty_tiles_before(0) == 0
    np.testing.assert_array_equal(layout.slice_tiles()[:, 1] * 10 + layout.slice_tiles()[:, 2], np.arange(96))
    patch = _numbered_patch((96, 96, 96))
    label = stitch_label(np.ones((96, 96, 96), dtype=np.uint8), layout)[0]
    image = stitch_image(patch, layout)[0]
    np.testing.assert_array_equal(image[_slice_box(2, 102, 3, 0, 0, 96, 96)], patch[:, :, 0])
    np.testing.assert_array_equal(image[_slice_box(2, 102, 3, 9, 5, 96, 96)], patch[:, :, 95])
    for tile in (96, 97, 98, 99):
        assert np.all(label[_tile_box(2, 102, tile // 10, tile % 10, 1024)] == IGNORE_LABEL), tile
    # The default centres the same patch differently.
    assert not np.array_equal(image, stitch_image(patch, mosaic_layout((96, 96, 96)))[0])


def test_non_square_tiles_follow_the_h_and_w_axes():
    layout = mosaic_layout((100, 200, 12))
    assert (layout.n_rows, layout.n_cols, layout.capacity) == (10, 5, 50)
    assert (layout.gutter_h, layout.gutter_w) == (1, 2)  # round(1.2), round(2.4)
    assert (layout.tile_h, layout.tile_w, layout.offset_h, layout.offset_w) == (102, 204, 2, 2)
    assert layout.empty_tiles_before(0) == 19  # (50 - 12) // 2
    patch = _numbered_patch((100, 200, 12))
    image = stitch_image(patch, layout)[0]
    # Slice 0 in tile 19 = row 3, column 4: 100 rows (H) by 200 columns (W), not transposed.
    top, left = 2 + 3 * 102 + 1, 2 + 4 * 204 + 2
    np.testing.assert_array_equal(image[top:top + 100, left:left + 200], patch[:, :, 0])
    # Slice 1 starts the next row of tiles.
    np.testing.assert_array_equal(image[top + 102:top + 202, 4:204], patch[:, :, 1])


def test_rounded_gutter_that_would_crop_slice_pixels_is_rounded_down():
    # 80×80: the official gutter round(2.67) = 3 gives 12 tiles of 86 = 1032 px, cropping 1 slice pixel per edge.
    layout = mosaic_layout((80, 80, 4))
    assert (layout.n_rows, layout.gutter_h, layout.tile_h, layout.offset_h) == (12, 2, 84, 8)
    patch = _numbered_patch((80, 80, 4))
    np.testing.assert_array_equal(unstitch(stitch_image(patch, layout), layout), patch)


def test_layout_is_cached_and_validated():
    assert mosaic_layout((96, 96, 96)) is mosaic_layout([96, 96, 96])
    assert mosaic_layout((96, 96, 96)).canvas == DEFAULT_CANVAS
    assert mosaic_layout(np.array([96, 96, 96])) == MosaicLayout((96, 96, 96))
    with pytest.raises(ValueError, match="does not fit"):
        mosaic_layout((1025, 10, 10))
    with pytest.raises(ValueError, match="does not fit"):
        mosaic_layout((10, 70, 10), canvas=64)
    for bad_shape in ((0, 10, 10), (10, 10), (10, 10, 10, 1), (10.0, 10, 10), (10, -1, 3), 96, (True, 2, 3)):
        with pytest.raises(ValueError, match="3 positive integers"):
            mosaic_layout(bad_shape)
    with pytest.raises(ValueError, match="depth_padding"):
        mosaic_layout((96, 96, 96), depth_padding="middle")
    with pytest.raises(ValueError, match="canvas"):
        mosaic_layout((10, 10, 10), canvas=0)
    with pytest.raises(IndexError):
        mosaic_layout((96, 96, 96)).slices_in_mosaic(1)


def test_arrays_of_the_wrong_shape_or_labels_out_of_range_are_refused():
    layout = mosaic_layout((8, 8, 4), canvas=32)
    with pytest.raises(ValueError, match="does not end with"):
        stitch_image(np.zeros((8, 8, 5)), layout)
    with pytest.raises(ValueError, match="does not end with"):
        unstitch(np.zeros((2, 32, 32)), layout)
    with pytest.raises(ValueError, match="does not end with"):
        unstitch(torch.zeros(32, 32), layout)
    with pytest.raises(ValueError, match=r"\[0, 254\]"):
        stitch_label(np.full((8, 8, 4), 255, dtype=np.int64), layout)
    with pytest.raises(ValueError, match=r"\[0, 254\]"):
        stitch_label(torch.full((8, 8, 4), -1), layout)
    with pytest.raises(ValueError, match="integers"):
        stitch_label(np.zeros((8, 8, 4), dtype=np.float32), layout)
    with pytest.raises(ValueError, match="integers"):
        stitch_label(torch.zeros((8, 8, 4)), layout)


# ---------------------------------------------------------------------------------------------------------------
# Properties on random shapes


@st.composite
def layouts(draw, max_mosaics: float = 2.5) -> MosaicLayout:
    """Small canvases with any in-plane size (square or not) and depths up to ``max_mosaics`` times the capacity."""
    canvas = draw(st.integers(8, 64))
    height = draw(st.integers(max(1, canvas // 10), canvas))
    width = draw(st.integers(max(1, canvas // 10), canvas))
    capacity = (canvas // height) * (canvas // width)
    depth = draw(st.integers(1, max(1, int(max_mosaics * capacity))))
    return mosaic_layout((height, width, depth), canvas, draw(st.sampled_from(["centre", "end"])))


leading_shapes = st.lists(st.integers(1, 3), max_size=2).map(tuple)


@PROPERTY_SETTINGS
@given(layout=layouts(), leading=leading_shapes)
def test_every_voxel_appears_exactly_once(layout, leading):
    n_values = math.prod(leading + layout.patch_shape)
    patch = np.arange(1, n_values + 1, dtype=np.float64).reshape(leading + layout.patch_shape)
    mosaics = stitch_image(patch, layout)
    assert mosaics.shape == leading + (layout.n_mosaics, layout.canvas, layout.canvas)
    np.testing.assert_array_equal(np.sort(mosaics[mosaics != 0]), np.arange(1, n_values + 1))
    np.testing.assert_array_equal(mosaics != 0, np.broadcast_to(layout.valid_mask(), mosaics.shape))
    # Every mosaic holds its share of slices: full ones except possibly the last.
    per_mosaic = layout.valid_mask().reshape(layout.n_mosaics, -1).sum(axis=1)
    slice_pixels = layout.patch_shape[0] * layout.patch_shape[1]
    assert per_mosaic.tolist() == [layout.slices_in_mosaic(m) * slice_pixels for m in range(layout.n_mosaics)]
    assert sum(layout.slices_in_mosaic(m) for m in range(layout.n_mosaics)) == layout.patch_shape[2]


@PROPERTY_SETTINGS
@given(layout=layouts(), leading=leading_shapes, seed=st.integers(0, 2**32 - 1))
def test_numpy_round_trip_for_images_labels_and_probability_maps(layout, leading, seed):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=leading + layout.patch_shape).astype(np.float32)
    image_mosaics = stitch_image(image, layout)
    assert image_mosaics.shape == leading + layout.mosaic_shape and image_mosaics.dtype == np.float32
    assert np.all(image_mosaics[..., ~layout.valid_mask()] == 0)
    np.testing.assert_array_equal(unstitch(image_mosaics, layout), image)

    label = rng.integers(0, IGNORE_LABEL, size=leading + layout.patch_shape)
    label_mosaics = stitch_label(label, layout)
    assert label_mosaics.dtype == np.uint8
    assert np.all(label_mosaics[..., ~layout.valid_mask()] == IGNORE_LABEL)
    np.testing.assert_array_equal(unstitch(label_mosaics, layout), label)

    probabilities = rng.dirichlet(np.ones(3), size=leading + layout.patch_shape)  # (..., H, W, D, 3)
    probabilities = np.moveaxis(probabilities, -1, len(leading))  # (..., 3, H, W, D)
    restored = unstitch(stitch(probabilities, layout, np.nan), layout)
    np.testing.assert_array_equal(restored, probabilities)


@PROPERTY_SETTINGS
@given(layout=layouts(), batch=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_torch_round_trip_keeps_type_dtype_and_values(layout, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn((batch, 3) + layout.patch_shape, generator=generator, dtype=torch.float64)
    mosaics = stitch_image(logits, layout)
    assert isinstance(mosaics, torch.Tensor) and mosaics.dtype == torch.float64
    assert mosaics.shape == (batch, 3) + layout.mosaic_shape
    torch.testing.assert_close(unstitch(mosaics, layout), logits, rtol=0, atol=0)
    # Same layout as numpy.
    np.testing.assert_array_equal(mosaics.numpy(), stitch_image(logits.numpy(), layout))

    label = torch.randint(0, 5, (batch,) + layout.patch_shape, generator=generator, dtype=torch.uint8)
    label_mosaics = stitch_label(label, layout)
    assert label_mosaics.dtype == torch.long
    valid = torch.from_numpy(layout.valid_mask().copy())
    assert torch.all(label_mosaics[:, ~valid] == IGNORE_LABEL)
    torch.testing.assert_close(unstitch(label_mosaics, layout), label.long(), rtol=0, atol=0)


def _official_style_mosaic(patch: np.ndarray, canvas: int, fill: float) -> np.ndarray:
    """One mosaic built as the official code does: pad each slice, pad depth at both ends, tile, centre, crop."""
    height, width, depth = patch.shape
    n_rows, n_cols = canvas // height, canvas // width
    gutter_h = round((canvas / n_rows - height) / 2)
    gutter_w = round((canvas / n_cols - width) / 2)
    before = (n_rows * n_cols - depth) // 2
    padded = np.pad(patch, [(gutter_h, gutter_h), (gutter_w, gutter_w), (before, n_rows * n_cols - depth - before)],
                    constant_values=fill)
    tile_h, tile_w = padded.shape[:2]
    grid = padded.reshape(tile_h, tile_w, n_rows, n_cols).transpose(2, 0, 3, 1).reshape(n_rows * tile_h,
                                                                                          n_cols * tile_w)
    margin = max(0, n_rows * tile_h - canvas, n_cols * tile_w - canvas)  # enlarge the canvas, then crop it back
    big = np.full((canvas + 2 * margin, canvas + 2 * margin), fill)
    top = (canvas + 2 * margin - grid.shape[0]) // 2
    left = (canvas + 2 * margin - grid.shape[1]) // 2
    big[top:top + grid.shape[0], left:left + grid.shape[1]] = grid
    return big[margin:margin + canvas, margin:margin + canvas]


def _check_against_official(patch_shape: Tuple[int, int, int], canvas: int) -> bool:
    """Compare with the official construction where its in-plane geometry keeps every slice pixel of a full grid;
    elsewhere check that the gutter is the official or the rounded-down one and that nothing is lost.

    Returns whether the official in-plane geometry was lossless.
    """
    layout = mosaic_layout(patch_shape, canvas)
    full_grid = _numbered_patch(patch_shape[:2] + (layout.capacity,))
    lossless = np.count_nonzero(_official_style_mosaic(full_grid, canvas, 0.0)) == full_grid.size
    patch = _numbered_patch(patch_shape)
    mosaic = stitch_image(patch, layout)[0]
    if lossless:
        np.testing.assert_array_equal(mosaic, _official_style_mosaic(patch, canvas, 0.0))
    for side, n_tiles, gutter in ((patch_shape[0], layout.n_rows, layout.gutter_h),
                                  (patch_shape[1], layout.n_cols, layout.gutter_w)):
        assert gutter in (round((canvas / n_tiles - side) / 2), (canvas // n_tiles - side) // 2)
    assert np.count_nonzero(mosaic) == patch.size
    return lossless


@pytest.mark.parametrize("patch_shape", [(112, 112, 80), (96, 96, 96), (128, 128, 64), (100, 200, 12)])
def test_paper_geometries_match_the_official_construction(patch_shape):
    assert _check_against_official(patch_shape, DEFAULT_CANVAS)


def test_every_in_plane_size_matches_the_official_construction_where_it_is_lossless():
    lossless = []
    for canvas in (48, 64, 100):
        for height in range(max(1, canvas // 8), canvas + 1):
            for width in (height, canvas + 1 - height):
                capacity = (canvas // height) * (canvas // width)
                lossless.append(_check_against_official((height, width, max(1, capacity - 3)), canvas))
    assert any(lossless) and not all(lossless)  # both branches were exercised


def test_torch_unstitch_passes_gradients_to_slice_pixels_only():
    layout = mosaic_layout((6, 5, 7), canvas=16)
    mosaics = torch.randn((2,) + layout.mosaic_shape, requires_grad=True)
    unstitch(mosaics, layout).sum().backward()
    expected = np.broadcast_to(layout.valid_mask(), (2,) + layout.mosaic_shape).astype(np.float32)
    np.testing.assert_array_equal(mosaics.grad.numpy(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_torch_tensors_stay_on_their_device():
    layout = mosaic_layout((96, 96, 96))
    patch = torch.randn((2,) + layout.patch_shape, device="cuda", dtype=torch.float16)
    mosaics = stitch_image(patch, layout)
    assert mosaics.device == patch.device and mosaics.dtype == torch.float16
    assert torch.equal(unstitch(mosaics, layout), patch)
    assert torch.equal(mosaics.cpu(), stitch_image(patch.cpu(), layout))


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def _render_case():
    layout = mosaic_layout((20, 20, 5), canvas=64)
    rng = np.random.default_rng(0)
    image = stitch_image(rng.uniform(1000.0, 2000.0, size=layout.patch_shape), layout)[0]
    label_patch = np.zeros(layout.patch_shape, dtype=np.int64)
    label_patch[5:15, 5:12, 1:4] = 1
    label_patch[2:4, 2:18, :] = 2
    return layout, image, stitch_label(label_patch, layout)[0]


def test_render_overlays_colour_exactly_on_foreground_and_grey_on_non_slice_pixels():
    layout, image, label = _render_case()
    rgb = render_mosaic(image, label, colors={1: (1.0, 0.0, 0.0)})
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert np.all(rgb[label == IGNORE_LABEL] == NON_SLICE_GREY)
    np.testing.assert_array_equal(label == IGNORE_LABEL, ~layout.valid_mask()[0])
    coloured = ~((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2]))
    np.testing.assert_array_equal(coloured, (label == 1) | (label == 2))
    # Class 1 in the colour given (red up, green and blue down), class 2 in a default colour.
    assert np.all(rgb[label == 1][:, 0] > rgb[label == 1][:, 1])
    assert np.all(rgb[label == 1][:, 1] == rgb[label == 1][:, 2])
    assert len(np.unique(rgb[label == 2][0])) > 1


def test_render_windows_intensity_on_slice_pixels_only():
    _, image, label = _render_case()
    rgb = render_mosaic(image, label)
    background = label == 0
    grey = rgb[..., 0][background]
    assert grey.min() == 0 and grey.max() == 255
    # With the zero gutters in the window the median voxel (1500 of 1000..2000) would be ~191 instead of ~128.
    median_voxel = np.argmin(np.abs(np.where(background, image, np.inf) - np.median(image[background])))
    assert 100 <= rgb[..., 0].ravel()[median_voxel] <= 155


def test_render_without_label_is_plain_grey():
    _, image, _ = _render_case()
    rgb = render_mosaic(image)
    assert rgb.shape == (64, 64, 3)
    assert np.all(rgb[..., 0] == rgb[..., 1]) and np.all(rgb[..., 1] == rgb[..., 2])
    assert rgb.min() == 0 and rgb.max() == 255
    with pytest.raises(ValueError, match="2D"):
        render_mosaic(np.zeros((1, 64, 64)))


def test_save_png_writes_a_readable_picture_of_the_right_size(tmp_path):
    _, image, label = _render_case()
    rgb = render_mosaic(image, label)
    path = save_png(rgb, tmp_path / "reports" / "mosaic.png")
    assert path == tmp_path / "reports" / "mosaic.png"
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (64, 64) and png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), rgb)
    assert [p.name for p in path.parent.iterdir()] == ["mosaic.png"]
    with pytest.raises(ValueError, match="RGB uint8"):
        save_png(rgb.astype(np.float32), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
