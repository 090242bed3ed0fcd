"""The Slicer module's Logic under the slicer-core wheels: real MRML scenes, volume and segmentation nodes.

Covers what the Logic does without the application: exporting volumes and labels to a job folder (voxels and
IJK-to-RAS geometry, non-identity directions included), writing the run configuration, importing a result folder as
segmentation and table nodes, and the documented scripting flow end to end with a stand-in engine process.
"""

import csv
import ctypes
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the slicer-core wheels are not installed", allow_module_level=True)

from vtk.util import numpy_support  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SFRSegment"))

from SFRSegmentLib.data.cohort import discover_cohort, validate_cohort  # noqa: E402
from SFRSegmentLib.base.errors import InputError  # noqa: E402
from SFRSegmentLib.storage.volumes import Segment, read_volume, write_volume  # noqa: E402
from SFRSegmentLib.storage.runfolder import RunFolder  # noqa: E402
from SFRSegmentLogicLib import jobs, nodes  # noqa: E402
from SFRSegmentLogicLib.jobs import CaseInput, RunSettings  # noqa: E402
from SFRSegmentLogicLib.process import ChildProcessRunner, engine_environment  # noqa: E402
from SFRSegmentLogicLib.runs import JobRunner  # noqa: E402
from test_slicer_launcher import run_with_packages_blocked  # noqa: E402

RED, GREEN, BLUE = (0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.2, 0.3, 0.9)


@pytest.fixture(scope="module", autouse=True)
def segmentation_converters():
    """Register the segmentation conversion rules, as Slicer's Segmentations module does at startup."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def _rotation(axis, angle):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


OBLIQUE = _rotation((1, 2, 3), 0.7) @ np.diag([1, -1, 1])  # rotated and mirrored: far from the identity


def _image_data(array_ijk, vtk_type):
    image = vtk.vtkImageData()
    image.SetDimensions(*array_ijk.shape)
    image.AllocateScalars(vtk_type, 1)
    # VTK stores i fastest, which is the C order of the [k, j, i] transpose.
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.transpose(array_ijk, (2, 1, 0)).ravel()
    return image


def _ijk_to_ras(node):
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _set_ijk_to_ras(node, ijk_to_ras):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijk_to_ras[r, c])
    node.SetIJKToRASMatrix(matrix)


def _geometry(spacing, origin, directions=np.eye(3)):
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.asarray(directions) * np.asarray(spacing, float)[None, :]
    ijk_to_ras[:3, 3] = origin
    return ijk_to_ras


def add_volume(scene, name, array_ijk, ijk_to_ras, node_class="vtkMRMLScalarVolumeNode"):
    vtk_type = numpy_support.get_vtk_array_type(array_ijk.dtype)
    volume = scene.AddNewNodeByClass(node_class, name)
    volume.SetAndObserveImageData(_image_data(array_ijk, vtk_type))
    _set_ijk_to_ras(volume, ijk_to_ras)
    return volume


def add_segmentation(scene, name, masks, ijk_to_ras, colors=None, volume=None):
    """A segmentation whose segments are the given {name: boolean IJK mask} on the grid ``ijk_to_ras``."""
    shape = next(iter(masks.values())).shape
    label = np.zeros(shape, np.uint8)
    for value, mask in enumerate(masks.values(), 1):
        label[mask] = value
    label_map = add_volume(scene, name + " label map", label, ijk_to_ras, "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(label_map, segmentation, "")
    scene.RemoveNode(label_map)
    content = segmentation.GetSegmentation()
    for index, segment_name in enumerate(masks):
        segment = content.GetNthSegment(index)
        segment.SetName(segment_name)
        if colors:
            segment.SetColor(*colors[segment_name])
    if volume is not None:
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return segmentation


def exported_masks(scene, segmentation, volume):
    """{segment name: IJK mask on ``volume``'s grid} of every segment, through Slicer's own export."""
    content = segmentation.GetSegmentation()
    masks = {}
    for index in range(content.GetNumberOfSegments()):
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(content.GetNthSegmentID(index))
        label_map = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation, ids, label_map, volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        image = label_map.GetImageData()
        dims = image.GetDimensions()
        array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).transpose(2, 1, 0)
        np.testing.assert_allclose(_ijk_to_ras(label_map), _ijk_to_ras(volume), atol=1e-9)
        masks[content.GetNthSegment(index).GetName()] = array > 0
        scene.RemoveNode(label_map)
    return masks


def blobs(shape, seed):
    """Two disjoint, non-empty boolean masks ('liver', 'tumour') and a third ('vessel') on an IJK grid."""
    rng = np.random.default_rng(seed)
    i, j, k = np.indices(shape)
    centre = np.asarray(shape) / 2 + rng.uniform(-1, 1, 3)
    liver = ((i - centre[0]) / 5) ** 2 + ((j - centre[1]) / 4) ** 2 + ((k - centre[2]) / 3) ** 2 < 1
    tumour = (i < 3) & (j < 4) & (k >= shape[2] - 3)
    vessel = (i == shape[0] - 2) & ~liver
    return {"liver": liver, "tumour": tumour & ~liver, "vessel": vessel & ~tumour}


# ---------------------------------------------------------------------------------------------------------------
# Export


def test_write_volume_keeps_voxels_and_an_oblique_mirrored_geometry(scene, tmp_path):
    array = np.random.default_rng(0).integers(-1000, 3000, size=(7, 9, 5)).astype(np.int16)
    ijk_to_ras = _geometry((0.7, 1.3, 2.5), (12.5, -40.0, 7.25), OBLIQUE)
    volume = add_volume(scene, "CT", array, ijk_to_ras)

    written = read_volume(nodes.write_volume(volume, tmp_path / "image.nrrd"))

    np.testing.assert_array_equal(written.array, array)
    assert written.array.dtype == np.int16
    np.testing.assert_allclose(written.ijk_to_ras, _ijk_to_ras(volume), atol=1e-6)
    np.testing.assert_allclose(written.ijk_to_ras, ijk_to_ras, atol=1e-6)


def test_labels_are_exported_on_the_volumes_grid_in_class_order(scene, tmp_path):
    shape = (14, 12, 8)
    ijk_to_ras = _geometry((0.8, 0.9, 2.0), (-30.0, 15.0, 60.0), OBLIQUE)
    volume = add_volume(scene, "MR", np.zeros(shape, np.float32), ijk_to_ras)
    masks = blobs(shape, seed=1)
    # The segmentation's own grid is a sub-block of the volume's, shifted by (2, 3, 1) voxels: the export must put
    # every voxel back where it belongs on the volume's grid.
    offset = np.array([2, 3, 1])
    sub = tuple(slice(o, s) for o, s in zip(offset, shape))
    sub_geometry = ijk_to_ras.copy()
    sub_geometry[:3, 3] = (ijk_to_ras @ np.append(offset, 1))[:3]
    segmentation = add_segmentation(scene, "labels", {n: m[sub] for n, m in masks.items()}, sub_geometry)
    expected = {n: np.zeros(shape, bool) for n in masks}
    for n, m in masks.items():
        expected[n][sub] = m[sub]
    classes = [nodes.SegmentClass(1, "tumour", RED), nodes.SegmentClass(2, "liver", GREEN)]

    label = read_volume(nodes.write_label_map(segmentation, classes, volume, tmp_path / "label.nrrd"))

    assert label.shape == shape
    np.testing.assert_allclose(label.ijk_to_ras, _ijk_to_ras(volume), atol=1e-6)
    assert expected["tumour"].any() and expected["liver"].any()
    np.testing.assert_array_equal(label.array == 1, expected["tumour"])
    np.testing.assert_array_equal(label.array == 2, expected["liver"])
    assert set(np.unique(label.array)) == {0, 1, 2}  # 'vessel' is not learned: background
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0  # the temporary node is gone


def test_a_missing_segment_is_an_error_not_background(scene, tmp_path):
    ijk_to_ras = _geometry((1, 1, 1), (0, 0, 0))
    volume = add_volume(scene, "CT", np.zeros((6, 6, 6), np.int16), ijk_to_ras)
    liver = blobs((6, 6, 6), 0)["vessel"]
    segmentation = add_segmentation(scene, "labels", {"liver": liver}, ijk_to_ras, volume=volume)
    with pytest.raises(ValueError, match="no segment named 'spleen'"):
        nodes.write_label_map(segmentation, [nodes.SegmentClass(1, "spleen", RED)], volume, tmp_path / "l.nrrd")
    with pytest.raises(InputError, match="has no segment named 'spleen'"):
        jobs.prepare_training_job(tmp_path / "jobs", [CaseInput(volume, segmentation)], ["spleen"], RunSettings())
    assert not (tmp_path / "jobs").exists()  # checked before anything is written


# ---------------------------------------------------------------------------------------------------------------
# Scene queries


def test_default_inputs_are_every_scalar_volume_labeled_by_the_segmentation_referencing_it(scene):
    ijk_to_ras = _geometry((1, 1, 1), (0, 0, 0))
    first = add_volume(scene, "first", np.zeros((4, 4, 4), np.int16), ijk_to_ras)
    second = add_volume(scene, "second", np.zeros((4, 4, 4), np.int16), ijk_to_ras)
    add_volume(scene, "a label map", np.zeros((4, 4, 4), np.uint8), ijk_to_ras, "vtkMRMLLabelMapVolumeNode")
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "no image data")
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3, 1:3, 1:3] = True
    labels = add_segmentation(scene, "labels of second", {"liver": mask}, ijk_to_ras, volume=second)
    prediction = add_segmentation(scene, "prediction", {"liver": mask}, ijk_to_ras, volume=first)
    prediction.SetAttribute(nodes.PREDICTION_ATTRIBUTE, "1")

    assert nodes.scalar_volumes(scene) == [first, second]
    assert nodes.label_segmentation(scene, second) is labels
    assert nodes.label_segmentation(scene, first) is None  # an unreviewed prediction is not a label

    nodes.set_label_segmentation(scene, first, prediction)  # the user picks it: now it is a label
    assert nodes.label_segmentation(scene, first) is prediction
    assert not prediction.GetAttribute(nodes.PREDICTION_ATTRIBUTE)

    nodes.set_label_segmentation(scene, second, None)
    assert nodes.label_segmentation(scene, second) is None

    loaded_from_disk = add_segmentation(scene, "loaded", {"liver": mask}, ijk_to_ras)
    nodes.set_label_segmentation(scene, second, loaded_from_disk)
    assert nodes.label_segmentation(scene, second) is loaded_from_disk
    assert loaded_from_disk.GetNodeReferenceID(nodes.REFERENCE_ROLE) == second.GetID()


def test_case_names_are_file_safe_and_unique():
    assert jobs.case_names(["CT chest (2)", "CT chest (2)", "ct_chest_2", "Ölçü", "", "a/b\\c"]) == \
        ["CT_chest_2", "CT_chest_2_2", "ct_chest_2_3", "l", "volume", "a_b_c"]


# ---------------------------------------------------------------------------------------------------------------
# The run configuration


def test_run_settings_read_a_parameter_node_with_its_sentinels_as_the_presets_values():
    import enum

    Choice = enum.Enum("Choice", [("UAMT", "uamt"), ("NONE", "none"), ("CPU", "cpu"), ("SMALL", "small")])
    node = dict(model="litemedsam", sslMethod=Choice.UAMT, pseudoLabels=Choice.NONE, preset=Choice.SMALL,
                device=Choice.CPU, fineTuneIterations=0, retrainIterations=40, sfrPlus=True, patchSizeI=32,
                patchSizeJ=32, patchSizeK=0, batchSize=0, seed=-1)
    settings = RunSettings.from_parameters(node.__getitem__)
    assert settings == RunSettings(model="litemedsam", method="uamt", preset="small", device="cpu",
                                   retrain_iterations=40, sfr_plus=True)
    node.update(fineTuneIterations=5, patchSizeK=16, batchSize=3, seed=0)
    settings = RunSettings.from_parameters(node.__getitem__)
    assert (settings.fine_tune_iterations, settings.patch_size, settings.batch_size, settings.seed) == (
        5, (32, 32, 16), 3, 0)
    config = jobs.run_config(settings)
    assert config["retrain"] == {"ssl_method": "uamt", "pseudo_labels": "none", "iterations": 40,
                                 "batch_labeled": 3, "batch_unlabeled": 3, "seed": 0}
    assert config["finetune"] == {"iterations": 5, "batch_size": 3, "seed": 0}


def test_run_configuration_holds_only_what_differs_from_the_preset():
    assert jobs.run_config(RunSettings()) == {
        "preset": "paper", "device": "auto", "finetune": {"base_checkpoint": "sam_vit_b", "sam": {"arch": "vit_b"}},
        "retrain": {"ssl_method": "mt", "pseudo_labels": "sam"}, "sfr_plus": False,
    }
    settings = RunSettings(model="/weights/my_sam.pth", method="sfr_acmt", device="cuda", fine_tune_iterations=50,
                           retrain_iterations=200, sfr_plus=True, patch_size=(96, 96, 64), batch_size=1, seed=7)
    assert jobs.run_config(settings) == {
        "preset": "paper", "device": "cuda", "patch_size": [96, 96, 64],
        "finetune": {"base_checkpoint": "/weights/my_sam.pth", "iterations": 50, "batch_size": 1, "seed": 7},
        "retrain": {"ssl_method": "acmt", "pseudo_labels": "sam", "iterations": 200, "batch_labeled": 1, "batch_unlabeled": 1, "seed": 7},
        "sfr_plus": True,
    }
    small = RunSettings(preset="small", device="cpu")
    assert not small.uses_checkpoint  # the small preset's SAM is randomly initialised: no weights to fetch
    assert "base_checkpoint" not in jobs.run_config(small)["finetune"]
    with pytest.raises(InputError, match="unknown method 'magic'"):
        RunSettings(method="magic")
    with pytest.raises(InputError, match="unknown ssl_method 'magic'") as error:
        jobs.run_config(RunSettings(ssl_method="magic"))
    assert error.value.field == "retrain.ssl_method"
    # A script may name the method as the paper does, or give its two parts.
    assert RunSettings(method="sfr_uamt") == RunSettings(ssl_method="uamt", pseudo_labels="sam")
    assert (RunSettings(method="supervised").ssl_method, RunSettings(method="supervised").pseudo_labels) == (
        "supervised", "none")
    # The engine's configuration checks the settings: a GPU by number is a device, a V-Net patch must suit the V-Net.
    assert jobs.run_config(RunSettings(device="cuda:1"))["device"] == "cuda:1"
    with pytest.raises(InputError, match="device must be one of auto, cuda, cpu or cuda:N"):
        jobs.run_config(RunSettings(device="gpu"))
    with pytest.raises(InputError, match=r"patch_size 96×96×40 is the V-Net's patch too \(retrain.patch_size"):
        jobs.run_config(RunSettings(patch_size=(96, 96, 40)))


def test_the_cpu_preset_gets_the_chosen_sam_but_runs_without_it_and_keeps_sams_own_patches():
    from SFRSegmentLib.base.config import CPU_SAM_PATCH, preset
    from SFRSegmentLib.base.config_io import with_overrides

    cpu = RunSettings(model="medsam_vit_b", preset="cpu")
    assert cpu.uses_checkpoint and not cpu.checkpoint_required
    assert RunSettings(preset="paper").checkpoint_required
    assert jobs.run_config(cpu) == {
        "preset": "cpu", "device": "auto", "finetune": {"base_checkpoint": "medsam_vit_b", "sam": {"arch": "vit_b"}},
        "retrain": {"ssl_method": "mt", "pseudo_labels": "sam"}, "sfr_plus": False,
    }
    patched = jobs.run_config(RunSettings(preset="cpu", patch_size=(96, 96, 64)))
    assert patched["patch_size"] == [96, 96, 64] and "patch_size" not in patched["finetune"]
    resolved = with_overrides(preset("cpu"), patched).resolved()
    assert resolved.retrain.patch_size == (96, 96, 64) and resolved.finetune.patch_size == CPU_SAM_PATCH
    # A method without SAM's pseudo-labels needs no SAM weights, unless SFR+ (which fine-tunes SAM) is on.
    assert not RunSettings(preset="cpu", method="mt").uses_checkpoint
    assert not RunSettings(preset="paper", method="supervised").uses_checkpoint
    assert RunSettings(preset="paper", method="mt", sfr_plus=True).uses_checkpoint
    assert "base_checkpoint" not in jobs.run_config(RunSettings(preset="cpu", method="mt"))["finetune"]


@pytest.mark.parametrize("model, preset_name, arch", [
    ("litemedsam", "paper", "tiny_vit"), ("sam_vit_b", "cpu", "vit_b"), ("medsam_vit_b", "cpu", "vit_b"),
    ("litemedsam", "cpu", "tiny_vit"), ("sam_vit_h", "paper", "vit_h")])
def test_a_catalog_model_brings_its_architecture_so_that_any_preset_runs_it(model, preset_name, arch):
    from SFRSegmentLib.base.config import preset
    from SFRSegmentLib.base.config_io import with_overrides

    config = jobs.run_config(RunSettings(model=model, preset=preset_name))
    assert config["finetune"] == {"base_checkpoint": model, "sam": {"arch": arch}}
    resolved = with_overrides(preset(preset_name), config).resolved(1)
    assert (resolved.finetune.base_checkpoint, resolved.finetune.sam.arch) == (model, arch)
    if preset(preset_name).finetune.sam.arch != arch:  # the engine refuses the model without its architecture
        with pytest.raises(InputError, match=f"set sam.arch to '{arch}'") as refused:
            with_overrides(preset(preset_name), {**config, "finetune": {"base_checkpoint": model}})
        assert refused.value.field == "finetune.sam.arch"


def test_a_checkpoint_file_keeps_the_presets_architecture(tmp_path):
    from SFRSegmentLib.base.config import preset
    from SFRSegmentLib.base.config_io import with_overrides

    for preset_name in ("paper", "cpu"):
        custom = str(tmp_path / "my_sam.pth")
        config = jobs.run_config(RunSettings(model=custom, preset=preset_name))
        assert config["finetune"] == {"base_checkpoint": custom}
        resolved = with_overrides(preset(preset_name), config).resolved(1)
        assert resolved.finetune.sam.arch == preset(preset_name).finetune.sam.arch


def test_the_presets_are_the_engines_one_list():
    from SFRSegmentLib.base import choices

    assert jobs.PRESETS is choices.PRESETS
    assert jobs.PRESETS == ("paper", "cpu", "small")
    with pytest.raises(InputError, match="unknown preset 'fast'"):
        jobs.run_config(RunSettings(preset="fast"))


def test_the_job_module_imports_without_the_packages_installed_at_the_first_run():
    # Inside Slicer the module reads its choices before torch and the requirements are installed (Slicer itself
    # ships numpy and SimpleITK).
    completed = run_with_packages_blocked(
        ("torch", "monai", "tqdm", "segment_anything", "scipy", "nrrd", "slicerio", "PIL"),
        "import SFRSegmentLogicLib.jobs as jobs; print(' '.join(jobs.PRESETS))")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["paper", "cpu", "small"]


def test_the_engine_accepts_the_run_configuration():
    config_module = pytest.importorskip("SFRSegmentLib.base.config")
    from SFRSegmentLib.base.config import parse_method
    from SFRSegmentLib.base.config_io import with_overrides

    for preset in jobs.PRESETS:
        settings = RunSettings(method="sfr_uamt", preset=preset, device="cpu", fine_tune_iterations=5,
                               retrain_iterations=6, sfr_plus=True, patch_size=(32, 32, 16), batch_size=1, seed=3)
        start = config_module.preset(preset)
        resolved = with_overrides(start, jobs.run_config(settings)).resolved()
        assert (resolved.preset, resolved.device, resolved.sfr_plus) == (preset, "cpu", True)
        assert (resolved.finetune.iterations, resolved.retrain.iterations, resolved.retrain.method) == \
            (5, 6, "sfr_uamt")
        assert resolved.retrain.patch_size == (32, 32, 16) and resolved.inference.patch_size is None
        # SAM's patch follows unless the preset gives SAM its own.
        assert resolved.finetune.patch_size == (start.finetune.patch_size or (32, 32, 16))
        assert (resolved.finetune.batch_size, resolved.retrain.batch_labeled, resolved.retrain.batch_unlabeled) == \
            (1, 1, 1)
        assert resolved.finetune.seed == resolved.retrain.seed == 3
        # The module passes its model to the presets that start from a pretrained SAM, and asks for the download
        # only where the engine would otherwise fetch it; the cpu preset runs without SAM instead.
        assert settings.uses_checkpoint == (start.finetune.base_checkpoint is not None)
        assert resolved.finetune.base_checkpoint == ("sam_vit_b" if settings.uses_checkpoint else None)
        if settings.uses_checkpoint:
            assert settings.checkpoint_required == (resolved.sam_missing == "download")
    for method in config_module.METHODS:
        assert RunSettings(method=method).uses_checkpoint == (parse_method(method)["pseudo_labels"] == "sam")
    defaults = with_overrides(config_module.preset("paper"), jobs.run_config(RunSettings()))
    assert defaults == config_module.preset("paper")  # nothing the user left alone changes the preset


# ---------------------------------------------------------------------------------------------------------------
# The preset and model a new parameter node starts on, and the order of the model list


def module_parameter_node(scene):
    """The module's parameter node in ``scene``, created as ScriptedLoadableModuleLogic.getParameterNode does."""
    node = scene.GetSingletonNode("SFRSegment", "vtkMRMLScriptedModuleNode")
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag("SFRSegment")
        node.SetAttribute("ModuleName", "SFRSegment")
        node = scene.AddNode(node)
    return node


class Detector:
    """A GPU detector that answers ``gpu`` and counts how often it was asked."""

    def __init__(self, gpu):
        self.gpu, self.calls = gpu, 0

    def __call__(self):
        self.calls += 1
        return self.gpu


@pytest.mark.parametrize("gpu, preset", [(False, "cpu"), (True, "paper")])
def test_a_new_parameter_node_starts_on_the_preset_for_this_computer(scene, gpu, preset):
    detector = Detector(gpu)
    assert jobs.new_node_preset(module_parameter_node(scene), detector) == preset
    assert detector.calls == 1
    assert preset in jobs.PRESETS


def saved_and_reloaded(scene):
    """A new scene loaded from ``scene`` saved as XML, as when a user saves and reopens it."""
    scene.SetSaveToXMLString(1)
    scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetLoadFromXMLString(1)
    loaded.SetSceneXMLString(scene.GetSceneXMLString())
    loaded.Import()
    return loaded


def test_a_preset_already_in_the_parameter_node_is_kept(scene):
    node = module_parameter_node(scene)
    node.SetParameter(jobs.PRESET_PARAMETER, "small")  # the user's choice, written by the parameter node wrapper
    detector = Detector(True)
    assert jobs.new_node_preset(node, detector) is None
    assert detector.calls == 0  # nor is the driver asked again each time the module is entered

    # A saved scene brings its choice back.
    restored = module_parameter_node(saved_and_reloaded(scene))
    assert restored.GetParameter(jobs.PRESET_PARAMETER) == "small"
    assert jobs.new_node_preset(restored, detector) is None

    # Closing the scene resets the module's node: the next one starts on this computer's preset again.
    scene.Clear(0)
    assert jobs.new_node_preset(module_parameter_node(scene), Detector(False)) == "cpu"


@pytest.mark.parametrize("gpu, preset, model", [(False, "cpu", "litemedsam"), (True, "paper", "sam_vit_b")])
def test_a_new_parameter_nodes_model_is_the_sam_its_preset_fine_tunes(scene, gpu, preset, model):
    from SFRSegmentLib.base.config import preset as engine_preset

    node = module_parameter_node(scene)
    assert jobs.new_node_preset(node, Detector(gpu)) == preset
    assert jobs.new_node_model(node, preset) == model == engine_preset(preset).finetune.base_checkpoint
    assert RunSettings(model=model, preset=preset).uses_checkpoint
    assert jobs.new_node_model(node, "small") == jobs.DEFAULT_MODEL_ID  # a random SAM: the model waits for a preset


def test_a_model_already_in_the_parameter_node_is_kept(scene):
    node = module_parameter_node(scene)
    node.SetParameter(jobs.MODEL_PARAMETER, "medsam_vit_b")  # the user's choice, written by the wrapper
    assert jobs.new_node_model(node, "cpu") is None

    # A saved scene brings its choice back, custom checkpoint files included.
    node.SetParameter(jobs.MODEL_PARAMETER, "/weights/my_sam.pth")
    restored = module_parameter_node(saved_and_reloaded(scene))
    assert restored.GetParameter(jobs.MODEL_PARAMETER) == "/weights/my_sam.pth"
    assert jobs.new_node_model(restored, "paper") is None

    scene.Clear(0)
    assert jobs.new_node_model(module_parameter_node(scene), "cpu") == "litemedsam"


def test_without_a_cuda_gpu_the_model_list_starts_with_litemedsam_and_keeps_the_catalogs_order_otherwise():
    from SFRSegmentLib.base.config import preset
    from SFRSegmentLib.models.sam.catalog import load_catalog

    catalog = load_catalog()
    assert list(catalog)[-1] == "litemedsam" == preset("cpu").finetune.base_checkpoint  # so that the order changes
    assert [entry.id for entry in jobs.model_order(catalog.values(), has_cuda_gpu=True)] == list(catalog)
    assert [entry.id for entry in jobs.model_order(catalog.values(), has_cuda_gpu=False)] == [
        "litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"]
    shuffled = [catalog[name] for name in ("medsam_vit_b", "sam_vit_h", "litemedsam", "sam_vit_b")]
    assert [entry.id for entry in jobs.model_order(iter(shuffled), has_cuda_gpu=False)] == [
        "litemedsam", "medsam_vit_b", "sam_vit_h", "sam_vit_b"]
    assert jobs.model_order(iter(shuffled), has_cuda_gpu=True) == shuffled


STAND_IN_DRIVER = """
int cuInit(unsigned int flags) { return INIT_RESULT; }
int cuDeviceGetCount(int *count) { *count = DEVICES; return 0; }
"""


@pytest.mark.parametrize("init_result, devices, expected", [(0, 2, True), (0, 0, False), (100, 1, False)])
def test_the_gpu_is_asked_of_the_cuda_driver(tmp_path, init_result, devices, expected):
    """A stand-in libcuda (cuInit's 100 is CUDA_ERROR_NO_DEVICE); a library that is missing or is no driver is
    skipped."""
    from SFRSegmentLogicLib import hardware

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a stand-in CUDA driver")
    source = tmp_path / "driver.c"
    source.write_text(STAND_IN_DRIVER, encoding="utf-8")
    driver = tmp_path / "libcuda_stand_in.so"
    subprocess.run([compiler, "-shared", "-fPIC", f"-DINIT_RESULT={init_result}", f"-DDEVICES={devices}",
                    str(source), "-o", str(driver)], check=True)
    not_a_driver = ctypes.util.find_library("m") or ctypes.util.find_library("c")
    assert hardware.has_cuda_gpu([str(tmp_path / "missing.so"), not_a_driver, str(driver)]) is expected
    assert hardware.has_cuda_gpu([]) is False


def test_the_gpu_question_needs_no_torch():
    # Asked in the widget's setup: it must neither import torch (seconds) nor need it installed.
    code = ("import sys; sys.modules['torch'] = None; "
            "from SFRSegmentLogicLib import hardware; print(hardware.has_cuda_gpu())")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT / "SFRSegment")})
    assert completed.returncode == 0, completed.stderr
    answer = completed.stdout.strip()
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.version.cuda is not None:  # a CUDA build of torch answers the same question
        assert answer == str(torch.cuda.is_available())
    else:
        from SFRSegmentLogicLib import hardware

        def loads(name):
            try:
                ctypes.CDLL(name)
                return True
            except OSError:
                return False

        assert answer in ("True", "False")
        if not any(loads(name) for name in hardware.CUDA_DRIVER_LIBRARIES):
            assert answer == "False"


# ---------------------------------------------------------------------------------------------------------------
# Job folders


def _scene_with_three_cases(scene):
    """Three volumes with oblique geometries; the first labeled with liver, tumour and vessel."""
    volumes, masks = [], []
    for index, shape in enumerate([(14, 12, 8), (12, 13, 9), (15, 11, 8)]):
        ijk_to_ras = _geometry((0.8 + 0.1 * index, 0.9, 2.0), (10.0 * index, -5.0, 3.0), OBLIQUE)
        masks.append(blobs(shape, seed=index))
        image = np.full(shape, 100, np.int16)
        image[masks[-1]["liver"]] = 200
        image[masks[-1]["tumour"]] = 300
        volumes.append(add_volume(scene, f"Patient {index} CT", image, ijk_to_ras))
    labels = add_segmentation(scene, "labels", masks[0], _ijk_to_ras(volumes[0]),
                              colors={"liver": RED, "tumour": GREEN, "vessel": BLUE}, volume=volumes[0])
    return volumes, masks, labels


def test_training_job_folder_is_a_cohort_the_engine_accepts(scene, tmp_path):
    volumes, masks, labels = _scene_with_three_cases(scene)
    inputs = [CaseInput(v, nodes.label_segmentation(scene, v)) for v in nodes.scalar_volumes(scene)]
    settings = RunSettings(preset="small", device="cpu", retrain_iterations=3)

    job = jobs.prepare_training_job(tmp_path / "jobs", inputs, ["liver", "tumour"], settings)

    assert job.classes == [nodes.SegmentClass(1, "liver", RED), nodes.SegmentClass(2, "tumour", GREEN)]
    assert job.volume_ids == {"Patient_0_CT": volumes[0].GetID(), "Patient_1_CT": volumes[1].GetID(),
                              "Patient_2_CT": volumes[2].GetID()}
    cohort = discover_cohort(job.cohort)
    validate_cohort(cohort)  # every image and label read and checked by the engine itself
    assert cohort.classes == {1: "liver", 2: "tumour"}
    assert [(c.name, c.labeled) for c in cohort.cases] == [("Patient_0_CT", True), ("Patient_1_CT", False),
                                                           ("Patient_2_CT", False)]
    label = read_volume(cohort.cases[0].label)
    np.testing.assert_array_equal(label.array == 1, masks[0]["liver"])
    np.testing.assert_array_equal(label.array == 2, masks[0]["tumour"])
    for case, volume in zip(cohort.cases, volumes):
        np.testing.assert_allclose(read_volume(case.image).ijk_to_ras, _ijk_to_ras(volume), atol=1e-6)
    assert json.loads(job.config.read_text()) == jobs.run_config(settings)
    described = json.loads((job.folder / jobs.JOB_FILE).read_text())
    assert {case: record["volume"] for case, record in described["cases"].items()} == {
        "Patient_0_CT": "Patient 0 CT", "Patient_1_CT": "Patient 1 CT", "Patient_2_CT": "Patient 2 CT"}
    # The inputs' identities: what was exported, whatever the nodes are called later.
    assert [record["image"] for record in described["cases"].values()] == [nodes.fingerprint(v) for v in volumes]
    assert [record["label"] is not None for record in described["cases"].values()] == [True, False, False]
    loaded = jobs.TrainingJob.load(job.folder)
    assert (loaded.classes, loaded.cases, loaded.overrides) == (job.classes, job.cases, job.overrides)
    assert job.command("python") == [
        "python", "-m", "SFRSegmentLib", "run", "--cohort", str(job.cohort), "--out", str(job.folder / "run"),
        "--preset", "small", "--config", str(job.config), "--progress", "jsonl"]


@pytest.mark.parametrize("inputs, names, message", [
    ([], ["liver"], "No input volumes"),
    (None, ["liver"], "No labeled volume"),
    ("labeled", [], "No segments to learn"),
    ("labeled", ["liver", "liver"], "must be unique"),
])
def test_bad_inputs_are_reported_before_anything_is_written(scene, tmp_path, inputs, names, message):
    volumes, _, labels = _scene_with_three_cases(scene)
    if inputs is None:
        inputs = [CaseInput(v) for v in volumes]
    elif inputs == "labeled":
        inputs = [CaseInput(volumes[0], labels)]
    with pytest.raises(InputError, match=message):
        jobs.prepare_training_job(tmp_path / "jobs", inputs, names, RunSettings())
    assert not (tmp_path / "jobs").exists()


# ---------------------------------------------------------------------------------------------------------------
# Import


def _write_prediction(path, image_path, label_array):
    """A result as the engine writes it: on the image's grid, default segment names and colours."""
    image = read_volume(image_path)
    values = [int(v) for v in np.unique(label_array) if v]
    write_volume(image.with_array(label_array.astype(np.uint8),
                                  [Segment(v, f"Segment_{v}", (0.5, 0.5, 0.5)) for v in values]),
                 path)


def test_results_become_segmentations_named_after_their_volumes(scene, tmp_path):
    volumes, masks, labels = _scene_with_three_cases(scene)
    inputs = [CaseInput(v, nodes.label_segmentation(scene, v)) for v in volumes]
    job = jobs.prepare_training_job(tmp_path / "jobs", inputs, ["liver", "tumour", "vessel"], RunSettings())
    cases = list(job.volume_ids)
    predicted = {}
    for case, case_masks in zip(cases[1:], masks[1:]):
        label = np.zeros(case_masks["liver"].shape, np.uint8)
        label[case_masks["liver"]] = 1
        label[case_masks["tumour"]] = 2
        label[0, 0, 0] = 9  # a value that is no class: dropped
        predicted[case] = label
        _write_prediction(job.run.prediction(case), job.cohort / case / "image.nrrd", label)
    with open(job.run.prediction_confidence, "w", newline="") as stream:
        csv.writer(stream).writerows([["case", "confidence"], [cases[1], "0.97"], [cases[2], "0.91"]])

    results = jobs.import_training_results(scene, job)

    assert set(results.segmentations) == set(cases[1:])  # the labeled case has no prediction
    for case, volume in zip(cases[1:], volumes[1:]):
        segmentation = results.segmentations[case]
        assert segmentation.GetName() == volume.GetName() + " segmentation"
        assert nodes.segment_names(segmentation) == ["liver", "tumour", "vessel"]
        content = segmentation.GetSegmentation()
        assert [tuple(np.round(content.GetNthSegment(i).GetColor(), 6)) for i in range(3)] == [RED, GREEN, BLUE]
        imported = exported_masks(scene, segmentation, volume)
        np.testing.assert_array_equal(imported["liver"], predicted[case] == 1)
        np.testing.assert_array_equal(imported["tumour"], predicted[case] == 2)
        assert not imported["vessel"].any()  # a class the result lacks is an empty segment
        assert segmentation.GetNodeReferenceID(nodes.REFERENCE_ROLE) == volume.GetID()
        assert segmentation.GetAttribute(nodes.PREDICTION_ATTRIBUTE) == nodes.content_fingerprint(segmentation, volume)
        assert nodes.unedited_prediction(scene, volume) is segmentation
        assert segmentation.GetDisplayNode() is not None
        assert nodes.label_segmentation(scene, volume) is None  # predictions are not labels by default
    assert nodes.label_segmentation(scene, volumes[0]) is labels

    table = results.confidence_table.GetTable()
    rows = [[table.GetValue(r, c).ToString() for c in range(3)] for r in range(table.GetNumberOfRows())]
    assert [table.GetColumnName(c) for c in range(3)] == ["Volume", "Case", "Confidence"]
    assert rows == [["Patient 2 CT", cases[2], "0.91"], ["Patient 1 CT", cases[1], "0.97"]]  # least confident first


def test_applying_a_trained_model_to_one_more_volume(scene, tmp_path):
    volumes, masks, labels = _scene_with_three_cases(scene)
    job = jobs.prepare_training_job(tmp_path / "jobs", [CaseInput(volumes[0], labels)], ["liver"], RunSettings())
    with pytest.raises(InputError, match="no trained model yet"):
        jobs.prepare_apply_job(job, volumes[2])
    job.run.vnet_weights.parent.mkdir(parents=True)
    job.run.vnet_weights.write_bytes(b"weights")

    apply = jobs.prepare_apply_job(jobs.TrainingJob.load(job.folder), volumes[2])

    assert apply.command("python") == ["python", "-m", "SFRSegmentLib", "predict", "--model", str(job.run.root),
                                       "--images", str(apply.image), "--out", str(apply.prediction.parent),
                                       "--preset", "paper", "--progress", "jsonl"]
    np.testing.assert_allclose(read_volume(apply.image).ijk_to_ras, _ijk_to_ras(volumes[2]), atol=1e-6)
    with pytest.raises(InputError, match="without writing the expected prediction"):
        jobs.import_apply_result(scene, apply)
    _write_prediction(apply.prediction, apply.image, masks[2]["liver"].astype(np.uint8))
    segmentation = jobs.import_apply_result(scene, apply)
    assert segmentation.GetName() == "Patient 2 CT segmentation"
    assert nodes.segment_names(segmentation) == ["liver"]
    np.testing.assert_array_equal(exported_masks(scene, segmentation, volumes[2])["liver"], masks[2]["liver"])


# ---------------------------------------------------------------------------------------------------------------
# The scripting example of docs/slicer.md, as far as it runs without the application


STAND_IN_ENGINE = textwrap.dedent('''
    """Plays `python -m SFRSegmentLib run`: segments each unlabeled case by its intensities (200 → 1, 300 → 2)."""
    import argparse, json, sys
    from pathlib import Path
    import numpy as np
    from SFRSegmentLib.base.choices import PRESETS
    from SFRSegmentLib.data.cohort import discover_cohort
    from SFRSegmentLib.storage.volumes import Segment, read_volume, write_volume
    from SFRSegmentLib.storage.runfolder import RunFolder

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["run"])
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", choices=PRESETS)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--progress", choices=["jsonl"])
    args = parser.parse_args()
    config = json.loads(args.config.read_text())
    cohort = discover_cohort(args.cohort)
    run = RunFolder(args.out)
    print(f"config: {json.dumps(config, sort_keys=True)}", file=sys.stderr, flush=True)
    unlabeled = cohort.unlabeled
    lines = ["case,confidence"]
    for step, case in enumerate(unlabeled, 1):
        image = read_volume(case.image)
        label = np.zeros(image.shape, np.uint8)
        label[image.array == 200] = 1
        label[image.array == 300] = 2
        write_volume(image.with_array(label, [Segment(v, n, (0.5, 0.5, 0.5)) for v, n in cohort.classes.items()]),
                     run.prediction(case.name))
        lines.append(f"{case.name},{0.5 + 0.1 * step}")
        print(json.dumps({"stage": "predict", "step": step, "total": len(unlabeled), "loss": None, "metric": None,
                          "eta_s": None, "message": case.name}), flush=True)
    run.prediction_confidence.write_text("\\n".join(lines) + "\\n")
''')


class StandInEngineRunner(ChildProcessRunner):
    """Runs the stand-in engine script instead of `-m SFRSegmentLib`, with the same arguments."""

    def __init__(self, script):
        self.script = script
        self.commands = []

    def start(self, command, environment, working_directory):
        self.commands.append(list(command))
        assert command[1:3] == ["-m", "SFRSegmentLib"]
        return super().start([command[0], str(self.script), *command[3:]], environment, working_directory)


def test_the_scripting_example_end_to_end_with_a_stand_in_engine(scene, tmp_path):
    """logic.inputs() → logic.run(..., wait=True) → run.results, as SFRSegmentLogic does it."""
    volumes, masks, labels = _scene_with_three_cases(scene)
    script = tmp_path / "stand_in_engine.py"
    script.write_text(STAND_IN_ENGINE, encoding="utf-8")
    runner = StandInEngineRunner(script)

    # logic.inputs() and logic.segmentNames(inputs)
    inputs = [CaseInput(v, nodes.label_segmentation(scene, v)) for v in nodes.scalar_volumes(scene)]
    names = [n for item in inputs if item.segmentation for n in nodes.segment_names(item.segmentation)][:2]
    assert names == ["liver", "tumour"]
    # logic.run(inputs, names, settings, wait=True)
    settings = RunSettings(preset="small", device="cpu", retrain_iterations=500)
    job = jobs.prepare_training_job(tmp_path / "jobs", inputs, names, settings)
    events, log = [], []
    run = JobRunner(scene, runner, ROOT).train(job, sys.executable, engine_environment({}, ROOT), events.append,
                                               log.append)
    results = run.wait().results

    assert [e.message for e in events] == ["Patient_1_CT", "Patient_2_CT"]
    assert any(f"config: {json.dumps(jobs.run_config(settings), sort_keys=True)}" == line for line in log)
    for case, volume, case_masks in zip(["Patient_1_CT", "Patient_2_CT"], volumes[1:], masks[1:]):
        segmentation = results.segmentations[case]
        assert nodes.segment_names(segmentation) == names
        imported = exported_masks(scene, segmentation, volume)
        np.testing.assert_array_equal(imported["liver"], case_masks["liver"])
        np.testing.assert_array_equal(imported["tumour"], case_masks["tumour"])
    assert results.confidence_table.GetTable().GetNumberOfRows() == 2
    assert isinstance(job.run, RunFolder) and job.run.root.parent == job.folder
