"""Faster, memory-leaner variants of SAM's image-encoder attention and blocks, installed in place.

SAM's ``Attention.forward`` materialises the (B·heads, N, N) score matrix, adds the decomposed relative-position
terms to it, and keeps the softmax for the backward pass. :class:`EfficientAttention` computes the same function with
``torch.nn.functional.scaled_dot_product_attention``, passing the decomposed relative-position bias as the additive
``attn_mask``, so that fused kernels (memory-efficient attention on CUDA) can be used. :class:`CheckpointedBlock`
recomputes each encoder block in the backward pass instead of storing its activations.

Both are subclasses that add no parameters or buffers. They are installed by swapping the ``__class__`` of the
modules already built by ``ImageEncoderViT``; parameter names, state dicts and checkpoints stay exactly SAM's.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .segment_anything_import import load_segment_anything

_modeling, _ = load_segment_anything()
_image_encoder = _modeling.image_encoder
SamAttention = _image_encoder.Attention
SamBlock = _image_encoder.Block


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, grid: Tuple[int, int]
) -> torch.Tensor:
    """SAM's decomposed relative-position term as an additive attention bias of shape (B, heads, N, N).

    ``q`` is the *unscaled* query, (B, heads, N, head_dim) with N = H·W, as in SAM's ``add_decomposed_rel_pos``:
    bias[(qh, qw), (kh, kw)] = q·Rh[qh, kh] + q·Rw[qw, kw].
    """
    height, width = grid
    batch, heads, _, head_dim = q.shape
    rel_h_table = _image_encoder.get_rel_pos(height, height, rel_pos_h)  # (H, H, head_dim)
    rel_w_table = _image_encoder.get_rel_pos(width, width, rel_pos_w)  # (W, W, head_dim)
    q_grid = q.reshape(batch, heads, height, width, head_dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rel_h_table)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rel_w_table)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # (B, heads, H, W, H_k, W_k)
    return bias.reshape(batch, heads, height * width, height * width)


class EfficientAttention(SamAttention):
    """SAM's encoder attention, computed with ``scaled_dot_product_attention``; numerically the same function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (height, width))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.reshape(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))


class CheckpointedBlock(SamBlock):
    """SAM's encoder block with activation checkpointing while gradients are recorded (non-reentrant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        return checkpoint(super().forward, x, use_reentrant=False)


def install_efficient_attention(image_encoder: nn.Module) -> None:
    """Switch every SAM ``Attention`` inside ``image_encoder`` to :class:`EfficientAttention`, in place."""
    for module in image_encoder.modules():
        if type(module) is SamAttention:
            module.__class__ = EfficientAttention


def install_gradient_checkpointing(image_encoder: nn.Module) -> None:
    """Switch every SAM ``Block`` inside ``image_encoder`` to :class:`CheckpointedBlock`, in place."""
    for module in image_encoder.modules():
        if type(module) is SamBlock:
            module.__class__ = CheckpointedBlock
