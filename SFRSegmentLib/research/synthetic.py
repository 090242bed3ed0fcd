"""A deterministic synthetic cohort (MRI-like volumes with organ-like blobs) for tests and the demo.

Each volume holds ``n_classes`` non-overlapping blobs, one per class: ellipsoids deformed by low-frequency noise,
each a single connected component clear of the volume border. The image has a per-class intensity, a textured
background, partial-volume blur, a smooth multiplicative bias field and Gaussian noise. Every size (blob radii,
texture grain, blur, bias) is defined in millimetres, so anisotropic spacing gives the same physical shapes with
fewer slices. The origin is the volume's centre at (0, 0, 0) mm (so never zero), directions are the identity.

Cohort layout written by :func:`make_synthetic_cohort`::

    out_dir/classes.json                  {"1": "organ 1", ...}
    out_dir/synthetic.json                the generator's parameters (marks the folder as regenerable)
    out_dir/case_000/image.nrrd           every case
    out_dir/case_000/label.nrrd           labeled cases only
    out_dir/truth/case_005/label.nrrd     held-out truth of the unlabeled cases

``truth/`` holds no volume file directly inside it, so :func:`SFRSegmentLib.data.cohort.discover_cohort` treats it as a
non-case folder (listed in ``Cohort.ignored``) and the unlabeled cases as unlabeled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..base.errors import InputError, PathLike
from ..data.cohort import CLASSES_FILE, Cohort, discover_cohort
from ..storage.atomic import atomic_write_text
from ..storage.volumes import Volume, write_volume

TRUTH_FOLDER = "truth"
PARAMETERS_FILE = "synthetic.json"
MAX_CLASSES = 6

_DEFORMATION = 0.3
"""Amplitude of the boundary deformation, relative to the ellipsoid radius: a blob lies within 1.3 radii."""
_RADIUS_RANGE = (0.18, 0.30)
"""Semi-axes of a single blob as fractions of the volume's smallest physical extent; n blobs get n^(-1/3) of it."""
_BACKGROUND = 100.0
_CONTRAST = 60.0
"""Class c is about c × _CONTRAST brighter than the background."""
_TEXTURE = 12.0
_TEXTURE_GRAIN_MM = 4.0
_BLUR_MM = 0.5
_BIAS = 0.25
"""The bias field multiplies intensities by exp(±0.25) at most."""
_NOISE = 8.0


def make_synthetic_volume(
    shape: Sequence[int], spacing: Sequence[float], n_classes: int, rng: np.random.Generator
) -> Tuple[Volume, Volume]:
    """A float32 image and its uint8 label (values 1..n_classes) on the same grid, drawn from ``rng``."""
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    extent = np.asarray(shape) * np.asarray(spacing)
    label = np.zeros(shape, dtype=np.uint8)
    for value, (centre, radii) in enumerate(_place_blobs(extent, min(spacing), n_classes, rng), start=1):
        label[_blob(shape, spacing, centre, radii, rng)] = value
    image = _render(label, spacing, n_classes, rng)
    origin = tuple(-extent / 2)
    return Volume(image, spacing, origin), Volume(label, spacing, origin)


def make_synthetic_cohort(
    out_dir: PathLike,
    n_cases: int = 8,
    n_labeled: int = 2,
    n_classes: int = 1,
    seed: int = 0,
    size_range: Sequence[Tuple[int, int]] = ((56, 72), (56, 72), (28, 40)),
    spacing: Sequence[float] = (0.8, 0.8, 1.6),
) -> Cohort:
    """Write a cohort of ``n_cases`` volumes (the first ``n_labeled`` labeled) and return it as discovered.

    Sizes are drawn per case from ``size_range`` (inclusive (low, high) per axis). Case i depends only on ``seed``
    and i, so the same seed gives byte-identical arrays. An existing ``out_dir`` is replaced only if it holds an
    earlier synthetic cohort; any other non-empty folder is refused.
    """
    _check_parameters(n_cases, n_labeled, n_classes, size_range, spacing)
    out_dir = Path(out_dir)
    _clear_output_folder(out_dir)
    names = [f"case_{i:03d}" for i in range(n_cases)]
    for index, (name, case_seed) in enumerate(zip(names, np.random.SeedSequence(seed).spawn(n_cases))):
        rng = np.random.default_rng(case_seed)
        shape = tuple(int(rng.integers(low, high + 1)) for low, high in size_range)
        image, label = make_synthetic_volume(shape, spacing, n_classes, rng)
        write_volume(image, out_dir / name / "image.nrrd")
        label_folder = out_dir / name if index < n_labeled else out_dir / TRUTH_FOLDER / name
        write_volume(label, label_folder / "label.nrrd")
    classes = {str(v): f"organ {v}" for v in range(1, n_classes + 1)}
    atomic_write_text(out_dir / CLASSES_FILE, json.dumps(classes, indent=2) + "\n")
    parameters = dict(n_cases=n_cases, n_labeled=n_labeled, n_classes=n_classes, seed=seed,
                      size_range=[list(r) for r in size_range], spacing=list(spacing))
    atomic_write_text(out_dir / PARAMETERS_FILE, json.dumps(parameters, indent=2) + "\n")
    return discover_cohort(out_dir)


def _check_parameters(
    n_cases: int, n_labeled: int, n_classes: int, size_range: Sequence[Tuple[int, int]], spacing: Sequence[float]
) -> None:
    if n_cases < 1:
        raise InputError(f"n_cases must be at least 1, got {n_cases}", field="n_cases")
    if not 1 <= n_labeled <= n_cases:
        raise InputError(f"n_labeled must be between 1 and n_cases ({n_cases}), got {n_labeled}", field="n_labeled")
    if not 1 <= n_classes <= MAX_CLASSES:
        raise InputError(f"n_classes must be between 1 and {MAX_CLASSES}, got {n_classes}", field="n_classes")
    if len(size_range) != 3 or any(not 16 <= low <= high for low, high in size_range):
        raise InputError(f"size_range needs (low, high) with 16 <= low <= high for 3 axes, got {size_range}",
                         field="size_range")
    if len(spacing) != 3 or any(s <= 0 for s in spacing):
        raise InputError(f"spacing needs 3 positive values, got {spacing}", field="spacing")


def _clear_output_folder(out_dir: Path) -> None:
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not (out_dir / PARAMETERS_FILE).is_file():
        raise InputError(
            f"the folder is not empty and holds no synthetic cohort ({PARAMETERS_FILE}); choose a new or empty folder",
            out_dir,
            "out_dir",
        )
    shutil.rmtree(out_dir)


def _place_blobs(
    extent: np.ndarray, margin: float, n_blobs: int, rng: np.random.Generator
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Centres and semi-axes (mm) of blobs whose deformed extents neither overlap nor reach the border.

    Each blob's reach (longest semi-axis × (1 + deformation)) must keep ``margin`` mm from the border and from every
    other blob; where the draws do not fit, the radii shrink and the draw is repeated.
    """
    scale = 1.0
    for _ in range(20):
        radii = rng.uniform(*_RADIUS_RANGE, size=(n_blobs, 3)) * extent.min() * scale / np.cbrt(n_blobs)
        reach = radii.max(axis=1) * (1 + _DEFORMATION) + margin
        centres: List[np.ndarray] = []
        for i in range(n_blobs):
            low, high = reach[i], extent - reach[i]
            if np.any(low >= high):
                break
            for _ in range(50):
                centre = rng.uniform(low, high)
                if all(np.linalg.norm(centre - c) > reach[i] + reach[j] for j, c in enumerate(centres)):
                    centres.append(centre)
                    break
            else:
                break
        if len(centres) == n_blobs:
            return list(zip(centres, radii))
        scale *= 0.85
    raise ValueError(f"cannot fit {n_blobs} separate blobs into a volume of {tuple(extent)} mm")


def _blob(
    shape: Tuple[int, ...], spacing: Tuple[float, ...], centre: np.ndarray, radii: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The mask of an ellipsoid with its surface moved by smooth noise, reduced to the component at its centre."""
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]  # voxel positions in mm from voxel 0
    grid = np.ix_(*axes)
    distance = np.sqrt(sum(((x - c) / r) ** 2 for x, c, r in zip(grid, centre, radii)))
    inside = distance + _DEFORMATION * _smooth_noise(shape, spacing, float(radii.min()), rng) < 1
    components, _ = ndimage.label(inside)
    centre_voxel = tuple(int(round(c / s)) for c, s in zip(centre, spacing))
    return components == components[centre_voxel]


def _render(label: np.ndarray, spacing: Tuple[float, ...], n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Intensities: per-class level plus texture, blurred, times a bias field, plus noise (float32)."""
    shape = label.shape
    levels = _BACKGROUND + _CONTRAST * np.arange(n_classes + 1) + rng.uniform(-8, 8, n_classes + 1)
    image = levels[label] + _TEXTURE * _smooth_noise(shape, spacing, _TEXTURE_GRAIN_MM, rng)
    image = ndimage.gaussian_filter(image, sigma=[_BLUR_MM / s for s in spacing])
    extent = float(min(n * s for n, s in zip(shape, spacing)))
    image *= np.exp(_BIAS * _smooth_noise(shape, spacing, extent / 2, rng))
    image += rng.normal(0.0, _NOISE, size=shape)
    return image.astype(np.float32)


def _smooth_noise(
    shape: Tuple[int, ...], spacing: Tuple[float, ...], grain_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """Random field with features about ``grain_mm`` wide, scaled to a maximum magnitude of 1.

    White noise on a coarse grid with one node per ``grain_mm`` is interpolated (cubic) to the voxel grid; the
    coarse grid is laid out in millimetres, so the field looks the same whatever the spacing.
    """
    coarse = tuple(max(2, int(np.ceil(n * s / grain_mm)) + 1) for n, s in zip(shape, spacing))
    field = ndimage.zoom(rng.standard_normal(coarse), [n / c for n, c in zip(shape, coarse)], order=3)
    if field.shape != shape:  # zoom rounds its output size; guard against a rounding surprise
        raise AssertionError(f"smooth noise has shape {field.shape}, expected {shape}")
    return field / np.abs(field).max()
