"""Stage P: whole-volume SAM pseudo-labels of the unlabeled cases (the paper's Eq. 3, materialised offline).

The official code pseudo-labels online, on each random crop of the re-training loop (docs/sfr-method.md §3). Here every unlabeled
volume is labeled once, whole, and the result is cached in the run folder:

* the volume is scaled as in training (z-scores, or [0, 1] for LiteMedSAM) and cut into windows of the patch SAM was fine-tuned on (read, with the
  canvas and depth padding, from the fine-tuned weights' JSON, so the mosaics are laid out as in fine-tuning) by
  MONAI's ``sliding_window_inference``; a volume smaller than the window is zero-padded (zero is its mean);
* each batch of windows is stitched into mosaics, run through the fine-tuned SAM (LoRA merged, eval mode, no
  gradients; bfloat16 autocast on CUDA), turned into K+1 softmax probabilities at full mosaic resolution and
  un-stitched (:class:`MosaicPredictor`);
* overlapping windows are averaged with equal weights, as the reference sliding-window test does. The default
  overlap is 50 % (a stride of half the window): the reference evaluation stride (18/18/4 voxels for LA) would
  cost about 30 times as many SAM passes for a smoother but hardly different result;
* the hard label is the argmax of the averaged probabilities (with ``largest_component``, only the largest
  connected component of each class kept), mapped back to the cohort's class values. With ``finetune.spacing``
  the volume is resampled to SAM's working grid first and the probabilities back to the image's grid.

Outputs (:class:`~SFRSegmentLib.storage.runfolder.RunFolder`): ``<case>.label.nrrd`` (uint8, the image's grid and geometry),
``<case>.prob.npy`` (uint8 probabilities × 255, shape (K+1, I, J, K)), the case's provenance record
``<case>.label.nrrd.provenance.json`` (:mod:`SFRSegmentLib.storage.provenance`: the options, the image's SHA-256 and the
SAM weights' identity) and ``confidence.csv``. A case is computed again only when its record differs from its
current inputs (its image edited, SAM fine-tuned again, other options), the progress stream saying why, or with
``redo``. The confidence of a case is the SFR+ one (docs/sfr-method.md §5): the mean over all
voxels of the largest class probability, taken from the stored probabilities so that cached and fresh cases agree
(the quantisation moves it by at most 1/510).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from ..base.config import PseudoLabelConfig
from ..base.config_io import to_dict
from ..base.device import autocast_context, resolve_device
from ..base.distributed import barrier, map_cases, ranks
from ..base.errors import InputError, PathLike
from ..base.progress import Cancellation, Cancelled, EtaClock, Progress, ProgressEvent, ignore_progress
from ..data.cohort import Case, Cohort, load_case
from ..data.patches import scale_intensities, synthetic_case
from ..data.resample import to_native_grid, to_working_grid
from ..models.sam.lora import merge_lora
from ..models.sam.model import SFRSam
from ..models.sam.stitching import MosaicLayout, stitch_image, unstitch
from ..storage.atomic import atomic_path
from ..storage.provenance import MISSING, Inputs, case_files, identity_of, record_path, stale_reason, write_record
from ..storage.runfolder import PROBABILITY_SCALE, RunFolder
from ..storage.volumes import Volume, write_volume
from .confidence import volume_confidence, write_table
from .finetune import load_finetuned_sam, training_layout, weights_info_path
from .inference import batches, keep_largest_components, one_batch_shape, window_count

STAGE = "pseudolabel"
_EXECUTION_ONLY = ("device", "windows_per_batch", "redo")
"""Options that do not change a pseudo-label."""


class MosaicPredictor:
    """SAM on 3D windows: (n, 1, H, W, D) → K+1 class probabilities (n, K+1, H, W, D), through the mosaics.

    Raises :class:`Cancelled` before a batch when ``cancellation`` has been requested.
    """

    def __init__(self, model: SFRSam, layout: MosaicLayout, precision: str = "auto",
                 cancellation: Optional[Cancellation] = None) -> None:
        self.model = model
        self.layout = layout
        self.precision = precision
        self.cancellation = cancellation

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        if self.cancellation is not None and self.cancellation.requested:
            raise Cancelled("pseudo-labelling stopped; finished cases are kept and a rerun continues")
        n_windows, size = windows.shape[0], self.layout.canvas
        mosaics = stitch_image(windows[:, 0], self.layout).reshape(-1, 1, size, size)
        with autocast_context(windows.device, self.precision):
            logits = self.model(mosaics)
        probabilities = torch.softmax(logits.float(), dim=1)
        per_window = probabilities.reshape(n_windows, self.layout.n_mosaics, -1, size, size).transpose(1, 2)
        return unstitch(per_window, self.layout)


def predict_probabilities(model: SFRSam, volume: np.ndarray, layout: MosaicLayout, overlap: float = 0.5,
                          windows_per_batch: int = 2, precision: str = "auto",
                          cancellation: Optional[Cancellation] = None) -> torch.Tensor:
    """Averaged class probabilities (K+1, I, J, K), float32 on the CPU, of a volume (I, J, K) scaled as the model
    expects (``model.config.input_scaling``) by sliding windows of ``layout.patch_shape``; ``model`` should be in eval mode (merged LoRA is fastest)."""
    device = next(model.parameters()).device
    inputs = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    with torch.no_grad():
        probabilities = sliding_window_inference(
            inputs, roi_size=layout.patch_shape, sw_batch_size=windows_per_batch,
            predictor=MosaicPredictor(model, layout, precision, cancellation), overlap=overlap, mode="constant",
            padding_mode="constant", cval=0.0, sw_device=device, device=torch.device("cpu"),
        )
    return torch.as_tensor(probabilities)[0]


def quantise(probabilities: torch.Tensor) -> np.ndarray:
    """Probabilities as uint8, p ≈ stored / 255."""
    return torch.round(probabilities * PROBABILITY_SCALE).clamp_(0, PROBABILITY_SCALE).to(torch.uint8).numpy()


def stored_confidence(stored_probabilities: np.ndarray) -> float:
    """:func:`~SFRSegmentLib.stages.confidence.volume_confidence` of stored uint8 probabilities (K+1, ...)."""
    return volume_confidence(stored_probabilities) / PROBABILITY_SCALE


def pseudolabel(cohort: Cohort, run: RunFolder, config: PseudoLabelConfig = PseudoLabelConfig(),
                progress: Progress = ignore_progress, cancellation: Optional[Cancellation] = None,
                cases: Optional[Sequence[Case]] = None, sam_weights: Optional[PathLike] = None) -> Path:
    """Pseudo-label the unlabeled cases of ``cohort`` (or just ``cases``) into ``run``; return ``confidence.csv``.

    The SAM is the run's own fine-tuned one (``finetune/sam_trainable.pt``) unless ``sam_weights`` names another
    trainable-weights file (SFR+ rounds reuse an earlier round's). Cases whose files were computed from the same
    inputs (:func:`case_inputs`) are skipped unless ``config.redo``; the model is loaded only if some case needs it. ``confidence.csv`` lists the cases
    labeled here and is rewritten only when its content changes. When ``cancellation`` is requested, the case in
    progress is dropped and :class:`~SFRSegmentLib.base.progress.Cancelled` is raised.
    """
    cases = list(cohort.unlabeled if cases is None else cases)
    weights = run.sam_weights if sam_weights is None else Path(sam_weights)
    inputs = case_inputs(cohort, cases, config, weights)
    stale = {case.name: stale_reason(run.pseudo_label_files(case.name), inputs[case.name]) for case in cases}
    pending = [case for case in cases if config.redo or stale[case.name] is not None]
    labeler = _Labeler(cohort, run, config, weights, cancellation) if pending else None
    clock = EtaClock(len(pending))
    confidences: Dict[str, float] = {}
    computed = 0

    def record(case: Case, status: str) -> None:
        confidences[case.name] = stored_confidence(np.load(run.pseudo_probabilities(case.name)))
        progress(ProgressEvent(STAGE, len(confidences), len(cases), metric=confidences[case.name],
                               eta_s=clock.eta_s(computed), message=f"{case.name}: {status}"))

    def write(case: Case, result: Tuple[np.ndarray, Volume]) -> None:
        nonlocal computed
        record_path(run.pseudo_label(case.name)).unlink(missing_ok=True)
        labeler.write(case, result)
        write_record(run.pseudo_label_files(case.name), inputs[case.name])
        computed += 1
        record(case, "computed")

    if ranks().is_main:
        for case in cases:
            if case not in pending:
                record(case, "cached")
            elif stale[case.name] not in (None, MISSING):
                progress(ProgressEvent(STAGE, len(confidences), len(cases), message=f"the pseudo-label of case "
                                       f"{case.name} is stale ({stale[case.name]}): computing it again"))
    if pending:  # under torchrun each rank labels its share of the cases and rank 0 writes them
        map_cases(pending, labeler.compute, write)
    if not cases:
        progress(ProgressEvent(STAGE, 0, 0, message="no unlabeled case to pseudo-label"))
    if ranks().is_main:
        write_table(run.confidence_table, {case.name: confidences[case.name] for case in cases})
    barrier()
    return run.confidence_table


class _Labeler:
    """The fine-tuned SAM of a run, ready to pseudo-label cases of a cohort."""

    def __init__(self, cohort: Cohort, run: RunFolder, config: PseudoLabelConfig, weights: Path,
                 cancellation: Optional[Cancellation]) -> None:
        model, info = load_finetuned_sam(weights, resolve_device(config.device))
        class_values = sorted(int(v) for v in cohort.classes)
        if info["class_values"] != class_values:
            raise InputError(f"SAM was fine-tuned for classes {info['class_values']} but the cohort has "
                             f"{class_values}", weights_info_path(weights), "class_values")
        self.model = merge_lora(model).eval()
        self.layout = training_layout(info["patch_size"], self.model.config, info["depth_padding"])
        self.spacing = info.get("spacing")  # absent in weights fine-tuned before finetune.spacing existed
        self.scaling = self.model.config.input_scaling
        self.label_values = np.array([0] + class_values, dtype=np.uint8)
        self.cohort, self.run, self.config, self.cancellation = cohort, run, config, cancellation

    def compute(self, case: Case) -> Tuple[np.ndarray, Volume]:
        """The case's stored probabilities (uint8, see :func:`quantise`) and its hard label on the image's grid."""
        image, _ = load_case(case, self.cohort.classes)
        working = image if self.spacing is None else to_working_grid(image, self.spacing)
        probabilities = predict_probabilities(self.model, scale_intensities(working.array, self.scaling), self.layout,
                                              self.config.overlap, self.config.windows_per_batch,
                                              self.config.precision, self.cancellation)
        probabilities = to_native_grid(probabilities, image.shape)
        channels = probabilities.argmax(dim=0).numpy()
        if self.config.largest_component:
            channels = keep_largest_components(channels, len(self.label_values))
        label = self.label_values[channels]
        return quantise(probabilities), image.with_array(label)

    def write(self, case: Case, result: Tuple[np.ndarray, Volume]) -> None:
        """Write what :meth:`compute` returned: probabilities and hard label, each file atomically."""
        probabilities, label = result
        with atomic_path(self.run.pseudo_probabilities(case.name)) as tmp:
            np.save(tmp, probabilities)
        write_volume(label, self.run.pseudo_label(case.name))


def case_inputs(cohort: Cohort, cases: Sequence[Case], config: PseudoLabelConfig, weights: Path
                ) -> Dict[str, Inputs]:
    """Case name → what its pseudo-label is computed from: the options that change it, the class values, the
    image's SHA-256 and the identity of the SAM weights (``missing`` while they do not exist)."""
    options = {name: value for name, value in to_dict(config).items() if name not in _EXECUTION_ONLY}
    options["class_values"] = sorted(int(v) for v in cohort.classes)
    upstream = {"SAM weights": identity_of(weights) if weights.is_file() else "missing"}
    return {case.name: Inputs(options, case_files([case], labels=False), upstream) for case in cases}


# ---------------------------------------------------------------------------------------------------------------
# What the run's estimate asks of this stage


def cases_left(run: RunFolder, cohort: Cohort, config: PseudoLabelConfig) -> Tuple[Case, ...]:
    """The unlabeled cases whose pseudo-labels in ``run`` are missing or stale (all of them with ``redo``)."""
    inputs = case_inputs(cohort, cohort.unlabeled, config, run.sam_weights)
    return tuple(case for case in cohort.unlabeled
                 if config.redo or stale_reason(run.pseudo_label_files(case.name), inputs[case.name]) is not None)


def window_intervals(window: Sequence[int], config: PseudoLabelConfig) -> Tuple[int, ...]:
    """The window step along each axis: MONAI's scan interval ``int(window·(1 − overlap))``, at least 1. (MONAI uses
    the window size on an axis exactly as long as the window, where there is one window either way.)"""
    return tuple(max(int(size * (1 - config.overlap)), 1) for size in window)


def passes(shape: Sequence[int], window: Sequence[int], config: PseudoLabelConfig) -> int:
    """SAM passes this stage makes on a volume of ``shape`` with SAM's ``window`` (its fine-tuning patch): its
    sliding windows in batches of ``windows_per_batch``."""
    return batches(window_count(shape, window, window_intervals(window, config)), config.windows_per_batch)


def timed_pass(sam: SFRSam, window: Sequence[int], depth_padding: str, config: PseudoLabelConfig
               ) -> Callable[[], object]:
    """One SAM pass of this stage, for timing: its sliding window over a synthetic volume that holds exactly one
    batch of ``config.windows_per_batch`` windows of ``window``."""
    model = merge_lora(sam).eval()
    layout = training_layout(window, model.config, depth_padding)
    volume, _ = synthetic_case(one_batch_shape(window, window_intervals(window, config), config.windows_per_batch))
    return lambda: predict_probabilities(model, volume, layout, config.overlap, config.windows_per_batch,
                                         config.precision)
