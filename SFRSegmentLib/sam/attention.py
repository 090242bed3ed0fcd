"""Faster, memory-leaner variants of SAM's image-encoder attention and blocks, installed in place.

SAM's ``Attention.forward`` materialises the (B·heads, N, N) score matrix, adds the decomposed relative-position
terms to it, and keeps the softmax for the backward pass. :class:`EfficientAttention` computes the same function with
``torch.nn.functional.scaled_dot_product_attention``, with the decomposed relative-position terms folded into q and k
as extra channels (no (N, N) bias is materialised), so that fused kernels can be used on CPU and CUDA. :class:`CheckpointedBlock`
recomputes each encoder block in the backward pass instead of storing its activations.

Both are subclasses that add no parameters or buffers. They are installed by swapping the ``__class__`` of the
modules already built by ``ImageEncoderViT``; parameter names, state dicts and checkpoints stay exactly SAM's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .segment_anything_import import load_segment_anything

_modeling, _ = load_segment_anything()
_image_encoder = _modeling.image_encoder
SamAttention = _image_encoder.Attention
SamBlock = _image_encoder.Block


class EfficientAttention(SamAttention):
    """SAM's encoder attention, computed with ``scaled_dot_product_attention``; numerically the same function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        head_dim = v.shape[-1]
        if self.use_rel_pos:
            # Fold the decomposed bias into q and k (scale·q'·k' = scale·q·k + q·Rh[qh, kh] + q·Rw[qw, kw]) instead of
            # passing it as attn_mask: a mask that needs a gradient sends the fused CPU kernel to the slow "math" path
            # and materialises the (B, heads, N, N) matrices.
            q_grid = q.reshape(batch, self.num_heads, height, width, head_dim)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, _image_encoder.get_rel_pos(height, height, self.rel_pos_h))
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, _image_encoder.get_rel_pos(width, width, self.rel_pos_w))
            index = torch.arange(tokens, device=x.device)
            key_cells = torch.cat([F.one_hot(index // width, height), F.one_hot(index % width, width)], -1).to(k.dtype)
            q = torch.cat([q, rel_h.reshape(batch, self.num_heads, tokens, height) / self.scale,
                           rel_w.reshape(batch, self.num_heads, tokens, width) / self.scale], -1)
            k = torch.cat([k, key_cells.expand(batch, self.num_heads, -1, -1)], -1)
            v = F.pad(v, (0, q.shape[-1] - head_dim))  # the fused CPU kernel needs equal q/k/v widths
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)[..., :head_dim]
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
