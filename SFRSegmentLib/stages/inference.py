"""Whole-volume prediction with a trained V-Net: the reference sliding window, optional post-processing, files.

The sliding window reproduces the reference ``test_single_case`` (UA-MT's ``test_util.py``, used unchanged by SFR):

* the volume is normalised as the model was trained (z-scored; for CT clipped and standardised, see
  :func:`~SFRSegmentLib.data.patches.normalize_intensities`) and zero-padded, equally on both sides (the odd
  voxel after), on every axis shorter than the patch;
* per axis the windows start at ``min(stride·i, size − patch)`` for i = 0 … ceil((size − patch) / stride);
* the softmax of each window is summed into the volume, divided by the number of windows covering each voxel,
  and the argmax is the label (then the padding is cut off).

It runs through MONAI's ``sliding_window_inference`` (``mode="constant"``, a softmax predictor), which scans with
an interval ``int(roi·(1 − overlap))`` per axis, clips the last start to ``size − roi`` and stops at the first
window reaching the end: the same starts, provided the interval equals the stride. A stride s < roi gets
``overlap = 1 − (s + ½)/roi``, so that ``int`` lands on s whatever the rounding of the float; s = roi gets overlap 0.
A stride larger than the patch (gaps between windows, which the reference allows) cannot be expressed and is
refused. Windows run batched (``sw_batch_size``) under ``torch.inference_mode`` through an eval-mode copy of the
model with its BatchNorms folded into the convolutions (:func:`SFRSegmentLib.models.vnet.fold_batchnorm`: the same
probabilities to float rounding, ~20 % faster on the CPU), channels-last, in float32 (``precision="bf16"`` trades
~1e-3 on the logits for speed).

The optional post-processing keeps, per class, the largest connected component (full 26-connectivity, as the
reference's ``getLargestCC`` with skimage's default); it is off by default, as in SFR's evaluation. It uses
``scipy.ndimage.label``: MONAI's ``KeepLargestConnectedComponent`` computes the same but needs scikit-image, which
is not a dependency of the engine.

The model file (:func:`SFRSegmentLib.models.vnet.load_vnet`) and the device and precision
(:mod:`SFRSegmentLib.base.device`) are decided elsewhere.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from ..base.config import InferenceConfig
from ..base.device import autocast_context, resolve_device
from ..base.distributed import map_cases
from ..base.errors import InputError, PathLike
from ..base.progress import Progress, ProgressEvent, ignore_progress
from ..data.cohort import Case, discover_cohort
from ..data.patches import normalize_intensities, synthetic_case
from ..data.resample import to_native_grid, to_working_grid
from ..data.validation import check_image
from ..models.vnet import MEMORY_FORMAT, VNetInfo, fold_batchnorm
from ..storage.runfolder import CONFIDENCE_TABLE
from ..storage.volumes import Volume, default_segments, file_suffix, read_volume, write_volume
from .confidence import recorded, volume_confidence, write_table

PREDICTION_SUFFIXES = (".seg.nrrd", ".nii.gz")
"""Every prediction is written as a Slicer segmentation and as NIfTI."""


# ---------------------------------------------------------------------------------------------------------------
# Sliding window


def window_starts(size: int, patch: int, stride: int) -> List[int]:
    """The reference window starts along one axis of ``size`` voxels (after padding to at least ``patch``)."""
    size = max(size, patch)
    count = -(-(size - patch) // stride) + 1
    return [min(stride * i, size - patch) for i in range(count)]


def window_count(shape: Sequence[int], window: Sequence[int], steps: Sequence[int]) -> int:
    """How many windows of ``window`` with steps ``steps`` cover a volume of ``shape``."""
    return math.prod(len(window_starts(size, patch, step)) for size, patch, step in zip(shape, window, steps))


def one_batch_shape(window: Sequence[int], steps: Sequence[int], batch_size: int) -> Tuple[int, int, int]:
    """A volume shape that holds exactly ``batch_size`` windows, all along the first axis (to time one pass)."""
    return (window[0] + (batch_size - 1) * steps[0], window[1], window[2])


def batches(count: int, batch_size: int) -> int:
    return -(-count // batch_size)


def monai_overlap(config: InferenceConfig) -> Tuple[float, float, float]:
    """MONAI overlaps whose scan interval ``int(roi·(1 − overlap))`` is exactly each stride."""
    return tuple(0.0 if stride == roi else 1.0 - (stride + 0.5) / roi
                 for stride, roi in zip(config.strides, config.patch_size))


def sliding_window_probabilities(model: torch.nn.Module, image: np.ndarray, config: InferenceConfig,
                                 device: Optional[torch.device] = None) -> torch.Tensor:
    """Class probabilities (C, I, J, K), float32 on the CPU, of an already normalised 3D array."""
    device = device or resolve_device(config.device)
    model = fold_batchnorm(model).to(device, memory_format=MEMORY_FORMAT)
    inputs = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        with autocast_context(device, config.precision):
            logits = model(windows.contiguous(memory_format=MEMORY_FORMAT))
        return torch.softmax(logits.float(), dim=1)

    with torch.inference_mode():
        probabilities = sliding_window_inference(
            inputs, roi_size=config.patch_size, sw_batch_size=config.sw_batch_size, predictor=predictor,
            overlap=monai_overlap(config), mode="constant", padding_mode="constant", cval=0.0,
        )
    return probabilities[0].cpu()


def keep_largest_components(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``labels`` (channel indices) with, per foreground index 1 … n_classes − 1, only its largest 26-connected
    component kept (the rest becomes background)."""
    kept = labels.copy()
    full_connectivity = ndimage.generate_binary_structure(labels.ndim, labels.ndim)
    for index in range(1, n_classes):
        components, count = ndimage.label(labels == index, structure=full_connectivity)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            kept[(components > 0) & (components != int(sizes.argmax()))] = 0
    return kept


def predict_volume(model: torch.nn.Module, image: Volume, config: InferenceConfig,
                   classes: Optional[Mapping[int, str]] = None,
                   spacing: Optional[Tuple[float, float, float]] = None,
                   intensity_window: Optional[Sequence[float]] = None) -> Tuple[Volume, np.ndarray]:
    """The label map (uint8 class values, on the image's grid, with segments) and the class probabilities
    (float32, (K+1, I, J, K), channel c for the c-th class value) of ``image``.

    ``classes`` (value → name, the model's :attr:`VNetInfo.classes`) gives the class values and segment names;
    without it channel c is class value c. With ``spacing`` (the model's :attr:`VNetInfo.spacing`) the window
    slides over the image resampled to that voxel size, and the probabilities are resampled back to the image's
    grid before the argmax. ``intensity_window`` (the model's :attr:`VNetInfo.intensity_window`) normalises the
    image as in training (:func:`~SFRSegmentLib.data.patches.normalize_intensities`).
    """
    working = image if spacing is None else to_working_grid(image, spacing)
    network_input = normalize_intensities(working.array, intensity_window)
    probabilities = to_native_grid(sliding_window_probabilities(model, network_input, config), image.shape)
    n_classes = probabilities.shape[0]
    classes = dict(classes) if classes is not None else {c: f"class_{c}" for c in range(1, n_classes)}
    if len(classes) != n_classes - 1:
        raise InputError(f"the model has {n_classes - 1} foreground outputs but {len(classes)} classes were given",
                         field="classes")
    channels = torch.argmax(probabilities, dim=0).numpy()
    if config.largest_component:
        channels = keep_largest_components(channels, n_classes)
    values = np.asarray((0,) + tuple(sorted(classes)), dtype=np.uint8)
    labels = values[channels]
    segments = default_segments(values[1:], [classes[int(v)] for v in values[1:]])
    return image.with_array(labels, segments), probabilities.numpy()


# ---------------------------------------------------------------------------------------------------------------
# Files


def image_case_name(path: Path) -> str:
    """A case name for an image file: its folder's name for ``<case>/image.<ext>``, else the name without ending."""
    stem = path.name[: -len(file_suffix(path))]
    return path.parent.name if stem == "image" else stem


def collect_images(paths: Sequence[PathLike]) -> Dict[str, Path]:
    """Case name → image file for image files and cohort folders (every case of the cohort)."""
    images: Dict[str, Path] = {}
    for path in map(Path, paths):
        found = ({case.name: case.image for case in discover_cohort(path).cases} if path.is_dir()
                 else {image_case_name(path): path})
        for name, image in found.items():
            if name in images:
                raise InputError(f"two images for case {name!r}: {images[name]} and {image}", image)
            images[name] = image
    return images


def predict_to_folder(model: torch.nn.Module, info: VNetInfo, images: Sequence[PathLike], out_dir: PathLike,
                      config: InferenceConfig, progress: Progress = ignore_progress) -> List[Path]:
    """Predict every image (files or cohort folders, named by :func:`collect_images`); see :func:`predict_cases`."""
    return _predict_named(model, info, collect_images(images), Path(out_dir), config, progress)


def predict_cases(model: torch.nn.Module, info: VNetInfo, cases: Sequence[Case], out_dir: PathLike,
                  config: InferenceConfig, progress: Progress = ignore_progress,
                  on_written: Callable[[str], None] = lambda name: None) -> List[Path]:
    """Predict the images of cohort cases and write ``<case.name>.seg.nrrd`` (segments named and coloured by the
    model's classes) and ``<case.name>.nii.gz`` into ``out_dir``, and each case's confidence (the mean over voxels
    of the largest class probability) into ``out_dir/confidence.csv`` (:mod:`SFRSegmentLib.stages.confidence`), calling
    ``on_written(case.name)`` after each case's files. Returns the files written. The window is
    ``config.patch_size``, or when that is None the patch the model was trained on (``info.patch_size``).

    Under torchrun the processes share the cases and rank 0 writes every file (the list is empty elsewhere).
    """
    return _predict_named(model, info, {case.name: case.image for case in cases}, Path(out_dir), config, progress,
                          on_written)


def _predict_named(model: torch.nn.Module, info: VNetInfo, images: Mapping[str, Path], out_dir: Path,
                   config: InferenceConfig, progress: Progress,
                   on_written: Callable[[str], None] = lambda name: None) -> List[Path]:
    written: List[Path] = []
    config = config.for_model(info.patch_size, info.downsampling)
    table = out_dir / CONFIDENCE_TABLE
    confidences = recorded(table)

    def predict(name: str) -> Tuple[Volume, float]:
        image = read_volume(images[name])
        check_image(image)
        labels, probabilities = predict_volume(model, image, config, info.classes, info.spacing,
                                               info.intensity_window)
        return labels, volume_confidence(probabilities)

    def write(name: str, result: Tuple[Volume, float]) -> None:
        labels, confidences[name] = result
        written.extend(write_volume(labels, out_dir / f"{name}{suffix}") for suffix in PREDICTION_SUFFIXES)
        write_table(table, confidences)
        on_written(name)
        progress(ProgressEvent("predict", len(written) // len(PREDICTION_SUFFIXES), len(images), metric=result[1],
                               message=f"predicted {name}"))

    map_cases(list(images), predict, write)
    return written


# ---------------------------------------------------------------------------------------------------------------
# What the run's estimate asks of this stage


def passes(shape: Sequence[int], config: InferenceConfig) -> int:
    """V-Net passes the sliding window makes on a volume of ``shape``, in batches of ``sw_batch_size``."""
    return batches(window_count(shape, config.patch_size, config.strides), config.sw_batch_size)


def timed_pass(model: torch.nn.Module, config: InferenceConfig, device: torch.device) -> Callable[[], object]:
    """One V-Net pass of the sliding window, for timing: over a synthetic volume that holds exactly one batch of
    ``sw_batch_size`` windows."""
    volume, _ = synthetic_case(one_batch_shape(config.patch_size, config.strides, config.sw_batch_size))
    return lambda: sliding_window_probabilities(model, volume, config, device)
