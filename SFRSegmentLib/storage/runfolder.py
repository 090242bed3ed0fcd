"""The run folder: where every stage reads and writes. Documented here once; stages and the Slicer module use it.

::

    RUN/
      config.json                      resolved configuration of the run
      manifest.json                    versions, device, seeds, SHA-256 of the inputs (split: train or test)
      plan.json                        the plan made from the cohort's fingerprint (SFRSegmentLib.run.plan), if any
      finetune/                        stage F (SAM fine-tuning)
        checkpoint.pt                  resumable state (trainable weights, optimizer, schedule, RNG, iteration)
        sam_trainable.pt               final trainable SAM weights (LoRA + prompt encoder + mask decoder)
        sam_trainable.json             its SAM config, the base checkpoint, iterations, SHA-256 of the .pt
        log.csv                        iteration, loss, lr
      pseudolabels/                    stage P (whole-volume SAM pseudo-labels of the unlabeled cases)
        <case>.label.nrrd              hard label (uint8) on the image's grid and geometry
        <case>.prob.npy                class probabilities, uint8 (K+1, I, J, K), p = value / 255
        confidence.csv                 case, confidence (mean max-softmax, SFR+ definition), least confident first
      retrain/                         stage R (V-Net re-training)
        checkpoint.pt, vnet.pt, vnet.json, log.csv
      predictions/<case>.seg.nrrd, <case>.nii.gz   the unlabeled and held-out test cases, on each image's grid
      predictions/confidence.csv       case, confidence of the V-Net's prediction, least confident first (review)
      metrics.csv                      split (test / unlabeled), case, class, Dice, Jaccard, HD95, ASD
      baseline/                        with baseline_method: its retrain/, predictions/ and metrics.csv
      report.html
      provenance.json                  the identity of every output the metrics and report came from
      timings.json                     wall seconds per stage of the last invocation of run
      .lock                            held by the process that runs in this folder (see RunFolder.exclusive)

Beside each stage output (``sam_trainable.pt``, ``<case>.label.nrrd``, ``vnet.pt``, ``<case>.seg.nrrd``) its
provenance record ``<output>.provenance.json`` says what it was computed from and holds the SHA-256 of each of its
files (:mod:`SFRSegmentLib.storage.provenance`): an output damaged afterwards (cut short, emptied, overwritten) is recomputed.
Every file is written atomically (see :mod:`SFRSegmentLib.storage.atomic`): a file that exists is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

from ..base.errors import InputError, PathLike


CONFIDENCE_TABLE = "confidence.csv"
"""The confidence table's file name, in ``pseudolabels/`` and in every prediction folder."""
PROBABILITY_SCALE = 255
"""Probabilities are stored as uint8: p = stored / PROBABILITY_SCALE (a 0.002 quantisation step)."""


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one run folder. Creating the object touches nothing on disk."""

    root: Path

    def __init__(self, root: PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @contextlib.contextmanager
    def exclusive(self) -> Iterator["RunFolder"]:
        """Hold the folder's lock while the body runs; a second process (a second click on Run, a second command)
        gets an :class:`InputError` at once instead of overwriting the first one's files.

        The lock is an OS file lock on ``.lock``, so the OS releases it when its process dies, however it dies: no
        stale lock survives a kill. Once it is held, the hidden temporary folders that killed writers left behind
        (``.<name>.*.partial``, :mod:`SFRSegmentLib.storage.atomic`) are removed, since no writer can still be using them.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = self.root / ".lock"
        with open(lock_path, "a+", encoding="utf-8") as lock_file:
            if not _try_lock(lock_file):
                raise InputError(f"another SFRSegment process (pid {_lock_holder(lock_path)}) is running in this run "
                                 "folder; wait for it to finish or stop it, or choose another output folder", self.root)
            lock_file.seek(0)
            lock_file.truncate()
            lock_file.write(f"{os.getpid()}\n")
            lock_file.flush()
            for leftover in sorted(self.root.rglob(".*.partial"), reverse=True):
                shutil.rmtree(leftover, ignore_errors=True)
            yield self  # the lock ends when the file is closed

    def in_use(self) -> bool:
        """Whether a process holds the folder's lock now (see :meth:`exclusive`), without waiting or writing.

        A free lock is taken for an instant and released, so a process that tries to take it in that instant is
        refused as if the folder were in use; a folder without ``.lock`` is not in use.
        """
        try:
            lock_file = open(self.root / ".lock", "r+", encoding="utf-8")
        except FileNotFoundError:
            return False
        with lock_file:
            if not _try_lock(lock_file):
                return True
            _unlock(lock_file)
            return False

    # run level
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    # stage F
    @property
    def finetune_dir(self) -> Path:
        return self.root / "finetune"

    @property
    def finetune_checkpoint(self) -> Path:
        return self.finetune_dir / "checkpoint.pt"

    @property
    def sam_weights(self) -> Path:
        return self.finetune_dir / "sam_trainable.pt"

    @property
    def sam_weights_info(self) -> Path:
        return self.finetune_dir / "sam_trainable.json"

    @property
    def finetune_log(self) -> Path:
        return self.finetune_dir / "log.csv"

    # stage P
    @property
    def pseudolabel_dir(self) -> Path:
        return self.root / "pseudolabels"

    def pseudo_label(self, case: str) -> Path:
        return self.pseudolabel_dir / f"{case}.label.nrrd"

    def pseudo_probabilities(self, case: str) -> Path:
        return self.pseudolabel_dir / f"{case}.prob.npy"

    def pseudo_label_files(self, case: str) -> List[Path]:
        """Both files of a case's pseudo-label; the first one carries the provenance record."""
        return [self.pseudo_label(case), self.pseudo_probabilities(case)]

    @property
    def confidence_table(self) -> Path:
        return self.pseudolabel_dir / CONFIDENCE_TABLE

    # stage R
    @property
    def retrain_dir(self) -> Path:
        return self.root / "retrain"

    @property
    def retrain_checkpoint(self) -> Path:
        return self.retrain_dir / "checkpoint.pt"

    @property
    def vnet_weights(self) -> Path:
        return self.retrain_dir / "vnet.pt"

    @property
    def retrain_log(self) -> Path:
        return self.retrain_dir / "log.csv"

    # outputs
    @property
    def prediction_dir(self) -> Path:
        return self.root / "predictions"

    @property
    def prediction_confidence(self) -> Path:
        return self.prediction_dir / CONFIDENCE_TABLE

    def prediction(self, case: str, suffix: str = ".seg.nrrd") -> Path:
        return self.prediction_dir / f"{case}{suffix}"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def baseline(self) -> "RunFolder":
        """The comparison run of ``baseline_method`` (its own retrain/, predictions/ and metrics.csv)."""
        return RunFolder(self.root / "baseline")


def _lock_holder(lock_path: Path) -> str:
    """The pid the holder wrote into the lock file ("unknown" where it cannot be read, e.g. locked on Windows)."""
    try:
        return lock_path.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


def _unlock(lock_file) -> None:
    """Release the lock :func:`_try_lock` took (Windows wants it released before the file is closed)."""
    if os.name == "nt":
        import msvcrt

        lock_file.seek(0)
        msvcrt.locking(lock_file.fileno(), msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _try_lock(lock_file) -> bool:
    """Take an exclusive, non-blocking lock on the open file; False when another process holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            lock_file.seek(0)
            msvcrt.locking(lock_file.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
