"""How long a run will take: a few real steps of each remaining stage, timed on the run's device and scaled up.

Before any training, :func:`estimate_run` builds each stage's real model from the run's configuration, randomly
initialised (the time of a step does not depend on the weights, so no SAM checkpoint is needed), and times one
unit of each kind of work the run still has (:class:`StageWork`, which each stage of :mod:`.stages` reports):

* a fine-tuning iteration: batch sampling, stitching, SAM forward, loss, backward and AdamW step at the configured
  batch, patch and SAM size (SFR+ fine-tuning is the same iteration);
* a pseudo-labelling pass: SAM on one batch of ``windows_per_batch`` windows, through the stage's own sliding-window
  function;
* a re-training iteration of each configured method (the run's and the baseline's), through the stage's own
  ``Trainer`` and batch drawing;
* a prediction pass: the V-Net on one batch of ``sw_batch_size`` windows, through the reference sliding window
  (SFR+ scoring is the same pass).

Each stage module answers for its own work: ``timed_step`` or ``timed_pass`` gives one unit of it on synthetic
data, and ``passes`` counts a volume's units; the stages ask them for the work left (``iterations_left``,
``cases_left``). Each unit is run once to warm up and then timed (:func:`seconds_per_step`). The counts come from the configuration
(iterations) and from the image shapes (sliding windows per case, counted by the same window rule the stages use),
so the estimate is the sum over stages of count × seconds per unit. Evaluation and the report take seconds and are
left out. The measurement runs under a forked random state: the run's results do not depend on whether it was
estimated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..base.config import InferenceConfig, RetrainConfig, RunConfig, Spacing
from ..base.device import resolve_device
from ..base.distributed import any_rank, ranks
from ..base.events import format_duration
from ..base.progress import Progress, ProgressEvent, ignore_progress
from ..data.cohort import Case, Cohort
from ..data.resample import working_shape
from ..models.sam.model import SFRSam
from ..stages import finetune, inference, pseudolabel, retrain
from ..storage.volumes import Volume, read_volume

STAGE = "estimate"
LONG_STEP_S = 10.0
"""A warm-up step this slow is itself the measurement (see :func:`seconds_per_step`)."""
TIMING_BUDGET_S = 2.0
"""Timing of one kind of step stops once the timed steps took this long (after at least one)."""
MAX_TIMED_STEPS = 3
Shape = Tuple[int, int, int]


@dataclass(frozen=True)
class StageWork:
    """What one pipeline stage still has to do, in the units the estimate times.

    ``retrain`` is the configuration whose iterations ``retrain_iterations`` counts (the baseline's method differs
    from the run's). ``predict_cases`` lists a case once per sliding-window pass over it (SFR+ scores the unlabeled
    cases once per round).
    """

    stage: str
    finetune_iterations: int = 0
    pseudolabel_cases: Tuple[Case, ...] = ()
    retrain: Optional[RetrainConfig] = None
    retrain_iterations: int = 0
    predict_cases: Tuple[Case, ...] = ()

    @property
    def has_work(self) -> bool:
        return bool(self.finetune_iterations or self.pseudolabel_cases or self.retrain_iterations
                    or self.predict_cases)


@dataclass(frozen=True)
class StepTimes:
    """Measured seconds of one unit of each kind of work; None (or no entry) where the run has none left."""

    finetune_iteration: Optional[float] = None
    pseudolabel_pass: Optional[float] = None
    retrain_iteration: Mapping[str, float] = field(default_factory=dict)
    """Per re-training method."""
    predict_pass: Optional[float] = None


@dataclass(frozen=True)
class WorkItem:
    """``count`` units of one kind of work at ``seconds_each``."""

    what: str
    count: int
    seconds_each: float

    @property
    def seconds(self) -> float:
        return self.count * self.seconds_each


@dataclass(frozen=True)
class StageEstimate:
    """The estimated time of one stage, as the work items it is made of."""

    stage: str
    items: Tuple[WorkItem, ...]

    @property
    def seconds(self) -> float:
        return sum(item.seconds for item in self.items)

    def describe(self) -> str:
        """One line: the stage, its time, and what it is made of."""
        parts = " + ".join(f"{item.count:,} {item.what} × {item.seconds_each:.3g} s" for item in self.items)
        return f"{self.stage}: {format_duration(self.seconds)} ({parts})"


@dataclass(frozen=True)
class RunEstimate:
    """The estimate of what a run still has to do on ``device``: one entry per stage with work left."""

    device: str
    stages: Tuple[StageEstimate, ...]

    @property
    def total_s(self) -> float:
        return sum(stage.seconds for stage in self.stages)

    def record(self) -> Dict[str, object]:
        """As plain JSON values: the device, the total and each stage's seconds and description."""
        return {"device": self.device, "total_s": self.total_s,
                "stages": [{"stage": s.stage, "seconds": s.seconds, "description": s.describe()} for s in self.stages]}


def estimate_run(cohort: Cohort, config: RunConfig, work: Sequence[StageWork],
                 progress: Progress = ignore_progress) -> RunEstimate:
    """Time the kinds of step ``work`` needs on the run's device, report the estimate to ``progress`` and return it.

    ``config`` is the run's resolved configuration (:meth:`RunConfig.resolved`). The events have stage ``estimate``:
    one per stage with work left, then the total (``eta_s`` = the total in seconds) and, when the total exceeds
    ``config.estimate_warn_hours``, a ``warning`` event that says what to do.
    """
    device = resolve_device(config.device)
    steps = sum(w.has_work for w in work) + 1
    progress(ProgressEvent(STAGE, 0, steps, message=f"timing a few steps of each remaining stage on {device}"))
    times = measure_step_times(cohort, config, work, device)
    estimate = RunEstimate(str(device), tuple(estimate_stages(work, times, config)))
    for step, stage in enumerate(estimate.stages, start=1):
        progress(ProgressEvent(STAGE, step, steps, message=stage.describe()))
    total = f"estimated time of what is left: {format_duration(estimate.total_s)} on {device}"
    progress(ProgressEvent(STAGE, steps, steps, eta_s=estimate.total_s, message=total))
    if estimate.total_s > config.estimate_warn_hours * 3600:
        progress(ProgressEvent(STAGE, steps, steps, eta_s=estimate.total_s, level="warning",
                               message=warning_message(estimate, config)))
    return estimate


def warning_message(estimate: RunEstimate, config: RunConfig) -> str:
    """What the user reads when the run would take longer than ``config.estimate_warn_hours``: the time and the
    ways to shorten it."""
    if estimate.device == "cpu":
        remedy = ("run it on a machine with a CUDA GPU (the paper preset is sized for one), or use the cpu preset "
                  "(--preset cpu), which is sized for real scans on a computer without one")
    else:
        remedy = "lower finetune.iterations and retrain.iterations (--config)"
    return (f"this run would take about {format_duration(estimate.total_s)} on {estimate.device}, more than "
            f"{config.estimate_warn_hours:g} h: {remedy}. It continues now; stop it (Ctrl-C or Cancel) to change "
            "the setup, and rerun to resume. The threshold is estimate_warn_hours; --no-estimate skips the estimate.")


# ---------------------------------------------------------------------------------------------------------------
# Counting


def _prediction_settings(config: RunConfig) -> InferenceConfig:
    """The run's prediction settings with the window set: ``inference.patch_size``, or the V-Net's training patch."""
    return config.inference.for_model(config.retrain.patch_size, config.retrain.downsampling)


def estimate_stages(work: Sequence[StageWork], times: StepTimes, config: RunConfig) -> List[StageEstimate]:
    """Count × seconds per unit for every stage with work left; image shapes are read from the cases' files. Under
    torchrun the per-case passes are shared by the processes (training steps are timed with all of them)."""
    volumes: Dict[str, Volume] = {}
    processes = ranks().world_size

    def volume(case: Case) -> Volume:
        if case.name not in volumes:
            volumes[case.name] = read_volume(case.image)
        return volumes[case.name]

    def working(case: Case, spacing: Optional[Spacing]) -> Shape:
        """The grid a network slides over: the image's own, or the working ``spacing``'s."""
        return volume(case).shape if spacing is None else working_shape(volume(case), spacing)

    stages = []
    for stage in (w for w in work if w.has_work):
        items = []
        if stage.finetune_iterations:
            items.append(WorkItem("fine-tuning iterations", stage.finetune_iterations, times.finetune_iteration))
        if stage.pseudolabel_cases:
            passes = sum(pseudolabel.passes(working(case, config.finetune.spacing), config.finetune.patch_size,
                                            config.pseudolabel)
                         for case in stage.pseudolabel_cases)
            passes = inference.batches(passes, processes)
            items.append(WorkItem(f"SAM passes of {config.pseudolabel.windows_per_batch} windows "
                                  f"({len(stage.pseudolabel_cases)} cases)", passes, times.pseudolabel_pass))
        if stage.retrain_iterations:
            method = stage.retrain.method
            items.append(WorkItem(f"{method} iterations", stage.retrain_iterations, times.retrain_iteration[method]))
        if stage.predict_cases:
            passes = sum(inference.passes(working(case, config.retrain.spacing), _prediction_settings(config))
                         for case in stage.predict_cases)
            passes = inference.batches(passes, processes)
            items.append(WorkItem(f"V-Net passes of {config.inference.sw_batch_size} windows "
                                  f"({len(stage.predict_cases)} cases)", passes, times.predict_pass))
        stages.append(StageEstimate(stage.stage, tuple(items)))
    return stages


# ---------------------------------------------------------------------------------------------------------------
# Timing


def measure_step_times(cohort: Cohort, config: RunConfig, work: Sequence[StageWork],
                       device: torch.device) -> StepTimes:
    """Time one unit of each kind of work that ``work`` has left (only those) on ``device``."""
    retrain_settings = {w.retrain.method: w.retrain for w in work if w.retrain_iterations}
    fine_tunes = any(w.finetune_iterations for w in work)
    pseudo_labels = any(w.pseudolabel_cases for w in work)
    predicts = any(w.predict_cases for w in work)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        sam = (finetune.build_base_sam(config.finetune.sam, None, config.finetune.seed).to(device)
               if fine_tunes or pseudo_labels else None)
        times = StepTimes(
            finetune_iteration=_time_finetune(sam, config, device) if fine_tunes else None,
            pseudolabel_pass=_time_pseudolabel(sam, config, device) if pseudo_labels else None,
            retrain_iteration={method: _time_retrain(settings, cohort, device)
                               for method, settings in retrain_settings.items()},
            predict_pass=_time_prediction(config, cohort, device) if predicts else None,
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the timing's memory back before the stages allocate theirs
    return times


def seconds_per_step(step: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of ``step``: the mean of up to :data:`MAX_TIMED_STEPS` calls (fewer once they took
    :data:`TIMING_BUDGET_S`) after a warm-up call, which pays for lazy initialisation and memory allocation. A warm-up
    of :data:`LONG_STEP_S` or more is the answer itself: against so long a step those costs are small, and a CPU run
    of the paper preset is not held up for minutes."""
    # Under torchrun the training steps are collective: every rank must take as many as the others (any_rank).
    warm_up = _timed(step, device)
    if any_rank(warm_up >= LONG_STEP_S):
        return warm_up
    durations: List[float] = []
    while len(durations) < MAX_TIMED_STEPS and not any_rank(sum(durations) >= TIMING_BUDGET_S):
        durations.append(_timed(step, device))
    return sum(durations) / len(durations)


def _timed(step: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    started = time.perf_counter()
    step()
    _synchronize(device)  # GPU work is asynchronous: wait for it before reading the clock
    return time.perf_counter() - started


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_finetune(sam: SFRSam, config: RunConfig, device: torch.device) -> float:
    return seconds_per_step(finetune.timed_step(config.finetune, sam, device), device)


def _time_pseudolabel(sam: SFRSam, config: RunConfig, device: torch.device) -> float:
    return seconds_per_step(pseudolabel.timed_pass(sam, config.finetune.patch_size, config.finetune.depth_padding,
                                                   config.pseudolabel), device)


def _time_retrain(settings: RetrainConfig, cohort: Cohort, device: torch.device) -> float:
    return seconds_per_step(retrain.timed_step(settings, cohort.classes, device), device)


def _time_prediction(config: RunConfig, cohort: Cohort, device: torch.device) -> float:
    model = retrain.trained_vnet_info(config.retrain, cohort.classes).build_model()
    return seconds_per_step(inference.timed_pass(model, _prediction_settings(config), device), device)
