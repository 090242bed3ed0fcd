"""Benchmark of data-parallel training with torchrun: step time with 1 and with N processes at the same per-process
batch, for the fine-tuning step (stage F) and the re-training step (stage R), as the engine runs them.

For each process count the script starts ``python -m torch.distributed.run --standalone --nproc_per_node=N`` on
itself. Every rank builds the stage's real training object (:class:`SFRSegmentLib.stages.finetune._Training` on
:class:`~SFRSegmentLib.stages.finetune.MosaicBatches`, :class:`SFRSegmentLib.stages.retrain.Trainer` on
:func:`~SFRSegmentLib.stages.retrain.draw_batch`) over a synthetic cohort, runs ``--warmup`` untimed and ``--iterations``
timed steps, and rank 0 prints the mean step time. With N processes every step trains N times as many samples
(the global batch), so the printed throughput (samples / s) is the number to compare.

On the CPU the processes share the machine's cores: ``--threads`` is the total, divided between the processes
(on a 2-core machine 1 process × 2 threads versus 2 processes × 1 thread, i.e. the same hardware). With CUDA
(``--device cuda``) each process takes one GPU.

Usage::

    .venv/bin/python benchmarks/bench_distributed.py                          # CPU, 1 and 2 processes
    .venv/bin/python benchmarks/bench_distributed.py --device cuda --processes 1 2 4 --paper
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

STAGES = ("finetune", "retrain")


def time_steps(step, warmup: int, iterations: int) -> float:
    """Mean seconds of ``iterations`` calls of ``step`` after ``warmup`` untimed ones, all ranks in step."""
    import torch.distributed as dist

    for _ in range(warmup):
        step()
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if dist.is_initialized():
        dist.barrier()
    return (time.perf_counter() - start) / iterations


def finetune_step(cohort, device: torch.device, paper: bool):
    """One fine-tuning iteration (sample → forward → loss → backward → AdamW) and the per-rank batch."""
    from SFRSegmentLib.base.config import preset
    from SFRSegmentLib.stages.finetune import (
        MosaicBatches,
        _Training,
        build_base_sam,
        finetune_inputs,
        load_training_volume,
        training_layout,
    )

    config = preset("paper" if paper else "small").resolved(len(cohort.classes)).finetune
    config = dataclasses.replace(config, base_checkpoint=None, allow_random_init=True, device=str(device))
    layout = training_layout(config.patch_size, config.sam, config.depth_padding)
    batches = MosaicBatches([load_training_volume(c, cohort.classes) for c in cohort.labeled], layout, config,
                            device)
    training = _Training(build_base_sam(config.sam, None, config.seed).to(device), config,
                         finetune_inputs(config, cohort, None))
    return (lambda: training.step(batches)), config.batch_size


def retrain_step(cohort, device: torch.device, paper: bool):
    """One SFR_MT re-training iteration (with cached pseudo-labels: the labels of the 'unlabeled' cases)."""
    from SFRSegmentLib.base.config import parse_method, preset
    from SFRSegmentLib.models.vnet import VNetInfo
    from SFRSegmentLib.stages.retrain import Trainer, draw_batch, load_training_cases

    config = dataclasses.replace(preset("paper" if paper else "small").resolved().retrain, device=str(device),
                                 **parse_method("sfr_mt"))
    unlabeled = [dataclasses.replace(case, label=None) for case in cohort.unlabeled]
    pseudo = {case.name: Path(cohort.root) / "truth" / case.name / "label.nrrd" for case in unlabeled}
    info = VNetInfo(classes=dict(cohort.classes), patch_size=config.patch_size)
    trainer = Trainer(config, info, len(cohort.labeled), len(unlabeled), device)
    labeled_cases = load_training_cases(cohort, cohort.labeled, pseudo)
    unlabeled_cases = load_training_cases(cohort, unlabeled, pseudo)

    def step() -> None:
        batch = draw_batch(labeled_cases, unlabeled_cases, trainer.sampler, trainer.rng, config, True, device)
        trainer.step(batch)

    return step, config.batch_labeled + config.batch_unlabeled


def child(args: argparse.Namespace) -> None:
    """One rank: time the stage's step and, on rank 0, print one JSON line."""
    from SFRSegmentLib.data.cohort import discover_cohort
    from SFRSegmentLib.base.distributed import process_group

    with process_group(use_cuda=args.device == "cuda") as here:
        device = torch.device(args.device)
        cohort = discover_cohort(args.cohort)
        make_step = finetune_step if args.child == "finetune" else retrain_step
        step, per_rank_batch = make_step(cohort, device, args.paper)
        seconds = time_steps(step, args.warmup, args.iterations)
        if here.is_main:
            samples = per_rank_batch * here.world_size
            print(json.dumps({"stage": args.child, "processes": here.world_size, "step_s": seconds,
                              "global_batch": samples, "samples_per_s": samples / seconds}), flush=True)


def launch(stage: str, processes: int, cohort: Path, args: argparse.Namespace) -> Dict[str, float]:
    threads = max(1, args.threads // processes) if args.device == "cpu" else args.threads
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--child", stage, "--cohort", str(cohort), "--device", args.device,
               "--warmup", str(args.warmup), "--iterations", str(args.iterations)] + (["--paper"] if args.paper else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode:
        raise SystemExit(f"{stage} with {processes} processes failed:\n{result.stderr[-4000:]}")
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("{")][-1]
    return {**json.loads(line), "threads_per_process": threads}


def main(argv: List[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--paper", action="store_true", help="the paper's shapes instead of the small preset's")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in total, shared by the processes")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--cohort", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    from SFRSegmentLib.research.synthetic import make_synthetic_cohort

    with tempfile.TemporaryDirectory() as folder:
        size = ((120, 128), (120, 128), (84, 90)) if args.paper else ((64, 72), (64, 72), (20, 24))
        make_synthetic_cohort(Path(folder), n_cases=6, n_labeled=2, size_range=size)
        print(f"{'stage':<9} {'processes':>9} {'threads/proc':>12} {'global batch':>12} {'step s':>8} "
              f"{'samples/s':>10} {'speed-up':>8}")
        for stage in args.stages:
            baseline = None
            for processes in args.processes:
                row = launch(stage, processes, Path(folder), args)
                baseline = baseline or row["samples_per_s"]
                print(f"{stage:<9} {processes:>9} {row['threads_per_process']:>12} {row['global_batch']:>12} "
                      f"{row['step_s']:>8.3f} {row['samples_per_s']:>10.2f} "
                      f"{row['samples_per_s'] / baseline:>7.2f}×", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
