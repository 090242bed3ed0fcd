"""Slicer nodes ↔ files, and the scene queries the module makes: the only code that touches voxels and geometry.

Uses nothing but Slicer's MRML classes, VTK and numpy, so it runs both inside Slicer and under the ``slicer-core``
wheels (tests). Geometry is never converted by hand: volumes are written by Slicer's own NRRD storage node (the file
gets the node's IJK-to-RAS, direction matrix included, in LPS as NRRD expects), labels are resampled onto the volume's
grid by ``vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode``, and results are read by Slicer's
segmentation storage node (volumes by its volume storage node).

A volume's identity is its :func:`fingerprint` (a hash of its voxels and geometry), so that a job folder can tell
whether the scene's inputs are still the ones it was made from, under any node names.

Which segmentation labels which volume is what Slicer itself records: the segmentation's reference-image-geometry
node reference (set by Segment Editor when a source volume is chosen). The module's own results carry
:data:`PREDICTION_ATTRIBUTE` so that an unreviewed prediction is never taken as a label by default; its value is the
:func:`content_fingerprint` the prediction had when it was loaded, so that an edit (in Segment Editor) can be told.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import vtk
from vtk.util import numpy_support

from slicer import (
    vtkMRMLDisplayableNode,
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLScene,
    vtkMRMLSegmentationNode,
    vtkMRMLSegmentationStorageNode,
    vtkMRMLStorageNode,
    vtkMRMLTableNode,
    vtkMRMLVolumeArchetypeStorageNode,
    vtkSegmentation,
    vtkSlicerSegmentationsModuleLogic,
)

from SFRSegmentLib.stages.confidence import read_table

REFERENCE_ROLE = "referenceImageGeometryRef"
"""The node reference through which a segmentation names the volume it was drawn on."""
PREDICTION_ATTRIBUTE = "SFRSegment.Prediction"
"""Set on the segmentations this module creates, to their :func:`content_fingerprint` at loading; cleared when the
user picks one as a label."""

Color = Tuple[float, float, float]


@dataclass(frozen=True)
class SegmentClass:
    """One class to learn: its label value in the exported label maps, and its segment name and colour in Slicer."""

    value: int
    name: str
    color: Color


# ---------------------------------------------------------------------------------------------------------------
# Scene queries


def scalar_volumes(scene: vtkMRMLScene) -> List[vtkMRMLScalarVolumeNode]:
    """The scene's scalar volumes with image data, in scene order (label maps are not volumes to segment)."""
    volumes = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode") and node.GetImageData() is not None:
            volumes.append(node)
    return volumes


def label_segmentation(scene: vtkMRMLScene, volume: vtkMRMLScalarVolumeNode) -> Optional[vtkMRMLSegmentationNode]:
    """The segmentation that labels ``volume``: the first one referencing it that is not an unreviewed prediction."""
    return next((s for s in _referencing(scene, volume) if not s.GetAttribute(PREDICTION_ATTRIBUTE)), None)


def unedited_prediction(scene: vtkMRMLScene, volume: vtkMRMLScalarVolumeNode) -> Optional[vtkMRMLSegmentationNode]:
    """The last unreviewed prediction of ``volume`` whose content is still what was loaded; None if there is none.

    A segmentation is such a prediction while it references ``volume`` and still carries :data:`PREDICTION_ATTRIBUTE`
    (used as labels, it has none) with the :func:`content_fingerprint` it has now: a segment painted, erased, renamed,
    added or removed in Segment Editor changes the fingerprint, and the segmentation counts as edited.
    """
    for segmentation in reversed(_predictions(scene, volume)):
        if segmentation.GetAttribute(PREDICTION_ATTRIBUTE) == content_fingerprint(segmentation, volume):
            return segmentation
    return None


def shown_segmentation(scene: vtkMRMLScene, volume: vtkMRMLScalarVolumeNode) -> Optional[vtkMRMLSegmentationNode]:
    """The segmentation to review for ``volume``: its labels if it has some, else its last prediction (edited or
    not); None if it has neither."""
    labels = label_segmentation(scene, volume)
    if labels is not None:
        return labels
    predictions = _predictions(scene, volume)
    return predictions[-1] if predictions else None


def _predictions(scene: vtkMRMLScene, volume: vtkMRMLScalarVolumeNode) -> List[vtkMRMLSegmentationNode]:
    """The segmentations referencing ``volume`` that are marked as predictions, in scene order."""
    return [s for s in _referencing(scene, volume) if s.GetAttribute(PREDICTION_ATTRIBUTE)]


def _referencing(scene: vtkMRMLScene, volume: vtkMRMLScalarVolumeNode) -> List[vtkMRMLSegmentationNode]:
    """The segmentations drawn on ``volume`` (:data:`REFERENCE_ROLE`), in scene order."""
    every = (scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")))
    return [s for s in every if s.GetNodeReferenceID(REFERENCE_ROLE) == volume.GetID()]


def set_label_segmentation(
    scene: vtkMRMLScene, volume: vtkMRMLScalarVolumeNode, segmentation: Optional[vtkMRMLSegmentationNode]
) -> None:
    """Make ``segmentation`` the label of ``volume`` (None: leave ``volume`` unlabeled).

    Choosing a segmentation links it to the volume as Segment Editor's source-volume selector does, and turns a
    prediction into a label. Leaving a volume unlabeled removes the links of the segmentations that labeled it.
    """
    current = label_segmentation(scene, volume)
    while current is not None and current is not segmentation:
        current.RemoveNodeReferenceIDs(REFERENCE_ROLE)
        current = label_segmentation(scene, volume)
    if segmentation is not None:
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentation.RemoveAttribute(PREDICTION_ATTRIBUTE)


def segment_names(segmentation: vtkMRMLSegmentationNode) -> List[str]:
    """The names of the segments of ``segmentation``, in its order."""
    content = segmentation.GetSegmentation()
    return [content.GetNthSegment(i).GetName() for i in range(content.GetNumberOfSegments())]


def segment_classes(names: Sequence[str], segmentations: Iterable[vtkMRMLSegmentationNode]) -> List[SegmentClass]:
    """The classes for ``names``: values 1, 2, … in that order, coloured as in the first segmentation having each."""
    colors: Dict[str, Color] = {}
    for segmentation in segmentations:
        content = segmentation.GetSegmentation()
        for name in names:
            segment_id = content.GetSegmentIdBySegmentName(name)
            if segment_id and name not in colors:
                colors[name] = tuple(content.GetSegment(segment_id).GetColor())
    return [SegmentClass(value, name, colors.get(name, (0.5, 0.5, 0.5))) for value, name in enumerate(names, 1)]


# ---------------------------------------------------------------------------------------------------------------
# Nodes to files


def write_volume(volume: vtkMRMLScalarVolumeNode, path: Path) -> Path:
    """Write ``volume`` as NRRD with its geometry (origin, spacing, direction matrix), through Slicer's storage node.

    A parent transform is not applied: the engine works on the voxel grid, and results come back on the same grid
    under the same transform.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    if not storage.WriteData(volume):
        raise OSError(f"{path}: could not write volume '{volume.GetName()}'")
    return path


GEOMETRY_DECIMALS = 6
"""A fingerprint's IJK-to-RAS is rounded to a micrometre: a volume written to NRRD and read back (origin and
directions in LPS, in decimal) may differ by 1e-14 mm."""


def fingerprint(volume: vtkMRMLScalarVolumeNode) -> str:
    """The SHA-256 of a volume's voxels (type, dimensions, values) and IJK-to-RAS geometry: the same for the same
    data, loaded again from the same file, written and read back, or exported again, whatever the node's name."""
    image = volume.GetImageData()
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    elements = [matrix.GetElement(row, column) for row in range(4) for column in range(4)]
    geometry = np.round(elements, GEOMETRY_DECIMALS) + 0.0  # + 0.0: -0.0 becomes 0.0
    digest = hashlib.sha256()
    digest.update(f"{image.GetScalarTypeAsString()} {image.GetNumberOfScalarComponents()} "
                  f"{image.GetDimensions()}".encode())
    digest.update(geometry.tobytes())
    digest.update(memoryview(numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())).cast("B"))
    return digest.hexdigest()


@contextlib.contextmanager
def exported_label_map(
    segmentation: vtkMRMLSegmentationNode,
    classes: Sequence[SegmentClass],
    reference_volume: vtkMRMLScalarVolumeNode,
) -> Iterator[vtkMRMLLabelMapVolumeNode]:
    """The segments named by ``classes`` as one temporary label map node (segment → class value) on the volume's
    grid, removed from the scene again when the block ends.

    Each class's segment is looked up by name; a missing one is an error rather than silently unlabeled voxels. Where
    segments overlap, the later class wins.
    """
    content = segmentation.GetSegmentation()
    segment_ids = vtk.vtkStringArray()
    for segment_class in sorted(classes, key=lambda c: c.value):
        segment_id = content.GetSegmentIdBySegmentName(segment_class.name)
        if not segment_id:
            raise ValueError(
                f"Segmentation '{segmentation.GetName()}' (the label of '{reference_volume.GetName()}') has no "
                f"segment named '{segment_class.name}'. Add it there, or untick it."
            )
        segment_ids.InsertNextValue(segment_id)
    _check_consecutive(classes)
    scene = segmentation.GetScene()
    # The export needs its output in the scene; the temporary node is removed again whatever happens.
    label_map = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SFRSegment export")
    try:
        exported = vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation, segment_ids, label_map, reference_volume, vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        )
        if not exported:
            raise OSError(f"could not export the segments of '{segmentation.GetName()}' to a label map")
        yield label_map
    finally:
        remove_with_display_nodes(scene, label_map)


def write_label_map(
    segmentation: vtkMRMLSegmentationNode,
    classes: Sequence[SegmentClass],
    reference_volume: vtkMRMLScalarVolumeNode,
    path: Path,
) -> Path:
    """Write the segments named by ``classes`` as one label map on the volume's grid (:func:`exported_label_map`)."""
    with exported_label_map(segmentation, classes, reference_volume) as label_map:
        return write_volume(label_map, path)


def label_fingerprint(
    segmentation: vtkMRMLSegmentationNode,
    classes: Sequence[SegmentClass],
    reference_volume: vtkMRMLScalarVolumeNode,
) -> str:
    """The :func:`fingerprint` of the label map :func:`write_label_map` would write."""
    with exported_label_map(segmentation, classes, reference_volume) as label_map:
        return fingerprint(label_map)


def content_fingerprint(segmentation: vtkMRMLSegmentationNode, reference_volume: vtkMRMLScalarVolumeNode) -> str:
    """A SHA-256 of a segmentation's segment names, in order, and of their voxels on the volume's grid: what an edit
    in Segment Editor changes (its colours and display do not count)."""
    names = segment_names(segmentation)
    digest = hashlib.sha256("\n".join(names).encode())
    if names:
        classes = [SegmentClass(value, name, (0.0, 0.0, 0.0)) for value, name in enumerate(names, 1)]
        digest.update(label_fingerprint(segmentation, classes, reference_volume).encode())
    return digest.hexdigest()


def _check_consecutive(classes: Sequence[SegmentClass]) -> None:
    # The export numbers the segments 1, 2, … in the order given, so the classes must be numbered that way too.
    values = sorted(c.value for c in classes)
    if values != list(range(1, len(values) + 1)):
        raise ValueError(f"class values must be 1..{len(values)}, got {values}")


def remove_with_display_nodes(scene: vtkMRMLScene, node: vtkMRMLDisplayableNode) -> None:
    """Remove ``node`` and its display nodes from ``scene``."""
    for index in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(index)
        if display is not None:
            scene.RemoveNode(display)
    scene.RemoveNode(node)


# ---------------------------------------------------------------------------------------------------------------
# Files to nodes


def load_volume(scene: vtkMRMLScene, path: Path, name: str) -> vtkMRMLScalarVolumeNode:
    """Load a volume file (as :func:`write_volume` writes it) as a new scalar volume node named ``name``."""
    volume = _read_node(scene, "vtkMRMLScalarVolumeNode", vtkMRMLVolumeArchetypeStorageNode(), path, name, "volume")
    volume.CreateDefaultDisplayNodes()
    return volume


def _read_node(scene: vtkMRMLScene, node_class: str, storage: vtkMRMLStorageNode, path: Path, name: str,
               what: str) -> vtkMRMLNode:
    """A new node of ``node_class`` named ``name`` (made unique in the scene) read from ``path`` by ``storage``;
    nothing is left in the scene when the file cannot be read."""
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        raise OSError(f"{path}: could not read the {what}")
    return node


def load_segmentation(
    scene: vtkMRMLScene,
    path: Path,
    name: str,
    volume: vtkMRMLScalarVolumeNode,
    classes: Sequence[SegmentClass],
) -> vtkMRMLSegmentationNode:
    """Load a ``.seg.nrrd`` result of ``volume`` as a new segmentation node named ``name``.

    Segments are matched to ``classes`` by label value and get the class's name and colour, in class order; a class
    the file lacks becomes an empty segment, so every result has the same segments. The node references ``volume``
    (as Segment Editor and DICOM export expect), sits under the volume's transform, and is marked as a prediction
    (:data:`PREDICTION_ATTRIBUTE`).
    """
    segmentation = _read_node(scene, "vtkMRMLSegmentationNode", vtkMRMLSegmentationStorageNode(), path, name,
                              "segmentation")
    _name_segments_by_class(segmentation.GetSegmentation(), classes)
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    segmentation.SetAttribute(PREDICTION_ATTRIBUTE, content_fingerprint(segmentation, volume))
    segmentation.CreateDefaultDisplayNodes()
    return segmentation


def _name_segments_by_class(content: vtkSegmentation, classes: Sequence[SegmentClass]) -> None:
    by_value = {c.value: c for c in classes}
    ids_by_value: Dict[int, str] = {}
    for segment_id in [content.GetNthSegmentID(i) for i in range(content.GetNumberOfSegments())]:
        value = content.GetSegment(segment_id).GetLabelValue()
        if value in by_value and value not in ids_by_value:
            ids_by_value[value] = segment_id
        else:
            content.RemoveSegment(segment_id)  # background or a value that is no class: not a segment to show
    for index, segment_class in enumerate(sorted(classes, key=lambda c: c.value)):
        segment_id = ids_by_value.get(segment_class.value)
        if segment_id is None:
            segment_id = content.AddEmptySegment("", segment_class.name, list(segment_class.color))
        segment = content.GetSegment(segment_id)
        segment.SetName(segment_class.name)
        segment.SetColor(*segment_class.color)
        content.SetSegmentIndex(segment_id, index)


def load_confidence_table(
    scene: vtkMRMLScene, path: Path, name: str, volume_names: Dict[str, str]
) -> vtkMRMLTableNode:
    """A table node of the prediction confidences in ``path`` (columns case, confidence), least confident first.

    ``volume_names`` maps case names to the names of their volumes, shown in a first column.
    """
    volume_column, case_column, confidence_column = vtk.vtkStringArray(), vtk.vtkStringArray(), vtk.vtkDoubleArray()
    volume_column.SetName("Volume")
    case_column.SetName("Case")
    confidence_column.SetName("Confidence")
    for case, confidence in read_table(path):
        volume_column.InsertNextValue(volume_names.get(case, case))
        case_column.InsertNextValue(case)
        confidence_column.InsertNextValue(confidence)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    for column in (volume_column, case_column, confidence_column):
        table.AddColumn(column)
    return table
