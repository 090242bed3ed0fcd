"""Several processes with ``torchrun``: who this process is, and the few collective steps the stages need.

``torchrun --nproc_per_node=N -m SFRSegmentLib run …`` starts N copies of the engine with ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` set; :func:`process_group` joins them into one ``torch.distributed`` group (NCCL when the run
uses CUDA, gloo otherwise). Inside it the stages divide the work as follows:

* **training** (fine-tuning, re-training): every rank holds the same model, draws the same *global* batch from the
  same random generator and trains on its own slice of it (:func:`rank_slice`), under
  :class:`~torch.nn.parallel.DistributedDataParallel`, which averages the gradients. N ranks with a per-rank batch
  b therefore step like one process with batch N·b; batch-level terms (the soft Dice sums over the batch) see the
  whole global batch through :func:`gather_batch`. The learning rate is not rescaled: it applies to the averaged
  gradient of the global batch, exactly as in one process with that batch;
* **per-case work** (pseudo-labels, predictions, SFR+ scoring): :func:`map_cases` gives case i to rank i mod N and
  sends every result to rank 0, which writes it;
* **files**: rank 0 alone writes the run folder (checkpoints, weights, tables, reports); the other ranks wait at a
  :func:`barrier` before they read what it wrote. Several machines therefore need the cohort and the run folder on
  a shared file system.

Without ``torchrun`` (or with one process) every function here is the identity or a no-op, so a single-process run
is unchanged.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: ``rank`` of ``world_size`` (``local_rank`` on its machine)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and reports progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def ranks() -> Ranks:
    """The current group's ranks; a single process when no group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(use_cuda: bool) -> Iterator[Ranks]:
    """Join the torchrun group for the duration of the block (NCCL with ``use_cuda``, else gloo) and leave it after.

    Outside torchrun, or when a group is already up (a caller that manages its own), nothing is initialised.
    With CUDA each process takes the GPU of its ``LOCAL_RANK``.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield ranks()
        return
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield ranks()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (after rank 0 wrote files the others read)."""
    if ranks().is_distributed:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks after it (e.g. a download into the shared cache, which
    the others then find there)."""
    here = ranks()
    if not here.is_main:
        barrier()
    yield
    if here.is_main:
        barrier()


def on_main_rank(context: ContextManager[T]) -> ContextManager[Optional[T]]:
    """``context`` on rank 0 (or without torchrun), a no-op elsewhere: for what one process must hold for all, such as
    the run folder's lock."""
    return context if ranks().is_main else contextlib.nullcontext()


def rank_slice(global_count: int) -> slice:
    """This rank's share of a global batch of ``global_count`` items (N equal parts, in rank order)."""
    here = ranks()
    if global_count % here.world_size:
        raise ValueError(f"a global batch of {global_count} does not split over {here.world_size} processes")
    size = global_count // here.world_size
    return slice(here.rank * size, (here.rank + 1) * size)


def gather_batch(tensor: torch.Tensor) -> torch.Tensor:
    """The tensors of all ranks concatenated along the batch axis, in rank order, with gradients flowing back to
    each rank's own part. Every rank then computes the same batch-level loss term; DDP's gradient averaging
    (division by N) and the sum in the all-gather's backward (×N) cancel, leaving the gradient of that term."""
    if not ranks().is_distributed:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()), dim=0)


def mean_over_ranks(values: Sequence[float]) -> List[float]:
    """The average of each value over the ranks (for logging the loss of the global batch)."""
    if not ranks().is_distributed:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any: ranks agree to stop at the same iteration (a signal reaches
    them at slightly different times, and a rank that stops alone would leave the others waiting forever)."""
    if not ranks().is_distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_to_main(value: T) -> List[T]:
    """Every rank's ``value`` (picklable), in rank order, on rank 0; an empty list on the others."""
    if not ranks().is_distributed:
        return [value]
    gathered: Optional[List[Optional[T]]] = [None] * dist.get_world_size() if ranks().is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered or []  # type: ignore[return-value]


def broadcast_from_main(value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not ranks().is_distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics) into ``module`` on every rank, as DDP does for the
    model it wraps; used for networks outside DDP such as the Mean Teacher's EMA teacher."""
    if not ranks().is_distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def data_parallel(model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` under DistributedDataParallel in a group (on its device, parameters broadcast from rank 0), else
    ``model`` itself. The caller keeps the plain model for saving and EMA updates."""
    if not ranks().is_distributed:
        return model
    device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def map_cases(items: Sequence[T], compute: Callable[[T], R], write: Callable[[T, R], None]) -> None:
    """Run ``compute`` on this rank's share of ``items`` (item i on rank i mod N) and ``write`` each result on rank
    0, in item order; every rank returns once rank 0 has written everything.

    The work goes in rounds of N items, so rank 0 holds one result per rank at a time. What the other ranks need
    afterwards (e.g. a confidence per case) ``write`` can collect for :func:`broadcast_from_main`. In one process
    this is ``compute`` then ``write`` for each item.
    """
    here = ranks()
    for start in range(0, len(items), here.world_size):
        chunk = items[start:start + here.world_size]
        mine = compute(chunk[here.rank]) if here.rank < len(chunk) else None
        gathered = gather_to_main(mine)[: len(chunk)]
        if here.is_main:
            for item, result in zip(chunk, gathered):
                write(item, result)
    barrier()
