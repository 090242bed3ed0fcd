"""The engine's child process: start it, read its JSON-lines progress, cancel it with everything it started.

Standard library only (with the engine's stdlib-only :mod:`SFRSegmentLib.base.events`), so it works inside Slicer before
the engine's dependencies are installed, under ``PythonSlicer`` and in a plain Python.

The engine (``python -m SFRSegmentLib run … --progress jsonl``) writes one JSON object per line on stdout with the
fields of :class:`SFRSegmentLib.base.events.ProgressEvent` (stage, step, total, loss, metric, eta_s, message, level).
Any other line, on stdout or stderr, is log text. :class:`EngineJob` turns the output into :class:`ProgressEvent`
objects and log lines, and the end of the process into an :class:`Outcome`. It is driven either by a Qt timer calling
:meth:`EngineJob.poll` (in the GUI) or by :meth:`EngineJob.wait` (a blocking loop, for scripts).

The process is started through a runner object (:class:`ChildProcessRunner` by default) so that tests and other hosts
can supply their own.

Cancelling stops the whole process tree, not only the child: the engine may run worker processes. On POSIX the child
leads a new process group; cancel sends SIGTERM to the group (the engine then saves a checkpoint and exits, so a rerun
resumes), and SIGKILL to whatever is left of the group once the child has exited or after a grace period. On Windows
``taskkill /T /F`` ends the tree at once, as Windows has no SIGTERM a console-less child could catch.
"""

from __future__ import annotations

import collections
import enum
import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

from SFRSegmentLib.base.errors import EXIT_BAD_INPUT, printed_error
from SFRSegmentLib.base.events import ProgressEvent, parse_progress_line

STDOUT = "stdout"
STDERR = "stderr"
STDERR_LINES_KEPT = 20
"""How many of the last stderr lines a failure message quotes."""
CANCEL_GRACE_S = 30.0
"""How long a cancelled engine may take to save its checkpoint before its process group is killed: generous, since
a busy computer (a heavy job beside Slicer) slows the save, and a save cut short loses the run's progress; an engine
that exits sooner is never waited for."""
_POLL_INTERVAL_S = 0.2
_CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)
"""Windows: start console programs without a console window (0 elsewhere)."""
_DRAIN_S = 2.0
"""How long output is still awaited after the child has exited (a leftover grandchild may hold its pipes open)."""


# ---------------------------------------------------------------------------------------------------------------
# Starting and stopping a process tree


class ChildProcess:
    """A started child process whose stdout and stderr lines are collected by two reader threads."""

    def __init__(self, popen: "subprocess.Popen[str]") -> None:
        self._popen = popen
        self._lines: "queue.Queue[Tuple[str, Optional[str]]]" = queue.Queue()
        self._open_streams = 2
        self._exited_at: Optional[float] = None
        for name, stream in ((STDOUT, popen.stdout), (STDERR, popen.stderr)):
            threading.Thread(target=self._read, args=(name, stream), name=f"SFRSegment {name} reader",
                             daemon=True).start()

    @property
    def pid(self) -> int:
        return self._popen.pid

    def _read(self, name: str, stream) -> None:
        # Only a queue is touched here: reader threads must not call Qt or MRML.
        for line in stream:
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()
        self._lines.put((name, None))

    def read_lines(self) -> List[Tuple[str, str]]:
        """The (stream, text) lines that arrived since the last call; never blocks."""
        lines = []
        while True:
            try:
                name, text = self._lines.get_nowait()
            except queue.Empty:
                return lines
            if text is None:
                self._open_streams -= 1
            else:
                lines.append((name, text))

    def exit_code(self) -> Optional[int]:
        """The exit status once the process has ended and its output has been read, else None."""
        code = self._popen.poll()
        if code is None:
            return None
        if self._open_streams > 0:
            self._exited_at = self._exited_at or time.monotonic()
            if time.monotonic() - self._exited_at < _DRAIN_S:
                return None
        return code

    def terminate(self) -> None:
        """Ask the process tree to stop (SIGTERM to the process group on POSIX; the tree is killed on Windows)."""
        if os.name == "nt":
            self.kill()
        else:
            self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the whole process tree at once."""
        if os.name == "nt":
            # taskkill is the only stock way to end a Windows process tree without psutil.
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.pid)], capture_output=True,
                           creationflags=_CREATE_NO_WINDOW)
        else:
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, signal_number: int) -> None:
        try:
            os.killpg(self.pid, signal_number)  # the child leads its own group: see ChildProcessRunner.start
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already



class ChildProcessRunner:
    """Starts processes so that their whole tree can be stopped: in a new session (POSIX) or process group."""

    def start(self, command: Sequence[str], environment: Mapping[str, str], working_directory: Path) -> ChildProcess:
        options: Dict[str, object] = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | _CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True
        popen = subprocess.Popen(
            list(command),
            env=dict(environment),
            cwd=str(working_directory),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        return ChildProcess(popen)


# ---------------------------------------------------------------------------------------------------------------
# Watching the engine


class Status(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Outcome:
    """How a job ended: its status, the exit code, and for a failure the message to show (with stderr's tail)."""

    status: Status
    exit_code: int
    message: str = ""


class EngineFailed(RuntimeError):
    """The engine's process ended with an error; ``str(error)`` is its message for bad input (exit status
    :data:`EXIT_BAD_INPUT`: :attr:`bad_input`), else quotes the last lines of its error output."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    @property
    def bad_input(self) -> bool:
        """Whether the engine refused its input: the message says what to fix, and is all there is to show."""
        return self.exit_code == EXIT_BAD_INPUT


class EngineCancelled(RuntimeError):
    """The job was cancelled; what the engine had finished is kept in its run folder, and a rerun resumes."""


class EngineJob:
    """A running engine process: its output dispatched to callbacks, its end turned into an :class:`Outcome`."""

    def __init__(
        self,
        process: ChildProcess,
        on_progress: Optional[Callable[[ProgressEvent], None]] = None,
        on_log: Optional[Callable[[str], None]] = None,
        cancel_grace_s: float = CANCEL_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.process = process
        self.on_progress = on_progress or (lambda event: None)
        self.on_log = on_log or (lambda text: None)
        self.cancel_grace_s = cancel_grace_s
        self.outcome: Optional[Outcome] = None
        self.last_event: Optional[ProgressEvent] = None
        self._stderr_tail: Deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        self._clock = clock
        self._kill_at: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.outcome is not None

    @property
    def cancel_requested(self) -> bool:
        return self._kill_at is not None

    def poll(self) -> bool:
        """Dispatch the output that arrived; return True once the process has ended (``outcome`` is then set)."""
        if self.outcome is not None:
            return True
        for stream, text in self.process.read_lines():
            event = parse_progress_line(text) if stream == STDOUT else None
            if event is not None:
                self.last_event = event
                self.on_progress(event)
                continue
            if stream == STDERR:
                self._stderr_tail.append(text)
            self.on_log(text)
        exit_code = self.process.exit_code()
        if self._kill_at is not None and (exit_code is not None or self._clock() >= self._kill_at):
            # The child has exited (or ran out of time): whatever it started goes too.
            self.process.kill()
        if exit_code is None:
            return False
        self.outcome = self._outcome(exit_code)
        return True

    def _outcome(self, exit_code: int) -> Outcome:
        if self._kill_at is not None:
            return Outcome(Status.CANCELLED, exit_code)
        if exit_code == 0:
            return Outcome(Status.SUCCEEDED, exit_code)
        printed = printed_error(self._stderr_tail)
        if exit_code == EXIT_BAD_INPUT and printed is not None:
            return Outcome(Status.FAILED, exit_code, printed)  # names the file and what to do
        tail = "\n".join(self._stderr_tail) or "(no error output)"
        return Outcome(Status.FAILED, exit_code,
                       f"The engine stopped with exit code {exit_code}. Last lines of its error output:\n{tail}")

    def cancel(self) -> None:
        """Ask the engine to stop; its process tree is killed once it has exited or after ``cancel_grace_s``."""
        if self.outcome is not None or self._kill_at is not None:
            return
        self._kill_at = self._clock() + self.cancel_grace_s
        self.process.terminate()

    def wait(self, between_polls: Optional[Callable[[], None]] = None, interval_s: float = _POLL_INTERVAL_S) -> Outcome:
        """Poll until the process has ended; ``between_polls`` runs after each poll (e.g. to keep a GUI painting)."""
        while not self.poll():
            if between_polls is not None:
                between_polls()
            time.sleep(interval_s)
        assert self.outcome is not None
        return self.outcome

    def raise_for_outcome(self) -> None:
        """Raise :class:`EngineFailed` or :class:`EngineCancelled` unless the job succeeded."""
        if self.outcome is None or self.outcome.status == Status.SUCCEEDED:
            return
        if self.outcome.status == Status.CANCELLED:
            raise EngineCancelled("The run was cancelled.")
        raise EngineFailed(self.outcome.message, self.outcome.exit_code)


def engine_environment(base: Mapping[str, str], engine_root: Path) -> Dict[str, str]:
    """The child's environment: ``base`` with the engine importable and its output unbuffered UTF-8."""
    environment = dict(base)
    paths = [str(engine_root)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(paths)
    environment["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they are written
    environment["PYTHONIOENCODING"] = "utf-8"
    return environment
