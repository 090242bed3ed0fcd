"""Stage R: re-train the V-Net with a semi-supervised method and (for ``sfr*`` methods) cached SAM pseudo-labels.

The loop follows the reference recipe (SFR's ``train_retraining.py``, UA-MT's LA scripts; docs/sfr-method.md §4):

* **Batches** come from two streams: ``batch_labeled`` crops of labeled cases, then ``batch_unlabeled`` crops of
  unlabeled cases (:class:`TwoStreamSampler`). Each stream walks through fresh random permutations of its cases
  without end, so one labeled case (the scarce setting) simply repeats, with a new random crop each time; the
  reference sampler cannot do this (its labeled stream must fill one batch per epoch).
* **Crops**: every volume is z-scored whole once; a crop is the reference ``RandomRotFlip`` (optional) and a random
  ``patch_size`` crop (:func:`SFRSegmentLib.data.patches.sample_patch`). An unlabeled crop and its pseudo-label crop are cut
  together, with the same rotation, flip and corner, from the whole-volume pseudo-label that stage P cached in the
  run folder. The official code runs SAM on every crop instead; the result is the same kind of target, without a
  SAM forward per iteration (see ``benchmarks/bench_retrain.py``).
* **Loss** = ½(CE + Dice) on the labeled crops + the method's terms (:mod:`SFRSegmentLib.stages.semisupervised`), minimised by SGD
  (lr 0.01, momentum 0.9, weight decay 1e-4), lr ×0.1 every 2,500 iterations (``step``) for 6,000 iterations, or,
  as AC-MT's own script schedules ``acmt`` and ``sfr_acmt``, (1 − it/T)^0.9 (``poly``) for 8,000
  (:func:`SFRSegmentLib.base.config.method_recipe`); seed 1337.
* **Device**: ``auto`` picks CUDA when present, where forwards run under bf16 autocast (losses in float32) with
  ``cudnn.benchmark``; the CPU runs in float32 unless ``precision`` is ``bf16`` (or ``bf16_if_native`` on a CPU
  with native bf16). Networks and batches are channels-last.

Run-folder outputs (:class:`SFRSegmentLib.storage.runfolder.RunFolder`): ``retrain/checkpoint.pt`` every
``checkpoint_every`` iterations, at a cancellation and at the end (student, method state such as the teacher,
optimiser, iteration, sampler and every random generator, log), written atomically (:mod:`SFRSegmentLib.storage.checkpoint`);
a rerun with the same inputs (:func:`retrain_inputs`) resumes from it and gives the same weights as an uninterrupted
run. At the end ``retrain/vnet.pt`` (the student at the final iteration, as the references evaluate it; averaged with
``init_weights`` when ``init_weights_share`` is set, :func:`with_start_share`) with
``retrain/vnet.json`` (classes, patch, this configuration), ``retrain/log.csv`` (iteration, lr, total loss, each
term and its weight) and, last, the provenance record ``retrain/vnet.pt.provenance.json``. A rerun whose inputs
match the record returns the V-Net at once; otherwise the V-Net is re-trained, the progress stream saying what
changed (:mod:`SFRSegmentLib.storage.provenance`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..base.config import REFERENCE_CONV_KERNELS, REFERENCE_DOWNSAMPLING, RetrainConfig
from ..base.config_io import to_dict
from ..base.device import autocast_context, resolve_device
from ..base.distributed import (
    barrier,
    broadcast_buffers,
    data_parallel,
    gather_to_main,
    mean_over_ranks,
    rank_slice,
    ranks,
)
from ..base.errors import InputError
from ..base.progress import Cancellation, Progress, ProgressEvent, ignore_progress
from ..data.augment import augment_crop
from ..data.cohort import Case, Cohort, load_case
from ..data.patches import normalize_intensities, sample_patch, synthetic_case
from ..data.resample import to_working_grid
from ..data.validation import check_same_geometry
from ..models.vnet import MEMORY_FORMAT, VNetInfo, load_vnet, save_vnet, vnet_info_path
from ..storage.checkpoint import iterations_left as remaining
from ..storage.checkpoint import load_checkpoint, reuse_trained, save_checkpoint
from ..storage.provenance import Inputs, case_files, identity_of, write_record
from ..storage.runfolder import RunFolder
from ..storage.volumes import read_volume
from .semisupervised import Step, build_method, learns_from_unlabeled, segmentation_loss
from .training import train

STAGE = "retrain"
EXECUTION_ONLY = ("checkpoint_every", "device", "init_weights")
"""Options that do not change the trained V-Net, or (``init_weights``) that its inputs identify by content."""
ADDED_OPTIONS = {"in_plane_rotation_only": False, "pseudo_label_min_volume": 0.0,
                 "ssl": {"pseudo_label_agreement": False}}
"""Options added since V-Nets were first trained, with the value those were trained with (options whose older
value is null need no entry: a missing record reads as null)."""


def trained_vnet_info(config: RetrainConfig, classes: Mapping[int, str]) -> VNetInfo:
    """What the model file of a V-Net trained with ``config`` records (architecture, patch, spacing, options)."""
    return VNetInfo(classes=dict(classes), patch_size=tuple(config.patch_size), n_filters=config.n_filters,
                    normalization=config.normalization, spacing=config.spacing,
                    downsampling=config.downsampling or REFERENCE_DOWNSAMPLING,
                    conv_kernels=config.conv_kernels or REFERENCE_CONV_KERNELS,
                    intensity_window=config.intensity_window, training=to_dict(config))


def learning_rate(iteration: int, config: RetrainConfig) -> float:
    """The learning rate of the 0-based ``iteration`` (the references update it after each iteration)."""
    if config.lr_schedule == "poly":
        return config.lr * (1.0 - iteration / config.iterations) ** config.lr_power
    return config.lr * config.lr_gamma ** (iteration // config.lr_step)


# ---------------------------------------------------------------------------------------------------------------
# Data


class _Stream:
    """Indices 0 … n−1 in fresh random permutations, one after another, without end."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.order: List[int] = []
        self.position = 0

    def take(self, count: int, rng: np.random.Generator) -> List[int]:
        taken = []
        for _ in range(count):
            if self.position == len(self.order):
                self.order = [int(i) for i in rng.permutation(self.n)]
                self.position = 0
            taken.append(self.order[self.position])
            self.position += 1
        return taken


class TwoStreamSampler:
    """Batches of ``batch_labeled`` labeled and ``batch_unlabeled`` unlabeled case indices, drawn from ``rng``.

    Within a stream every case comes once per permutation; a batch larger than its stream's case count repeats
    cases. The state (:meth:`state_dict`) is the current permutations and positions; the generator is the caller's.
    """

    def __init__(self, n_labeled: int, n_unlabeled: int, batch_labeled: int, batch_unlabeled: int) -> None:
        if n_labeled < 1 or (batch_unlabeled > 0 and n_unlabeled < 1):
            raise ValueError(f"cannot draw {batch_labeled} + {batch_unlabeled} from {n_labeled} labeled and "
                             f"{n_unlabeled} unlabeled cases")
        self.streams = (_Stream(n_labeled), _Stream(n_unlabeled))
        self.batch_sizes = (batch_labeled, batch_unlabeled)

    def next_batch(self, rng: np.random.Generator) -> Tuple[List[int], List[int]]:
        labeled, unlabeled = (s.take(n, rng) for s, n in zip(self.streams, self.batch_sizes))
        return labeled, unlabeled

    def state_dict(self) -> Dict[str, Any]:
        return {"orders": [s.order for s in self.streams], "positions": [s.position for s in self.streams]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for stream, order, position in zip(self.streams, state["orders"], state["positions"]):
            stream.order, stream.position = list(order), int(position)


@dataclass
class TrainingCase:
    """A case in memory: its z-scored image and its target as class indices (label, pseudo-label or None)."""

    name: str
    image: np.ndarray
    target: Optional[np.ndarray]


@dataclass
class Batch:
    """One training batch on the device: images (labeled first), labels of the labeled crops, and the
    pseudo-labels of the unlabeled crops with a flag per crop (None when the run uses none)."""

    images: torch.Tensor
    labels: torch.Tensor
    pseudo_labels: Optional[torch.Tensor]
    has_pseudo_label: Optional[torch.Tensor]


def class_index_table(classes: Mapping[int, str]) -> np.ndarray:
    """A lookup table uint8 value → channel index (background 0, the c-th smallest class value c; others 255)."""
    table = np.full(256, 255, dtype=np.uint8)
    table[0] = 0
    for index, value in enumerate(sorted(classes), start=1):
        table[value] = index
    return table


def _class_indices(labels: np.ndarray, table: np.ndarray, path: Optional[Path]) -> np.ndarray:
    if labels.min() < 0 or labels.max() > 255:
        raise InputError(f"label values {labels.min()}..{labels.max()} lie outside 0..255", path, "labels")
    indices = table[labels.astype(np.uint8)]
    if (indices == 255).any():
        unknown = sorted(set(np.unique(labels[indices == 255]).tolist()))
        raise InputError(f"label values {unknown} are not classes of the cohort", path, "labels")
    return indices


def required_pseudo_labels(cohort: Cohort, run: RunFolder) -> Dict[str, Path]:
    """Case name → the run folder's cached pseudo-label of every unlabeled case; InputError naming the first
    missing file (stage P writes them)."""
    paths = {case.name: run.pseudo_label(case.name) for case in cohort.unlabeled}
    for path in paths.values():
        if not path.is_file():
            raise InputError("pseudo-label missing: this method needs the cached SAM pseudo-label of every "
                             "unlabeled case (run the pseudolabel stage first)", path)
    return paths


def class_volumes(path: Path, classes: Sequence[int]) -> Dict[int, float]:
    """Class value → its volume in mm³ in the label file ``path``."""
    label = read_volume(path)
    voxel = float(np.prod(label.spacing))
    counts = np.bincount(label.array.ravel().astype(np.int64), minlength=max(classes) + 1)
    return {value: float(counts[value]) * voxel for value in classes}


def plausible_pseudo_labels(cohort: Cohort, pseudo_labels: Mapping[str, Path], min_share: float,
                            progress: Progress = ignore_progress) -> Dict[str, Path]:
    """``pseudo_labels`` without those that give some class less than ``min_share`` of the smallest volume the class
    has in the labeled volumes (``retrain.pseudo_label_min_volume``); a progress event names each one left out."""
    classes = sorted(int(value) for value in cohort.classes)
    labeled = [class_volumes(case.label, classes) for case in cohort.labeled]
    floor = {value: min_share * min(volumes[value] for volumes in labeled) for value in classes}
    kept = {}
    for name, path in sorted(pseudo_labels.items()):
        volumes = class_volumes(path, classes)
        short = [value for value in classes if volumes[value] < floor[value]]
        if not short:
            kept[name] = path
            continue
        shares = ", ".join(f"class {value} {volumes[value] / (floor[value] / min_share):.2f}" for value in short)
        progress(ProgressEvent(STAGE, 0, 1, message=f"{name}: its pseudo-label is left out of the SFR term ({shares} "
                                                    f"of the smallest labeled volume, below {min_share})"))
    return kept


def load_training_cases(cohort: Cohort, cases: Sequence[Case], pseudo_labels: Mapping[str, Path],
                        spacing: Optional[Tuple[float, float, float]] = None,
                        intensity_window: Optional[Sequence[float]] = None) -> List[TrainingCase]:
    """The cases normalised (:func:`~SFRSegmentLib.data.patches.normalize_intensities` with ``intensity_window``), with
    their label (labeled cases) or pseudo-label (when one is given) as class indices; with ``spacing``, image and
    target resampled to that working voxel size first."""
    table = class_index_table(cohort.classes)
    loaded = []
    for case in cases:
        image, label = load_case(case, cohort.classes)
        if label is None and case.name in pseudo_labels:
            label = read_volume(pseudo_labels[case.name])
            check_same_geometry(image, label)
        target = None
        if label is not None:
            target = _class_indices(label.array, table, label.path)
            if spacing is not None:
                target = to_working_grid(label.with_array(target), spacing, labels=True).array
        if spacing is not None:
            image = to_working_grid(image, spacing)
        loaded.append(TrainingCase(case.name, normalize_intensities(image.array, intensity_window), target))
    return loaded


def _training_crop(case: TrainingCase, rng: np.random.Generator,
                   config: RetrainConfig) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """A random crop of ``case`` and its target, augmented as ``config`` says."""
    image, target = sample_patch(case.image, case.target, config.patch_size, rng, config.rot_flip)
    if config.augmentation == "strong":
        image, target = augment_crop(image, target, rng, config.in_plane_rotation_only)
    return image, target


def draw_batch(labeled: Sequence[TrainingCase], unlabeled: Sequence[TrainingCase], sampler: TwoStreamSampler,
               rng: np.random.Generator, config: RetrainConfig, with_pseudo_labels: bool,
               device: torch.device) -> Batch:
    """Cut the next batch: each crop and its target with one rotation, flip and corner. Under torchrun the sampler
    draws the global batch, every rank cuts all of it (the same generator on every rank) and keeps its own slice of
    each stream."""
    labeled_ids, unlabeled_ids = sampler.next_batch(rng)
    crops = [_training_crop(labeled[i], rng, config) for i in labeled_ids]
    unlabeled_crops = [_training_crop(unlabeled[i], rng, config) for i in unlabeled_ids]
    crops = crops[rank_slice(len(crops))]
    labeled_ids = labeled_ids[rank_slice(len(labeled_ids))]
    crops += unlabeled_crops[rank_slice(len(unlabeled_crops))]
    images = torch.from_numpy(np.stack([image for image, _ in crops]))[:, None].to(device)
    labels = torch.from_numpy(np.stack([target for _, target in crops[: len(labeled_ids)]])).long().to(device)
    if not with_pseudo_labels:
        return Batch(images, labels, None, None)
    unlabeled_targets = [target for _, target in crops[len(labeled_ids):]]
    has = torch.tensor([t is not None for t in unlabeled_targets], dtype=torch.bool, device=device)
    blank = np.zeros(config.patch_size, dtype=np.uint8)
    pseudo = np.stack([blank if t is None else t for t in unlabeled_targets])
    return Batch(images, labels, torch.from_numpy(pseudo).long().to(device), has)


# ---------------------------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """One re-training's state (seeded student, method, optimiser, sampler, generator, log, iteration) and its
    optimiser step. Its :meth:`state_dict` is what a checkpoint holds besides the configuration."""

    def __init__(self, config: RetrainConfig, info: VNetInfo, n_labeled: int, n_unlabeled: int,
                 device: torch.device) -> None:
        torch.manual_seed(config.seed)
        self.config, self.device = config, device
        self.student = info.build_model()
        # Read once: the saved V-Net averages with these very weights (init_weights_share), not a later file.
        self.start = _initial_weights(config.init_weights, info) if config.init_weights is not None else None
        if self.start is not None:
            self.student.load_state_dict(self.start)
        self.student = self.student.to(device, memory_format=MEMORY_FORMAT).train()
        here = ranks()
        if here.is_distributed and device.type == "cuda":
            # Batch statistics over the global batch, as in one process (torch's SyncBatchNorm is GPU-only).
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        self.method = build_method(config.ssl_method, config.uses_pseudo_labels, self.student, config.ssl,
                                   config.iterations)
        if config.batchnorm_statistics == "frozen":
            if config.init_weights is None:
                raise InputError("frozen BatchNorm statistics need trained ones: give init_weights, or use batch",
                                 field="retrain.batchnorm_statistics")
            for network in (self.student, *self.method.networks()):
                freeze_batchnorm(network)
        self.forward_model = data_parallel(self.student)
        if here.is_distributed:
            torch.manual_seed(config.seed + here.rank)  # distinct dropout and teacher noise on each rank
        batch_unlabeled = config.batch_unlabeled if self.method.uses_unlabeled else 0
        if self.method.uses_unlabeled and n_unlabeled == 0:
            raise InputError(f"method {config.method} learns from unlabeled cases but the cohort has none",
                             field="method")
        if self.method.uses_unlabeled and batch_unlabeled == 0:
            raise InputError(f"method {config.method} needs batch_unlabeled of at least 1", field="batch_unlabeled")
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        processes = here.world_size
        self.sampler = TwoStreamSampler(n_labeled, n_unlabeled, config.batch_labeled * processes,
                                        batch_unlabeled * processes)
        self.rng = np.random.default_rng(config.seed)
        self.log: List[Dict[str, float]] = []
        self.iteration = 0

    def step(self, batch: Batch) -> Dict[str, float]:
        """One optimiser step on ``batch``; appends and returns the log row (iteration counted from 1, lr, total
        loss, each term and its weight)."""
        lr = learning_rate(self.iteration, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_labeled = batch.labels.shape[0]
        images = batch.images.contiguous(memory_format=MEMORY_FORMAT)
        with autocast_context(self.device, self.config.precision):
            logits = self.forward_model(images).float()
            step = Step(self.iteration, images, logits, n_labeled, batch.pseudo_labels, batch.has_pseudo_label)
            terms = self.method.losses(step)
        supervised = segmentation_loss(logits[:n_labeled], batch.labels)
        loss = supervised + sum(term.weight * term.value for term in terms)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.after_step(self.student, self.iteration)
        for network in (self.student, *self.method.networks()):
            broadcast_buffers(network)  # BatchNorm statistics follow rank 0's, so every rank holds the same state
        self.iteration += 1
        values = {"loss": loss.item(), "supervised": supervised.item(), **{t.name: t.value.item() for t in terms}}
        row = {"iteration": self.iteration, "lr": lr, **dict(zip(values, mean_over_ranks(list(values.values()))))}
        for term in terms:
            row[f"{term.name}_weight"] = term.weight
        self.log.append(row)
        return row

    def state_dict(self) -> Dict[str, Any]:
        return {
            "iteration": self.iteration,
            "student": self.student.state_dict(),
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": gather_to_main(torch.get_rng_state()),
            "cuda_rng": gather_to_main(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []),
            "processes": ranks().world_size,
            "log": self.log,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.rng.bit_generator.state = state["numpy_rng"]
        rank = ranks().rank
        torch.set_rng_state(state["torch_rng"][rank].cpu())
        if state["cuda_rng"][rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"][rank]])
        self.log = list(state["log"])
        self.iteration = int(state["iteration"])


def retrain(cohort: Cohort, run: RunFolder, config: RetrainConfig, pseudo_labels: Optional[Mapping[str, Path]] = None,
            progress: Progress = ignore_progress, cancellation: Optional[Cancellation] = None) -> Path:
    """Run (or resume) stage R on ``cohort`` into ``run``; returns the path of the trained V-Net (``vnet.pt``).
    ``config`` is a resolved section (patch and schedule set, :meth:`SFRSegmentLib.base.config.RunConfig.resolved`).

    ``pseudo_labels`` maps unlabeled case names to label files; by default an ``sfr*`` method takes the run
    folder's cached pseudo-label of every unlabeled case (InputError naming a missing one). Unlabeled cases absent
    from an explicit mapping are trained without the pseudo-label term (SFR+). A cancellation request saves a
    checkpoint and raises :class:`~SFRSegmentLib.base.progress.Cancelled`.
    """
    with_pseudo_labels = config.uses_pseudo_labels
    if with_pseudo_labels and pseudo_labels is None:
        pseudo_labels = required_pseudo_labels(cohort, run)
    pseudo_labels = dict(pseudo_labels or {}) if with_pseudo_labels else {}
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    info = trained_vnet_info(config, cohort.classes)
    trainer = Trainer(config, info, len(cohort.labeled), len(cohort.unlabeled), device)
    inputs = retrain_inputs(config, cohort, pseudo_labels)
    if reuse_trained([run.vnet_weights, vnet_info_path(run.vnet_weights)], inputs, STAGE, config.iterations, progress,
                     "already re-trained", "the V-Net is stale ({reason}): re-training it again"):
        return run.vnet_weights
    if config.pseudo_label_min_volume:  # a function of the pseudo-labels, which the inputs identify
        pseudo_labels = plausible_pseudo_labels(cohort, pseudo_labels, config.pseudo_label_min_volume, progress)
    labeled = load_training_cases(cohort, cohort.labeled, pseudo_labels, config.spacing, config.intensity_window)
    unlabeled = (load_training_cases(cohort, cohort.unlabeled, pseudo_labels, config.spacing,
                                     config.intensity_window)
                 if trainer.method.uses_unlabeled else [])
    state = load_checkpoint(run.retrain_checkpoint, inputs, STAGE, config.iterations, progress, device)
    if state is not None:
        trainer.load_state_dict(state)
        progress(ProgressEvent(STAGE, trainer.iteration, config.iterations,
                               message=f"resumed at iteration {trainer.iteration}"))

    def step() -> float:
        batch = draw_batch(labeled, unlabeled, trainer.sampler, trainer.rng, config, with_pseudo_labels, device)
        return trainer.step(batch)["loss"]

    train(STAGE, "re-training", lambda: trainer.iteration, config.iterations, config.checkpoint_every, step,
          lambda: _save_checkpoint(trainer, run, inputs), progress, cancellation)
    if ranks().is_main:
        save_vnet(run.vnet_weights, with_start_share(trainer, info), info)
        write_record([run.vnet_weights, vnet_info_path(run.vnet_weights)], inputs)
    barrier()
    return run.vnet_weights


def freeze_batchnorm(network: nn.Module) -> None:
    """Make every BatchNorm of ``network`` normalise with its running statistics and keep them (eval mode); its
    scale and shift still train."""
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def with_start_share(trainer: Trainer, info: VNetInfo) -> nn.Module:
    """The V-Net to save: the student, or with ``init_weights_share`` s > 0 a new V-Net whose every floating tensor
    (weights and BatchNorm statistics) is s × the start's + (1 − s) × the student's: weight interpolation between
    the weights training started from and where it ended."""
    share = trainer.config.init_weights_share
    if not share:
        return trainer.student
    model = info.build_model()
    model.load_state_dict({name: torch.lerp(tensor, trainer.start[name].to(tensor), share)
                           if tensor.is_floating_point() else tensor
                           for name, tensor in trainer.student.state_dict().items()})
    return model


def _initial_weights(path: str, info: VNetInfo) -> Dict[str, torch.Tensor]:
    """The weights of the V-Net file ``path``, after checking it is this architecture for these classes."""
    model, stored = load_vnet(path)
    mismatch = [name for name in ("classes", "n_filters", "normalization")
                if getattr(stored, name) != getattr(info, name)]
    if mismatch:
        raise InputError(f"this V-Net differs from the one to train in {', '.join(mismatch)}; start from a V-Net "
                         "trained with the same classes and architecture", path, "retrain.init_weights")
    return model.state_dict()


def retrain_inputs(config: RetrainConfig, cohort: Cohort, pseudo_labels: Mapping[str, Path]) -> Inputs:
    """What determines the trained V-Net (:class:`~SFRSegmentLib.storage.provenance.Inputs`): the options except
    :data:`EXECUTION_ONLY`, the class values and the number of processes (the global batch is the per-process batch
    × processes); the labeled images and labels, the unlabeled images when the method learns from them; the identity
    of each pseudo-label used. The method is recorded by its name (``method``, the two fields' alias), as records
    made before the two fields existed hold it, so that those V-Nets stay current."""
    options = {name: value for name, value in to_dict(config).items()
               if name not in EXECUTION_ONLY + ("ssl_method", "pseudo_labels")}
    options["method"] = config.method
    options["class_values"] = sorted(int(v) for v in cohort.classes)
    options["processes"] = ranks().world_size
    files = case_files(cohort.labeled)
    if learns_from_unlabeled(config.ssl_method, config.uses_pseudo_labels):
        files.update(case_files(cohort.unlabeled, labels=False))
    upstream = {f"pseudo-label of case {name}": identity_of(path) for name, path in sorted(pseudo_labels.items())}
    if config.init_weights is not None:
        upstream["V-Net re-training continues from"] = identity_of(config.init_weights)
    return Inputs(options, files, upstream, ADDED_OPTIONS)


def _save_checkpoint(trainer: Trainer, run: RunFolder, inputs: Inputs) -> None:
    """Every rank takes part (the state gathers each rank's random generator states); rank 0 writes."""
    state = trainer.state_dict()
    save_checkpoint(run.retrain_checkpoint, state, inputs, run.retrain_log, state["log"])


# ---------------------------------------------------------------------------------------------------------------
# What the run's estimate asks of this stage


def iterations_left(run: RunFolder, cohort: Cohort, config: RetrainConfig) -> int:
    """Re-training iterations still to do in ``run`` (all of them while a pseudo-label it needs is missing)."""
    pseudo_labels = {case.name: run.pseudo_label(case.name) for case in cohort.unlabeled} \
        if config.uses_pseudo_labels else {}
    if not all(path.is_file() for path in pseudo_labels.values()):
        return config.iterations
    inputs = retrain_inputs(config, cohort, pseudo_labels)
    return remaining(config.iterations, [run.vnet_weights, vnet_info_path(run.vnet_weights)],
                     run.retrain_checkpoint, inputs)


def timed_step(config: RetrainConfig, classes: Mapping[int, str], device: torch.device) -> Callable[[], object]:
    """One iteration of this stage's ``Trainer`` with ``config`` on batches drawn from synthetic patches, for
    timing: the time of a step does not depend on the voxels."""
    trainer = Trainer(config, trained_vnet_info(config, classes), 1, 1, device)
    image, target = synthetic_case(config.patch_size)
    labeled = [TrainingCase("labeled", image, target)]
    unlabeled = [TrainingCase("unlabeled", image, target if config.uses_pseudo_labels else None)]
    return lambda: trainer.step(draw_batch(labeled, unlabeled, trainer.sampler, trainer.rng, config,
                                           config.uses_pseudo_labels, device))
