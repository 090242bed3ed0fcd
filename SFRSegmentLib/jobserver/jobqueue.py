"""The queue: the engine's own commands (``python -m SFRSegmentLib run|predict …``) as child processes, at most
``slots`` at a time, in the order the jobs were started.

Each child runs without a shell in its job folder, in a new session (so that cancel reaches everything it started),
with its stdout and stderr appended to the job folder's ``engine.*.log`` files: the child never writes into a pipe
that dies with the server. The queue reads those files as they grow and adds each line to the job's events: a JSON
progress line as a ``progress`` event, any other line as a ``log`` event.

On Linux each child is told (``prctl(PR_SET_PDEATHSIG)``) to receive SIGTERM when the server ends, however it ends:
the engine then saves its checkpoint and stops, and the restarted server lists the job as interrupted
(:meth:`JobQueue.start`), resumable from that checkpoint. Elsewhere a server that is killed outright leaves its
children running; one still working in a run folder holds its lock, and resume says so.

With ``gpus``, each slot is one GPU: its child sees only that GPU (``CUDA_VISIBLE_DEVICES``). With
``processes_per_job`` > 1 each child is ``torchrun --nproc_per_node=N`` around the same command.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import json
import os
import signal
import sys
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence

from ..base.errors import EXIT_BAD_INPUT, printed_error
from ..base.events import parse_progress_line
from .store import COHORT_MANIFEST, JobError, JobFolder, JobState, JobStore

EXIT_CANCELLED = 130
"""The engine's exit status after a cancel (cli.EXIT_CANCELLED; not imported, cli loads the engine's options)."""
CANCEL_GRACE_S = 60.0
"""How long a cancelled engine may take to save its checkpoint before its process group is killed."""
POLL_S = 0.2
"""How often a running child's output files are read."""
STDERR_LINES_QUOTED = 20
_PR_SET_PDEATHSIG = 1


class JobQueue:
    """Runs the queued jobs of a :class:`JobStore`; every method runs in the server's event loop."""

    def __init__(self, store: JobStore, slots: int = 1, gpus: Sequence[str] = (), processes_per_job: int = 1,
                 python: str = sys.executable) -> None:
        if gpus and slots != len(gpus):
            raise ValueError("with gpus, there is one slot per GPU")
        self.store = store
        self.free_slots: List[int] = list(range(slots))
        self.gpus = list(gpus)
        self.processes_per_job = processes_per_job
        self.python = python
        self.waiting: Deque[str] = collections.deque()
        self.running: Dict[str, asyncio.subprocess.Process] = {}
        self.cancelled: set = set()
        self.stopping = False
        self._tasks: set = set()
        self._wakeup: Optional[asyncio.Event] = None
        self._dispatcher: Optional[asyncio.Task] = None

    async def start(self) -> None:
        """Mark the jobs that were running when the server last stopped as interrupted, queue the queued ones
        again (oldest first), and start dispatching."""
        for job in self.store.jobs():
            state = job.state
            if state is JobState.RUNNING:
                self.store.set_state(job, JobState.INTERRUPTED, "the server stopped during the run; resume the job to "
                                     "continue from its last checkpoint")
            elif state is JobState.QUEUED:
                self.waiting.append(job.id)
        self._wakeup = asyncio.Event()
        self._dispatcher = asyncio.create_task(self._dispatch())
        self._wakeup.set()

    def submit(self, job: JobFolder) -> None:
        """Queue a job the store has just marked as queued."""
        self.waiting.append(job.id)
        self._wakeup.set()

    def position(self, job_id: str) -> Optional[int]:
        return list(self.waiting).index(job_id) if job_id in self.waiting else None

    def cancel(self, job: JobFolder) -> None:
        """A queued job ends cancelled at once; a running one's engine is asked to stop (SIGTERM to its process
        group: it saves its checkpoint and exits), and killed after :data:`CANCEL_GRACE_S`."""
        if job.id in self.waiting:
            self.waiting.remove(job.id)
            self.store.set_state(job, JobState.CANCELLED, "cancelled before it started")
        elif job.id in self.running:
            if job.id not in self.cancelled:
                self.cancelled.add(job.id)
                _signal_group(self.running[job.id].pid, signal.SIGTERM)
                self._spawn(self._kill_after_grace(job.id, self.running[job.id]))
        else:
            raise JobError(409, f"job {job.id} is {job.state.value}: only a queued or running job can be cancelled")

    async def shutdown(self) -> None:
        """Stop every running engine (it saves its checkpoint) and wait for it; its job is listed as interrupted and
        resumes when asked."""
        self.stopping = True
        if self._dispatcher:
            self._dispatcher.cancel()
        for process in list(self.running.values()):
            _signal_group(process.pid, signal.SIGTERM)
        for process in list(self.running.values()):
            try:
                await asyncio.wait_for(process.wait(), CANCEL_GRACE_S)
            except asyncio.TimeoutError:
                _signal_group(process.pid, signal.SIGKILL)
        for task in list(self._tasks):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 5)

    async def _dispatch(self) -> None:
        while not self.stopping:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self.waiting and self.free_slots and not self.stopping:
                try:
                    job = self.store.job(self.waiting.popleft())
                except JobError:  # its folder was removed by hand meanwhile: nothing to run
                    continue
                self._spawn(self._run(job, self.free_slots.pop(0)))

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, job: JobFolder, slot: int) -> None:
        try:
            await self._run_engine(job, slot)
        except Exception as error:  # the job ends failed with the reason; the server goes on
            self.store.set_state(job, JobState.FAILED, f"the server could not run the engine: {error}", None)
        finally:
            self.running.pop(job.id, None)
            self.cancelled.discard(job.id)
            self.free_slots.append(slot)
            self.free_slots.sort()
            self._wakeup.set()

    async def _run_engine(self, job: JobFolder, slot: int) -> None:
        attempts = job.read_state().get("attempts", 0) + 1
        command = engine_command(self.store, job, self.python, self.processes_per_job, first_attempt=attempts == 1)
        environment = dict(os.environ)
        if self.gpus:
            environment["CUDA_VISIBLE_DEVICES"] = self.gpus[slot]
        logs = [job.stdout_log, job.stderr_log]
        offsets = [path.stat().st_size if path.is_file() else 0 for path in logs]
        stderr_lines: List[str] = []
        with open(job.stdout_log, "ab") as stdout, open(job.stderr_log, "ab") as stderr:
            process = await asyncio.create_subprocess_exec(
                *command, cwd=str(job.root), env=environment, stdin=asyncio.subprocess.DEVNULL, stdout=stdout,
                stderr=stderr, start_new_session=True, preexec_fn=_end_with_the_server())
        self.running[job.id] = process
        self.store.set_state(job, JobState.RUNNING, "", None, attempts)
        readers = [_LineReader(path, offset) for path, offset in zip(logs, offsets)]
        while True:
            ended = process.returncode is not None
            if not ended:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(process.wait(), POLL_S)
                ended = process.returncode is not None
            for stream, reader in zip(("stdout", "stderr"), readers):
                for line in reader.new_lines(final=ended):
                    self._record_line(job, stream, line, stderr_lines)
            if ended:
                break
        if process.returncode != 0:
            _signal_group(process.pid, signal.SIGKILL)  # what it started (torchrun's workers) ends with it
        self._record_end(job, process.returncode, stderr_lines, attempts)

    def _record_line(self, job: JobFolder, stream: str, line: str, stderr_lines: List[str]) -> None:
        journal = self.store.journal(job)
        event = parse_progress_line(line) if stream == "stdout" else None
        if event is not None:
            journal.append({"kind": "progress", "event": json.loads(event.to_json())})
            return
        journal.append({"kind": "log", "stream": stream, "text": line})
        if stream == "stderr":
            stderr_lines.append(line)
            del stderr_lines[:-STDERR_LINES_QUOTED]

    def _record_end(self, job: JobFolder, code: int, stderr_lines: List[str], attempts: int) -> None:
        if code == 0:
            self.store.set_state(job, JobState.FINISHED, "", 0, attempts)
        elif self.stopping:
            self.store.set_state(job, JobState.INTERRUPTED, "the server stopped during the run; resume the job to "
                                 "continue from its last checkpoint", code, attempts)
        elif code == EXIT_CANCELLED or job.id in self.cancelled:
            self.store.set_state(job, JobState.CANCELLED, "cancelled: the last checkpoint is saved; resume the job to "
                                 "continue", code, attempts)
        else:
            self.store.set_state(job, JobState.FAILED, failure_message(code, stderr_lines), code, attempts)

    async def _kill_after_grace(self, job_id: str, process: asyncio.subprocess.Process) -> None:
        try:
            await asyncio.wait_for(process.wait(), CANCEL_GRACE_S)
        except asyncio.TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)


def engine_command(store: JobStore, job: JobFolder, python: str, processes_per_job: int = 1,
                   first_attempt: bool = True) -> List[str]:
    """The engine's command line for a job (paths relative to the job folder, the child's working folder)."""
    record = job.read_record()
    start = record["start"]
    launcher = [python, "-m", "SFRSegmentLib"]
    if processes_per_job > 1:
        launcher = [python, "-m", "torch.distributed.run", f"--nproc_per_node={processes_per_job}", "-m",
                    "SFRSegmentLib"]
    preset = ["--preset", start["preset"]] if start.get("preset") else []
    if record["kind"] == "run":
        command = launcher + ["run", "--cohort", f"inputs/{COHORT_MANIFEST}", "--out", "run", "--config",
                              "config.json", "--progress", "jsonl"] + preset
        if start.get("truth"):
            command += ["--truth", f"inputs/{start['truth']}"]
        if record.get("parent"):
            command += ["--from", str(store.job(record["parent"]).run)]
        if first_attempt:  # a resumed run continues; redoing the stages again would throw its progress away
            for stage in start.get("redo", []):
                command += ["--redo", stage]
        return command
    command = launcher + ["predict", "--model", str(store.job(record["parent"]).run), "--images",
                          *[f"inputs/{name}" for name in start["images"]], "--out", "predictions", "--config",
                          "config.json", "--progress", "jsonl"] + preset
    if start.get("device"):
        command += ["--device", start["device"]]
    return command


def failure_message(code: int, stderr_lines: Sequence[str]) -> str:
    """The engine's own message: what it printed after ``error:`` for bad input (exit 2) or a write error, every
    line of it, else the last lines of its error output."""
    printed = printed_error(stderr_lines)
    if printed is not None:
        return printed
    tail = "\n".join(stderr_lines[-STDERR_LINES_QUOTED:])
    what = "refused its input" if code == EXIT_BAD_INPUT else f"stopped with exit code {code}"
    return f"the engine {what}" + (f":\n{tail}" if tail else "")


class _LineReader:
    """The complete lines appended to a file since an offset (a last line without its newline waits for it)."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self.offset = offset
        self.pending = b""

    def new_lines(self, final: bool = False) -> List[str]:
        try:
            with open(self.path, "rb") as stream:
                stream.seek(self.offset)
                data = stream.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        data = self.pending + data
        *lines, self.pending = data.split(b"\n")
        if final and self.pending:
            lines.append(self.pending)
            self.pending = b""
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]


def _signal_group(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, number)


def _end_with_the_server():
    """A preexec function that makes the child receive SIGTERM when the server process dies (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    server = os.getpid()

    def end_with_the_server() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != server:  # the server died before the call: nobody would signal us
            os.kill(os.getpid(), signal.SIGTERM)

    return end_with_the_server

