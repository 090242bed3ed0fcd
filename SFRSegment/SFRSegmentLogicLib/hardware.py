"""Whether this computer has a CUDA GPU, asked of the NVIDIA driver itself.

Standard library only (ctypes), so the module can ask before torch is installed, and quickly: importing torch takes
seconds, the driver answers in milliseconds. The answer only chooses the preset a new parameter node starts on; the
engine picks its device with torch (``device = "auto"``).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Sequence

CUDA_DRIVER_LIBRARIES = {"win32": ("nvcuda.dll",), "linux": ("libcuda.so.1",)}.get(sys.platform, ())
"""The NVIDIA driver's CUDA library on this platform (none on macOS, which has no CUDA)."""


def has_cuda_gpu(libraries: Sequence[str] = CUDA_DRIVER_LIBRARIES) -> bool:
    """Whether the CUDA driver (the first of ``libraries`` that loads) reports at least one GPU.

    False without a driver. Like torch, it honours ``CUDA_VISIBLE_DEVICES``; nothing is allocated on a GPU (``cuInit``
    creates no context).
    """
    for name in libraries:
        try:
            driver = ctypes.CDLL(name)
            count = ctypes.c_int(0)
            return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
        except (OSError, AttributeError):  # not there, or not a CUDA driver
            continue
    return False
