"""Faster, memory-leaner variants of SAM's image-encoder attention and blocks, installed in place.

SAM's ``Attention.forward`` materialises the (B·heads, N, N) score matrix, adds the decomposed relative-position
terms to it, and keeps the softmax for the backward pass (1.6 GB per global block at 1024², batch 2).
:class:`EfficientAttention` computes the same function without keeping any (N, N) matrix:

* on CPU (without autocast), with :func:`blockwise_rel_pos_attention`: scores, bias and softmax are formed for
  a block of queries at a time, and recomputed block by block in the backward pass;
* elsewhere, with ``torch.nn.functional.scaled_dot_product_attention``, the decomposed bias folded into q and k as
  extra channels so that the fused CUDA kernels apply.

The fold triples the channels of q, k and v in the global blocks (64 → 192, and v is zero-padded because the fused
kernels need equal widths), which on CPU costs more than the blockwise loop saves by being fused.
:class:`CheckpointedBlock` recomputes each encoder block in the backward pass instead of storing its activations.

Both are subclasses that add no parameters or buffers. They are installed by swapping the ``__class__`` of the
modules already built by ``ImageEncoderViT``; parameter names, state dicts and checkpoints stay exactly SAM's.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .segment_anything_import import load_segment_anything

_modeling, _ = load_segment_anything()
_image_encoder = _modeling.image_encoder
SamAttention = _image_encoder.Attention
SamBlock = _image_encoder.Block

SCORE_BLOCK_ELEMENTS = 1 << 22
"""Score-matrix elements formed at once by :func:`blockwise_rel_pos_attention` (16 MB in float32: large enough for
efficient matrix products, small enough to stay in cache; at the paper's shapes 2 M and 8 M were slower)."""

_softmax_into = torch.ops.aten._softmax.out


def _score_blocks(rows: int, tokens: int) -> Iterator[Tuple[slice, slice]]:
    """(batch·head rows, query rows) blocks of about ``SCORE_BLOCK_ELEMENTS`` scores, covering every (row, query).

    As many queries of one row as fit come first (1024 of the 4096 in a 1024² global block; all 196 of a 14×14
    window, with ~100 windows·heads per block): long matrix products run faster than many short ones (measured
    25 % faster than blocks of 64 queries across all rows).
    """
    query_step = min(tokens, max(32, SCORE_BLOCK_ELEMENTS // tokens))
    row_step = min(rows, max(1, SCORE_BLOCK_ELEMENTS // (query_step * tokens)))
    for row in range(0, rows, row_step):
        for query in range(0, tokens, query_step):
            yield slice(row, min(rows, row + row_step)), slice(query, min(tokens, query + query_step))


def _block_view(buffer: torch.Tensor, rows: slice, queries: slice) -> torch.Tensor:
    """A contiguous (rows, queries, keys) view at the start of ``buffer`` (``out=`` needs contiguous tensors)."""
    shape = (rows.stop - rows.start, queries.stop - queries.start, buffer.shape[-1])
    return buffer.view(-1)[: shape[0] * shape[1] * shape[2]].view(shape)


def _block_probabilities(q_scaled: torch.Tensor, k_t: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                         rows: slice, queries: slice, buffer: torch.Tensor) -> torch.Tensor:
    """softmax(scale·q·kᵀ + rel_h[q, key row] + rel_w[q, key column]) for one block, written into ``buffer``."""
    scores = _block_view(buffer, rows, queries)
    torch.bmm(q_scaled[rows, queries], k_t[rows], out=scores)
    scores.view(*scores.shape[:2], rel_h.shape[-1], rel_w.shape[-1]).add_(
        rel_h[rows, queries, :, None]).add_(rel_w[rows, queries, None, :])
    return _softmax_into(scores, -1, False, out=scores)


class _BlockwiseRelPosAttention(torch.autograd.Function):
    """Attention with a decomposed bias, one block of scores at a time; the backward recomputes each block (as
    flash attention does), so memory stays O(N) per row instead of O(N²)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                scale: float) -> torch.Tensor:
        q_scaled, k_t = q * scale, k.transpose(1, 2)
        blocks = list(_score_blocks(q.shape[0], q.shape[1]))
        scores = q.new_empty(blocks[0][0].stop, blocks[0][1].stop, k.shape[1])
        out = torch.empty(q.shape[:2] + v.shape[2:], dtype=q.dtype, device=q.device)
        for rows, queries in blocks:
            out[rows, queries] = torch.bmm(_block_probabilities(q_scaled, k_t, rel_h, rel_w, rows, queries, scores),
                                           v[rows])
        ctx.save_for_backward(q_scaled, k, v, rel_h, rel_w, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q_scaled, k, v, rel_h, rel_w, out = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        # softmax backward: dS = P ⊙ (dP − rowsum(dO ⊙ O)), with rowsum(dO ⊙ O) = rowsum(P ⊙ dP) computed once.
        row_terms = (grad_out * out).sum(-1, keepdim=True)
        k_t, v_t = k.transpose(1, 2), v.transpose(1, 2)
        grad_q, grad_k, grad_v = torch.empty_like(q_scaled), torch.zeros_like(k), torch.zeros_like(v)
        grad_rel_h, grad_rel_w = torch.empty_like(rel_h), torch.empty_like(rel_w)
        blocks = list(_score_blocks(q_scaled.shape[0], q_scaled.shape[1]))
        probabilities = q_scaled.new_empty(blocks[0][0].stop, blocks[0][1].stop, k.shape[1])
        grad_scores = torch.empty_like(probabilities)
        for rows, queries in blocks:
            p = _block_probabilities(q_scaled, k_t, rel_h, rel_w, rows, queries, probabilities)
            block_grad_out = grad_out[rows, queries]
            grad_v[rows].baddbmm_(p.transpose(1, 2), block_grad_out)
            ds = _block_view(grad_scores, rows, queries)
            torch.bmm(block_grad_out, v_t[rows], out=ds)
            ds.sub_(row_terms[rows, queries]).mul_(p)
            grad_q[rows, queries] = torch.bmm(ds, k[rows])
            grad_k[rows].baddbmm_(ds.transpose(1, 2), q_scaled[rows, queries])
            ds_grid = ds.view(*ds.shape[:2], rel_h.shape[-1], rel_w.shape[-1])
            grad_rel_h[rows, queries] = ds_grid.sum(-1)
            grad_rel_w[rows, queries] = ds_grid.sum(-2)
        return grad_q.mul_(ctx.scale), grad_k, grad_v, grad_rel_h, grad_rel_w, None


def blockwise_rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                                rel_w: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale·q·kᵀ + bias)·v with SAM's decomposed bias ``bias[i, (r, c)] = rel_h[i, r] + rel_w[i, c]``.

    q, k, v: (rows, N, head_dim), keys in row-major (r, c) order of an (H, W) grid, N = H·W;
    rel_h: (rows, N, H); rel_w: (rows, N, W). Differentiable in all five tensors.
    """
    return _BlockwiseRelPosAttention.apply(q, k, v, rel_h, rel_w, scale)


def _blockwise_applies(q: torch.Tensor) -> bool:
    """The blockwise kernel is the faster one on CPU; under autocast the folded SDPA keeps bf16 kernels."""
    return q.device.type == "cpu" and not _cpu_autocast_enabled()


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument (pyproject allows torch from 2.1)
        return torch.is_autocast_cpu_enabled()


class EfficientAttention(SamAttention):
    """SAM's encoder attention without an (N, N) matrix kept for the backward pass; numerically the same function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)  # each (B·heads, N, head_dim)
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            q_grid = q.reshape(batch * self.num_heads, height, width, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", q_grid, _image_encoder.get_rel_pos(height, height, self.rel_pos_h))
            rel_w = torch.einsum("bhwc,wkc->bhwk", q_grid, _image_encoder.get_rel_pos(width, width, self.rel_pos_w))
            rel_h, rel_w = rel_h.reshape(-1, tokens, height), rel_w.reshape(-1, tokens, width)
            if _blockwise_applies(q):
                out = blockwise_rel_pos_attention(q, k, v, rel_h, rel_w, self.scale)
            else:
                out = self._folded_sdpa(q, k, v, rel_h, rel_w, height, width)
        out = out.reshape(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(batch, height, width, -1))

    def _folded_sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                     rel_w: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # scale·q'·k' = scale·q·k + rel_h[q, kh] + rel_w[q, kw] with one-hot key cells: a bias passed as attn_mask
        # that needs a gradient would send SDPA to its slow "math" path and materialise the (N, N) matrices.
        head_dim, tokens = v.shape[-1], height * width
        index = torch.arange(tokens, device=q.device)
        key_cells = torch.cat([F.one_hot(index // width, height), F.one_hot(index % width, width)], -1).to(k.dtype)
        q = torch.cat([q, rel_h / self.scale, rel_w / self.scale], -1)
        k = torch.cat([k, key_cells.expand(k.shape[0], -1, -1)], -1)
        v = F.pad(v, (0, q.shape[-1] - head_dim))  # the fused kernels need equal q/k/v widths
        return F.scaled_dot_product_attention(q, k, v, scale=self.scale)[..., :head_dim]


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
