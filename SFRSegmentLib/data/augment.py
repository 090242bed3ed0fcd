"""Spatial and intensity augmentation of training crops, for learning from very few labeled volumes.

The references train the V-Net with their 3D rot90 + flip alone (``RetrainConfig.rot_flip``), over 6,000 iterations.
With a few labeled volumes and a short CPU schedule the network then learns the training scans' intensities and
shapes by heart. ``RetrainConfig.augmentation = "strong"`` adds, per crop, the kinds of variation real scans differ
by (a milder form of nnU-Net's recipe):

* with probability 0.7 a random affine about the crop's centre: rotation by up to ±20° about the slice axis and ±5°
  about the two others, scaling by 0.85–1.15 per axis, in millimetres-true geometry (the crop's voxels are
  isotropic at the working spacing; with ``in_plane_only``, for thick-slice volumes, the rotation is about the
  slice axis alone and the slice axis is not scaled, so no 10 mm slice is mixed with its neighbours); the image is
  sampled trilinearly, the target (label or pseudo-label) by the
  nearest voxel, and zero (the mean, after the z-score) fills what moves in from outside;
* a gamma curve (γ in 0.7–1.5, probability 0.3), contrast ×0.75–1.25 and brightness ±0.25 (each with probability
  0.5), Gaussian noise of standard deviation up to 0.1 (probability 0.2).

They are written with torch's ``affine_grid``/``grid_sample`` rather than MONAI's ``RandAffined``, which takes
about 0.2 s per 80×80×48 crop on two CPU cores (as long as the training step itself) for the same resampling.
Every random draw comes from the caller's generator (the re-training's, saved in its checkpoints), so a resumed run
augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

AFFINE_P = 0.7
ROTATION_DEG = (5.0, 5.0, 20.0)
"""Largest rotation about array axes i, j and k (the slice axis)."""
SCALE = (0.85, 1.15)
GAMMA_P, GAMMA = 0.3, (0.7, 1.5)
CONTRAST_P, CONTRAST = 0.5, (0.75, 1.25)
BRIGHTNESS_P, BRIGHTNESS = 0.5, 0.25
NOISE_P, NOISE_STD = 0.2, 0.1


def augment_crop(image: np.ndarray, target: Optional[np.ndarray], rng: np.random.Generator,
                 in_plane_only: bool = False) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``image`` (z-scored float32 crop) and ``target`` (class indices, or None) with the ``strong`` augmentation
    (module docstring) drawn from ``rng``; same shapes and dtypes, C-contiguous."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    if rng.random() < AFFINE_P:
        theta = _affine(tensor.shape, rng, in_plane_only)
        tensor = _resample(tensor, theta, "bilinear")
        if target is not None:
            target = _resample(torch.from_numpy(target.astype(np.float32)), theta, "nearest").numpy().astype(
                target.dtype)
    if rng.random() < GAMMA_P:
        low, high = tensor.min(), tensor.max()
        span = torch.clamp(high - low, min=1e-6)
        tensor = ((tensor - low) / span) ** float(rng.uniform(*GAMMA)) * span + low
    if rng.random() < CONTRAST_P:
        tensor = tensor * float(rng.uniform(*CONTRAST))
    if rng.random() < BRIGHTNESS_P:
        tensor = tensor + float(rng.uniform(-BRIGHTNESS, BRIGHTNESS))
    if rng.random() < NOISE_P:
        noise = torch.Generator().manual_seed(int(rng.integers(0, 2 ** 63 - 1)))
        tensor = tensor + float(rng.uniform(0, NOISE_STD)) * torch.randn(tensor.shape, generator=noise)
    augmented = np.ascontiguousarray(tensor.numpy(), dtype=np.float32)
    return augmented, None if target is None else np.ascontiguousarray(target)


def _affine(shape: Tuple[int, ...], rng: np.random.Generator, in_plane_only: bool = False) -> torch.Tensor:
    """``affine_grid``'s 3×4 matrix (output → input, normalised coordinates, grid axes in (k, j, i) order) of a
    random rotation and scaling about the centre, true to the voxel geometry of a crop of ``shape``. The draws are
    the same with ``in_plane_only``, which zeroes the rotations about i and j and the scaling of k."""
    rotation = np.eye(3)
    for axis, limit in enumerate(ROTATION_DEG):
        angle = math.radians(rng.uniform(-limit, limit)) * (axis == 2 or not in_plane_only)
        plane = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[np.ix_(plane, plane)] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
        rotation = rotation @ turn
    scale = rng.uniform(*SCALE, size=3)
    if in_plane_only:
        scale[2] = 1.0
    half = np.asarray(shape, dtype=float) / 2  # voxels per unit of normalised coordinates, per array axis
    matrix = np.diag(1 / half) @ rotation @ np.diag(1 / scale) @ np.diag(half)
    theta = np.zeros((3, 4))
    theta[:, :3] = matrix[::-1, ::-1]  # array axes (i, j, k) → grid axes (x = k, y = j, z = i)
    return torch.from_numpy(theta).float()


def _resample(volume: torch.Tensor, theta: torch.Tensor, mode: str) -> torch.Tensor:
    grid = F.affine_grid(theta[None], [1, 1, *volume.shape], align_corners=False)
    return F.grid_sample(volume[None, None], grid, mode=mode, padding_mode="zeros", align_corners=False)[0, 0]
