"""The review queue and model updates in the Slicer module's Logic, under the slicer-core wheels (real MRML scenes).

A result folder is made as the engine writes one (predictions on each image's grid, ``confidence.csv``) and imported;
then: the review queue's rows and order, a prediction that becomes labels only when used as labels, the update job
folder that starts from its parent's run, and the update's results replacing only the predictions nobody edited.
(The real engine's result folder is reviewed in test_slicer_jobs.py.)
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the slicer-core wheels are not installed", allow_module_level=True)

from vtk.util import numpy_support  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SFRSegment"))

from SFRSegmentLib.data.cohort import discover_cohort  # noqa: E402
from SFRSegmentLib.base.errors import InputError  # noqa: E402
from SFRSegmentLib.storage.volumes import read_volume  # noqa: E402
from SFRSegmentLogicLib import jobs, nodes, review  # noqa: E402
from SFRSegmentLogicLib.jobs import CaseInput, RunSettings, TrainingJob  # noqa: E402
from test_slicer_logic import (  # noqa: E402, F401 (segmentation_converters is an autouse fixture)
    _scene_with_three_cases,
    _write_prediction,
    exported_masks,
    segmentation_converters,
)

NAMES = ["liver", "tumour"]


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def inputs_of(scene):
    return [CaseInput(v, nodes.label_segmentation(scene, v)) for v in nodes.scalar_volumes(scene)]


def write_results(job, masks, confidences):
    """Predictions of the unlabeled cases (``masks``: case → {segment: mask}) and their confidence.csv, as the
    engine writes them, and a model file."""
    for case, case_masks in masks.items():
        label = np.zeros(case_masks["liver"].shape, np.uint8)
        label[case_masks["liver"]] = 1
        label[case_masks["tumour"]] = 2
        _write_prediction(job.run.prediction(case), job.image(case), label)
    with open(job.run.prediction_confidence, "w", newline="") as stream:
        csv.writer(stream).writerows([["case", "confidence"], *confidences.items()])
    job.run.vnet_weights.parent.mkdir(parents=True, exist_ok=True)
    job.run.vnet_weights.write_bytes(b"weights")


@pytest.fixture()
def finished(scene, tmp_path):
    """A finished job on three volumes (the first labeled) whose two predictions are imported into the scene."""
    volumes, masks, _ = _scene_with_three_cases(scene)
    job = jobs.prepare_training_job(tmp_path / "jobs", inputs_of(scene), NAMES, RunSettings(preset="small"))
    cases = list(job.cases)
    write_results(job, dict(zip(cases[1:], masks[1:])), {cases[1]: "0.97", cases[2]: "0.91"})
    results = jobs.import_training_results(scene, job)
    return dict(job=job, volumes=volumes, masks=masks, cases=cases, results=results)


def erase_segment(segmentation, name):
    """Erase every voxel of a segment, as Segment Editor's eraser would."""
    content = segmentation.GetSegmentation()
    segment = content.GetSegment(content.GetSegmentIdBySegmentName(name))
    labelmap = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    voxels[voxels == segment.GetLabelValue()] = 0
    labelmap.Modified()
    segmentation.Modified()


def test_the_review_queue_lists_the_predicted_volumes_least_confident_first_with_what_to_show(scene, finished):
    job, volumes, cases, results = finished["job"], finished["volumes"], finished["cases"], finished["results"]
    assert results.job is job

    rows = review.review_queue(scene, job)

    assert rows == [
        review.ReviewRow(cases[2], "Patient 2 CT", 0.91, volumes[2].GetID(),
                         results.segmentations[cases[2]].GetID(), False),
        review.ReviewRow(cases[1], "Patient 1 CT", 0.97, volumes[1].GetID(),
                         results.segmentations[cases[1]].GetID(), False)]
    job.run.prediction_confidence.unlink()  # nothing predicted yet: no ranking
    assert review.review_queue(scene, job) == []


def test_a_prediction_becomes_labels_only_when_used_as_labels(scene, tmp_path, finished):
    job, volumes, cases, masks = finished["job"], finished["volumes"], finished["cases"], finished["masks"]
    prediction = finished["results"].segmentations[cases[2]]
    erase_segment(prediction, "tumour")  # corrected in Segment Editor, not yet used as labels
    assert nodes.label_segmentation(scene, volumes[2]) is None
    unmarked = jobs.prepare_training_job(tmp_path / "again", inputs_of(scene), NAMES, RunSettings(preset="small"))
    assert [c.labeled for c in discover_cohort(unmarked.cohort).cases] == [True, False, False]

    [row, _] = review.review_queue(scene, job)
    assert review.use_as_labels(scene, row) is prediction

    assert nodes.label_segmentation(scene, volumes[2]) is prediction
    assert prediction.GetAttribute(nodes.PREDICTION_ATTRIBUTE) is None
    assert [r.labeled for r in review.review_queue(scene, job)] == [True, False]
    marked = jobs.prepare_training_job(tmp_path / "again", inputs_of(scene), NAMES, RunSettings(preset="small"))
    cohort = discover_cohort(marked.cohort)
    assert [c.labeled for c in cohort.cases] == [True, False, True]
    label = read_volume(cohort.cases[2].label).array
    np.testing.assert_array_equal(label == 1, masks[2]["liver"])
    assert not (label == 2).any()  # the correction, not the prediction

    scene.RemoveNode(volumes[1])
    with pytest.raises(InputError, match="'Patient 1 CT' or its segmentation has been removed"):
        review.use_as_labels(scene, review.ReviewRow(cases[1], "Patient 1 CT", 0.97, volumes[1].GetID(), None, False))


def test_an_update_job_starts_from_its_parents_run_with_the_labels_the_scene_has_now(scene, tmp_path, finished):
    job, volumes, cases = finished["job"], finished["volumes"], finished["cases"]
    review.use_as_labels(scene, review.review_queue(scene, job)[0])
    parent_files = {path: path.read_bytes() for path in job.folder.rglob("*") if path.is_file()}

    update = jobs.prepare_update_job(tmp_path / "jobs", TrainingJob.load(job.folder), inputs_of(scene))

    assert update.folder != job.folder and update.folder.parent == job.folder.parent
    assert json.loads((update.folder / jobs.JOB_FILE).read_text())["parent"] == str(job.folder)
    loaded = TrainingJob.load(update.folder)
    assert loaded.parent == job.folder and loaded.overrides == job.overrides  # the parent's settings by default
    assert loaded.classes == job.classes
    assert update.command("python") == [
        "python", "-m", "SFRSegmentLib", "run", "--cohort", str(update.cohort), "--out", str(update.run.root),
        "--preset", "small", "--config", str(update.config), "--progress", "jsonl", "--from", str(job.run.root)]
    assert [(c.name, c.labeled) for c in discover_cohort(update.cohort).cases] == [
        (cases[0], True), (cases[1], False), (cases[2], True)]
    assert update.volume_ids == {case: volume.GetID() for case, volume in zip(cases, volumes)}
    assert {path: path.read_bytes() for path in job.folder.rglob("*") if path.is_file()} == parent_files

    other = jobs.prepare_update_job(tmp_path / "jobs", job, inputs_of(scene), RunSettings(preset="small", seed=3))
    assert other.overrides == jobs.run_config(RunSettings(preset="small", seed=3))
    job.run.vnet_weights.unlink()
    with pytest.raises(InputError, match="no trained model yet"):
        jobs.prepare_update_job(tmp_path / "jobs", job, inputs_of(scene))


def test_an_updates_results_replace_the_predictions_nobody_edited(scene, tmp_path, finished):
    job, volumes, cases, masks = finished["job"], finished["volumes"], finished["cases"], finished["masks"]
    before = finished["results"].segmentations
    edited = before[cases[1]]
    erase_segment(edited, "tumour")  # edited, not used as labels: kept, but no longer an unedited prediction
    assert nodes.unedited_prediction(scene, volumes[1]) is None
    assert nodes.unedited_prediction(scene, volumes[2]) is before[cases[2]]
    update = jobs.prepare_update_job(tmp_path / "jobs", job, inputs_of(scene))
    new = {case: {"liver": masks[i]["liver"], "tumour": np.zeros_like(masks[i]["tumour"])}
           for i, case in ((1, cases[1]), (2, cases[2]))}
    write_results(update, new, {cases[1]: "0.95", cases[2]: "0.99"})
    displays = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationDisplayNode")

    results = jobs.import_training_results(scene, update)

    assert scene.GetNodeByID(edited.GetID()) is edited and edited.GetName() == "Patient 1 CT segmentation"
    assert results.segmentations[cases[1]].GetName() == "Patient 1 CT segmentation_1"  # added next to the edit
    replaced = results.segmentations[cases[2]]
    assert scene.GetNodeByID(before[cases[2]].GetID()) is None and replaced.GetName() == "Patient 2 CT segmentation"
    assert not exported_masks(scene, replaced, volumes[2])["tumour"].any()
    assert nodes.unedited_prediction(scene, volumes[2]) is replaced
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 4  # labels, the edit, two new predictions
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationDisplayNode") == displays + 1  # the old one's went
    assert [(row.case, row.segmentation_id) for row in review.review_queue(scene, update)] == [
        (cases[1], results.segmentations[cases[1]].GetID()), (cases[2], replaced.GetID())]
