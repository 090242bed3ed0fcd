"""Stage F: fine-tune SFR's SAM on stitched patches of the labeled cases (method docs/sfr-method.md §1.2, §2).

Recipe (defaults = the paper's code, ``train_finetuning.py`` with ``train.sh``'s options)
-------------------------------------------------------------------------------------------
* Data: every labeled case is read once, z-scored over the whole volume and kept in memory. Each iteration draws
  ``batch_size`` patches: the case comes from a shuffled pass over the labeled cases (a new shuffle per pass, so a
  single labeled case simply gives several patches of itself), then the 3D ``RandomRotFlip``, a random crop of
  ``patch_size`` (zero-padded first where the volume is smaller), optionally the per-slice Bézier intensity map
  (``bezier_p``; the code's default 0.5 is **off** here, see below), stitching into mosaics (the torch path of
  :mod:`SFRSegmentLib.models.sam.stitching`, whole batch at once) and, with ``mosaic_rot_flip`` (the code's ``--rdmrotflip``),
  a rot90 + flip of each whole mosaic and its label.
* Model: :func:`~SFRSegmentLib.models.sam.model.build_sfr_sam` from a SAM checkpoint (catalog id or file), LoRA rank 4 on q
  and v, prompt encoder and mask decoder trained. The K+1 logits are upsampled to the full mosaic and the loss is
  :class:`~SFRSegmentLib.stages.losses.SFRLoss` there, as in the paper.
* Optimiser: AdamW (lr 1e-3, betas (0.9, 0.999), weight decay 0.1) on the trainable parameters; the learning rate
  of iteration ``it`` (0-based) is ``lr·(1 − it/T)^0.9``, updated after every step (torch's ``PolynomialLR``).
* 6,000 iterations, batch 2, seed 1337.

The Bézier augmentation clips z-scored intensities to [0, 1] on the slices it touches and is not applied when
pseudo-labelling (a train/test mismatch the paper does not mention, docs/sfr-method.md §8.5 item 10), hence off by default.

Run folder (:class:`~SFRSegmentLib.storage.runfolder.RunFolder`)
-------------------------------------------------------
``finetune/checkpoint.pt`` is written every ``checkpoint_every`` iterations, when cancelled and at the end: trainable
weights, optimiser, schedule, iteration, the numpy and torch RNG states and the log so far. A rerun resumes from it
and ends with the same weights as an uninterrupted run. At the end ``sam_trainable.pt`` (trainable weights only),
``log.csv``, ``sam_trainable.json`` and, last, the provenance record ``sam_trainable.pt.provenance.json`` are
written (:mod:`SFRSegmentLib.storage.provenance`). The inputs are the options that change the weights, the SHA-256 of the
labeled images and labels and of the base checkpoint, and the identity of ``init_weights``. A rerun with the same
inputs is not trained again; with other inputs the old weights and a stale checkpoint are replaced (the progress
stream says what changed), so pseudo-labels and everything after them are recomputed too.

Without a base checkpoint (``base_checkpoint=None``, allowed only with ``allow_random_init``, for tests and demos)
the frozen encoder is drawn from ``seed``; the JSON records it, so the weights can be loaded again.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.optim.lr_scheduler import PolynomialLR

from ..base.config import FinetuneConfig, SamConfig
from ..base.config_io import to_dict, with_overrides
from ..base.device import autocast_context, resolve_device
from ..base.distributed import barrier, data_parallel, main_first, mean_over_ranks, rank_slice, ranks
from ..base.errors import InputError, PathLike
from ..base.progress import Cancellation, Progress, ProgressEvent, ignore_progress
from ..data.cohort import Case, Cohort, load_case
from ..data.patches import sample_patch, scale_intensities, synthetic_case
from ..data.resample import to_working_grid
from ..models.sam.lora import load_trainable_state_dict, trainable_state_dict
from ..models.sam.model import SFRSam, build_sfr_sam
from ..models.sam.stitching import MosaicLayout, mosaic_layout, stitch_image, stitch_label
from ..models.sam.weights import DownloadError, available_offline, load_state_dict, resolve_checkpoint
from ..storage.atomic import atomic_path, atomic_write_text
from ..storage.checkpoint import iterations_left as remaining
from ..storage.checkpoint import load_checkpoint, reuse_trained, save_checkpoint, write_log
from ..storage.provenance import Inputs, case_files, file_digest, identity_of, write_record
from ..storage.runfolder import RunFolder
from .losses import SFRLoss
from .training import train

STAGE = "finetune"
FORMAT_VERSION = 1
RANDOM_INIT_MESSAGE = "no SAM checkpoint: random initialisation (demo/test only)"
BEZIER_POINTS = 100_000
"""Points at which the official code evaluates each Bézier curve."""

log = logging.getLogger(__name__)


_EXECUTION_ONLY = ("device", "checkpoint_every", "base_checkpoint", "init_weights")
"""Options that do not change the weights (the two files are identified by content and identity instead)."""
_SAM_EXECUTION_ONLY = ("efficient_attention", "gradient_checkpointing")


def finetune_inputs(config: FinetuneConfig, cohort: Cohort, base: Optional[Mapping[str, str]]) -> Inputs:
    """What determines the trained weights (:class:`~SFRSegmentLib.storage.provenance.Inputs`): the configuration without
    the execution-only settings (device, checkpoint interval, attention kernel, gradient checkpointing), the class
    values and, under torchrun, the number of processes (the global batch is ``batch_size`` × processes); the
    labeled images and labels and the base checkpoint (``base``, see :func:`resolve_base_checkpoint`); the
    weights fine-tuning continues from (``init_weights``)."""
    options = to_dict(config)
    for name in _EXECUTION_ONLY:
        options.pop(name)
    options["sam"] = sam_identity(options["sam"])
    options["class_values"] = sorted(int(v) for v in cohort.classes)
    if ranks().is_distributed:
        options["processes"] = ranks().world_size
    files = case_files(cohort.labeled)
    if base is not None:
        files["base SAM checkpoint"] = base["sha256"]
    upstream = {} if config.init_weights is None else {"SAM weights fine-tuning continues from":
                                                       identity_of(config.init_weights)}
    return Inputs(options, files, upstream)


def sam_identity(sam: Mapping[str, Any]) -> Dict[str, Any]:
    """A SAM config dict without the settings that do not change its function (attention kernel, checkpointing).
    The token size keeps its earlier name, ``patch_size``, as records made before the rename hold it, so that
    their fine-tuned SAMs stay current."""
    return {"patch_size" if name == "token_size" else name: value for name, value in sam.items()
            if name not in _SAM_EXECUTION_ONLY}


# ---------------------------------------------------------------------------------------------------------------
# Device and model


def build_base_sam(config: SamConfig, checkpoint_state: Optional[Mapping[str, torch.Tensor]], init_seed: int) -> SFRSam:
    """SFR's SAM before fine-tuning; its random parts (all of it without a checkpoint) are drawn from ``init_seed``
    without disturbing the caller's torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return build_sfr_sam(config, checkpoint_state)


def resolve_base_checkpoint(source: Optional[str], expected_sha256: Optional[str] = None
                            ) -> Optional[Dict[str, str]]:
    """The base checkpoint as recorded in ``sam_trainable.json``: source (id or path), file, SHA-256; None for
    random initialisation. A catalog id is downloaded when it is not cached; offline that fails with a message that
    says how to use a local file. With ``expected_sha256`` the file must be that one."""
    if source is None:
        return None
    try:
        path = resolve_checkpoint(source)
    except DownloadError as error:
        raise InputError(
            f"cannot get the SAM checkpoint {source!r}: {error}; or give the path of a local copy as the base "
            "checkpoint (command line: --checkpoint FILE)",
            field="base_checkpoint",
        ) from error
    digest = file_digest(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise InputError(f"the SAM checkpoint {source!r} is not the file fine-tuning started from (SHA-256 "
                         f"{expected_sha256})", path, "base_checkpoint")
    return {"source": source, "path": str(path), "sha256": digest}


def _base_state(record: Optional[Mapping[str, str]]) -> Optional[Dict[str, torch.Tensor]]:
    return None if record is None else load_state_dict(record["path"])


def weights_info_path(weights: PathLike) -> Path:
    """The JSON that describes a trainable-weights file: ``x.pt`` → ``x.json`` (``sam_trainable.json`` in a run)."""
    return Path(weights).with_suffix(".json")


_INFO_FIELDS = ("sam_config", "base_checkpoint", "init_seed", "weights_sha256")
"""The fields of ``sam_trainable.json`` that loading the weights reads."""


def read_weights_info(weights: PathLike) -> Optional[Dict[str, Any]]:
    """The JSON beside a trainable-weights file as a dict, or None when there is none (fine-tuning unfinished)."""
    path = weights_info_path(weights)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"not valid JSON ({error}); fine-tune again (in a run folder: rerun with --redo finetune)",
                         path) from None
    missing = [name for name in _INFO_FIELDS if not isinstance(info, dict) or name not in info]
    if missing:
        raise InputError(f"not the description of fine-tuned SAM weights (no {', '.join(missing)}); fine-tune again "
                         "(in a run folder: rerun with --redo finetune)", path, missing[0])
    return info


def load_finetuned_sam(weights: PathLike, device: torch.device = torch.device("cpu")
                       ) -> Tuple[SFRSam, Dict[str, Any]]:
    """A fine-tuned SAM (LoRA not merged, eval mode, on ``device``) from its trainable-weights file (a run's
    ``finetune/sam_trainable.pt``), and the JSON beside it.

    The file must have the SHA-256 the JSON records, and the base checkpoint must be the one fine-tuning started
    from.
    """
    info = _checked_weights_info(weights)
    base = info["base_checkpoint"]
    if base is not None:
        base = resolve_base_checkpoint(base["source"], expected_sha256=base["sha256"])
    model = build_base_sam(with_overrides(SamConfig(), info["sam_config"]), _base_state(base), info["init_seed"])
    load_trainable_state_dict(model, load_state_dict(weights))
    return model.to(device).eval(), info


def _checked_weights_info(weights: PathLike) -> Dict[str, Any]:
    info = read_weights_info(weights)
    if info is None:
        raise InputError("no fine-tuned SAM here (its .json is missing); run the finetune stage first",
                         weights_info_path(weights))
    if not Path(weights).is_file() or file_digest(weights) != info["weights_sha256"]:
        raise InputError("missing, or not the file its .json describes (SHA-256 differs); fine-tune again", weights,
                         "sha256")
    return info


def _initial_weights(config: FinetuneConfig, base: Optional[Mapping[str, str]]) -> Dict[str, torch.Tensor]:
    """The trainable weights of ``config.init_weights``, after checking they were made on the same base model."""
    info = _checked_weights_info(config.init_weights)
    same_base = (info["base_checkpoint"] or {}).get("sha256") == (base or {}).get("sha256")
    if base is None:
        same_base = info["base_checkpoint"] is None and info["init_seed"] == config.seed
    if not same_base or sam_identity(info["sam_config"]) != sam_identity(to_dict(config.sam)):
        raise InputError("these weights were fine-tuned from another base checkpoint or SAM architecture than this "
                         "configuration's", config.init_weights, "init_weights")
    return load_state_dict(config.init_weights)


# ---------------------------------------------------------------------------------------------------------------
# Data


def class_index_lookup(class_values: Sequence[int]) -> np.ndarray:
    """A 256-entry uint8 table mapping label values (0, then the sorted class values) to class indices 0..K."""
    lookup = np.zeros(256, dtype=np.uint8)
    for index, value in enumerate(sorted(int(v) for v in class_values), start=1):
        lookup[value] = index
    return lookup


def load_training_volume(case: Case, classes: Mapping[int, str], sam: SamConfig = SamConfig(),
                         spacing: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """A labeled case as (float32 image scaled for ``sam``, uint8 class indices 0..K), both resampled to the
    working ``spacing`` when one is given."""
    image, label = load_case(case, classes)
    if label is None:
        raise InputError("a training case needs a label", case.image, "label")
    if spacing is not None:
        image, label = to_working_grid(image, spacing), to_working_grid(label, spacing, labels=True)
    return scale_intensities(image.array, sam.input_scaling), class_index_lookup(list(classes))[label.array]


def training_layout(patch_size: Sequence[int], sam: SamConfig, depth_padding: str) -> MosaicLayout:
    """The mosaic layout of a patch on SAM's canvas; InputError if the patch does not fit."""
    try:
        return mosaic_layout(tuple(patch_size), canvas=sam.image_size, depth_padding=depth_padding)
    except ValueError as error:
        raise InputError(str(error), field="patch_size") from None


@lru_cache(maxsize=1)
def _bezier_basis() -> np.ndarray:
    """(BEZIER_POINTS, 4) cubic Bernstein polynomials at evenly spaced t in [0, 1]."""
    t = np.linspace(0.0, 1.0, BEZIER_POINTS)
    return np.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3], axis=1)


def bezier_slices(patch: np.ndarray, probability: float, rng: np.random.Generator) -> np.ndarray:
    """The official per-slice intensity augmentation (docs/sfr-method.md §1.2): each slice along the last axis, with
    ``probability``, is mapped through a random cubic Bézier curve from (0, 0) to (1, 1) with two uniformly random
    inner control points, evaluated at 100,000 points with both coordinates sorted (so the map is monotone) and
    applied by linear interpolation, which clips values outside [0, 1]. Returns a new array."""
    out = np.array(patch, dtype=np.float32, copy=True)
    for k in range(patch.shape[-1]):
        if rng.random() < probability:
            x1, y1, x2, y2 = rng.random(4)
            xs = _bezier_basis() @ np.array([0.0, x1, x2, 1.0])
            ys = _bezier_basis() @ np.array([0.0, y1, y2, 1.0])
            out[..., k] = np.interp(patch[..., k], np.sort(xs), np.sort(ys))
    return out


class MosaicBatches:
    """Training batches of augmented mosaics drawn from labeled volumes held in memory (see the module docstring).

    :meth:`sample` returns images (N, 1, S, S) float32 and labels (N, S, S) int64 (255 on gutters and empty
    tiles) on ``device``, N = batch_size × mosaics per patch. Under torchrun every rank draws the same global batch
    of batch_size × processes patches and keeps its own slice, so the data do not depend on the number of processes.
    """

    def __init__(self, volumes: Sequence[Tuple[np.ndarray, np.ndarray]], layout: MosaicLayout,
                 config: FinetuneConfig, device: torch.device) -> None:
        if not volumes:
            raise InputError("no labeled case to fine-tune on", field="cases")
        self.volumes = list(volumes)
        self.layout = layout
        self.config = config
        self.device = device

    def case_index(self, sample: int) -> int:
        """The case of the ``sample``-th patch of the run: pass p = sample // n over the cases follows a shuffle
        drawn from (seed, p), so the order does not depend on where a run was resumed."""
        n_cases = len(self.volumes)
        order = np.random.default_rng([self.config.seed, sample // n_cases]).permutation(n_cases)
        return int(order[sample % n_cases])

    def sample(self, iteration: int, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        global_batch = self.config.batch_size * ranks().world_size
        images, labels = [], []
        for b in range(global_batch):
            image, label = self.volumes[self.case_index(iteration * global_batch + b)]
            image_patch, label_patch = sample_patch(image, label, self.layout.patch_shape, rng,
                                                    augment=self.config.rot_flip)
            if self.config.bezier_p > 0:
                image_patch = bezier_slices(image_patch, self.config.bezier_p, rng)
            images.append(image_patch)
            labels.append(label_patch)
        size = self.layout.canvas
        image_mosaics = stitch_image(torch.from_numpy(np.stack(images)).to(self.device), self.layout)
        label_mosaics = stitch_label(torch.from_numpy(np.stack(labels)).to(self.device), self.layout)
        image_mosaics = image_mosaics.reshape(-1, 1, size, size)
        label_mosaics = label_mosaics.reshape(-1, size, size)
        if self.config.mosaic_rot_flip:
            image_mosaics, label_mosaics = _rot_flip_mosaics(image_mosaics, label_mosaics, rng)
        mine = rank_slice(len(image_mosaics))
        return image_mosaics[mine], label_mosaics[mine]


def _rot_flip_mosaics(images: torch.Tensor, labels: torch.Tensor,
                      rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each mosaic and its label turned by k·90° (k ∈ {0..3}) and then flipped along its rows or columns."""
    turned_images, turned_labels = [], []
    for image, label in zip(images, labels):
        k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
        turned_images.append(torch.rot90(image, k, dims=(-2, -1)).flip(-2 + axis))
        turned_labels.append(torch.rot90(label, k, dims=(-2, -1)).flip(-2 + axis))
    return torch.stack(turned_images), torch.stack(turned_labels)


# ---------------------------------------------------------------------------------------------------------------
# Training


def compute_loss(model: torch.nn.Module, loss_function: SFRLoss, images: torch.Tensor, labels: torch.Tensor,
                 precision: str = "auto") -> torch.Tensor:
    """The forward pass and loss of one batch of mosaics (full-resolution logits, as the paper)."""
    with autocast_context(images.device, precision):
        logits = model(images)
    return loss_function(logits, labels)


def apply_gradients(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Backward pass, optimiser step, then the per-iteration learning-rate update."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


class _Training:
    """The mutable state of a fine-tuning run: model, optimiser, schedule, RNG, iteration and log."""

    def __init__(self, model: SFRSam, config: FinetuneConfig, inputs: Inputs) -> None:
        self.model = model.train()
        # SAM's prompt encoder holds point and mask embeddings that prompt-free SFR never uses.
        self.forward_model = data_parallel(self.model, find_unused_parameters=True)
        self.config = config
        self.inputs = inputs
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.scheduler = PolynomialLR(self.optimizer, total_iters=config.iterations, power=config.poly_power)
        self.loss_function = SFRLoss(config.dice_counts_ignored)
        self.rng = np.random.default_rng(config.seed)
        self.iteration = 0
        self.log: List[Dict[str, float]] = []

    def step(self, batches: MosaicBatches) -> float:
        images, labels = batches.sample(self.iteration, self.rng)
        lr = self.optimizer.param_groups[0]["lr"]
        loss = compute_loss(self.forward_model, self.loss_function, images, labels, self.config.precision)
        apply_gradients(loss, self.optimizer, self.scheduler)
        value, = mean_over_ranks([loss.item()])
        self.log.append({"iteration": self.iteration, "loss": value, "lr": float(lr)})
        self.iteration += 1
        return value

    def save(self, run: RunFolder) -> None:
        """Write the resumable checkpoint and the log so far, atomically (rank 0; the ranks' states are equal)."""
        state = {
            "iteration": self.iteration,
            "trainable": {key: value.cpu() for key, value in trainable_state_dict(self.model).items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "log": self.log,
        }
        save_checkpoint(run.finetune_checkpoint, state, self.inputs, run.finetune_log, self.log)

    def restore(self, state: Mapping[str, Any]) -> None:
        load_trainable_state_dict(self.model, state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        self.iteration = int(state["iteration"])
        self.log = list(state["log"])


def finetune(cohort: Cohort, run: RunFolder, config: FinetuneConfig, progress: Progress = ignore_progress,
             cancellation: Optional[Cancellation] = None) -> Path:
    """Fine-tune SAM on the labeled cases of ``cohort`` into ``run``; return the path of ``sam_trainable.pt``.
    ``config`` is a resolved section (its ``patch_size`` set, :meth:`SFRSegmentLib.base.config.RunConfig.resolved`).

    Returns at once when the run folder holds weights fine-tuned from the same inputs (:func:`finetune_inputs`);
    replaces stale ones; resumes from ``finetune/checkpoint.pt`` when it was saved with the same inputs. When
    ``cancellation`` is requested, the checkpoint is saved and :class:`Cancelled` is raised.
    """
    if config.sam.num_classes != len(cohort.classes):
        raise InputError(f"the cohort has {len(cohort.classes)} foreground classes but the SAM config has "
                         f"num_classes={config.sam.num_classes}", field="num_classes")
    with main_first():
        base = resolve_base_checkpoint(config.base_checkpoint)
    inputs = finetune_inputs(config, cohort, base)
    if reuse_trained([run.sam_weights, run.sam_weights_info], inputs, STAGE, config.iterations, progress,
                     "already fine-tuned", "the fine-tuned SAM is stale ({reason}): fine-tuning again"):
        return run.sam_weights
    resume_state = load_checkpoint(run.finetune_checkpoint, inputs, STAGE, config.iterations, progress)
    if base is None:
        log.warning(RANDOM_INIT_MESSAGE)
        progress(ProgressEvent(STAGE, 0, config.iterations, message=RANDOM_INIT_MESSAGE))
    device = resolve_device(config.device)
    layout = training_layout(config.patch_size, config.sam, config.depth_padding)
    batches = MosaicBatches([load_training_volume(case, cohort.classes, config.sam, config.spacing)
                             for case in cohort.labeled], layout, config, device)
    model = build_base_sam(config.sam, _base_state(base), config.seed)
    if config.init_weights is not None:
        load_trainable_state_dict(model, _initial_weights(config, base))
    training = _Training(model.to(device), config, inputs)
    if resume_state is not None:
        training.restore(resume_state)
        progress(ProgressEvent(STAGE, training.iteration, config.iterations,
                               message=f"resumed at iteration {training.iteration}"))
    train(STAGE, "fine-tuning", lambda: training.iteration, config.iterations, config.checkpoint_every,
          lambda: training.step(batches), lambda: training.save(run), progress, cancellation)
    return _write_result(training, run, base, layout)


def _write_result(training: _Training, run: RunFolder, base: Optional[Dict[str, str]], layout: MosaicLayout) -> Path:
    """Write ``sam_trainable.pt``, the log, ``sam_trainable.json`` and, last, the provenance record (whose presence
    marks the end); rank 0 writes, the others wait for it."""
    if ranks().is_main:
        _write_files(training, run, base, layout)
    barrier()
    return run.sam_weights


def _write_files(training: _Training, run: RunFolder, base: Optional[Dict[str, str]], layout: MosaicLayout) -> None:
    weights = {key: value.cpu() for key, value in trainable_state_dict(training.model).items()}
    with atomic_path(run.sam_weights) as tmp:
        torch.save(weights, tmp)
    write_log(run.finetune_log, training.log)
    info = {
        "format": FORMAT_VERSION,
        "sam_config": to_dict(training.config.sam),
        "base_checkpoint": base,
        "init_seed": training.config.seed,
        "iterations": training.iteration,
        "class_values": training.inputs.options["class_values"],
        "patch_size": list(layout.patch_shape),
        "spacing": None if training.config.spacing is None else list(training.config.spacing),
        "depth_padding": layout.depth_padding,
        "weights_sha256": file_digest(run.sam_weights),
    }
    atomic_write_text(run.sam_weights_info, json.dumps(info, indent=2) + "\n")
    write_record([run.sam_weights, run.sam_weights_info], training.inputs)


# ---------------------------------------------------------------------------------------------------------------
# What the run's estimate asks of this stage


def iterations_left(run: RunFolder, cohort: Cohort, config: FinetuneConfig) -> int:
    """Fine-tuning iterations still to do in ``run`` (all of them while the base checkpoint is not on this
    machine)."""
    source = config.base_checkpoint
    if source is not None and not available_offline(source):
        return config.iterations
    inputs = finetune_inputs(config, cohort, resolve_base_checkpoint(source))
    return remaining(config.iterations, [run.sam_weights, run.sam_weights_info], run.finetune_checkpoint, inputs)


def timed_step(config: FinetuneConfig, sam: SFRSam, device: torch.device) -> Callable[[], float]:
    """One iteration of this stage's own training step (sampling, stitching, forward, loss, backward, AdamW) on a
    synthetic volume of the patch size, for timing: the time of a step does not depend on the weights."""
    layout = training_layout(config.patch_size, config.sam, config.depth_padding)
    batches = MosaicBatches([synthetic_case(config.patch_size)], layout, config, device)
    training = _Training(sam, config, Inputs({}))
    return lambda: training.step(batches)
