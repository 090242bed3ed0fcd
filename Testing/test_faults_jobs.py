"""Fault injection (issue #15) for the Slicer module's job folders, under the slicer-core wheels: each file a job
folder holds and the module or the engine reads back (:data:`FILE_KINDS`) × each damage of :data:`test_faults.DAMAGES`,
then what users do with the folder: list the past jobs, reopen it into an empty scene, resume it from the scene it
was made in.

Listing never raises; a job whose job.json or config.json is damaged is listed as damaged. A damaged state.json makes
the job interrupted, so resuming recovers it; a damaged classes.json is written again on resume. Any other damaged
file stops reopen and resume with an InputError that names the file and says what to do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the slicer-core wheels are not installed", allow_module_level=True)

from test_slicer_jobs import job_runner, prepared_job  # noqa: E402 (first: it puts SFRSegmentLogicLib on the path)
from SFRSegmentLib.base.errors import InputError  # noqa: E402
from SFRSegmentLogicLib import history, jobs  # noqa: E402
from SFRSegmentLogicLib.jobs import JobState, TrainingJob  # noqa: E402
from test_faults import DAMAGES  # noqa: E402
from test_slicer_logic import segmentation_converters  # noqa: E402, F401 (an autouse fixture)

LABELED, UNLABELED = "Patient_0_CT", "Patient_1_CT"
"""Two of the three cases of test_slicer_logic's scene: a labeled one and one without labels."""


@dataclass(frozen=True)
class FileKind:
    """A file of a job folder and the state Past jobs lists after it is damaged: DAMAGED (only deletion is left),
    INTERRUPTED (resuming recovers it), or None: listed as it was (the file is read only on reopen and resume)."""

    path: str
    listed_as: Optional[JobState]
    resume_recovers: bool = False


FILE_KINDS = (
    FileKind(jobs.JOB_FILE, JobState.DAMAGED),
    FileKind(jobs.CONFIG_FILE, JobState.DAMAGED),
    FileKind(jobs.STATE_FILE, JobState.INTERRUPTED, resume_recovers=True),
    FileKind("cohort/classes.json", None, resume_recovers=True),
    FileKind(f"cohort/{LABELED}/image.nrrd", None),
    FileKind(f"cohort/{LABELED}/label.nrrd", None),
    FileKind(f"cohort/{UNLABELED}/image.nrrd", None),
)
CASES = [(kind, damage) for kind in FILE_KINDS for damage in DAMAGES]


@pytest.mark.parametrize("kind, how", CASES, ids=[f"{kind.path}-{how}" for kind, how in CASES])
def test_damaged_job_folder(tmp_path: Path, kind: FileKind, how: str) -> None:
    scene = slicer.vtkMRMLScene()
    job = prepared_job(scene, tmp_path)
    assert job.cases[LABELED].label is not None and job.cases[UNLABELED].label is None
    classes = (job.cohort / "classes.json").read_text(encoding="utf-8")
    job.record_state(JobState.CANCELLED)
    runner = job_runner(scene)
    damaged = job.folder / kind.path
    DAMAGES[how](damaged)

    [summary] = history.list_jobs(tmp_path / "jobs", runner.is_running)
    assert summary.state == (kind.listed_as or JobState.CANCELLED)
    if kind.listed_as == JobState.DAMAGED or (kind.listed_as is not None and how != "missing"):
        assert kind.path in summary.message  # (a state.json never written is an engine never started)

    if kind.resume_recovers:
        resumed = history.resumable_job(scene, job.folder, runner.is_running)
        assert set(resumed.volume_ids) == set(job.cases)
        assert (job.cohort / "classes.json").read_text(encoding="utf-8") == classes
        return
    for attempt in (lambda: history.resumable_job(scene, job.folder, runner.is_running),
                    lambda: _reopen_finished(job, runner)):
        with pytest.raises(InputError) as caught:
            attempt()
        message = str(caught.value)
        assert kind.path.split("/")[-1] in message and str(job.folder) in message
        assert "Delete" in message or "delete" in message
        assert "Error" not in message.replace("InputError", "")  # words, not an exception's type


def _reopen_finished(job: TrainingJob, runner) -> None:
    """Reopen ``job``, recorded as finished, into an empty scene."""
    job.record_state(JobState.FINISHED)
    history.reopen(slicer.vtkMRMLScene(), job.folder, runner.is_running)
