"""The V-Net of the semi-supervised segmentation literature (UA-MT's ``networks/vnet.py``), and its file.

UA-MT, DTC, SASSNet, MC-Net, SS-Net, BCP and SFR all re-train this network, so results are comparable only with
it: 9,448,866 parameters for 1 input and 2 output channels with BatchNorm or GroupNorm (9,443,266 without
normalisation or with InstanceNorm, which has no affine parameters there). MONAI's ``VNet`` is a different,
5× larger design (5³ kernels, residual stages, concatenated skips, dropout that cannot be switched off).

Layout (``f`` = ``n_filters``):

* encoder: conv stages of 1, 2, 3, 3, 3 convolutions (3×3×3, padding 1, then norm and ReLU) at widths
  f, 2f, 4f, 8f, 16f, separated by 2×2×2 stride-2 convolutions (+ norm + ReLU);
* decoder: 2×2×2 stride-2 transposed convolutions (+ norm + ReLU), the encoder feature of the same scale
  **added** (not concatenated), then conv stages of 3, 3, 2, 1 convolutions;
* ``downsampling`` may give each of the four down- and upsamplings its own stride per axis (kernel = stride), as
  nnU-Net does for anisotropic volumes: a stride of 1 along a thick-slice axis keeps a patch of a few 10 mm slices
  from being pooled to nothing while the in-plane axes are pooled four times. The default, 2×2×2 four times, is the
  reference; its state dict is unchanged (the kernels of a stride-1 axis have size 1, so such a V-Net's weights
  have other shapes).
* ``conv_kernels`` may give each of the five scales its own kernel (3 or 1 per axis; the decoder stage of a scale
  has its encoder stage's), as nnU-Net does: a kernel of 1 along a 10 mm slice axis while the pixels are still
  1.5 mm convolves within each slice instead of mixing slices whose content differs, and costs a third. The
  default, 3×3×3 everywhere, is the reference.
* head: a 1×1×1 convolution to ``n_classes`` logits, no activation;
* dropout (``Dropout3d``, p = 0.5) on the bottleneck output and on the last decoder feature, only when
  ``has_dropout`` (the training scripts set it, the test scripts do not).

Four downsamplings halve each spatial size four times, so every spatial size of the input must be a multiple of
16 (112×112×80 → 7×7×5 at the bottleneck), or of the product of that axis's strides
(:func:`~SFRSegmentLib.base.config.input_multiples`); :func:`check_input_shape` says so before a shape error deep inside.

Submodule names (``block_one`` … ``block_nine``, ``block_*_dw``, ``block_*_up``, ``out_conv``, each block's
``conv`` sequence) follow the reference so that state dicts of published checkpoints load unchanged.

Without autograd (inference, the Mean Teacher's teacher) the forward computes the same numbers with fewer
full-resolution activations alive at once: the decoder adds each skip in place and releases it once added, and
dropout works in place. The teacher's forward is the memory peak of a re-training step (a full-resolution
activation of a 4-crop batch is 257 MB), and in inference every allocation saved is memory the kernel does not
have to fault in again. :func:`fold_batchnorm` folds eval-mode BatchNorm into the convolutions for inference.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.flop_counter import FlopCounterMode

from ..base.choices import NORMALIZATIONS
from ..base.config import (REFERENCE_CONV_KERNELS, REFERENCE_DOWNSAMPLING, ConvKernels, Downsampling, Shape,
                           input_multiples)
from ..base.config_io import to_dict
from ..base.errors import InputError, PathLike
from ..storage.atomic import atomic_path, atomic_write_text
from ..storage.runfolder import RunFolder

GROUPNORM_GROUPS = 16
"""Groups of the reference's GroupNorm; every width (multiples of n_filters) must be divisible by it."""

DROPOUT_P = 0.5


def check_input_shape(shape: Sequence[int], n_channels: Optional[int] = None,
                      downsampling: Downsampling = REFERENCE_DOWNSAMPLING) -> None:
    """Raise ValueError unless ``shape`` is (B, C, H, W, D) with H, W, D multiples of ``input_multiples``
    (16 for the reference) and C = n_channels."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 5:
        raise ValueError(f"the V-Net expects a (batch, channels, H, W, D) tensor, got shape {shape}")
    if n_channels is not None and shape[1] != n_channels:
        raise ValueError(f"the V-Net was built for {n_channels} input channel(s), got {shape[1]} (shape {shape})")
    spatial, multiples = shape[2:], input_multiples(downsampling)
    if any(s <= 0 or s % m for s, m in zip(spatial, multiples)):
        raise ValueError(
            f"the V-Net needs spatial sizes that are positive multiples of {multiples} (the products of its "
            f"downsampling strides {[list(s) for s in downsampling]}), got {spatial}; use a patch size such as "
            f"{tuple(7 * m for m in multiples)} or pad the input"
        )


def _normalization(kind: str, channels: int) -> Optional[nn.Module]:
    if kind == "batchnorm":
        return nn.BatchNorm3d(channels)
    if kind == "groupnorm":
        return nn.GroupNorm(num_groups=GROUPNORM_GROUPS, num_channels=channels)
    if kind == "instancenorm":
        return nn.InstanceNorm3d(channels)
    return None


def _layer(conv: nn.Module, channels: int, normalization: str) -> List[nn.Module]:
    """``conv`` followed by the normalisation (if any) and ReLU, as every layer of the reference."""
    norm = _normalization(normalization, channels)
    return [conv] + ([norm] if norm is not None else []) + [nn.ReLU(inplace=True)]


class _Block(nn.Module):
    """A sequence of layers kept under the attribute ``conv``, as the reference names it (for its state dicts)."""

    def __init__(self, layers: List[nn.Module]):
        super().__init__()
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _conv_stage(n_convs: int, in_channels: int, out_channels: int, normalization: str,
                kernel: Shape = (3, 3, 3)) -> _Block:
    """``n_convs`` convolutions of ``kernel`` (3×3×3 in the reference; padded to keep the size), the first from
    ``in_channels``, each with norm and ReLU."""
    layers: List[nn.Module] = []
    for index in range(n_convs):
        conv = nn.Conv3d(in_channels if index == 0 else out_channels, out_channels, kernel_size=kernel,
                         padding=tuple(k // 2 for k in kernel))
        layers += _layer(conv, out_channels, normalization)
    return _Block(layers)


def _downsampling(in_channels: int, out_channels: int, normalization: str, stride: Shape) -> _Block:
    """Convolution with kernel = stride (2×2×2 in the reference), norm and ReLU: divides each size by its stride."""
    conv = nn.Conv3d(in_channels, out_channels, kernel_size=stride, stride=stride)
    return _Block(_layer(conv, out_channels, normalization))


def _upsampling(in_channels: int, out_channels: int, normalization: str, stride: Shape) -> _Block:
    """Transposed convolution with kernel = stride, norm and ReLU: multiplies each size by its stride."""
    deconv = nn.ConvTranspose3d(in_channels, out_channels, kernel_size=stride, stride=stride)
    return _Block(_layer(deconv, out_channels, normalization))


class VNet(nn.Module):
    """The literature V-Net: ``(B, n_channels, H, W, D)`` → logits ``(B, n_classes, H, W, D)``.

    ``n_classes`` counts the background: K foreground classes need ``n_classes = K + 1``. ``has_dropout`` is a
    plain attribute; Mean-Teacher-style code may switch it between forward passes.
    """

    def __init__(
        self,
        n_channels: int = 1,
        n_classes: int = 2,
        n_filters: int = 16,
        normalization: str = "batchnorm",
        has_dropout: bool = False,
        downsampling: Downsampling = REFERENCE_DOWNSAMPLING,
        conv_kernels: ConvKernels = REFERENCE_CONV_KERNELS,
    ):
        super().__init__()
        downsampling = tuple(tuple(int(s) for s in strides) for strides in downsampling)
        if len(downsampling) != 4 or any(len(s) != 3 or min(s) < 1 for s in downsampling):
            raise ValueError(f"downsampling must be 4 strides (H, W, D) of positive integers, got {downsampling}")
        conv_kernels = tuple(tuple(int(k) for k in kernel) for kernel in conv_kernels)
        if len(conv_kernels) != 5 or any(len(k) != 3 or not all(n > 0 and n % 2 for n in k) for k in conv_kernels):
            raise ValueError(f"conv_kernels must be 5 kernels (H, W, D) of odd positive sizes, got {conv_kernels}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if normalization == "groupnorm" and n_filters % GROUPNORM_GROUPS:
            raise ValueError(
                f"groupnorm uses {GROUPNORM_GROUPS} groups, so n_filters must be a multiple of {GROUPNORM_GROUPS}, "
                f"got {n_filters}"
            )
        if min(n_channels, n_classes, n_filters) < 1:
            raise ValueError(
                f"n_channels, n_classes and n_filters must be positive, got {n_channels}, {n_classes}, {n_filters}"
            )
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.has_dropout = has_dropout
        self.downsampling = downsampling
        self.conv_kernels = conv_kernels
        f, norm, k = n_filters, normalization, conv_kernels
        down, up = downsampling, downsampling[::-1]

        self.block_one = _conv_stage(1, n_channels, f, norm, k[0])
        self.block_one_dw = _downsampling(f, 2 * f, norm, down[0])
        self.block_two = _conv_stage(2, 2 * f, 2 * f, norm, k[1])
        self.block_two_dw = _downsampling(2 * f, 4 * f, norm, down[1])
        self.block_three = _conv_stage(3, 4 * f, 4 * f, norm, k[2])
        self.block_three_dw = _downsampling(4 * f, 8 * f, norm, down[2])
        self.block_four = _conv_stage(3, 8 * f, 8 * f, norm, k[3])
        self.block_four_dw = _downsampling(8 * f, 16 * f, norm, down[3])
        self.block_five = _conv_stage(3, 16 * f, 16 * f, norm, k[4])

        self.block_five_up = _upsampling(16 * f, 8 * f, norm, up[0])
        self.block_six = _conv_stage(3, 8 * f, 8 * f, norm, k[3])
        self.block_six_up = _upsampling(8 * f, 4 * f, norm, up[1])
        self.block_seven = _conv_stage(3, 4 * f, 4 * f, norm, k[2])
        self.block_seven_up = _upsampling(4 * f, 2 * f, norm, up[2])
        self.block_eight = _conv_stage(2, 2 * f, 2 * f, norm, k[1])
        self.block_eight_up = _upsampling(2 * f, f, norm, up[3])
        self.block_nine = _conv_stage(1, f, f, norm, k[0])
        self.out_conv = nn.Conv3d(f, n_classes, kernel_size=1)

        self.dropout = nn.Dropout3d(p=DROPOUT_P)

    def encoder(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The five encoder features, finest first; the bottleneck one passes through dropout if enabled."""
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self.block_five(self.block_four_dw(x4))
        return [x1, x2, x3, x4, self._dropout(x5)]

    def decoder(self, features: List[torch.Tensor]) -> torch.Tensor:
        """Logits from the encoder features: upsample, add the skip, convolve; dropout before the head if enabled.

        The list is consumed (emptied, coarsest first) so that without autograd each skip is freed once added."""
        in_place = not torch.is_grad_enabled()
        x = features.pop()
        for upsampling, stage in ((self.block_five_up, self.block_six), (self.block_six_up, self.block_seven),
                                  (self.block_seven_up, self.block_eight), (self.block_eight_up, self.block_nine)):
            x = upsampling(x)
            # With autograd, ReLU's backward needs the upsampled tensor as it is: add out of place.
            x = stage(x.add_(features.pop()) if in_place else x + features.pop())
        return self.out_conv(self._dropout(x))

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Feature dropout if ``has_dropout`` (and in train mode); in place without autograd, with the same mask and
        values (with autograd the input must stay as it is: the ReLU before it needs it for its backward)."""
        if not self.has_dropout:
            return x
        return F.dropout3d(x, self.dropout.p, self.dropout.training, inplace=not torch.is_grad_enabled())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (no softmax) of shape (B, n_classes, H, W, D); H, W and D must be multiples of
        ``input_multiples(downsampling)`` (16 for the reference)."""
        check_input_shape(x.shape, self.n_channels, self.downsampling)
        return self.decoder(self.encoder(x))


def forward_flops(patch: Shape, n_filters: int = 16, downsampling: Downsampling = REFERENCE_DOWNSAMPLING,
                  conv_kernels: ConvKernels = REFERENCE_CONV_KERNELS) -> int:
    """Floating-point operations of one V-Net forward of one ``patch`` (torch's FlopCounterMode on the meta
    device: counted, not run, in milliseconds): what a planned patch costs beside the preset's."""
    with torch.device("meta"):
        model = VNet(n_filters=n_filters, downsampling=downsampling, conv_kernels=conv_kernels)
        patches = torch.empty(1, 1, *patch)
    with FlopCounterMode(display=False) as counter:
        model(patches)
    return counter.get_total_flops()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` in which every BatchNorm3d that follows a (transposed) convolution in a
    sequence is folded into it (running statistics and affine into weight and bias, torch's ``fuse_conv_bn_eval``):
    the eval-mode function up to float rounding, without the BatchNorm's pass over every activation and the
    allocation of its output (~20 % of a CPU forward). For inference only: the copy has no BatchNorm left to train."""
    folded = copy.deepcopy(model).eval()
    for sequence in [module for module in folded.modules() if isinstance(module, nn.Sequential)]:
        for index in reversed(range(1, len(sequence))):
            conv, norm = sequence[index - 1], sequence[index]
            if isinstance(norm, nn.BatchNorm3d) and isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)):
                sequence[index - 1] = fuse_conv_bn_eval(conv, norm, transpose=isinstance(conv, nn.ConvTranspose3d))
                del sequence[index]
    return folded


# ---------------------------------------------------------------------------------------------------------------
# The V-Net file: weights and what they mean

MODEL_FORMAT = "sfrsegment-vnet/1"


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
    probabilities back (:mod:`SFRSegmentLib.data.resample`). None: each image's own grid."""
    downsampling: Downsampling = REFERENCE_DOWNSAMPLING
    """The strides of the four downsamplings (:class:`VNet`); files made before it existed have the reference's."""
    conv_kernels: ConvKernels = REFERENCE_CONV_KERNELS
    """The convolution kernels of the five scales (:class:`VNet`); files made before it existed have the
    reference's."""
    intensity_window: Optional[Tuple[float, float, float, float]] = None
    """The input normalisation it was trained with (:func:`~SFRSegmentLib.data.patches.normalize_intensities`): None
    z-scores each volume (files made before it existed too)."""
    training: Dict[str, Any] = field(default_factory=dict)
    """The re-training configuration (for the record)."""

    @property
    def class_values(self) -> Tuple[int, ...]:
        return tuple(sorted(self.classes))

    def build_model(self) -> VNet:
        """An untrained V-Net of this architecture (K+1 outputs)."""
        return VNet(n_channels=1, n_classes=len(self.classes) + 1, n_filters=self.n_filters,
                    normalization=self.normalization, has_dropout=True, downsampling=self.downsampling,
                    conv_kernels=self.conv_kernels)


MEMORY_FORMAT = torch.channels_last_3d
"""Models and their inputs run channels-last: the same numbers (to float rounding), faster convolutions on CPU
(oneDNN) and with bf16."""


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
        downsampling=tuple(tuple(strides) for strides in record.get("downsampling", REFERENCE_DOWNSAMPLING)),
        conv_kernels=tuple(tuple(kernel) for kernel in record.get("conv_kernels", REFERENCE_CONV_KERNELS)),
        intensity_window=tuple(record["intensity_window"]) if record.get("intensity_window") else None,
        training=record["training"],
    )
