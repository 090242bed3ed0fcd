"""Progress reporting and cancellation shared by the long-running stages.

A stage reports :class:`~SFRSegmentLib.base.events.ProgressEvent` objects to a :data:`Progress` callable. The command
line turns them into a tqdm bar on a terminal (:class:`TqdmReporter`) or into JSON lines on stdout
(:class:`JsonLinesReporter`, one object per line with the keys of :class:`ProgressEvent`: stage, step, total, loss,
metric, eta_s, message, level): the JSON lines are the one contract between the Slicer module and the engine's child
process (:mod:`SFRSegmentLib.base.events` defines and parses them). ``level`` is ``info`` or ``warning``;
the run-time estimate (stage ``estimate``, :mod:`SFRSegmentLib.run.estimate`) warns this way before a run that would
take many hours.

A :class:`Cancellation` is a flag a stage checks once per iteration. Inside :meth:`Cancellation.on_signals`, SIGINT
and SIGTERM set it instead of killing the process, so the stage saves its checkpoint and raises :class:`Cancelled`; a
second SIGINT interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Callable, Iterator, Optional, TextIO

from tqdm import tqdm

from .distributed import ranks
from .events import ProgressEvent  # noqa: F401  (stages import it from here)

Progress = Callable[[ProgressEvent], None]
"""Anything that accepts progress events."""


def ignore_progress(event: ProgressEvent) -> None:
    """A :data:`Progress` that drops every event (what a stage uses when it is given none)."""


class JsonLinesReporter:
    """Writes every event as one JSON object per line to ``stream`` (stdout by default), flushed at once."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream

    def __call__(self, event: ProgressEvent) -> None:
        stream = self.stream or sys.stdout
        stream.write(event.to_json() + "\n")
        stream.flush()


class TqdmReporter:
    """One tqdm bar per stage (on stderr); loss and metric as its postfix, messages printed above it."""

    def __init__(self) -> None:
        self._bar: Optional[tqdm] = None
        self._stage = ""

    def __call__(self, event: ProgressEvent) -> None:
        if self._bar is None or event.stage != self._stage:
            self.close()
            self._bar = tqdm(total=event.total, desc=event.stage, dynamic_ncols=True, file=sys.stderr)
            self._stage = event.stage
        if event.message:
            marker = "WARNING: " if event.level == "warning" else ""
            self._bar.write(f"[{event.stage}] {marker}{event.message}", file=sys.stderr)
        values = {"loss": event.loss, "metric": event.metric}
        self._bar.set_postfix({name: f"{value:.4f}" for name, value in values.items() if value is not None},
                              refresh=False)
        self._bar.update(event.step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


REPORTER_KINDS = ("bar", "jsonl", "none")


def make_reporter(kind: str) -> Progress:
    """The reporter the command line's ``--progress`` names: a tqdm ``bar``, ``jsonl`` on stdout, or ``none``."""
    if kind not in REPORTER_KINDS:
        raise ValueError(f"unknown progress reporter {kind!r}; expected one of {REPORTER_KINDS}")
    if not ranks().is_main:
        return ignore_progress  # under torchrun rank 0 reports for all processes
    return {"bar": TqdmReporter, "jsonl": JsonLinesReporter, "none": lambda: ignore_progress}[kind]()


class EtaClock:
    """Estimates the seconds left from the mean time per step since the clock started at ``start_step``."""

    def __init__(self, total: int, start_step: int = 0) -> None:
        self.total = total
        self.start_step = start_step
        self._started = time.perf_counter()

    def eta_s(self, step: int) -> Optional[float]:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self._started) / done * (self.total - step)


class Cancelled(Exception):
    """A stage stopped because cancellation was requested; what it had done is saved and a rerun resumes it."""


class Cancellation:
    """A thread-safe cancellation flag, set by :meth:`request` or by a signal inside :meth:`on_signals`."""

    def __init__(self) -> None:
        self._flag = threading.Event()

    def request(self) -> None:
        self._flag.set()

    @property
    def requested(self) -> bool:
        return self._flag.is_set()

    @contextlib.contextmanager
    def on_signals(self, signals: tuple = (signal.SIGINT, signal.SIGTERM)) -> Iterator["Cancellation"]:
        """While inside, the first of ``signals`` sets the flag; a second SIGINT raises KeyboardInterrupt.

        Signal handlers can only be installed from the main thread; elsewhere this does nothing.
        """
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handle(signum: int, frame: object) -> None:
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.request()

        previous = {number: signal.signal(number, handle) for number in signals}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
