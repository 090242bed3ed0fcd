"""The plan before a run, and the class table, in the Slicer module: real MRML scenes (slicer-core wheels), the real
engine in a child process, and the widget's own code on the .ui's widgets (PySide6 offscreen, as test_slicer_ui).

The plan is made of a scene of thick-slice volumes (1.5 × 1.5 × 10 mm, as cine MRI) at the cpu preset, which plans
from the volumes: its values must be those the engine's planner gives for the same volumes, not the preset's, its
estimate must be there, and no job folder may be left behind (a cancelled or refused plan neither).
"""

import os
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import List, Optional, Sequence

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the slicer-core wheels are not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SFRSegment"))

from SFRSegmentLib.base import choices  # noqa: E402
from SFRSegmentLib.base.config import preset  # noqa: E402
from SFRSegmentLib.base.config_io import given_paths, with_overrides  # noqa: E402
from SFRSegmentLib.data.cohort import discover_cohort  # noqa: E402
from SFRSegmentLib.base.errors import InputError  # noqa: E402
from SFRSegmentLib.base.events import format_duration  # noqa: E402
from SFRSegmentLib.run.plan import plan_config  # noqa: E402
from SFRSegmentLib.storage.volumes import read_volume  # noqa: E402
from SFRSegmentLogicLib import history, jobs, nodes, plans  # noqa: E402
from SFRSegmentLogicLib.jobs import CaseInput, RunSettings, TrainingJob  # noqa: E402
from SFRSegmentLogicLib.plans import PlanJob, RunPlan  # noqa: E402
from SFRSegmentLogicLib.process import (  # noqa: E402
    ChildProcessRunner,
    EngineCancelled,
    EngineFailed,
    engine_environment,
)
from SFRSegmentLogicLib.runs import JobRunner  # noqa: E402
from test_plan import thick_slice_cohort  # noqa: E402
from test_slicer_logic import (  # noqa: E402, F401 (segmentation_converters is an autouse fixture)
    BLUE,
    GREEN,
    RED,
    _ijk_to_ras,
    _scene_with_three_cases,
    add_segmentation,
    add_volume,
    segmentation_converters,
)
from test_slicer_ui import PythonQtWidget, loaded_ui, module_code  # noqa: E402, F401 (loaded_ui is a fixture)

SEGMENTS = {1: ("myocardium", RED), 2: ("vessels", GREEN)}
SETTINGS = RunSettings(preset="cpu", method="mt", device="cpu", retrain_iterations=4)
"""The cpu preset plans from the volumes; mt needs no SAM, so only the V-Net's steps are timed."""


def inputs_of(scene):
    return [CaseInput(v, nodes.label_segmentation(scene, v)) for v in nodes.scalar_volumes(scene)]


def thick_slice_scene(cohort: Path, labeled: Sequence[str]):
    """The cohort's images as volumes; those of ``labeled`` with their labels as a segmentation (SEGMENTS)."""
    scene = slicer.vtkMRMLScene()
    for folder in sorted(path for path in cohort.iterdir() if (path / "image.nrrd").is_file()):
        image = read_volume(folder / "image.nrrd")
        volume = add_volume(scene, folder.name, image.array, image.ijk_to_ras)
        if folder.name in labeled:
            label_path = next(p for p in (folder / "label.nrrd", cohort / "truth" / folder.name / "label.nrrd")
                              if p.is_file())
            label = read_volume(label_path).array
            add_segmentation(scene, f"{folder.name} labels", {name: label == value for value, (name, _) in
                                                              SEGMENTS.items()}, image.ijk_to_ras,
                             colors=dict(SEGMENTS.values()), volume=volume)
    return scene


@pytest.fixture()
def temporary_folder(tmp_path, monkeypatch):
    """The system's temporary folder, for this test alone: what a plan leaves there can be seen."""
    folder = tmp_path / "temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture()
def planned(tmp_path, temporary_folder):
    """A plan of a scene of one labeled and two unlabeled thick-slice volumes, made by the real engine."""
    cohort = thick_slice_cohort(tmp_path / "cohort", n_labeled=1, n_unlabeled=2)
    scene = thick_slice_scene(cohort, labeled=["case0"])
    job = plans.prepare_plan_job(inputs_of(scene), [name for name, _ in SEGMENTS.values()], SETTINGS)
    assert job.root.parent == temporary_folder  # not in any jobs folder
    runner = JobRunner(scene, ChildProcessRunner(), ROOT)
    events = []
    run = runner.plan(job, sys.executable, engine_environment(os.environ, ROOT), events.append)
    assert runner.is_running(job.folder)
    run.wait()
    return dict(cohort=cohort, job=job, run=run, events=events, runner=runner)


def test_the_plan_is_the_engines_plan_of_the_volumes_with_its_estimate_and_leaves_no_job(planned, temporary_folder):
    job, plan = planned["job"], planned["run"].results
    # The engine's own planner on the same volumes, with the run configuration the module wrote.
    config, engine_plan, _ = plan_config(with_overrides(preset("cpu"), job.training.overrides),
                                         discover_cohort(planned["cohort"]), given_paths(job.training.overrides))
    assert plan.from_volumes
    assert plan.spacing == config.retrain.spacing == (1.5, 1.5, 10.0) != preset("cpu").retrain.spacing
    assert plan.patch_size == config.patch_size != preset("cpu").patch_size  # the thick axis covers the slices
    assert plan.strides == engine_plan.downsampling
    assert plan.largest_component == config.inference.largest_component is False  # class 2 is two pieces
    assert set(plan.reasons) >= {plans.SPACING, plans.PATCH_SIZE, plans.STRIDES}
    assert plan.record["planned"][plans.SPACING]["used"] == list(plan.spacing)

    assert plan.device == "cpu" and [stage.stage for stage in plan.stages] == ["retrain", "predict"]  # mt: no SAM
    assert all(stage.seconds > 0 for stage in plan.stages)
    assert plan.total_s == pytest.approx(sum(stage.seconds for stage in plan.stages))
    assert "(4 mt iterations" in plan.stages[0].description
    assert any(event.stage == "estimate" for event in planned["events"])

    assert not job.root.exists() and list(temporary_folder.iterdir()) == []  # nothing left, anywhere
    assert not planned["runner"].is_running(job.folder)


def test_the_plan_table_shows_the_plan_and_says_whose_times_they_are(planned, loaded_ui):
    widget, QtWidgets = loaded_ui
    QtGui = pytest.importorskip("PySide6.QtGui")
    plan = planned["run"].results
    status = []
    qt = types.SimpleNamespace(QTableWidgetItem=QtWidgets.QTableWidgetItem, QBrush=QtGui.QBrush,
                               QColor=QtGui.QColor)
    parts = module_code(functions=["stageTitle", "formatDuration", "formatShape"],
                        widget_methods=["_showPlan", "onRunFinished"], qt=qt, choices=choices, plans=plans,
                        PlanJob=PlanJob, RunPlan=RunPlan, TrainingJob=TrainingJob, EngineCancelled=EngineCancelled,
                        EngineFailed=EngineFailed, Optional=Optional, Sequence=Sequence,
                        format_duration=format_duration)
    view = parts.Widget()
    view.ui = types.SimpleNamespace(**{name: PythonQtWidget(widget.findChild(QtWidgets.QWidget, name))
                                       for name in ("planTable", "planLabel", "progressBar", "statusLabel")})
    view._showStatus, view._updateButtons, view.updatePastJobs = status.append, lambda: None, lambda: None
    view._planOnServer = True  # asked for while computing on a server

    view.onRunFinished(planned["run"])

    table = view.ui.planTable.widget
    assert table.editTriggers() == QtWidgets.QAbstractItemView.NoEditTriggers
    rows = {table.item(row, 0).text(): table.item(row, 1) for row in range(table.rowCount())}

    def numbers(text):
        return [float(number) for number in re.findall(r"\d+(?:\.\d+)?", text)]

    assert numbers(rows["Working spacing"].text()) == list(plan.spacing)
    assert rows["Working spacing"].toolTip() == plan.reasons[plans.SPACING]
    assert numbers(rows["V-Net patch"].text()) == list(plan.patch_size)
    assert numbers(rows["V-Net strides"].text()) == [s for stride in plan.strides for s in stride]
    assert rows["Largest component"].text() == "not kept"
    for stage in plan.stages:  # each stage's time as the engine writes durations, what it is made of as tooltip
        shown = rows[choices.STAGE_TITLES[stage.stage]]
        assert shown.text() == format_duration(stage.seconds) and shown.toolTip() == stage.description
    assert rows["Total"].text() == format_duration(plan.total_s)
    assert "Planned from the volumes" in view.ui.planLabel.text
    assert "this computer (cpu)" in view.ui.planLabel.text and "not on the server" in view.ui.planLabel.text
    assert status == [f"Planned: about {format_duration(plan.total_s)} on this computer."]

    view._showPlan(None)  # a new plan starts from an empty table
    assert table.rowCount() == 0 and view.ui.planLabel.text == ""


def test_a_preset_that_does_not_plan_shows_its_own_values():
    record = {"planned": None, "estimate": {"device": "cpu", "total_s": 12.5, "stages": [
        {"stage": "retrain", "seconds": 12.5, "description": "retrain: 12 s (5 mt iterations × 2.5 s)"}]}}
    overrides = jobs.run_config(RunSettings(preset="small", patch_size=(64, 64, 32)))
    plan = plans.run_plan(record, overrides)
    small = preset("small")
    assert not plan.from_volumes and plan.reasons == {}
    assert plan.spacing is small.retrain.spacing is None  # each volume's own grid
    assert plan.patch_size == (64, 64, 32)  # the settings' patch
    assert len(plan.strides) == 4 and plan.largest_component == small.inference.largest_component
    assert (plan.total_s, [stage.stage for stage in plan.stages]) == (12.5, ["retrain"])


def test_a_cancelled_or_refused_plan_leaves_nothing(tmp_path, temporary_folder):
    cohort = thick_slice_cohort(tmp_path / "cohort", n_labeled=2, n_unlabeled=1)
    names = [name for name, _ in SEGMENTS.values()]
    runner = JobRunner(slicer.vtkMRMLScene(), ChildProcessRunner(), ROOT)
    environment = engine_environment(os.environ, ROOT)

    scene = thick_slice_scene(cohort, labeled=["case0"])
    cancelled = plans.prepare_plan_job(inputs_of(scene), names, SETTINGS)
    run = runner.plan(cancelled, sys.executable, environment, on_progress=lambda event: run.cancel())
    with pytest.raises(EngineCancelled):
        run.wait()
    with pytest.raises(ProcessLookupError):
        os.killpg(run.engine.process.pid, 0)  # the whole process group is gone
    assert not cancelled.root.exists()

    every_volume_labeled = thick_slice_scene(cohort, labeled=["case0", "case1", "case2"])
    refused = plans.prepare_plan_job(inputs_of(every_volume_labeled), names, SETTINGS)
    run = runner.plan(refused, sys.executable, environment)
    with pytest.raises(EngineFailed) as failed:
        run.wait()
    assert failed.value.bad_input and "no unlabeled case" in str(failed.value)  # the engine's message, as for Run
    assert not refused.root.exists()

    with pytest.raises(InputError, match="No labeled volume"):  # checked before the engine starts
        plans.prepare_plan_job(inputs_of(thick_slice_scene(cohort, labeled=[])), names, SETTINGS)
    assert list(temporary_folder.iterdir()) == []
    assert history.list_jobs(temporary_folder, runner.is_running) == []


def test_the_class_table_shows_each_segments_name_colour_and_value_and_follows_the_inputs(loaded_ui, tmp_path):
    widget, QtWidgets = loaded_ui
    QtGui = pytest.importorskip("PySide6.QtGui")
    QtCore = pytest.importorskip("PySide6.QtCore")
    scene = slicer.vtkMRMLScene()
    volumes, masks, _ = _scene_with_three_cases(scene)  # the first labeled: liver RED, tumour GREEN, vessel BLUE
    purple = (0.5, 0.2, 0.7)
    add_segmentation(scene, "labels 1", {"liver": masks[1]["liver"], "cyst": masks[1]["tumour"]},
                     _ijk_to_ras(volumes[1]), colors={"liver": BLUE, "cyst": purple}, volume=volumes[1])
    parameters = types.SimpleNamespace(excludedSegments=[], excludedVolumes=[])
    # The Logic's methods the widget calls (SFRSegmentLogic.inputs, segmentNames, segmentClasses).
    logic = types.SimpleNamespace(
        inputs=lambda excludedVolumes=(): [item for item in inputs_of(scene) if item.volume not in excludedVolumes],
        segmentNames=jobs.label_segment_names, segmentClasses=jobs.input_classes)
    qt = types.SimpleNamespace(QTableWidgetItem=QtWidgets.QTableWidgetItem, QBrush=QtGui.QBrush,
                               QColor=QtGui.QColor, Qt=QtCore.Qt)
    parts = module_code(widget_methods=["_updateSegmentsTable", "_showLabelValues", "onSegmentsTableItemChanged",
                                        "_inputs", "_segmentNames"], qt=qt, List=List, Sequence=Sequence,
                        CaseInput=CaseInput)
    view = parts.Widget()
    view.ui = types.SimpleNamespace(segmentsTable=PythonQtWidget(widget.findChild(QtWidgets.QWidget,
                                                                                  "segmentsTable")))
    view.logic, view._parameterNode, view._updateButtons = logic, parameters, lambda: None
    table = view.ui.segmentsTable.widget
    table.itemChanged.connect(view.onSegmentsTableItemChanged)

    def rounded(color):
        return tuple(round(value, 2) for value in color)

    def shown():
        return [(table.item(row, 0).text(), table.item(row, 0).checkState() == QtCore.Qt.Checked,
                 rounded(table.item(row, 1).background().color().getRgbF()[:3]),
                 table.item(row, 2).text()) for row in range(table.rowCount())]

    assert [table.horizontalHeaderItem(column).text() for column in range(3)] == ["Segment", "Colour", "Label value"]
    view._updateSegmentsTable()
    # Each name's colour is the one it has in the first labeled volume having it, as the results get it.
    assert shown() == [("liver", True, RED, "1"), ("tumour", True, GREEN, "2"), ("vessel", True, BLUE, "3"),
                       ("cyst", True, purple, "4")]

    table.item(1, 0).setCheckState(QtCore.Qt.Unchecked)  # the user unticks tumour: the others are renumbered
    assert parameters.excludedSegments == ["tumour"]
    assert shown() == [("liver", True, RED, "1"), ("tumour", False, GREEN, ""), ("vessel", True, BLUE, "2"),
                       ("cyst", True, purple, "3")]

    parameters.excludedVolumes = [volumes[1]]  # the inputs change: its segments go, unticked ones stay unticked
    scene.GetFirstNodeByName("labels").GetSegmentation().GetSegment(
        scene.GetFirstNodeByName("labels").GetSegmentation().GetSegmentIdBySegmentName("vessel")).SetColor(*purple)
    view._updateSegmentsTable()
    assert shown() == [("liver", True, RED, "1"), ("tumour", False, GREEN, ""), ("vessel", True, purple, "2")]

    # The table's values, names and colours are the classes of the job Run makes, which its results are imported with.
    inputs = view._inputs()
    job = jobs.prepare_training_job(tmp_path / "jobs", inputs, view._segmentNames(inputs), RunSettings(preset="small"))
    assert [(str(c.value), c.name, rounded(c.color)) for c in job.classes] == [
        (value, name, color) for name, ticked, color, value in shown() if ticked]
