"""Past jobs in the Slicer module's Logic, under the slicer-core wheels: a job's state, resuming an unfinished job,
reopening a finished one, deleting, and the messages for folders that are not (readable) job folders.

The last part drives the real engine in a child process at the small preset on real LA volumes (cropped around the
atrium to keep it short): a run is cancelled after its first re-training events, resumed through the Logic's job
runner, and must continue from the saved iteration; the finished job is reopened into a new scene, and its model is
applied with progress events, and cancelled.
"""

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the slicer-core wheels are not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SFRSegment"))

from SFRSegmentLib.base.errors import InputError  # noqa: E402
from SFRSegmentLogicLib import history, jobs, nodes, review  # noqa: E402
from SFRSegmentLogicLib.jobs import CaseInput, JobState, RunSettings, TrainingJob  # noqa: E402
from SFRSegmentLogicLib.process import ChildProcessRunner, EngineCancelled, engine_environment  # noqa: E402
from SFRSegmentLogicLib.runs import JobRunner  # noqa: E402
from test_runfolder import start_holder  # noqa: E402
from test_slicer_logic import (  # noqa: E402, F401 (segmentation_converters is an autouse fixture)
    StandInEngineRunner,
    STAND_IN_ENGINE,
    _ijk_to_ras,
    _scene_with_three_cases,
    add_segmentation,
    add_volume,
    exported_masks,
    segmentation_converters,
)

LA_ROOT = ROOT.parent / "shared" / "data" / "LA"
LA_CASES = ("06SR5RBREL16DQ6M8LWS", "0RZDK210BSMWAA6467LU", "1D7CUD1955YZPGK8XHJX")
LA_CROP = np.array([96, 96, 40])
"""Voxels kept around each atrium: the small preset's patches (48×48×16) fit, and a run takes well under a minute."""


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def inputs_of(scene):
    return [CaseInput(v, nodes.label_segmentation(scene, v)) for v in nodes.scalar_volumes(scene)]


def job_runner(scene, process_runner=None):
    return JobRunner(scene, process_runner or ChildProcessRunner(), ROOT)


def prepared_job(scene, tmp_path, settings=RunSettings(preset="small", device="cpu")):
    _scene_with_three_cases(scene)
    return jobs.prepare_training_job(tmp_path / "jobs", inputs_of(scene), ["liver", "tumour"], settings)


# ---------------------------------------------------------------------------------------------------------------
# What is not a job folder


def test_a_folder_that_is_not_a_job_folder_is_named_with_what_to_do(scene, tmp_path):
    volumes, _, _ = _scene_with_three_cases(scene)
    runner = job_runner(scene)
    apply_model = lambda: jobs.prepare_apply_job(TrainingJob.load(tmp_path), volumes[0])  # noqa: E731 (applyModel)
    for attempt in (apply_model, lambda: history.reopen(scene, tmp_path, runner.is_running),
                    lambda: history.resumable_job(scene, tmp_path, runner.is_running),
                    lambda: history.delete_job(tmp_path, runner.is_running)):
        with pytest.raises(InputError) as error:
            attempt()
        assert str(error.value) == (f"{tmp_path}: this is not an SFRSegment job folder: it has no job.json. Choose a "
                                    "folder that Run created (Past jobs lists them).")
    assert tmp_path.is_dir()  # nothing deleted


def test_a_damaged_job_folder_is_listed_as_such_and_can_be_deleted(scene, tmp_path):
    job = prepared_job(scene, tmp_path)
    (job.folder / jobs.JOB_FILE).write_text('{"classes": [', encoding="utf-8")  # cut short
    with pytest.raises(InputError) as error:
        TrainingJob.load(job.folder)
    message = str(error.value)
    assert message.startswith(f"{job.folder}: this job folder is damaged: its job.json cannot be read (")
    assert message.endswith("). Delete it (Past jobs, Delete) and run again.")
    assert "Error" not in message  # words, not an exception's type
    runner = job_runner(scene)
    [summary] = history.list_jobs(tmp_path / "jobs", runner.is_running)
    assert (summary.state, summary.message, summary.volumes) == (JobState.DAMAGED, message, [])
    (job.folder / jobs.JOB_FILE).write_text(json.dumps({"classes": [], "cases": {}}), encoding="utf-8")
    job.config.unlink()
    with pytest.raises(InputError, match=r"damaged: its config.json cannot be read \(\[Errno 2\] No such file"):
        TrainingJob.load(job.folder)
    job.config.write_text(json.dumps({"preset": "small"}), encoding="utf-8")
    with pytest.raises(InputError, match=r"damaged: its config.json cannot be read \(retrain is missing\)"):
        TrainingJob.load(job.folder)
    history.delete_job(job.folder, runner.is_running)
    assert not job.folder.exists()


# ---------------------------------------------------------------------------------------------------------------
# A job's state


def test_the_state_is_recorded_in_the_folder_and_a_run_nobody_runs_any_more_was_interrupted(scene, tmp_path):
    job = prepared_job(scene, tmp_path)
    runner = job_runner(scene)

    def state():
        return history.job_state(TrainingJob.load(job.folder), runner.is_running)

    assert state() == (JobState.INTERRUPTED, "the engine was never started")
    job.record_state(JobState.RUNNING)
    holder = start_holder(job.run.root)  # an engine in another process holds the run folder
    try:
        assert state() == (JobState.RUNNING, "")
        with pytest.raises(InputError, match="this job is running; cancel it first"):
            history.delete_job(job.folder, runner.is_running)
    finally:
        holder.send_signal(signal.SIGKILL)  # Slicer and its engine killed: nothing records how the run ended
        holder.wait()
    state_now, message = state()
    assert state_now == JobState.INTERRUPTED and "Slicer was closed or crashed" in message
    job.record_state(JobState.FAILED, "The engine stopped with exit code 1.")
    assert state() == (JobState.FAILED, "The engine stopped with exit code 1.")
    with pytest.raises(InputError, match="this job is failed, not finished, so it has no results to reopen yet"):
        history.reopen(scene, job.folder, runner.is_running)
    job.record_state(JobState.FINISHED)
    with pytest.raises(InputError, match="only a cancelled, failed or interrupted job can be resumed. Reopen"):
        history.resumable_job(scene, job.folder, runner.is_running)


# ---------------------------------------------------------------------------------------------------------------
# Which unfinished job the scene would make again


def _reloaded_scene(scene):
    """The same volumes and labels in another scene, as after saving and loading it: other node names and IDs,
    another order."""
    other = slicer.vtkMRMLScene()
    for volume in reversed(nodes.scalar_volumes(scene)):
        copy = add_volume(other, "renamed " + volume.GetName(), _voxels(volume), _ijk_to_ras(volume))
        labels = nodes.label_segmentation(scene, volume)
        if labels is not None:
            masks = exported_masks(scene, labels, volume)
            add_segmentation(other, "reloaded labels", masks, _ijk_to_ras(volume), volume=copy)
    return other


def _voxels(volume):
    from vtk.util import numpy_support

    image = volume.GetImageData()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        image.GetDimensions()[::-1]).transpose(2, 1, 0).copy()


def test_an_unfinished_job_is_found_by_its_inputs_content_and_settings_not_by_node_names(scene, tmp_path):
    settings = RunSettings(preset="small", device="cpu", retrain_iterations=7)
    job = prepared_job(scene, tmp_path, settings)
    runner = job_runner(scene)
    names = ["liver", "tumour"]

    def found(in_scene=scene, segment_names=names, run_settings=settings):
        return history.unfinished_job(tmp_path / "jobs", inputs_of(in_scene), segment_names, run_settings,
                                      runner.is_running)

    match = found()  # never started (no state recorded): interrupted, so unfinished
    assert match.folder == job.folder and match.volume_ids == job.volume_ids
    job.record_state(JobState.CANCELLED)
    assert found().folder == job.folder
    old_style = json.loads(job.config.read_text())  # a job folder made before the method had two fields
    retrain = old_style["retrain"]
    assert (retrain.pop("ssl_method"), retrain.pop("pseudo_labels")) == ("mt", "sam")
    job.config.write_text(json.dumps({**old_style, "retrain": {**retrain, "method": "sfr_mt"}}))
    assert found().folder == job.folder
    assert found(run_settings=dataclasses.replace(settings, pseudo_labels="none")) is None

    other = _reloaded_scene(scene)
    match = found(other)
    assert match.folder == job.folder
    assert {case: other.GetNodeByID(i).GetName() for case, i in match.volume_ids.items()} == {
        case: "renamed " + record.volume for case, record in job.cases.items()}

    assert found(run_settings=dataclasses.replace(settings, retrain_iterations=8)) is None
    assert found(segment_names=["tumour", "liver"]) is None
    volume = nodes.scalar_volumes(other)[0]
    voxels = _voxels(volume)
    voxels[0, 0, 0] += 1
    add_volume(other, volume.GetName(), voxels, _ijk_to_ras(volume))
    other.RemoveNode(volume)
    assert found(other) is None  # the same name, other voxels
    job.record_state(JobState.FINISHED)
    assert found() is None


def test_past_jobs_are_listed_newest_first_with_what_they_were_made_of(scene, tmp_path):
    older = prepared_job(scene, tmp_path, RunSettings(preset="small", method="mt"))
    os.utime(older.folder / jobs.JOB_FILE, (time.time() - 3600,) * 2)
    newer = jobs.prepare_training_job(tmp_path / "jobs", inputs_of(scene), ["liver"], RunSettings(model="medsam"))
    newer.record_state(JobState.FAILED, "out of memory")
    (tmp_path / "jobs" / "not a job").mkdir()  # other folders are not listed

    summaries = history.list_jobs(tmp_path / "jobs", job_runner(scene).is_running)

    assert [s.folder for s in summaries] == [newer.folder, older.folder]
    assert [(s.model, s.method, s.preset, s.state, s.message) for s in summaries] == [
        ("medsam", "sfr_mt", "paper", JobState.FAILED, "out of memory"),
        (None, "mt", "small", JobState.INTERRUPTED, "the engine was never started")]
    assert summaries[0].volumes == ["Patient 0 CT", "Patient 1 CT", "Patient 2 CT"]
    assert summaries[0].size_bytes == sum(p.stat().st_size for p in newer.folder.rglob("*") if p.is_file()) > 1000
    assert summaries[1].created < summaries[0].created


# ---------------------------------------------------------------------------------------------------------------
# The scripting flow through the job runner, with a stand-in engine


def test_a_run_records_its_state_and_the_runner_knows_it_runs_until_it_has_ended(scene, tmp_path):
    script = tmp_path / "stand_in_engine.py"
    script.write_text(STAND_IN_ENGINE, encoding="utf-8")
    job = prepared_job(scene, tmp_path)
    runner = job_runner(scene, StandInEngineRunner(script))
    finished = []

    run = runner.train(job, sys.executable, engine_environment(os.environ, ROOT), on_finished=finished.append)

    assert runner.is_running(job.folder) and TrainingJob.load(job.folder).recorded_state()[0] == JobState.RUNNING
    with pytest.raises(InputError, match="this job is running already"):
        runner.train(job, sys.executable, engine_environment(os.environ, ROOT))
    assert run.wait() is run and finished == [run]
    assert not runner.is_running(job.folder)
    assert TrainingJob.load(job.folder).recorded_state() == (JobState.FINISHED, "")
    assert sorted(run.results.segmentations) == ["Patient_1_CT", "Patient_2_CT"]
    assert run.results.report is None  # the stand-in writes none


# ---------------------------------------------------------------------------------------------------------------
# The real engine at the small preset on real LA volumes


def _la_scene(scene):
    """The three LA cases cropped around the atrium, the first labeled ('atrium'): as a user would have loaded them."""
    from SFRSegmentLib.storage.volumes import read_volume

    for index, case in enumerate(LA_CASES):
        image, label = (read_volume(LA_ROOT / case / f"{name}.nrrd") for name in ("image", "label"))
        centre = np.round(np.argwhere(label.array > 0).mean(axis=0)).astype(int)
        low = np.clip(centre - LA_CROP // 2, 0, np.asarray(image.shape) - LA_CROP)
        crop = tuple(slice(a, a + n) for a, n in zip(low, LA_CROP))
        ijk_to_ras = image.ijk_to_ras.copy()
        ijk_to_ras[:3, 3] = (image.ijk_to_ras @ np.r_[low, 1])[:3]
        volume = add_volume(scene, f"LA {index}", np.ascontiguousarray(image.array[crop]), ijk_to_ras)
        if index == 0:
            add_segmentation(scene, "LA 0 labels", {"atrium": label.array[crop] > 0}, ijk_to_ras, volume=volume)


class Recorder:
    """Collects a run's progress events and log; cancels the run at the first event ``cancel_at`` accepts."""

    def __init__(self, cancel_at=lambda event: False):
        self.events, self.log, self.run, self.cancel_at = [], [], None, cancel_at

    def on_progress(self, event):
        self.events.append(event)
        if self.cancel_at(event) and not self.run.engine.cancel_requested:
            self.run.cancel()

    def stages(self):
        return {event.stage for event in self.events}


@pytest.fixture(scope="module")
def resumed_job(tmp_path_factory):
    """A small run on LA cases, cancelled after its first re-training events, then resumed to its end."""
    if not all((LA_ROOT / case / "label.nrrd").is_file() for case in LA_CASES):
        pytest.skip("../shared/data/LA is not present")
    scene = slicer.vtkMRMLScene()
    _la_scene(scene)
    jobs_root = tmp_path_factory.mktemp("la") / "jobs"
    settings = RunSettings(preset="small", device="cpu", fine_tune_iterations=2, retrain_iterations=10)
    runner = job_runner(scene)
    environment = engine_environment(os.environ, ROOT)
    inputs = inputs_of(scene)

    first = Recorder(cancel_at=lambda event: event.stage == "retrain" and event.step >= 2)
    job = jobs.prepare_training_job(jobs_root, inputs, ["atrium"], settings)
    first.run = runner.train(job, sys.executable, environment, first.on_progress, first.log.append)
    with pytest.raises(EngineCancelled):
        first.run.wait()
    cancelled_state = TrainingJob.load(job.folder).recorded_state()
    saved_iterations = job.run.retrain_log.read_text(encoding="utf-8").splitlines()[1:]

    unfinished = history.unfinished_job(jobs_root, inputs_of(scene), ["atrium"], settings, runner.is_running)
    second = Recorder()
    second.run = runner.train(unfinished, sys.executable, environment, second.on_progress, second.log.append)
    second.run.wait()
    return dict(scene=scene, job=job, runner=runner, first=first, second=second, unfinished=unfinished,
                cancelled_state=cancelled_state, saved_iterations=saved_iterations, environment=environment)


def test_a_cancelled_run_resumes_from_its_saved_iteration_and_its_results_are_imported(resumed_job):
    job, first, second = resumed_job["job"], resumed_job["first"], resumed_job["second"]
    assert resumed_job["cancelled_state"] == (JobState.CANCELLED, "")
    assert "cancelled: the last checkpoint is saved" in "\n".join(first.log)
    saved = int(resumed_job["saved_iterations"][-1].split(",")[0])
    assert saved >= 2
    assert resumed_job["unfinished"].folder == job.folder  # the same scene and settings find the cancelled job

    retrain_steps = [event.step for event in second.events if event.stage == "retrain" and event.loss is not None]
    assert retrain_steps[0] == saved + 1 and retrain_steps[-1] == 10  # continued, not from 0
    assert all(event.step == event.total for event in second.events if event.stage == "finetune")  # not redone
    assert not any("computed" in event.message for event in second.events if event.stage == "pseudolabel")
    logged = [int(line.split(",")[0]) for line in job.run.retrain_log.read_text().splitlines()[1:]]
    assert logged == list(range(1, 11))

    results = second.run.results
    scene = resumed_job["scene"]
    assert {scene.GetNodeByID(job.volume_ids[case]).GetName(): segmentation.GetName()
            for case, segmentation in results.segmentations.items()} == {
        "LA 1": "LA 1 segmentation", "LA 2": "LA 2 segmentation"}
    assert results.confidence_table.GetTable().GetNumberOfRows() == 2
    assert results.report == job.run.report and job.run.report.is_file()
    assert TrainingJob.load(job.folder).recorded_state() == (JobState.FINISHED, "")
    [summary] = history.list_jobs(job.folder.parent, resumed_job["runner"].is_running)
    assert (summary.state, summary.volumes, summary.method) == (JobState.FINISHED, ["LA 0", "LA 1", "LA 2"],
                                                                "sfr_mt")


def test_the_review_queue_of_a_real_run_is_its_ranking_and_an_update_starts_from_its_run(resumed_job, tmp_path):
    job, scene = resumed_job["job"], resumed_job["scene"]
    results = resumed_job["second"].run.results
    ranked = [line.split(",") for line in job.run.prediction_confidence.read_text(encoding="utf-8").splitlines()[1:]]

    rows = review.review_queue(scene, results.job)

    assert [(row.case, row.confidence) for row in rows] == [(case, float(value)) for case, value in ranked]
    assert [row.confidence for row in rows] == sorted(row.confidence for row in rows)  # least confident first
    assert sorted(row.volume for row in rows) == ["LA 1", "LA 2"]
    assert {row.case: row.segmentation_id for row in rows} == {
        case: segmentation.GetID() for case, segmentation in results.segmentations.items()}
    assert not any(row.labeled for row in rows)

    corrected = review.use_as_labels(scene, rows[0])  # the least confident one, as corrected
    update = jobs.prepare_update_job(tmp_path / "jobs", TrainingJob.load(job.folder), inputs_of(scene))
    assert update.command(sys.executable)[-2:] == ["--from", str(job.run.root)]
    assert TrainingJob.load(update.folder).parent == job.folder
    assert {case for case, record in update.cases.items() if record.label is not None} == {
        list(job.cases)[0], rows[0].case}
    assert nodes.label_segmentation(scene, scene.GetNodeByID(rows[0].volume_id)) is corrected

    # The update runs the real engine from the parent's run; the other volume's unedited prediction is replaced.
    other = scene.GetNodeByID(rows[1].volume_id)
    before = nodes.unedited_prediction(scene, other)
    recorder = Recorder()
    recorder.run = resumed_job["runner"].train(update, sys.executable, resumed_job["environment"],
                                               recorder.on_progress, recorder.log.append)
    recorder.run.wait()
    manifest = json.loads(update.run.manifest.read_text(encoding="utf-8"))["update"]
    assert manifest["parent"] == str(job.run.root.resolve()) and manifest["corrected"] == [rows[0].case]
    assert "retrain" in recorder.stages() and update.run.report.is_file()
    after = nodes.unedited_prediction(scene, other)
    assert after is not None and after is not before and before.GetScene() is None  # replaced, old node removed
    assert nodes.label_segmentation(scene, scene.GetNodeByID(rows[0].volume_id)) is corrected  # never overwritten


def test_a_finished_job_reopens_into_a_new_scene_with_its_volumes_labels_and_results(resumed_job):
    job = resumed_job["job"]
    scene = slicer.vtkMRMLScene()
    results = history.reopen(scene, job.folder, job_runner(scene).is_running)

    volumes = {volume.GetName(): volume for volume in nodes.scalar_volumes(scene)}
    assert sorted(volumes) == ["LA 0", "LA 1", "LA 2"]
    assert [nodes.fingerprint(volumes[record.volume]) for record in job.cases.values()] == [
        record.image for record in job.cases.values()]
    labels = nodes.label_segmentation(scene, volumes["LA 0"])
    assert labels.GetName() == "LA 0 labels" and nodes.segment_names(labels) == ["atrium"]
    original = resumed_job["scene"]
    np.testing.assert_array_equal(exported_masks(scene, labels, volumes["LA 0"])["atrium"],
                                  exported_masks(original, nodes.label_segmentation(original, nodes.scalar_volumes(
                                      original)[0]), nodes.scalar_volumes(original)[0])["atrium"])
    assert sorted(s.GetName() for s in results.segmentations.values()) == ["LA 1 segmentation", "LA 2 segmentation"]
    for case, segmentation in results.segmentations.items():
        assert segmentation.GetNodeReferenceID(nodes.REFERENCE_ROLE) == volumes[job.cases[case].volume].GetID()
    table = results.confidence_table.GetTable()
    assert sorted(table.GetValue(row, 0).ToString() for row in range(table.GetNumberOfRows())) == ["LA 1", "LA 2"]
    assert results.report == job.run.report

    again = history.reopen(scene, job.folder, job_runner(scene).is_running)  # the volumes are found, not reloaded
    assert len(nodes.scalar_volumes(scene)) == 3 and len(again.segmentations) == 2


def test_applying_the_model_reports_progress_per_volume_and_cancelling_it_stops_the_engine(resumed_job):
    job, scene, runner = resumed_job["job"], resumed_job["scene"], resumed_job["runner"]
    volume = nodes.scalar_volumes(scene)[2]
    applied = Recorder()
    apply_job = jobs.prepare_apply_job(TrainingJob.load(job.folder), volume)
    applied.run = runner.apply(apply_job, sys.executable, resumed_job["environment"], applied.on_progress,
                               applied.log.append)
    segmentation = applied.run.wait().results
    assert [(e.stage, e.step, e.total, e.message) for e in applied.events] == [
        ("predict", 1, 1, f"predicted {apply_job.case}")]
    # A new node beside the run's own result, which is kept (the suffix depends on the names used before).
    assert segmentation.GetName().startswith("LA 2 segmentation_")
    assert scene.GetFirstNodeByName("LA 2 segmentation") not in (None, segmentation)
    assert segmentation.GetNodeReferenceID(nodes.REFERENCE_ROLE) == volume.GetID()

    cancelled = jobs.prepare_apply_job(TrainingJob.load(job.folder), volume)
    run = runner.apply(cancelled, sys.executable, resumed_job["environment"])
    assert runner.is_running(job.folder)  # the model in use: the job cannot be deleted meanwhile
    run.cancel()
    with pytest.raises(EngineCancelled):
        run.wait()
    with pytest.raises(ProcessLookupError):
        os.killpg(run.engine.process.pid, 0)  # the whole process group is gone
    assert not cancelled.folder.exists()  # nothing left behind
    assert not runner.is_running(job.folder)
