"""The plan of a run before it starts: what the engine would use and how long it would take on this computer.

The scene's inputs are exported as for a run (:func:`jobs.prepare_training_job`) and the engine runs on them with
``--plan-only`` (``python -m SFRSegmentLib run … --plan-only --progress jsonl``): it validates the cohort, plans from
it (working spacing, V-Net patch and strides, largest component: ``SFRSegmentLib.run.plan``) where the preset plans, times
a few steps of each stage, writes ``RUN/plan.json`` and exits without training. :class:`RunPlan` is that record as
the module shows it.

A plan's job folder is made in a new temporary folder, never in the jobs folder, and removed when the engine ends
(finished, failed or cancelled): there, a job folder whose engine never trained would be listed in Past jobs as
interrupted and offered to Run as an unfinished job to continue.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from SFRSegmentLib.base.config import REFERENCE_DOWNSAMPLING, preset
from SFRSegmentLib.base.config_io import with_overrides

from .jobs import CaseInput, RunSettings, TrainingJob, prepare_training_job
from .process import Outcome, Status

PLAN_FOLDER_PREFIX = "SFRSegment-plan-"
"""The name a plan's temporary folder starts with."""
SPACING, PATCH_SIZE, STRIDES, LARGEST_COMPONENT = ("retrain.spacing", "patch_size", "retrain.downsampling",
                                                   "inference.largest_component")
"""The configuration fields a :class:`RunPlan` shows (plan.json's names: ``SFRSegmentLib.run.plan.PLANNED_FIELDS``)."""

Shape = Tuple[int, int, int]


@dataclass(frozen=True)
class StageTime:
    """The estimated time of one stage on this computer, and what it is made of (the engine's words)."""

    stage: str
    seconds: float
    description: str


@dataclass(frozen=True)
class RunPlan:
    """What a run would use and how long it would take on this computer (the engine's ``plan.json``)."""

    spacing: Optional[Tuple[float, float, float]]
    """The working voxel size in mm; None: each volume keeps its own grid."""
    patch_size: Shape
    """The V-Net's patch in voxels."""
    strides: Tuple[Shape, ...]
    """The strides of the V-Net's four downsamplings."""
    largest_component: bool
    """Whether only the largest connected piece of each class is kept in the predictions."""
    from_volumes: bool
    """Whether the preset planned these from the volumes (else they are the preset's and the settings')."""
    reasons: Dict[str, str]
    """Field (:data:`SPACING`, …) → why the plan chose its value; only the planned values that the run uses."""
    device: str
    """Where the steps were timed."""
    total_s: float
    stages: Tuple[StageTime, ...]
    record: Dict[str, Any] = field(repr=False)
    """plan.json as the engine wrote it."""


def run_plan(record: Mapping[str, Any], overrides: Mapping[str, Any]) -> RunPlan:
    """The :class:`RunPlan` of a plan.json ``record`` made with the run configuration ``overrides`` (a job's
    config.json): the values the run uses, planned from the volumes or, where the preset does not plan
    (``planned: null``), the preset's with the overrides."""
    planned = record["planned"]
    if planned is not None:
        used = {path: entry["used"] for path, entry in planned.items()}
        reasons = {path: entry["reason"] for path, entry in planned.items()
                   if entry["reason"] and entry["used"] == entry["plan"]}
    else:
        config = with_overrides(preset(overrides["preset"]), dict(overrides)).resolved()
        used = {path: _field(config, path) for path in (SPACING, PATCH_SIZE, STRIDES, LARGEST_COMPONENT)}
        reasons = {}
    spacing, strides = used[SPACING], used[STRIDES] or REFERENCE_DOWNSAMPLING  # null: the reference V-Net's
    estimate = record["estimate"]
    return RunPlan(
        spacing=None if spacing is None else tuple(float(s) for s in spacing),
        patch_size=tuple(int(s) for s in used[PATCH_SIZE]),
        strides=tuple(tuple(int(s) for s in stride) for stride in strides),
        largest_component=bool(used[LARGEST_COMPONENT]),
        from_volumes=planned is not None,
        reasons=reasons,
        device=str(estimate["device"]),
        total_s=float(estimate["total_s"]),
        stages=tuple(StageTime(str(s["stage"]), float(s["seconds"]), str(s["description"]))
                     for s in estimate["stages"]),
        record=dict(record),
    )


def _field(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


@dataclass
class PlanJob:
    """A training job folder made only to be planned, in its own temporary folder ``root`` (module docstring)."""

    training: TrainingJob
    root: Path
    record: Optional[Dict[str, Any]] = None
    """plan.json, once the engine has written it and ended."""

    @property
    def folder(self) -> Path:
        return self.training.folder

    def command(self, python: str) -> List[str]:
        """The training job's command with ``--plan-only``: always on this computer (the engine refuses
        ``--plan-only`` with ``--server``)."""
        return [*self.training.command(python), "--plan-only"]

    def ended(self, outcome: Outcome) -> None:
        """Keep plan.json of a plan that finished, then remove the temporary folder, however the engine ended."""
        try:
            if outcome.status == Status.SUCCEEDED:
                self.record = json.loads(self.training.run.plan.read_text(encoding="utf-8"))
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def plan(self) -> RunPlan:
        """The plan the engine wrote (after it finished)."""
        return run_plan(self.record, self.training.overrides)


def prepare_plan_job(inputs: Sequence[CaseInput], segment_names: Sequence[str], settings: RunSettings) -> PlanJob:
    """Export the inputs as a run of ``settings`` would (checked first) into a new temporary folder, to be planned;
    nothing is left when the inputs are wrong."""
    root = Path(tempfile.mkdtemp(prefix=PLAN_FOLDER_PREFIX))
    try:
        return PlanJob(prepare_training_job(root, inputs, segment_names, settings), root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
