"""The module's Logic class itself (``SFRSegmentLogic`` in SFRSegment.py) on slicer-core scenes: every way to resume
goes through one check, and the remote mode ("Compute on: a server") against a real job server on 127.0.0.1.

SFRSegment.py imports Slicer's application modules, so it cannot be imported here. Its ``SFRSegmentLogic`` class is
executed from the module's source (:func:`test_slicer_ui.module_code`) with the names it uses: the real
``SFRSegmentLogicLib`` and engine, a slicer-core scene as ``slicer.mrmlScene``, and Qt's own QSettings (PySide6) as the
application's settings. Only what needs the application is replaced: ``PythonSlicer`` is this interpreter.
"""

from __future__ import annotations

import os
import shutil
import sys
import types
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the slicer-core wheels are not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SFRSegment"))

from SFRSegmentLib.base.errors import InputError  # noqa: E402
from SFRSegmentLib.models.sam import catalog, weights  # noqa: E402
from SFRSegmentLib.research.synthetic import make_synthetic_cohort  # noqa: E402
from SFRSegmentLib.storage.volumes import read_volume, write_volume  # noqa: E402
from SFRSegmentLogicLib import hardware, history, jobs, nodes, plans, remote, review  # noqa: E402
from SFRSegmentLogicLib.history import JobSummary  # noqa: E402
from SFRSegmentLogicLib.jobs import CaseInput, JobState, RunSettings, TrainingJob, TrainingResults  # noqa: E402
from SFRSegmentLogicLib.process import (  # noqa: E402
    ChildProcessRunner,
    EngineCancelled,
    ProgressEvent,
    engine_environment,
)
from SFRSegmentLogicLib.remote import ComputeServer, ComputeSettings  # noqa: E402
from SFRSegmentLogicLib.review import ReviewRow  # noqa: E402
from SFRSegmentLogicLib.runs import EngineRun, JobRunner  # noqa: E402
from test_jobserver import Server, free_port  # noqa: E402
from test_slicer_logic import (  # noqa: E402, F401 (segmentation_converters is an autouse fixture)
    STAND_IN_ENGINE,
    StandInEngineRunner,
    _scene_with_three_cases,
    exported_masks,
    module_parameter_node,
    segmentation_converters,
)
from test_slicer_ui import module_code  # noqa: E402


class ScriptedLoadableModuleLogic:
    """What SFRSegmentLogic takes from Slicer's base class here: nothing but a constructor."""

    def __init__(self) -> None:
        pass


class QTimer:
    """The GUI's poll timer (``run(wait=False)``), idle here: the test polls the run itself (``run.wait()``)."""

    def __init__(self) -> None:
        self.timeout = types.SimpleNamespace(connect=lambda poll: None)

    def setInterval(self, milliseconds: int) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def logic_class(scene, settings=None) -> type:
    """SFRSegmentLogic from SFRSegment.py, working on ``scene``, with this interpreter as its engine's Python and
    ``settings`` (a QSettings) as the application's settings."""
    application = types.SimpleNamespace(
        mrmlScene=scene, app=types.SimpleNamespace(processEvents=lambda: None),
        util=types.SimpleNamespace(startupEnvironment=lambda: dict(os.environ)))
    names = dict(
        ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic, slicer=application,
        qt=types.SimpleNamespace(QSettings=lambda: settings, QTimer=QTimer),
        ENGINE_ROOT=ROOT, RESOURCES=ROOT / "Resources", Path=Path, shutil=shutil, Optional=Optional,
        Callable=Callable, Sequence=Sequence, List=List, Union=Union, SFRSegmentParameterNode=object,
        vtkMRMLScalarVolumeNode=slicer.vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode=slicer.vtkMRMLSegmentationNode,
        ChildProcessRunner=ChildProcessRunner, JobRunner=JobRunner, EngineRun=EngineRun, ProgressEvent=ProgressEvent,
        CaseInput=CaseInput, RunSettings=RunSettings, TrainingJob=TrainingJob, TrainingResults=TrainingResults,
        JobSummary=JobSummary, ReviewRow=ReviewRow, InputError=InputError, engine_environment=engine_environment,
        catalog=catalog, weights=weights, dependencies=None,  # installs into Slicer's Python: not here
        hardware=hardware, history=history, jobs=jobs,
        nodes=nodes, review=review, remote=remote, ComputeServer=ComputeServer, ComputeSettings=ComputeSettings,
        SegmentClass=nodes.SegmentClass, plans=plans, PlanJob=plans.PlanJob, RunPlan=plans.RunPlan)
    namespace = module_code(classes=["SFRSegmentLogic"], **names)

    class Logic(namespace.SFRSegmentLogic):
        @staticmethod
        def enginePython() -> str:
            return sys.executable

    return Logic


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def inputs_of(scene):
    return [CaseInput(v, nodes.label_segmentation(scene, v)) for v in nodes.scalar_volumes(scene)]


# ---------------------------------------------------------------------------------------------------------------
# One resume check


def test_every_way_to_resume_refuses_a_job_whose_copy_of_a_volume_changed(scene, tmp_path):
    """A cancelled job whose copy of a volume was replaced since: Run → Continue (the widget calls resume with what
    unfinishedJob found), resume(job), resume(folder) and run(resume=True) all refuse it, naming the file, and start
    no engine; the engine would otherwise train on the changed copy from iteration 0."""
    _scene_with_three_cases(scene)
    runner = StandInEngineRunner(tmp_path / "stand_in_engine.py")
    runner.script.write_text(STAND_IN_ENGINE, encoding="utf-8")
    logic = logic_class(scene)(processRunner=runner)
    inputs, names = inputs_of(scene), ["liver", "tumour"]
    settings, jobs_folder = RunSettings(preset="small", device="cpu"), tmp_path / "jobs"
    job = jobs.prepare_training_job(jobs_folder, inputs, names, settings)
    job.record_state(JobState.CANCELLED)
    changed = job.image(next(iter(job.cases)))
    volume = read_volume(changed)
    write_volume(volume.with_array(volume.array + 1), changed)  # e.g. a copy replaced by hand

    found = logic.unfinishedJob(inputs, names, settings, jobs_folder)
    assert found is not None and found.folder == job.folder  # the scene itself is unchanged: the job matches
    ways = {
        "Run → Continue, resume(job)": lambda: logic.resume(found, wait=True),
        "resume(folder)": lambda: logic.resume(job.folder, wait=True),
        "run(resume=True)": lambda: logic.run(inputs, names, settings, jobsFolder=jobs_folder, wait=True),
    }
    for way, resume in ways.items():
        with pytest.raises(InputError) as refused:
            resume()
        assert "has changed since the job wrote it" in str(refused.value), way
        assert refused.value.path == changed, way
    assert runner.commands == []  # no engine was started
    assert TrainingJob.load(job.folder).recorded_state() == (JobState.CANCELLED, "")


# ---------------------------------------------------------------------------------------------------------------
# Compute on a server: a real job server on 127.0.0.1, the real engine at the small preset


SETTINGS = RunSettings(preset="small", device="cpu", fine_tune_iterations=2, retrain_iterations=6)
"""A few iterations of each stage: enough to cancel re-training in the middle and write every output."""


def settings_file(path: Path):
    """Qt's own QSettings on an ini file, as Slicer's settings are kept."""
    QtCore = pytest.importorskip("PySide6.QtCore")
    return QtCore.QSettings(str(path), QtCore.QSettings.IniFormat)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote-cohort") / "cohort"
    make_synthetic_cohort(root, n_cases=3, n_labeled=1, n_classes=1, seed=3, size_range=((48, 52), (48, 52), (16, 18)))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("remote-server") / "data").start()
    yield server
    server.stop()


def loaded_scene(cohort: Path):
    """A scene holding the cohort's volumes, the labeled one with its labels, as a user would have loaded them."""
    scene = slicer.vtkMRMLScene()
    classes = [nodes.SegmentClass(1, "blob", (0.9, 0.1, 0.1))]
    for folder in sorted(cohort.glob("case_*")):
        volume = nodes.load_volume(scene, folder / "image.nrrd", folder.name)
        if (folder / "label.nrrd").is_file():
            labels = nodes.load_segmentation(scene, folder / "label.nrrd", folder.name + " labels", volume, classes)
            nodes.set_label_segmentation(scene, volume, labels)
    return scene


def imported_masks(scene, results):
    """{volume name: its imported segmentation's mask on the volume's grid}."""
    masks = {}
    for case, segmentation in results.segmentations.items():
        volume = scene.GetNodeByID(results.job.volume_ids[case])
        masks[volume.GetName()] = exported_masks(scene, segmentation, volume)["blob"]
    return masks


def test_a_run_through_the_server_cancelled_and_resumed_imports_what_the_same_run_here_imports(
        server, cohort, tmp_path):
    here_scene, remote_scene = loaded_scene(cohort), loaded_scene(cohort)
    here = logic_class(here_scene, settings_file(tmp_path / "here.ini"))()
    local_events: List[ProgressEvent] = []
    local = here.run(here.inputs(), ["blob"], SETTINGS, jobsFolder=tmp_path / "here", wait=True,
                     onProgress=local_events.append)

    logic = logic_class(remote_scene, settings_file(tmp_path / "remote.ini"))()
    logic.setComputeSettings(ComputeSettings(on_server=True, url=server.url, token=server.token))
    on_server = logic.computeServer()
    assert on_server == ComputeServer(server.url, server.token)

    # Run, then Cancel during re-training: the server's job stops with its checkpoint, as a local run does.
    first: List[ProgressEvent] = []
    log: List[str] = []

    def cancel_in_retraining(event: ProgressEvent) -> None:
        first.append(event)
        if event.stage == "retrain" and event.step >= 2 and not cancelled.engine.cancel_requested:
            cancelled.cancel()

    cancelled = logic.run(  # as the panel starts it: wait=False, polled (here by cancelled.wait())
        logic.inputs(), ["blob"], SETTINGS, jobsFolder=tmp_path / "remote",
                          onProgress=cancel_in_retraining, onLog=log.append, server=on_server)
    with pytest.raises(EngineCancelled):
        cancelled.wait()
    job = cancelled.job
    assert TrainingJob.load(job.folder).recorded_state()[0] == JobState.CANCELLED
    assert TrainingJob.load(job.folder).server == server.url
    server_job = remote.server_job_id(job.run.root)
    assert server.client().job(server_job)["state"] == "cancelled"
    assert any("uploading" in line for line in log)  # the engine's client said what it did

    # The one resume check holds on a server too: a changed copy is refused (with it, the engine's client would
    # start a new server job from iteration 0), and a server's job is resumed on that server only.
    changed = job.image(next(iter(job.cases)))
    original = changed.read_bytes()
    volume = read_volume(changed)
    write_volume(volume.with_array(volume.array + 1), changed)
    for resume in (lambda: logic.run(logic.inputs(), ["blob"], SETTINGS, jobsFolder=tmp_path / "remote", wait=True,
                                     server=on_server),
                   lambda: logic.resume(job.folder, wait=True, server=on_server)):
        with pytest.raises(InputError) as refused:
            resume()
        assert refused.value.path == changed and "has changed since the job wrote it" in str(refused.value)
    changed.write_bytes(original)
    with pytest.raises(InputError) as elsewhere:
        logic.resume(job.folder, wait=True)
    assert f"this job ran on the server {server.url}" in str(elsewhere.value) and "Choose Compute on" in str(
        elsewhere.value)
    assert TrainingJob.load(job.folder).recorded_state()[0] == JobState.CANCELLED

    # Run again with the same inputs: the unfinished job is found on the same server and continued, not restarted.
    second: List[ProgressEvent] = []
    resumed = logic.run(logic.inputs(), ["blob"], SETTINGS, jobsFolder=tmp_path / "remote", wait=True,
                        onProgress=second.append, server=on_server)
    assert resumed.job.folder == job.folder and remote.server_job_id(job.run.root) == server_job
    saved = max(event.step for event in first if event.stage == "retrain")
    retrained = [event.step for event in second if event.stage == "retrain" and event.loss is not None]
    assert retrained[0] > 1 and retrained[0] <= saved + 1 and retrained[-1] == SETTINGS.retrain_iterations
    assert not any(event.stage == "finetune" and event.loss is not None for event in second)  # not redone
    assert TrainingJob.load(job.folder).recorded_state() == (JobState.FINISHED, "")

    # The same progress, and the same segmentations imported into the scene, named the same way.
    stages = lambda events: list(dict.fromkeys(event.stage for event in events))  # noqa: E731
    assert stages(first + second) == stages(local_events)
    here_masks, remote_masks = imported_masks(here_scene, local.results), imported_masks(remote_scene, resumed.results)
    assert sorted(remote_masks) == sorted(here_masks) == ["case_001", "case_002"]
    for name in here_masks:
        assert here_masks[name].any()
        np.testing.assert_array_equal(remote_masks[name], here_masks[name])
    assert sorted(s.GetName() for s in resumed.results.segmentations.values()) == [
        "case_001 segmentation", "case_002 segmentation"]
    assert resumed.results.report is not None and resumed.results.confidence_table is not None

    # Apply the model through the server: the same segmentation as applying the local run's model here.
    volume_here, volume_remote = (nodes.scalar_volumes(s)[0] for s in (here_scene, remote_scene))
    applied_here = here.applyModel(volume_here, local.job.folder, wait=True).results
    applied_remote = logic.applyModel(volume_remote, job.folder, wait=True, server=on_server).results
    np.testing.assert_array_equal(exported_masks(remote_scene, applied_remote, volume_remote)["blob"],
                                  exported_masks(here_scene, applied_here, volume_here)["blob"])
    with pytest.raises(InputError) as elsewhere:  # its model is on the server
        logic.applyModel(volume_remote, job.folder, wait=True)
    assert f"this job ran on the server {server.url}" in str(elsewhere.value)

    # Update model through the server: a new job there that starts from the server's job (run --from JOB).
    with pytest.raises(InputError) as local_parent:  # a local job's models are here
        logic.update(local.job.folder, wait=True, server=on_server)
    assert "this job ran on this computer" in str(local_parent.value)
    update = logic.update(resumed.results.job, wait=True, server=on_server)
    update_job = remote.server_job_id(update.job.run.root)
    assert update.job.parent == job.folder and update.job.server == server.url
    assert server.client().job(update_job)["parent"] == server_job
    assert sorted(s.GetName() for s in update.results.segmentations.values()) == [
        "case_001 segmentation", "case_002 segmentation"]  # the unedited predictions were replaced

    # The token is in the application's settings only: not in the scene, not in the job folders.
    token = server.token.encode()
    remote_scene.SetSaveToXMLString(1)
    remote_scene.Commit()
    assert server.token not in remote_scene.GetSceneXMLString()
    for folder in (job.folder, update.job.folder):
        assert not any(token in path.read_bytes() for path in folder.rglob("*") if path.is_file())


def test_a_wrong_token_an_unreachable_server_or_a_bad_url_say_what_to_check(server, cohort, tmp_path):
    scene = loaded_scene(cohort)
    logic = logic_class(scene, settings_file(tmp_path / "settings.ini"))()
    inputs = logic.inputs()

    with pytest.raises(remote.ComputeServerError) as refused:
        logic.run(inputs, ["blob"], SETTINGS, jobsFolder=tmp_path / "jobs", wait=True,
                  server=ComputeServer(server.url, "not-the-token"))
    assert refused.value.bad_input  # the dialog shows the message itself
    assert "the server refused the token" in str(refused.value)
    assert "Check the token under Compute on" in str(refused.value)
    assert "not-the-token" not in str(refused.value)

    with pytest.raises(remote.ComputeServerError) as unreachable:
        logic.run(inputs, ["blob"], SETTINGS, jobsFolder=tmp_path / "jobs", wait=True,
                  server=ComputeServer(f"http://127.0.0.1:{free_port()}", server.token))
    assert "cannot reach the SFRSegment server" in str(unreachable.value)
    assert "Check under Compute on the server URL" in str(unreachable.value)
    assert "that the server runs" in str(unreachable.value)

    with pytest.raises(remote.ComputeServerError) as not_tls:  # https to a server without TLS
        logic.run(inputs, ["blob"], SETTINGS, jobsFolder=tmp_path / "jobs", wait=True,
                  server=ComputeServer(server.url.replace("http:", "https:"), server.token))
    assert "CA certificate" in str(not_tls.value) and "https://" in str(not_tls.value)

    made = sorted((tmp_path / "jobs").iterdir())
    for bad, field in ((ComputeServer("gpu.example.org:8765", server.token), "url"),
                       (ComputeServer(server.url, " "), "token"),
                       (ComputeServer(server.url, server.token, tmp_path / "no-such.pem"), "ca_file")):
        with pytest.raises(InputError) as unusable:
            logic.run(inputs, ["blob"], SETTINGS, jobsFolder=tmp_path / "jobs", wait=True, server=bad)
        assert unusable.value.field == field and "Compute on" in str(unusable.value)
    assert sorted((tmp_path / "jobs").iterdir()) == made  # refused before a job folder was written


def test_the_compute_settings_are_kept_in_the_application_settings_not_in_the_scene(tmp_path):
    scene = slicer.vtkMRMLScene()
    certificate = tmp_path / "server.pem"
    certificate.write_text("-----BEGIN CERTIFICATE-----\n")
    Logic = logic_class(scene, settings_file(tmp_path / "Slicer.ini"))
    assert Logic().computeServer() is None  # nothing kept yet: this computer

    chosen = ComputeSettings(on_server=True, url="https://gpu.example.org:8765", token="s3cret-token",
                             ca_file=str(certificate))
    Logic().setComputeSettings(chosen)
    assert "s3cret-token" not in repr(chosen) and "s3cret-token" not in repr(chosen.server())
    assert (tmp_path / "Slicer.ini").stat().st_mode & 0o777 == 0o600  # it holds a token now

    # Another Slicer session (new settings object on the same file) finds the choice.
    again = logic_class(scene, settings_file(tmp_path / "Slicer.ini"))()
    assert again.computeSettings() == chosen
    assert again.computeServer() == ComputeServer("https://gpu.example.org:8765", "s3cret-token", certificate)
    again.setComputeSettings(ComputeSettings(on_server=False, url=chosen.url, token=chosen.token))
    assert again.computeServer() is None and again.computeSettings().url == chosen.url  # kept for next time

    # The scene holds none of it: its parameter node has no such parameter, and a saved scene no URL or token.
    parameter_node = module_parameter_node(scene)
    assert not [name for name in parameter_node.GetParameterNames() if "server" in name.lower()
                or "token" in name.lower()]
    scene.SetSaveToXMLString(1)
    scene.Commit()
    assert "s3cret-token" not in scene.GetSceneXMLString() and "gpu.example.org" not in scene.GetSceneXMLString()
