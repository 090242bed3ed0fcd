"""Resampling between a volume's own grid and a coarser working grid (training at a working spacing).

A V-Net trained at a working voxel size (``RetrainConfig.spacing``, recorded in the model file) sees every volume
resampled to that size, and its probabilities are resampled back to each volume's own grid before the argmax, as
nnU-Net does: the labels always come out on the input image's grid, at its resolution.

The working grid covers exactly the same box as the volume's own grid: along an axis of n voxels of size s, it has
m = max(1, round(n·s / t)) voxels of size n·s / m for a target size t (so the working spacing can differ from t by
half a voxel over the whole extent), and its first voxel's corner coincides with the original first voxel's corner.
With both grids sharing corners and directions, the physical mapping between them is the one of
``torch.nn.functional.interpolate`` with ``align_corners=False``: output voxel o samples input coordinate
(o + ½)·n/m − ½. Images and probabilities are interpolated trilinearly, label maps with ``nearest-exact`` (the
voxel whose centre is nearest).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..base.config import Spacing
from ..storage.volumes import Volume


def working_shape(volume: Volume, spacing: Spacing) -> Tuple[int, int, int]:
    """The voxel counts of ``volume``'s box at the working ``spacing`` (module docstring)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(volume.shape, volume.spacing, spacing))


def to_working_grid(volume: Volume, spacing: Spacing, labels: bool = False) -> Volume:
    """``volume`` resampled to the working ``spacing`` (trilinear, or nearest voxel for ``labels``), with the
    working grid's geometry. A volume already at that grid is returned as it is."""
    shape = working_shape(volume, spacing)
    if shape == volume.shape:
        return volume
    tensor = torch.from_numpy(np.ascontiguousarray(volume.array))[None, None]
    if labels:
        # nearest-exact is not implemented for integer tensors; small integers are exact in float32
        resampled = F.interpolate(tensor.float(), size=shape, mode="nearest-exact").to(tensor.dtype)
    else:
        resampled = F.interpolate(tensor.float(), size=shape, mode="trilinear", align_corners=False)
    new_spacing = np.asarray(volume.shape) * np.asarray(volume.spacing) / np.asarray(shape)
    # Keep the box's corner: voxel centres move by half the change of the voxel size along each axis.
    origin = np.asarray(volume.origin) + volume.direction @ ((new_spacing - np.asarray(volume.spacing)) / 2)
    return dataclasses.replace(volume, array=resampled[0, 0].numpy(), spacing=tuple(new_spacing),
                               origin=tuple(origin), path=None)


def to_native_grid(probabilities: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Class probabilities (C, I, J, K) on a working grid, trilinearly resampled to the volume's own ``shape``
    (the box is the same, see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    if tuple(probabilities.shape[1:]) == shape:
        return probabilities
    return F.interpolate(probabilities[None].float(), size=shape, mode="trilinear", align_corners=False)[0]
