"""LoRA on the q and v parts of SAM's fused qkv projections, as SFR fine-tunes SAM (method docs/sfr-method.md §2).

Every image-encoder block computes q, k and v with one ``Linear(dim, 3·dim)``. :class:`LoRAQKV` wraps it and adds a
rank-r bypass B·A to the q third and another to the v third; k is untouched. A is Kaiming-uniform (a = √5), B is
zero, so a freshly wrapped model computes exactly what SAM computes; there is no α/r scaling.

Fine-tuning trains the LoRA factors, the prompt encoder and the mask decoder; everything else in the image encoder is
frozen. :func:`trainable_state_dict` saves just those weights (a few MB, instead of SAM's 360 MB), and
:func:`merge_lora` folds B·A into the qkv weights for inference, giving back SAM's plain architecture.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, Iterator, List, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...base.errors import InputError

# The modules of a SAM model that fine-tuning trains in full (parameters and buffers are saved).
TRAINABLE_MODULES: Tuple[str, ...] = ("prompt_encoder", "mask_decoder")


class LoRAQKV(nn.Module):
    """A fused qkv ``Linear`` plus rank-``rank`` LoRA bypasses on its q and v outputs.

    The fused output is ``groups`` blocks of [q k v], each ``dim / groups`` wide: one block in SAM's ViT
    (``[q | k | v]``), one per head in TinyViT (``[q_0 k_0 v_0 q_1 …]``, :mod:`SFRSegmentLib.models.sam.tiny_vit`).
    output = qkv(x) + the q and v parts of [B_q A_q x, 0, B_v A_v x], each placed in its group.
    """

    LORA_PARAMETERS: Tuple[str, ...] = ("a_q", "b_q", "a_v", "b_v")

    def __init__(self, qkv: nn.Linear, rank: int, groups: int = 1) -> None:
        super().__init__()
        if qkv.out_features != 3 * qkv.in_features:
            raise ValueError(f"expected a fused qkv Linear(d, 3d), got Linear({qkv.in_features}, {qkv.out_features})")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        if groups < 1 or qkv.in_features % groups:
            raise ValueError(f"{groups} [q k v] groups do not divide the width {qkv.in_features}")
        self.base = qkv
        self.dim = qkv.in_features
        self.rank = rank
        self.groups = groups
        factory = {"device": qkv.weight.device, "dtype": qkv.weight.dtype}
        self.a_q = nn.Parameter(torch.empty(rank, self.dim, **factory))
        self.b_q = nn.Parameter(torch.zeros(self.dim, rank, **factory))
        self.a_v = nn.Parameter(torch.empty(rank, self.dim, **factory))
        self.b_v = nn.Parameter(torch.zeros(self.dim, rank, **factory))
        nn.init.kaiming_uniform_(self.a_q, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.a_v, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = F.linear(F.linear(x, self.a_q), self.b_q)
        v = F.linear(F.linear(x, self.a_v), self.b_v)
        return self.base(x) + self._interleave(q, v)

    def _interleave(self, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q and v (..., dim) laid out as the fused output (..., 3·dim), zeros where k goes."""
        grouped = (*q.shape[:-1], self.groups, self.dim // self.groups)
        parts = torch.stack([q.reshape(grouped), torch.zeros_like(q).reshape(grouped), v.reshape(grouped)], dim=-2)
        return parts.reshape(*q.shape[:-1], 3 * self.dim)

    def merged(self) -> nn.Linear:
        """A plain frozen ``Linear`` whose weight is qkv's with B_q·A_q and B_v·A_v added to the q and v rows."""
        merged = copy.deepcopy(self.base)
        with torch.no_grad():
            merged.weight += self._interleave((self.b_q @ self.a_q).t(), (self.b_v @ self.a_v).t()).t()
        merged.requires_grad_(False)
        return merged


def apply_lora(image_encoder: nn.Module, rank: int) -> None:
    """Wrap the ``attn.qkv`` of every block in :class:`LoRAQKV` and freeze all encoder weights but the LoRA factors.
    An attention whose fused output is laid out head by head says so by its ``qkv_groups``."""
    image_encoder.requires_grad_(False)
    for block in image_encoder.blocks:
        block.attn.qkv = LoRAQKV(block.attn.qkv, rank, getattr(block.attn, "qkv_groups", 1))


def merge_lora(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`LoRAQKV` replaced by its merged ``Linear``; ``model`` is unchanged.

    The copy has SAM's plain parameter layout (``...attn.qkv.weight``) and computes the same outputs.
    """
    merged_model = copy.deepcopy(model)
    for parent in list(merged_model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRAQKV):
                setattr(parent, name, child.merged())
    return merged_model


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The fine-tuned weights only: every LoRA factor, plus the prompt encoder and mask decoder state in full.

    Keys are ``model.state_dict()`` keys; tensors are detached copies, ready for ``torch.save``.
    """
    keys = set(_trainable_keys(model))
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items() if key in keys}


def load_trainable_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load what :func:`trainable_state_dict` saved; keys and shapes must match exactly (frozen weights are kept)."""
    full_state = model.state_dict()
    expected = {key: full_state[key] for key in _trainable_keys(model)}
    problems = describe_mismatch(expected, state_dict)
    if problems:
        raise InputError(
            f"fine-tuned SAM weights do not fit this model: {problems} "
            "(saved for another number of classes, LoRA rank or encoder?)",
            field="state_dict",
        )
    model.load_state_dict(dict(state_dict), strict=False)


def describe_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    """Missing, unexpected and wrongly shaped keys of ``given`` against ``expected``, in words; '' if it fits."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    reshaped = sorted(
        f"{key} {tuple(given[key].shape)} (model {tuple(expected[key].shape)})"
        for key in set(expected) & set(given)
        if given[key].shape != expected[key].shape
    )
    parts = [
        f"{len(keys)} {what} key(s) {_preview(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", reshaped))
        if keys
    ]
    return "; ".join(parts)


def _trainable_keys(model: nn.Module) -> Iterator[str]:
    for module_name, module in model.named_modules():
        if isinstance(module, LoRAQKV):
            yield from (f"{module_name}.{name}" for name in LoRAQKV.LORA_PARAMETERS)
    for module_name in TRAINABLE_MODULES:
        yield from (f"{module_name}.{key}" for key in getattr(model, module_name).state_dict())


def _preview(keys: List[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"
