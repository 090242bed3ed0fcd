"""Where and at which precision the networks run: the one place the engine decides the device and the autocast.

``device`` options (:func:`SFRSegmentLib.base.config.check_device`) are resolved here for every stage, and the precision
options (:data:`SFRSegmentLib.base.choices.PRECISIONS`) become an autocast context here.
"""

from __future__ import annotations

import contextlib
import functools
from typing import ContextManager

import torch

from .choices import PRECISIONS
from .config import check_device
from .errors import InputError


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where bf16 autocast is about twice as fast as
    float32 for the V-Net; elsewhere it is emulated and slower. Asked of the CPU's instruction sets: oneDNN's own
    "bf16 supported" is also true on AVX-512 CPUs without AVX512-BF16, where it emulates bf16 at about a third of
    float32's speed (a re-training iteration of 2.9 s instead of 0.93 s on such a CPU)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(torch.backends.mkldnn.is_available()
                and (capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")))


def autocast_context(device: torch.device, precision: str) -> ContextManager:
    """The context the networks' forward passes run in: bf16 autocast or nothing (see
    :data:`~SFRSegmentLib.base.choices.PRECISIONS`). The one place where the engine's precision is decided."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}", field="precision")
    bf16 = {"bf16": True, "fp32": False, "auto": device.type == "cuda",
            "bf16_if_native": device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())}[precision]
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    """The device ``name`` (:func:`SFRSegmentLib.base.config.check_device`) on this machine: ``auto`` is CUDA when
    available, else the CPU; ``cuda`` or ``cuda:N`` without CUDA (or without GPU N) is an InputError that says so."""
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name} was asked for, but CUDA is not available on this machine (no CUDA GPU, "
                             "or a torch without CUDA); use device auto or cpu", field="device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name} was asked for, but this machine has {torch.cuda.device_count()} CUDA "
                             f"GPU(s), numbered from 0", field="device")
    return device
