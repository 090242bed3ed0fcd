"""What a planned patch costs per re-training iteration: the cpu preset's left-atrium patch (64×64×32, 2×2×2
strides, 3×3×3 kernels) beside the patch the plan gives thick-slice cine MRI (128×128×8, strides 2×2×1 2×2×1 2×2×2
2×2×2: the LA patch's voxels) and a cheaper candidate within the LA patch's operations per forward (80×96×8 with 3×3×1
kernels at the two finest scales, ``retrain.conv_kernels``; on ACDC it segmented worse, docs/results.md). Each row
also prints the operations of one forward (:func:`SFRSegmentLib.models.vnet.forward_flops`).

Each is one Mean Teacher iteration of stage R's own ``Trainer`` (student forward and backward, teacher forward, SGD
step; 2 labeled + 2 unlabeled crops, 3 classes), the cpu preset's settings otherwise, on synthetic volumes. The
patches are timed in turns (A B C A B C …) in one process, so that a busy machine slows all of them alike and the
ratios hold even where the seconds do not. Usage::

    .venv/bin/python benchmarks/bench_plan.py --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from SFRSegmentLib.base.config import REFERENCE_CONV_KERNELS, REFERENCE_DOWNSAMPLING, preset  # noqa: E402
from SFRSegmentLib.models.vnet import forward_flops  # noqa: E402
from SFRSegmentLib.stages.retrain import Trainer, TrainingCase, draw_batch, trained_vnet_info  # noqa: E402

THICK = ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))
IN_PLANE_FIRST = ((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3))
Shape = Tuple[int, int, int]
PATCHES: Dict[str, Tuple[Shape, Tuple[Shape, ...], Tuple[Shape, ...]]] = {
    "LA preset 64×64×32": ((64, 64, 32), REFERENCE_DOWNSAMPLING, REFERENCE_CONV_KERNELS),
    "ACDC plan 128×128×8": ((128, 128, 8), THICK, REFERENCE_CONV_KERNELS),
    "80×96×8, 3×3×1 kernels": ((80, 96, 8), THICK, IN_PLANE_FIRST),
}
CLASSES = {1: "right ventricle", 2: "myocardium", 3: "left ventricle"}


def make_step(patch, downsampling, kernels):
    settings = dataclasses.replace(preset("cpu").retrain, ssl_method="mt", pseudo_labels="none",
                                   patch_size=patch, downsampling=downsampling,
                                   conv_kernels=kernels, precision="fp32", iterations=1500)
    device = torch.device("cpu")
    trainer = Trainer(settings, trained_vnet_info(settings, CLASSES), 1, 1, device)
    shape = tuple(2 * s for s in patch[:2]) + (patch[2] + 2,)
    rng = np.random.default_rng(0)
    image = rng.standard_normal(shape).astype(np.float32)
    target = rng.integers(0, 4, shape).astype(np.int64)
    labeled, unlabeled = [TrainingCase("l", image, target)], [TrainingCase("u", image, None)]

    def step() -> float:
        started = time.perf_counter()
        trainer.step(draw_batch(labeled, unlabeled, trainer.sampler, trainer.rng, settings, False, device))
        return time.perf_counter() - started

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed iterations of each patch (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = {name: make_step(*spec) for name, spec in PATCHES.items()}
    for step in steps.values():
        step()  # warm-up: allocations, kernel selection
    times: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(step())
    base = statistics.median(times[next(iter(times))])
    print(f"Mean Teacher re-training iteration, 2 + 2 crops, 3 classes, fp32, {args.threads} threads, median of "
          f"{args.rounds} in turns")
    print(f"{'patch':<24}{'voxels':>9}{'GFLOP':>8}{'s / iteration':>16}{'vs LA':>8}")
    for name, (patch, downsampling, kernels) in PATCHES.items():
        median = statistics.median(times[name])
        flops = forward_flops(patch, downsampling=downsampling, conv_kernels=kernels) / 1e9
        print(f"{name:<24}{int(np.prod(patch)):>9}{flops:>8.1f}{median:>16.2f}{median / base:>8.2f}")


if __name__ == "__main__":
    main()
