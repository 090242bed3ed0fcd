"""Import the real ``segment_anything`` model classes without requiring torchvision.

``segment_anything/__init__.py`` imports ``SamPredictor`` and ``SamAutomaticMaskGenerator``, which import torchvision
(for resizing and box NMS). SFR uses neither: it builds the model from ``segment_anything.modeling`` and
``segment_anything.build_sam``, which need only torch. Where torchvision is missing, or broken against the installed
torch (as on CPU-only machines with a torch wheel for which no torchvision build exists), we register the installed
``segment_anything`` folder as a package *without running its ``__init__``* and import the two submodules from it.
The classes are the installed ones, byte for byte; nothing is faked, and no ``torchvision`` module is created.
The only visible difference is that ``segment_anything.SamPredictor`` (and the other top-level re-exports) are absent
in that process; importing ``segment_anything.predictor`` still fails with torchvision's own ImportError.
"""

from __future__ import annotations

import importlib
import os
import traceback
import importlib.util
import sys
from types import ModuleType
from typing import Tuple

PACKAGE = "segment_anything"


def load_segment_anything() -> Tuple[ModuleType, ModuleType]:
    """Return the real ``(segment_anything.modeling, segment_anything.build_sam)`` modules."""
    try:
        import segment_anything  # noqa: F401  (the normal route, where torchvision works)
    except (ImportError, RuntimeError) as exc:  # a torchvision built for another torch fails with RuntimeError
        if PACKAGE in sys.modules or not _is_torchvision_error(exc):
            raise
        _register_package_without_init()
    modeling = importlib.import_module(f"{PACKAGE}.modeling")
    build_sam = importlib.import_module(f"{PACKAGE}.build_sam")
    return modeling, build_sam


def _is_torchvision_error(exc: Exception) -> bool:
    """Whether the import failed inside torchvision: missing (ImportError naming it) or installed for another
    torch (``RuntimeError: operator torchvision::nms does not exist``, raised from torchvision's own files)."""
    text = f"{getattr(exc, 'name', '')} {exc}"
    if "torchvision" in text:
        return True
    frames = traceback.extract_tb(exc.__traceback__)
    return any(f"{os.sep}torchvision{os.sep}" in frame.filename for frame in frames)


def _register_package_without_init() -> None:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed: pip install segment-anything")
    package = importlib.util.module_from_spec(spec)  # module object only; its __init__ is not executed
    sys.modules[PACKAGE] = package
