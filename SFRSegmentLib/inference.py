"""Whole-volume prediction with a trained V-Net: the reference sliding window, optional post-processing, files.

The sliding window reproduces the reference ``test_single_case`` (UA-MT's ``test_util.py``, used unchanged by SFR):

* the volume is z-scored (the training loader's normalisation) and zero-padded, equally on both sides (the odd
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
model with its BatchNorms folded into the convolutions (:func:`SFRSegmentLib.vnet.fold_batchnorm`: the same
probabilities to float rounding, ~20 % faster on the CPU), channels-last, in float32 (``precision="bf16"`` trades
~1e-3 on the logits for speed).

The optional post-processing keeps, per class, the largest connected component (full 26-connectivity, as the
reference's ``getLargestCC`` with skimage's default); it is off by default, as in SFR's evaluation. It uses
``scipy.ndimage.label``: MONAI's ``KeepLargestConnectedComponent`` computes the same but needs scikit-image, which
is not a dependency of the engine.

Model files: :func:`save_vnet` writes the weights with everything needed to rebuild and apply the model
(:class:`VNetInfo`) into one ``.pt`` file and the same information, readable, into a ``.json`` beside it;
:func:`load_vnet` reads the ``.pt`` (or a run folder's ``retrain/vnet.pt``).
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from scipy import ndimage

from .atomic import atomic_path, atomic_write_text
from .choices import PRECISIONS
from .config import InferenceConfig, check_device
from .config_io import to_dict
from .data import Case, discover_cohort, zscore
from .distributed import map_cases
from .errors import InputError, PathLike
from .io import Volume, default_segments, file_suffix, read_volume, write_volume
from .progress import Progress, ProgressEvent, ignore_progress
from .resample import to_native_grid, to_working_grid
from .runfolder import RunFolder
from .validation import check_image
from .vnet import VNet, fold_batchnorm

MODEL_FORMAT = "sfrsegment-vnet/1"
PREDICTION_SUFFIXES = (".seg.nrrd", ".nii.gz")
"""Every prediction is written as a Slicer segmentation and as NIfTI."""


@dataclass(frozen=True)
class VNetInfo:
    """What a trained V-Net file records besides its weights: how to rebuild it and what its channels mean."""

    classes: Dict[int, str]
    """Foreground class value → name; output channel c (1 … K) is the c-th smallest value, channel 0 background."""
    patch_size: Tuple[int, int, int]
    """The training patch, the default sliding window."""
    n_filters: int = 16
    normalization: str = "batchnorm"
    spacing: Optional[Tuple[float, float, float]] = None
    """The working voxel size (mm) the model was trained at; prediction resamples each image to it and the
    probabilities back (:mod:`SFRSegmentLib.resample`). None: each image's own grid."""
    training: Dict[str, Any] = field(default_factory=dict)
    """The re-training configuration (for the record)."""

    @property
    def class_values(self) -> Tuple[int, ...]:
        return tuple(sorted(self.classes))

    def build_model(self) -> VNet:
        """An untrained V-Net of this architecture (K+1 outputs)."""
        return VNet(n_channels=1, n_classes=len(self.classes) + 1, n_filters=self.n_filters,
                    normalization=self.normalization, has_dropout=True)


MEMORY_FORMAT = torch.channels_last_3d
"""Models and their inputs run channels-last: the same numbers (to float rounding), faster convolutions on CPU
(oneDNN) and with bf16."""


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast is about twice as fast as
    float32 for the V-Net; elsewhere it is emulated and slower."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_context(device: torch.device, precision: str) -> ContextManager:
    """The context the networks' forward passes run in: bf16 autocast or nothing (see
    :data:`~SFRSegmentLib.choices.PRECISIONS`). The one place where the engine's precision is decided."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", field="precision")
    bf16 = {"bf16": True, "fp32": False, "auto": device.type == "cuda",
            "bf16_if_native": device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())}[precision]
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    """The device ``name`` (:func:`SFRSegmentLib.config.check_device`) on this machine: ``auto`` is CUDA when
    available, else the CPU; ``cuda`` or ``cuda:N`` without CUDA (or without GPU N) is an InputError that says so."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name} was asked for, but CUDA is not available on this machine (no CUDA GPU, "
                             "or a torch without CUDA); use device auto or cpu", field="device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name} was asked for, but this machine has {torch.cuda.device_count()} CUDA "
                             f"GPU(s), numbered from 0", field="device")
    return device


# ---------------------------------------------------------------------------------------------------------------
# Model files


def vnet_info_path(weights: PathLike) -> Path:
    """The JSON that describes a V-Net file: ``vnet.pt`` → ``vnet.json``."""
    return Path(weights).with_suffix(".json")


def save_vnet(path: PathLike, model: torch.nn.Module, info: VNetInfo) -> Path:
    """Write the weights and ``info`` to ``path`` (.pt) and ``info`` to the ``.json`` beside it, atomically."""
    path = Path(path)
    record = _info_record(info)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": MODEL_FORMAT, "info": record, "state_dict": state}, tmp)
    atomic_write_text(vnet_info_path(path), json.dumps(record, indent=2) + "\n")
    return path


def _info_record(info: VNetInfo) -> Dict[str, Any]:
    record = to_dict(info)
    record["classes"] = {str(value): name for value, name in sorted(info.classes.items())}
    return record


def load_vnet(path: PathLike, device: Optional[torch.device] = None) -> Tuple[VNet, VNetInfo]:
    """The trained V-Net (in eval mode) and its :class:`VNetInfo`, from a ``.pt`` written by :func:`save_vnet` or
    a run folder (its ``retrain/vnet.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = RunFolder(path).vnet_weights
    if not path.is_file():
        raise InputError("no trained V-Net here (run the retrain stage first)", path)
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for files that are not its archives
        raise InputError(f"cannot read the model file: {exc}", path) from exc
    if not isinstance(stored, dict) or stored.get("format") != MODEL_FORMAT:
        raise InputError(f"not a V-Net file of this engine (expected format {MODEL_FORMAT!r})", path, "format")
    try:
        info = _stored_info(stored["info"])
        model = info.build_model()
        model.load_state_dict(stored["state_dict"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:  # fields missing or mismatched
        raise InputError(f"a V-Net file of this engine's format whose content does not fit it "
                         f"({type(exc).__name__}: {exc}); re-train it (in a run folder: rerun with --redo retrain)",
                         path, "info") from exc
    return model.to(device or torch.device("cpu")).eval(), info


def _stored_info(record: Mapping[str, Any]) -> VNetInfo:
    """The :class:`VNetInfo` that :func:`_info_record` stored."""
    return VNetInfo(
        classes={int(value): name for value, name in record["classes"].items()},
        patch_size=tuple(record["patch_size"]),
        n_filters=record["n_filters"],
        normalization=record["normalization"],
        spacing=tuple(record["spacing"]) if record.get("spacing") else None,
        training=record["training"],
    )


# ---------------------------------------------------------------------------------------------------------------
# Sliding window


def window_starts(size: int, patch: int, stride: int) -> List[int]:
    """The reference window starts along one axis of ``size`` voxels (after padding to at least ``patch``)."""
    size = max(size, patch)
    count = -(-(size - patch) // stride) + 1
    return [min(stride * i, size - patch) for i in range(count)]


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
                   spacing: Optional[Tuple[float, float, float]] = None) -> Tuple[Volume, np.ndarray]:
    """The label map (uint8 class values, on the image's grid, with segments) and the class probabilities
    (float32, (K+1, I, J, K), channel c for the c-th class value) of ``image``.

    ``classes`` (value → name, the model's :attr:`VNetInfo.classes`) gives the class values and segment names;
    without it channel c is class value c. With ``spacing`` (the model's :attr:`VNetInfo.spacing`) the window
    slides over the image resampled to that voxel size, and the probabilities are resampled back to the image's
    grid before the argmax.
    """
    working = image if spacing is None else to_working_grid(image, spacing)
    probabilities = to_native_grid(sliding_window_probabilities(model, zscore(working.array), config), image.shape)
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
    model's classes) and ``<case.name>.nii.gz`` into ``out_dir``, calling ``on_written(case.name)`` after each
    case's files. Returns the files written. The window is ``config.patch_size``, or when that is None the patch the
    model was trained on (``info.patch_size``).

    Under torchrun the processes share the cases and rank 0 writes every file (the list is empty elsewhere).
    """
    return _predict_named(model, info, {case.name: case.image for case in cases}, Path(out_dir), config, progress,
                          on_written)


def _predict_named(model: torch.nn.Module, info: VNetInfo, images: Mapping[str, Path], out_dir: Path,
                   config: InferenceConfig, progress: Progress,
                   on_written: Callable[[str], None] = lambda name: None) -> List[Path]:
    written: List[Path] = []
    config = config.for_model(info.patch_size)

    def predict(name: str) -> Volume:
        image = read_volume(images[name])
        check_image(image)
        return predict_volume(model, image, config, info.classes, info.spacing)[0]

    def write(name: str, labels: Volume) -> None:
        written.extend(write_volume(labels, out_dir / f"{name}{suffix}") for suffix in PREDICTION_SUFFIXES)
        on_written(name)
        progress(ProgressEvent("predict", len(written) // len(PREDICTION_SUFFIXES), len(images),
                               message=f"predicted {name}"))

    map_cases(list(images), predict, write)
    return written
