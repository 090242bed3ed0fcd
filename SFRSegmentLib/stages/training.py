"""The one training loop of the training stages: SAM's fine-tuning (F) and the V-Net's re-training (R).

Each stage keeps what is its own (model, optimiser, batches, what a checkpoint holds) behind two callables, one
optimiser step and one checkpoint write; this loop owns what they share: where a cancellation is honoured (before a
step, on every rank at once), when a checkpoint is written (every ``checkpoint_every`` iterations, at the end and
when cancelled), and the progress events with their time estimate. Resuming is the stages' own: they restore their
state from the checkpoint before calling the loop, which continues from their iteration.

Why not MONAI's engines (ignite's ``Engine`` with handlers): they count epochs over a data loader, while both stages
draw seeded batches by iteration and must resume bit for bit at any iteration, random generator states included,
across several processes; the handlers would wrap these same twenty lines without removing any of them.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..base.distributed import any_rank
from ..base.progress import Cancellation, Cancelled, EtaClock, Progress, ProgressEvent


def train(stage: str, task: str, position: Callable[[], int], total: int, checkpoint_every: int,
          step: Callable[[], float], save: Callable[[], None], progress: Progress,
          cancellation: Optional[Cancellation]) -> None:
    """Run ``step`` (one optimiser step, returning its loss) until ``position()`` (iterations done) reaches
    ``total``. ``save`` writes the checkpoint; every rank calls it. A cancellation request saves a checkpoint and
    raises :class:`Cancelled`, whose message says that ``task`` stopped and a rerun resumes."""
    clock = EtaClock(total, position())
    while position() < total:
        if any_rank(cancellation is not None and cancellation.requested):
            save()
            raise Cancelled(f"{task} stopped at iteration {position()} of {total}; the checkpoint is saved and a "
                            "rerun resumes from it")
        loss = step()
        done = position()
        if done % checkpoint_every == 0 or done == total:
            save()
        progress(ProgressEvent(stage, done, total, loss=loss, eta_s=clock.eta_s(done)))
