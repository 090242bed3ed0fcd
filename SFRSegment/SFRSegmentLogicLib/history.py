"""Past jobs: the training job folders under a jobs folder, the state each is in now, and what can be done with it.

A job's state is what its folder recorded (:meth:`jobs.TrainingJob.recorded_state`), checked against whether an
engine runs it: a job recorded as running that no engine runs any more was interrupted (Slicer was closed or crashed
during the run). Whether a job runs is asked of an ``is_running`` function, :meth:`runs.JobRunner.is_running`: the
jobs this Slicer started, and any whose run folder's lock another process holds (:meth:`RunFolder.in_use`).

Scene volumes are recognised by their fingerprints (:func:`nodes.fingerprint`: voxels and geometry), never by node
names: an unfinished job matches the scene when its configuration, its segments and the fingerprints of its images and
labels are the scene's (:func:`unfinished_job`); reopening or resuming a job pairs its cases with the scene's volumes
of the same fingerprint and loads the job's own copy of any volume the scene lacks (:func:`attach`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLScene

from SFRSegmentLib.base.errors import InputError

from .jobs import (
    JOB_FILE,
    RESUMABLE,
    CaseInput,
    Fingerprints,
    JobState,
    RunSettings,
    TrainingJob,
    TrainingResults,
    check_inputs,
    engine_config,
    import_training_results,
    input_fingerprints,
    damaged_copy_error,
    is_job_folder,
    require_intact_copy,
    require_job_folder,
    require_place,
    run_config,
    write_cohort_classes,
)
from .nodes import fingerprint, load_segmentation, load_volume, scalar_volumes, set_label_segmentation

IsRunning = Callable[[Path], bool]
"""Whether an engine runs the job in a folder now."""
LABELS_SUFFIX = " labels"
"""A label loaded from a job folder is named after its volume: '<volume name> labels'."""


@dataclass(frozen=True)
class JobSummary:
    """One line of the past jobs: what the job was made of and with, its state, and its size on disk."""

    folder: Path
    created: float
    """When the job was made (its job.json's modification time, in seconds since the epoch)."""
    volumes: List[str]
    """The names its volumes had (empty for a damaged job)."""
    model: Optional[str]
    """The SAM checkpoint it was given; None when it used none, or when it is damaged."""
    method: str
    preset: str
    state: JobState
    message: str
    """A failure's message, what interrupted or damaged the job; empty otherwise."""
    size_bytes: int
    server: Optional[str] = None
    """The URL of the job server it runs on; None: this computer (and for a damaged job)."""


def job_state(job: TrainingJob, is_running: IsRunning) -> Tuple[JobState, str]:
    """The state ``job`` is in now and its message: the recorded one, except that a job recorded as running that no
    engine runs is INTERRUPTED."""
    recorded, message = job.recorded_state()
    if recorded != JobState.RUNNING:
        return recorded, message
    if is_running(job.folder):
        return JobState.RUNNING, ""
    return JobState.INTERRUPTED, "the run stopped without recording how: Slicer was closed or crashed during it"


def list_jobs(jobs_root: Path, is_running: IsRunning) -> List[JobSummary]:
    """Every job folder directly under ``jobs_root`` (the folders holding a job.json), newest first; a damaged one is
    listed as such, so that it can be deleted."""
    return [_summary(folder, is_running) for folder in _job_folders(jobs_root)]


def _job_folders(jobs_root: Path) -> List[Path]:
    """The job folders under ``jobs_root`` (:func:`jobs.is_job_folder`), newest first."""
    root = Path(jobs_root)
    folders = [path for path in root.iterdir() if path.is_dir() and is_job_folder(path)] if root.is_dir() else []
    return sorted(folders, key=_created, reverse=True)


def _created(folder: Path) -> float:
    """When the job was made: its job.json's modification time (the folder's, when job.json is lost)."""
    job_file = folder / JOB_FILE
    return (job_file if job_file.is_file() else folder).stat().st_mtime


def _summary(folder: Path, is_running: IsRunning) -> JobSummary:
    created, size = _created(folder), folder_size(folder)
    try:
        job = TrainingJob.load(folder)
    except InputError as error:
        return JobSummary(folder, created, [], None, "", "", JobState.DAMAGED, str(error), size)
    state, message = job_state(job, is_running)
    return JobSummary(folder, created, [record.volume for record in job.cases.values()], job.model, job.method,
                      job.preset, state, message, size, job.server)


def folder_size(folder: Path) -> int:
    """The bytes of every file under ``folder``."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def unfinished_job(jobs_root: Path, inputs: Sequence[CaseInput], segment_names: Sequence[str],
                   settings: RunSettings, is_running: IsRunning,
                   server_url: Optional[str] = None) -> Optional[TrainingJob]:
    """The newest unfinished job (cancelled, failed or interrupted) under ``jobs_root`` that these inputs and settings
    would make again on ``server_url`` (None: this computer), with each case paired with its input's volume; None if
    there is none. Whether it can be resumed is :func:`resumable_job`'s to say.

    It matches when it runs there, its configuration is ``settings``'s, its segments are ``segment_names`` in the
    same order, and its cases' fingerprints are the inputs' (in any order). The inputs are fingerprinted only when a
    job of the same place, configuration, segments and number of volumes exists.
    """
    check_inputs(inputs, segment_names)
    wanted = engine_config(run_config(settings))
    candidates = []
    for folder in _job_folders(jobs_root):
        try:
            job = TrainingJob.load(folder)
            same = engine_config(job.overrides, job.config) == wanted
        except InputError:
            continue  # a damaged job is no one's to continue
        if (job.server == server_url and same
                and [c.name for c in job.classes] == list(segment_names)
                and len(job.cases) == len(inputs) and job_state(job, is_running)[0] in RESUMABLE):
            candidates.append(job)
    if not candidates:
        return None
    found = [(item.volume.GetID(), prints)
             for item, prints in zip(inputs, input_fingerprints(inputs, candidates[0].classes))]
    for job in candidates:
        volume_ids = _pair(job, found)
        if volume_ids is not None:
            return dataclasses.replace(job, volume_ids=volume_ids)
    return None


def _pair(job: TrainingJob, found: Sequence[Tuple[str, Fingerprints]]) -> Optional[Dict[str, str]]:
    """Case → volume ID, each case paired with a volume of the same fingerprints; None unless they pair one to one."""
    recorded = {case: (record.image, record.label) for case, record in job.cases.items()}
    if collections.Counter(recorded.values()) != collections.Counter(prints for _, prints in found):
        return None
    free = collections.defaultdict(list)
    for volume_id, prints in found:
        free[prints].append(volume_id)
    return {case: free[prints].pop(0) for case, prints in recorded.items()}


def attach(scene: vtkMRMLScene, job: TrainingJob) -> TrainingJob:
    """``job`` with each case paired with a scene volume of the same image fingerprint; where the scene has none, the
    job's own copy of the volume is loaded (with, for a labeled case, its label as the volume's labels)."""
    in_scene = collections.defaultdict(list)
    for volume in scalar_volumes(scene):
        in_scene[fingerprint(volume)].append(volume)
    volume_ids = {}
    for case, record in job.cases.items():
        same = in_scene[record.image]
        volume_ids[case] = (same.pop(0) if same else _load_case(scene, job, case)).GetID()
    return dataclasses.replace(job, volume_ids=volume_ids)


def _load_case(scene: vtkMRMLScene, job: TrainingJob, case: str) -> vtkMRMLScalarVolumeNode:
    """Load the job's copy of ``case`` (its volume, and its labels as the volume's labels) into ``scene``; a copy
    that is damaged (:func:`jobs.require_intact_copy`, checked before anything is loaded) or cannot be read is an
    InputError naming the file."""
    record = job.cases[case]
    for path in _case_files(job, case):
        require_intact_copy(job, path)
    with _readable_copy(job.image(case)):
        volume = load_volume(scene, job.image(case), record.volume)
    if record.label is not None:
        with _readable_copy(job.label(case)):
            labels = load_segmentation(scene, job.label(case), record.volume + LABELS_SUFFIX, volume, job.classes)
        set_label_segmentation(scene, volume, labels)
    return volume


def _case_files(job: TrainingJob, case: str) -> Tuple[Path, ...]:
    """The files the job exported for ``case``: its image, and its label when it is labeled."""
    return (job.image(case),) + ((job.label(case),) if job.cases[case].label is not None else ())


def check_cohort(job: TrainingJob) -> None:
    """Raise the InputError that names the first damaged file of the job's cohort (missing, or changed since the job
    wrote it) and says what to do; the engine would read it again on resume."""
    for case in job.cases:
        for path in _case_files(job, case):
            require_intact_copy(job, path)


@contextlib.contextmanager
def _readable_copy(path: Path) -> Iterator[None]:
    """Turn a failure to read ``path``, a file of the job's cohort, into the InputError that says what to do."""
    try:
        yield
    except OSError as error:
        raise damaged_copy_error(path, f"cannot be read ({error})") from error


def reopen(scene: vtkMRMLScene, folder: Path, is_running: IsRunning) -> TrainingResults:
    """Load a finished job's results into ``scene`` (segmentations, review table; the report is named), with its
    volumes (:func:`attach`)."""
    job = TrainingJob.load(folder)
    state, _ = job_state(job, is_running)
    if state != JobState.FINISHED:
        raise InputError(f"this job is {state.value}, not finished, so it has no results to reopen yet. "
                         + _what_to_do(state), folder)
    return import_training_results(scene, attach(scene, job))


def resumable_job(scene: vtkMRMLScene, job: Union[TrainingJob, Path], is_running: IsRunning,
                  server_url: Optional[str] = None) -> TrainingJob:
    """The unfinished job ``job`` (a job, e.g. what :func:`unfinished_job` found, or its folder) ready to resume on
    ``server_url`` (None: this computer), or the InputError that says why not and what to do.

    The one check before any resume: the job is read again from its folder, and must be cancelled, failed or
    interrupted, run where it is asked to (:func:`jobs.require_place`), and have its cohort as it wrote it
    (:func:`check_cohort`: the engine reads it again, and a changed copy would silently restart training from
    iteration 0 on other data). Its classes.json is written again. Its cases keep the volumes ``job`` pairs them with
    when those are still in ``scene``; otherwise they are found or loaded (:func:`attach`).
    """
    folder = job.folder if isinstance(job, TrainingJob) else Path(job)
    loaded = TrainingJob.load(folder)
    state, _ = job_state(loaded, is_running)
    if state not in RESUMABLE:
        raise InputError(f"this job is {state.value}: only a cancelled, failed or interrupted job can be resumed. "
                         + _what_to_do(state), folder)
    require_place(loaded, server_url, "resumed")
    check_cohort(loaded)
    write_cohort_classes(loaded)
    paired = job.volume_ids if isinstance(job, TrainingJob) else {}
    if paired.keys() == loaded.cases.keys() and all(scene.GetNodeByID(i) is not None for i in paired.values()):
        return dataclasses.replace(loaded, volume_ids=dict(paired))
    return attach(scene, loaded)


def _what_to_do(state: JobState) -> str:
    return {
        JobState.RUNNING: "Wait for it to finish, or cancel it.",
        JobState.FINISHED: "Reopen its results instead.",
        JobState.DAMAGED: "Delete it and run again.",
    }.get(state, "Resume it first.")


def delete_job(folder: Path, is_running: IsRunning) -> None:
    """Delete a job folder (refused for a folder that is not one, and for a running job)."""
    folder = Path(folder)
    require_job_folder(folder)
    if is_running(folder):
        raise InputError("this job is running; cancel it first, then delete it.", folder)
    shutil.rmtree(folder)
