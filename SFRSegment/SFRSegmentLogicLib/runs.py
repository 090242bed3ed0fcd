"""Running the engine on a job folder and following it to its end, without the application.

The engine runs here, or on a job server (:mod:`remote`): then the child process is the engine's client of that
server, with the same progress, exit codes and result files, so everything below is the same for both.

:class:`JobRunner` starts the engine's child process for a training job (``run``, which resumes what the folder
holds), a plan job (``run --plan-only``: :mod:`plans`) or an apply job (``predict``), records a training job's state
in its folder (running, then finished, cancelled or failed), and knows which jobs it runs. Each start gives an
:class:`EngineRun`: :meth:`EngineRun.poll` (from a GUI timer) or :meth:`EngineRun.wait` (scripts) dispatches the
engine's progress events and log lines, and once the engine has ended records how, imports the results into the scene
and calls ``on_finished``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Union

from slicer import vtkMRMLScene, vtkMRMLSegmentationNode

from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.runfolder import RunFolder

from .jobs import (
    RUN_FOLDER,
    ApplyJob,
    JobState,
    TrainingJob,
    TrainingResults,
    import_apply_result,
    import_training_results,
    require_place,
)
from .plans import PlanJob, RunPlan
from .process import CANCEL_GRACE_S, ChildProcessRunner, EngineJob, ProgressEvent
from .remote import REMOTE_CANCEL_GRACE_S, ComputeServer, explained, server_url

OnProgress = Optional[Callable[[ProgressEvent], None]]
OnLog = Optional[Callable[[str], None]]
OnFinished = Optional[Callable[["EngineRun"], None]]


@dataclass
class EngineRun:
    """A started engine job: its folder, its process, and once it has finished, its results or its error."""

    job: Union[TrainingJob, PlanJob, ApplyJob]
    engine: EngineJob
    import_results: Callable[[], Any]
    on_finished: OnFinished = None
    results: Union[TrainingResults, RunPlan, vtkMRMLSegmentationNode, None] = None
    error: Optional[Exception] = None
    """Why it did not succeed: the engine's failure (EngineFailed), a cancellation (EngineCancelled), or an import
    error."""
    finished: bool = False
    timer: Any = None
    """The GUI's poll timer (a qt.QTimer), kept with the run it polls."""
    server: Optional[ComputeServer] = None
    """The job server it runs on; None: this computer."""

    def cancel(self) -> None:
        """Stop the engine and everything it started; ``error`` becomes an EngineCancelled."""
        self.engine.cancel()

    def poll(self) -> bool:
        """Dispatch the engine's output; once it has ended, finish the run (see the module docstring). True once
        finished."""
        if self.finished:
            return True
        if not self.engine.poll():
            return False
        try:
            self.job.ended(self.engine.outcome)
            self.engine.raise_for_outcome()
            self.results = self.import_results()
        except Exception as error:  # reported to the caller through run.error, raised by wait()
            self.error = error if self.server is None else explained(error)
        self.finished = True
        if self.on_finished is not None:
            self.on_finished(self)
        return True

    def wait(self, between_polls: Optional[Callable[[], None]] = None) -> "EngineRun":
        """Block until the run has finished (``between_polls`` runs between polls, e.g. to keep a GUI painting); raise
        its error if it did not succeed."""
        self.engine.wait(between_polls)
        self.poll()
        if self.error is not None:
            raise self.error
        return self


class JobRunner:
    """Starts the engine on job folders in ``scene``'s name, through ``process_runner``, in ``working_directory``
    (the folder holding the engine), and knows the jobs it runs."""

    def __init__(self, scene: vtkMRMLScene, process_runner: ChildProcessRunner, working_directory: Path) -> None:
        self.scene = scene
        self.process_runner = process_runner
        self.working_directory = working_directory
        self._runs: List[EngineRun] = []

    def train(self, job: TrainingJob, python: str, environment: Mapping[str, str], on_progress: OnProgress = None,
              on_log: OnLog = None, on_finished: OnFinished = None,
              server: Optional[ComputeServer] = None) -> EngineRun:
        """Run (or resume: the engine continues from the folder's checkpoints) a training job, here or on the job
        server ``server`` (which must be the job's); its results are imported for the volumes of
        ``job.volume_ids``. A job that is running already is refused."""
        if self.is_running(job.folder):
            raise InputError("this job is running already; wait for it to finish, or cancel it.", job.folder)
        require_place(job, server_url(server), "run")
        run = self._start(job, job.command(python, server), environment,
                          lambda: import_training_results(self.scene, job), on_progress, on_log, on_finished, server)
        job.record_state(JobState.RUNNING)
        return run

    def plan(self, job: PlanJob, python: str, environment: Mapping[str, str], on_progress: OnProgress = None,
             on_log: OnLog = None, on_finished: OnFinished = None) -> EngineRun:
        """Plan a run and time a few of its steps, on this computer; the results are its :class:`RunPlan`. Its
        temporary folder is removed once the engine has ended, cancelled or not."""
        return self._start(job, job.command(python), environment, job.plan, on_progress, on_log, on_finished, None)

    def apply(self, job: ApplyJob, python: str, environment: Mapping[str, str], on_progress: OnProgress = None,
              on_log: OnLog = None, on_finished: OnFinished = None,
              server: Optional[ComputeServer] = None) -> EngineRun:
        """Segment an apply job's volume, here or on the training job's server ``server``; the result is imported as
        a segmentation."""
        require_place(job.training, server_url(server), "applied")
        return self._start(job, job.command(python, server), environment,
                           lambda: import_apply_result(self.scene, job), on_progress, on_log, on_finished, server)

    def is_running(self, folder: Path) -> bool:
        """Whether an engine works in the job folder ``folder`` now: one this runner started (also while it has not
        yet taken the run folder's lock, or applies the job's model), or another process holding that lock."""
        folder = Path(folder).resolve()
        mine = any(not run.finished and folder in (run.job.folder.resolve(), *run.job.folder.resolve().parents)
                   for run in self._runs)
        return mine or RunFolder(folder / RUN_FOLDER).in_use()

    def _start(self, job: Union[TrainingJob, PlanJob, ApplyJob], command: List[str], environment: Mapping[str, str],
               import_results: Callable[[], Any], on_progress: OnProgress, on_log: OnLog,
               on_finished: OnFinished, server: Optional[ComputeServer]) -> EngineRun:
        if server is not None:
            environment = server.environment(environment)
        process = self.process_runner.start(command, environment, self.working_directory)
        grace = CANCEL_GRACE_S if server is None else REMOTE_CANCEL_GRACE_S
        engine = EngineJob(process, on_progress=on_progress, on_log=on_log, cancel_grace_s=grace)
        run = EngineRun(job, engine, import_results, on_finished, server=server)
        self._runs = [other for other in self._runs if not other.finished] + [run]
        return run
