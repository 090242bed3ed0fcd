"""The review queue: a finished job's predicted volumes, least confident first, each with the nodes to show.

The ranking is the engine's: the confidence of the V-Net's prediction of each case (``RUN/predictions/confidence.csv``,
:mod:`SFRSegmentLib.stages.confidence`), the predictions the user reviews. Each row pairs a
case with its volume in the scene and the segmentation to review (:func:`nodes.shown_segmentation`: the volume's
labels once the user has used a corrected prediction as labels, else its prediction). Using a segmentation as labels
is :func:`nodes.set_label_segmentation`, the one explicit step by which a prediction becomes a label; the next run or
update (:func:`jobs.prepare_update_job`) exports it as one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from slicer import vtkMRMLScene, vtkMRMLSegmentationNode

from SFRSegmentLib.stages.confidence import read_table
from SFRSegmentLib.base.errors import InputError

from .jobs import TrainingJob
from .nodes import label_segmentation, set_label_segmentation, shown_segmentation


@dataclass(frozen=True)
class ReviewRow:
    """One volume of the review queue."""

    case: str
    volume: str
    """The volume's name."""
    confidence: float
    """The engine's confidence in the volume's prediction (mean largest probability, 0 to 1)."""
    volume_id: str
    segmentation_id: Optional[str]
    """The segmentation to show and edit (:func:`nodes.shown_segmentation`); None when the volume has none."""
    labeled: bool
    """Whether that segmentation is the volume's labels (used as labels), rather than a prediction."""


def review_queue(scene: vtkMRMLScene, job: TrainingJob) -> List[ReviewRow]:
    """The rows of ``job``'s review queue, least confident first: its ranked cases whose volume is in ``scene``
    (``job.volume_ids``). Empty until the job has predicted its volumes."""
    if not job.run.prediction_confidence.is_file():
        return []
    rows = []
    for case, confidence in read_table(job.run.prediction_confidence):
        volume = scene.GetNodeByID(job.volume_ids.get(case, ""))
        if volume is None:
            continue
        segmentation = shown_segmentation(scene, volume)
        rows.append(ReviewRow(case, volume.GetName(), confidence, volume.GetID(),
                              None if segmentation is None else segmentation.GetID(),
                              segmentation is not None and segmentation is label_segmentation(scene, volume)))
    return rows


def use_as_labels(scene: vtkMRMLScene, row: ReviewRow) -> vtkMRMLSegmentationNode:
    """Make the row's segmentation (a prediction, corrected or not) its volume's labels, which the next run or update
    exports: the prediction marker is cleared and the segmentation linked to the volume
    (:func:`nodes.set_label_segmentation`). Returns that segmentation."""
    volume, segmentation = scene.GetNodeByID(row.volume_id), scene.GetNodeByID(row.segmentation_id or "")
    if volume is None or segmentation is None:
        raise InputError(f"'{row.volume}' or its segmentation has been removed from the scene.")
    set_label_segmentation(scene, volume, segmentation)
    return segmentation
