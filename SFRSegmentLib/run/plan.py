"""The run's plan: working spacing, patch, V-Net strides and the shape-dependent choices, derived from the cohort.

A preset is a budget (the finest working voxel, the voxels of one V-Net patch) plus fixed recipes; the cohort's
fingerprint (:func:`fingerprint`: every volume's spacing and shape, and of every labeled volume how much of each
class lies in its largest connected piece) decides the rest, with nnU-Net's published rules as the anchor
(Isensee et al., Nature Methods 2021, "rule-based parameters"):

* **Anisotropy.** An axis whose median spacing is more than ``plan.anisotropy`` times the finest other axis's is
  *thick* (10 mm cine-MRI slices beside 1.5 mm pixels). It keeps its own spacing: nothing is resampled across it to
  the in-plane spacing, which would invent slices between real ones.
* **Working spacing.** Every other axis: the cohort's median spacing, but not finer than ``plan.finest_spacing``
  (the preset's budget: 1.25 mm on a CPU).
* **V-Net strides.** Four downsamplings; at each, an axis is halved only if its current spacing is at most twice
  the finest current one (nnU-Net's rule), so a thick axis is first left alone and pooled once the in-plane
  voxels have grown as coarse.
* **Patch.** The preset's patch where no axis is thick (its shape was chosen by measurement). Along a thick axis
  the patch covers the median number of slices (rounded down to the axis's stride product, at least one
  product), and the in-plane sides grow, in the preset's proportions, to keep the preset's voxel budget, but not
  beyond the median in-plane size (rounded up to the stride product).
* **Intensity normalisation.** Per modality, as nnU-Net: a cohort that looks like CT (every volume
  integer-valued with air below ``CT_AIR_BELOW`` Hounsfield units) is clipped to its labeled foreground's 0.5 and
  99.5 percentiles and standardised with that foreground's mean and standard deviation, the same numbers for every
  volume, since CT's units are absolute; any other cohort (MRI) is z-scored volume by volume.
* **Augmentation.** With a thick axis, the strong augmentation rotates and scales in the slice plane only.
* **Largest component.** Kept (in pseudo-labels and predictions) only if the preset keeps it and, for every
  class, the median labeled volume has at least ``LARGEST_COMPONENT_SHARE`` of the class in one 26-connected
  piece.
* **Sliding window.** With a thick axis the prediction window spans the median slice plane (rounded up to the
  stride products) at the patch's depth: prediction needs no gradient, so a window several times the training
  patch fits in memory, and a volume takes a few windows instead of dozens of overlapping small ones (the V-Net is
  fully convolutional; on ACDC 5× faster, and no less accurate, docs/results.md). Otherwise the window is the
  training patch. The prediction strides keep the preset's overlap: they grow and shrink with the window (at most
  half of it).

:func:`plan_config` applies the plan to every planned field that still has its preset's value: a value set by
hand (a configuration file, the command line, the Slicer module, an update's parent) wins, and ``plan.enabled =
false`` turns planning off. The command line passes the paths its ``--config`` file and flags set (and an update
its parent's whole configuration), so a value set by hand wins even where it equals the preset's. The plan, its
fingerprint and the reason for each value are written to the run folder's ``plan.json`` and shown by ``run
--print-config`` with a cohort; the planned values are part of the
configuration that every stage's provenance covers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..base.config import REFERENCE_DOWNSAMPLING, RunConfig, Shape, Spacing, preset
from ..data.cohort import Cohort, load_case
from ..storage.volumes import read_volume

CT_AIR_BELOW = -500.0
"""A volume whose minimum is below this (and whose voxels are integers) is in Hounsfield units: air is −1000."""
FOREGROUND_SAMPLES = 10000
"""Foreground voxels drawn per labeled volume for the intensity statistics (nnU-Net draws as many)."""
FOREGROUND_PERCENTILES = (0.5, 99.5)
LARGEST_COMPONENT_SHARE = 0.9
"""A class counts as one piece when its largest 26-connected component holds at least this share of its voxels in
the median labeled volume."""
POOLINGS = 4
"""The V-Net's downsamplings."""
PLANNED_FIELDS = ("retrain.downsampling", "inference.stride_xy", "inference.stride_z", "inference.patch_size",
                  "patch_size", "retrain.spacing", "finetune.spacing", "retrain.in_plane_rotation_only",
                  "retrain.intensity_window", "pseudolabel.largest_component", "inference.largest_component")
"""The configuration fields a plan sets (each only while it has its preset's value), in an order in which each
intermediate configuration passes the checks (strides before the patch they must fit, the window's strides before
the window)."""


@dataclass(frozen=True)
class Fingerprint:
    """What the plan is derived from: the cohort's geometry and its classes' connectivity."""

    spacings: Tuple[Spacing, ...]
    """Every volume's voxel size (mm), labeled and unlabeled."""
    shapes: Tuple[Shape, ...]
    """Every volume's size in voxels, in the same order."""
    largest_component_shares: Dict[int, float]
    """Class value → median, over the labeled volumes, of the share of the class in its largest piece."""
    minima: Tuple[float, ...]
    """Every volume's smallest voxel value, in the same order."""
    integer_valued: bool
    """Whether every volume holds integer values only (CT's Hounsfield units do)."""
    foreground: Tuple[float, float, float, float]
    """The labeled volumes' foreground voxels (a sample of each): 0.5 and 99.5 percentiles, mean, std."""

    @property
    def looks_like_ct(self) -> bool:
        return self.integer_valued and bool(self.minima) and max(self.minima) < CT_AIR_BELOW

    @property
    def median_spacing(self) -> Spacing:
        return tuple(float(v) for v in np.median(np.asarray(self.spacings), axis=0))

    @property
    def median_shape(self) -> Shape:
        return tuple(int(v) for v in np.median(np.asarray(self.shapes), axis=0))


@dataclass(frozen=True)
class Plan:
    """The planned values and why (``reasons``: planned field → one sentence)."""

    spacing: Spacing
    patch_size: Shape
    downsampling: Tuple[Shape, ...]
    in_plane_rotation_only: bool
    largest_component: bool
    stride_xy: int
    stride_z: int
    window: Optional[Shape]
    """The prediction window; None: the training patch."""
    intensity_window: Optional[Tuple[float, float, float, float]]
    reasons: Dict[str, str]

    def values(self) -> Dict[str, Any]:
        """Planned field → value, in the order of :data:`PLANNED_FIELDS`."""
        reference = self.downsampling == REFERENCE_DOWNSAMPLING  # null, as the presets say it
        values = {"retrain.downsampling": None if reference else self.downsampling,
                  "inference.patch_size": self.window, "inference.stride_xy": self.stride_xy,
                  "inference.stride_z": self.stride_z, "patch_size": self.patch_size, "retrain.spacing": self.spacing,
                  "finetune.spacing": self.spacing, "retrain.in_plane_rotation_only": self.in_plane_rotation_only,
                  "retrain.intensity_window": self.intensity_window,
                  "pseudolabel.largest_component": self.largest_component,
                  "inference.largest_component": self.largest_component}
        return {path: values[path] for path in PLANNED_FIELDS}

    def summary(self) -> str:
        """One line for the progress output and the report."""
        strides = " ".join("×".join(map(str, s)) for s in self.downsampling)
        return (f"spacing {_text(self.spacing)} mm, V-Net patch {_text(self.patch_size)}, strides {strides}, "
                f"largest component {'kept' if self.largest_component else 'not kept'}"
                + (", in-plane augmentation" if self.in_plane_rotation_only else "")
                + (", CT normalisation clipped to [{:g}, {:g}]".format(*self.intensity_window[:2])
                   if self.intensity_window else ""))


def fingerprint(cohort: Cohort) -> Fingerprint:
    """The cohort's :class:`Fingerprint`: every training volume's header and intensity range, and the labels and
    foreground intensities of the labeled ones."""
    spacings, shapes, minima, samples = [], [], [], []
    integer_valued = True
    shares: Dict[int, List[float]] = {value: [] for value in cohort.classes}
    rng = np.random.default_rng(0)
    for case in cohort.cases:
        if case.label is None:
            image = read_volume(case.image)
        else:
            image, label = load_case(case, cohort.classes)
            for value in shares:
                shares[value].append(_largest_share(label.array == value))
            foreground = image.array[label.array > 0]
            samples.append(rng.choice(foreground, min(FOREGROUND_SAMPLES, foreground.size), replace=False))
        spacings.append(tuple(float(s) for s in image.spacing))
        shapes.append(image.shape)
        minima.append(float(image.array.min()))
        integer_valued = integer_valued and _integer_valued(image.array)
    sampled = np.concatenate(samples).astype(np.float64) if samples else np.zeros(1)
    low, high = np.percentile(sampled, FOREGROUND_PERCENTILES)
    return Fingerprint(tuple(spacings), tuple(shapes),
                       {value: float(np.median(found)) for value, found in shares.items() if found},
                       tuple(minima), integer_valued,
                       (float(low), float(high), float(sampled.mean()), float(sampled.std())))


def _integer_valued(array: np.ndarray) -> bool:
    return array.dtype.kind in "iub" or bool(np.all(np.mod(array, 1) == 0))


def _largest_share(mask: np.ndarray) -> float:
    """The share of ``mask``'s voxels in its largest 26-connected piece (1 for an empty mask)."""
    pieces, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return 1.0
    sizes = np.bincount(pieces.ravel())[1:]
    return float(sizes.max() / sizes.sum())


def make_plan(found: Fingerprint, config: RunConfig, patch_by_hand: Optional[Shape] = None) -> Plan:
    """The plan for a cohort of fingerprint ``found`` under ``config``'s budget (``config.plan``) and its preset's
    values (see the module docstring for the rules); with ``patch_by_hand`` (a patch the user set) the choices that
    depend on the patch (the prediction strides) follow that patch instead of the planned one."""
    budget = config.plan
    base = preset(config.preset)
    median = found.median_spacing
    thick = tuple(median[axis] > budget.anisotropy * min(median[a] for a in range(3) if a != axis)
                  for axis in range(3))
    finest = budget.finest_spacing or 0.0
    spacing = tuple(round(median[a] if thick[a] else max(median[a], finest), 4) for a in range(3))
    reasons = {"retrain.spacing": _spacing_reason(median, spacing, thick, finest)}
    downsampling = _downsampling(spacing)
    multiples = tuple(math.prod(s[a] for s in downsampling) for a in range(3))
    reasons["retrain.downsampling"] = ("each axis halved while its spacing is at most twice the finest "
                                       f"(nnU-Net's rule): input multiples {_text(multiples)}")
    shape = tuple(int(round(n * s / w)) for n, s, w in zip(found.median_shape, median, spacing))
    patch = tuple(patch_by_hand) if patch_by_hand is not None else _patch(base.patch_size, shape, thick, multiples)
    reasons["patch_size"] = ("set by hand" if patch_by_hand is not None else "the preset's patch"
                             if patch == base.patch_size else
                             f"the thick axis covers the median {shape[thick.index(True)]} slices, the in-plane sides "
                             f"keep the preset's {math.prod(base.patch_size)} voxels")
    one_piece = {value: share >= LARGEST_COMPONENT_SHARE for value, share in found.largest_component_shares.items()}
    keep = base.inference.largest_component and all(one_piece.values())
    reasons["inference.largest_component"] = (
        "classes whose largest piece holds (median) " + ", ".join(
            f"{value}: {share:.0%}" for value, share in sorted(found.largest_component_shares.items()))
        + f"; kept only if the preset keeps it and every class has ≥ {LARGEST_COMPONENT_SHARE:.0%}")
    window = _window(patch, shape, thick, multiples)
    reasons["inference.patch_size"] = (
        "the training patch" if window is None else
        f"the median slice plane ({_text([n for n, t in zip(shape, thick) if not t])} voxels, rounded up) at the "
        "patch's depth: a few windows per volume")
    stride_xy, stride_z = _window_strides(base, window or patch)
    clip = found.foreground if found.looks_like_ct and found.foreground[3] > 0 else None
    reasons["retrain.intensity_window"] = (
        f"CT (integer voxels, air below {CT_AIR_BELOW:g} HU): clipped to the labeled foreground's "
        f"{FOREGROUND_PERCENTILES[0]:g} and {FOREGROUND_PERCENTILES[1]:g} percentiles, standardised with its mean "
        "and std" if clip else "not CT (relative intensities, such as MRI): each volume z-scored")
    reasons["inference.stride_xy"] = reasons["inference.stride_z"] = (
        "the preset's overlap of windows: its stride scaled by the window's size, at most half the window")
    reasons["finetune.spacing"] = "the V-Net's working spacing: SAM fine-tunes and pseudo-labels on the same grid"
    reasons["pseudolabel.largest_component"] = reasons["inference.largest_component"]
    reasons["retrain.in_plane_rotation_only"] = ("a thick axis: no rotation across it" if any(thick)
                                                 else "no thick axis")
    return Plan(spacing, patch, downsampling, any(thick), keep, stride_xy, stride_z, window, clip, reasons)


def _window(patch: Shape, shape: Shape, thick: Sequence[bool], multiples: Shape) -> Optional[Shape]:
    """With a thick axis, the prediction window: the median size (rounded up to the stride product) along the other
    axes, at least the patch, and the patch along the thick one; None (the training patch) otherwise."""
    if not any(thick):
        return None
    return tuple(patch[a] if thick[a] else max(patch[a], -(-shape[a] // multiples[a]) * multiples[a])
                 for a in range(3))


def _window_strides(base: RunConfig, window: Shape) -> Tuple[int, int]:
    """Prediction strides (in-plane, slice axis) that overlap ``window``-sized windows as much as the preset's
    strides overlap its patch, at most half the window: a grown in-plane window takes proportionally longer steps
    (a fixed stride would multiply the windows, and the time, by the growth squared)."""
    preset_xy, preset_z = min(base.patch_size[:2]), base.patch_size[2]
    stride_xy = base.inference.stride_xy * min(window[:2]) // preset_xy
    stride_z = base.inference.stride_z * window[2] // preset_z
    return (max(1, min(stride_xy, min(window[:2]) // 2)), max(1, min(stride_z, window[2] // 2)))


def _spacing_reason(median: Spacing, spacing: Spacing, thick: Sequence[bool], finest: float) -> str:
    text = f"median spacing {_text(median)} mm"
    if any(thick):
        text += f"; axis {thick.index(True)} is thick and keeps its own"
    if finest:
        text += f"; no axis finer than the budget's {finest:g} mm"
    return text


def _downsampling(spacing: Spacing) -> Tuple[Shape, ...]:
    """nnU-Net's pooling rule: per downsampling, stride 2 on the axes whose spacing is at most twice the finest."""
    current, strides = list(spacing), []
    for _ in range(POOLINGS):
        finest = min(current)
        stride = tuple(2 if s <= 2 * finest else 1 for s in current)
        current = [s * f for s, f in zip(current, stride)]
        strides.append(stride)
    return tuple(strides)


def _patch(preset_patch: Shape, shape: Shape, thick: Sequence[bool], multiples: Shape) -> Shape:
    """The preset's patch, or along a thick axis the median slice count and in-plane sides that keep its voxels."""
    if not any(thick):
        return tuple(preset_patch)
    axis = thick.index(True)
    depth = max(multiples[axis], shape[axis] // multiples[axis] * multiples[axis])
    others = [a for a in range(3) if a != axis]
    growth = math.sqrt(math.prod(preset_patch) / depth / math.prod(preset_patch[a] for a in others))
    patch = [0, 0, 0]
    patch[axis] = depth
    for a in others:
        largest = -(-shape[a] // multiples[a]) * multiples[a]  # the median size, rounded up
        patch[a] = min(largest, max(multiples[a], int(preset_patch[a] * growth) // multiples[a] * multiples[a]))
    return tuple(patch)


def plan_config(config: RunConfig, cohort: Cohort, given: Collection[str] = ()
                ) -> Tuple[RunConfig, Optional[Plan], Optional[Fingerprint]]:
    """``config`` with the cohort's plan applied to the planned fields that were not set by hand (not in ``given``,
    the dotted paths of the user's overrides, and still the preset's values), the plan and the fingerprint;
    ``config`` unchanged and None, None when ``plan.enabled`` is false."""
    if not config.plan.enabled:
        return config, None, None
    found = fingerprint(cohort)
    base = preset(config.preset)
    by_hand = "patch_size" in given or config.patch_size != base.patch_size
    plan = make_plan(found, config, config.patch_size if by_hand else None)
    for path, value in plan.values().items():
        if path not in given and _get(config, path) == _get(base, path):
            config = _set(config, path, value)
    return config, plan, found


def plan_record(config: RunConfig, plan: Plan, found: Fingerprint) -> Dict[str, Any]:
    """``plan.json``: the fingerprint, each planned field's value in the run (set by hand where it differs from the
    plan's) and why the plan chose it."""
    return {
        "fingerprint": {"median_spacing": found.median_spacing, "median_shape": found.median_shape,
                        "volumes": len(found.shapes),
                        "largest_component_shares": {str(k): v for k, v in found.largest_component_shares.items()},
                        "minimum_intensity": min(found.minima), "integer_valued": found.integer_valued,
                        "foreground_intensity": dict(zip(("p0.5", "p99.5", "mean", "std"), found.foreground))},
        "planned": {path: {"plan": _plain(value), "used": _plain(_get(config, path)),
                           "reason": plan.reasons.get(path, "")}
                    for path, value in plan.values().items()},
        "summary": plan.summary(),
    }


def _get(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def _set(config: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(config, **{head: value})
    return dataclasses.replace(config, **{head: _set(getattr(config, head), rest, value)})


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _text(values: Sequence[Any]) -> str:
    return "×".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
