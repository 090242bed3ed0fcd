"""Named choices that the engine, its command line and the Slicer module share. Standard library only, so that the
Slicer module can read them before the engine's dependencies (torch, MONAI) are installed."""

from __future__ import annotations

PRESETS = ("paper", "cpu", "small")
"""Starting configurations (:func:`SFRSegmentLib.config.preset`): ``paper`` for a GPU, ``cpu`` for real scans on a
computer without one, ``small`` for tests and demos only."""

SAM_MISSING = ("download", "skip")
"""What a run does when the base SAM checkpoint is not on the machine (``RunConfig.sam_missing``)."""
