"""SFRSegment's engine: semi-supervised 3D segmentation with a segmentation foundation model (SFR: Stitching,
Fine-tuning, Re-training).

The packages are the architecture, lowest first: :mod:`.base` (configuration, choices, errors, events, devices),
:mod:`.storage` (volumes, atomic writes, the run folder, provenance, checkpoints), :mod:`.data` (cohorts, checks,
resampling, patches, augmentation), :mod:`.models` (the V-Net, the SAM family), :mod:`.stages` (fine-tune,
pseudo-label, re-train, SFR+, inference), :mod:`.evaluation` (metrics, report), :mod:`.run` (plan, estimate,
pipeline, update); beside them :mod:`.jobserver` (the HTTP job server and its client), :mod:`.cli` (the command
line) and :mod:`.research` (the paper's protocol and tables, synthetic data, the demo).

The names below are the public API, the one that ``docs/scripting.md`` uses; they load on first use, so that
``import SFRSegmentLib`` does not import torch (the Slicer module reads the lists of choices without it)::

    from SFRSegmentLib import discover_cohort, preset, run_pipeline
    result = run_pipeline("cohort/", "run/", preset("cpu"))
"""

import importlib
from typing import Any, Dict, List

_PUBLIC: Dict[str, str] = {
    # configuration
    "RunConfig": "base.config", "preset": "base.config",
    "with_overrides": "base.config_io", "load_overrides": "base.config_io", "to_dict": "base.config_io",
    "METHODS": "base.choices", "PRESETS": "base.choices",
    # errors and progress
    "InputError": "base.errors", "WriteError": "storage.atomic",
    "Progress": "base.progress", "ProgressEvent": "base.events", "Cancellation": "base.progress",
    "Cancelled": "base.progress",
    # data
    "Case": "data.cohort", "Cohort": "data.cohort", "discover_cohort": "data.cohort", "validate_cohort": "data.cohort",
    "Volume": "storage.volumes", "read_volume": "storage.volumes", "write_volume": "storage.volumes",
    # a whole run
    "run_pipeline": "run.pipeline", "plan_run": "run.pipeline", "PipelineResult": "run.pipeline",
    "RunFolder": "storage.runfolder",
    # the stages one at a time
    "finetune": "stages.finetune", "pseudolabel": "stages.pseudolabel", "retrain": "stages.retrain",
    # a trained model on new images, and scoring
    "load_vnet": "models.vnet", "predict_volume": "stages.inference", "predict_to_folder": "stages.inference",
    "evaluate_folders": "evaluation.metrics",
}

__all__: List[str] = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
