"""The resumable state of a training stage (SAM fine-tuning, V-Net re-training) and its loss log.

A stage first asks :func:`reuse_trained` whether its final outputs are current. Otherwise it saves its state every
few iterations, when cancelled and at the end, atomically, together with the
:class:`~SFRSegmentLib.storage.provenance.Inputs` it is training from. A rerun resumes the checkpoint only when those inputs
are still the current ones; a stale or damaged checkpoint is discarded with a progress message and the stage starts
from iteration 0 (it can always be recomputed, so neither is an error).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from ..base.distributed import ranks
from ..base.progress import Progress, ProgressEvent
from .atomic import atomic_path, atomic_write_text
from .provenance import MISSING, Inputs, forget, stale_reason

FORMAT = "sfrsegment-checkpoint/3"


def reuse_trained(outputs: Sequence[Path], inputs: Inputs, stage: str, total: int, progress: Progress,
                  done: str, stale_message: str) -> bool:
    """True when the stage's ``outputs`` were trained from ``inputs`` (the progress stream says ``done``). Otherwise
    rank 0 deletes them and False is returned; outputs that existed are announced as ``stale_message``, formatted
    with the reason (``{reason}``)."""
    stale = stale_reason(outputs, inputs)
    if stale is None:
        progress(ProgressEvent(stage, total, total, message=done))
        return True
    if stale != MISSING:
        progress(ProgressEvent(stage, 0, total, message=stale_message.format(reason=stale)))
    if ranks().is_main:
        forget(outputs)
    return False


def save_checkpoint(path: Path, state: Mapping[str, Any], inputs: Inputs, log_path: Path,
                    log: Sequence[Mapping[str, Any]]) -> None:
    """Write ``state`` with ``inputs`` to ``path``, then the log so far to ``log_path`` (rank 0 only: the
    processes' states are equal, or ``state`` already gathers what differs)."""
    if not ranks().is_main:
        return
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "inputs": inputs.as_dict(), **state}, tmp)
    write_log(log_path, log)


def load_checkpoint(path: Path, inputs: Inputs, stage: str, total: int, progress: Progress,
                    map_location: Any = "cpu") -> Optional[Dict[str, Any]]:
    """The state saved at ``path`` when it was made from ``inputs``; None when there is none, or when it is stale
    or unreadable (then rank 0 deletes it and the progress stream says why)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load raises many types for damaged files
        reason = f"it cannot be read ({type(error).__name__}: damaged or cut short)"
    else:
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            reason = f"it is not a checkpoint of this engine's format {FORMAT}"
        else:
            reason = "; ".join(inputs.changes_from(state.get("inputs")))
            if not reason:
                return state
    progress(ProgressEvent(stage, 0, total, message=f"not resuming {path}: {reason}; starting from iteration 0"))
    if ranks().is_main:
        path.unlink(missing_ok=True)
    return None


def saved_iteration(path: Path, inputs: Inputs) -> int:
    """The iterations done by the checkpoint at ``path`` when :func:`load_checkpoint` would resume it, else 0 (for
    the run-time estimate). Memory-mapped, so the weights are not read; reading it changes nothing."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, or damaged: torch.load raises many types
        return 0
    if not isinstance(state, dict) or state.get("format") != FORMAT or inputs.changes_from(state.get("inputs")):
        return 0
    return int(state.get("iteration", 0))


def write_log(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """The training log as CSV, columns in the order the first row gives them."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def iterations_left(total: int, outputs: Sequence[Path], checkpoint: Path, inputs: Inputs) -> int:
    """What a training stage still has to do: 0 when its ``outputs`` are current; else ``total`` less what a
    checkpoint saved from the same ``inputs`` has done (for the estimate; reading changes nothing)."""
    if stale_reason(outputs, inputs) is None:
        return 0
    return max(0, total - saved_iteration(checkpoint, inputs))
