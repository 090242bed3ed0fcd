"""The stages of a run behind one interface (:class:`Stage`): what each still has to do in the run folder (for the
estimate) and running it. :func:`run_stages` lists them in order for a configuration; the pipeline runs them one
after the other and :func:`remaining_work` asks each for its work. A stage whose upstream stage (``depends_on``) has
work left counts all of its own: its inputs will change.

* :class:`FineTuning` (F) and :class:`PseudoLabelling` (P), when the method uses SAM's pseudo-labels;
* :class:`ReTraining` (R), the V-Net;
* :class:`SfrPlusRounds`, with ``sfr_plus``;
* :class:`Baseline`, with ``baseline_method``: its own re-training, prediction and scoring in ``RUN/baseline``;
* :class:`Prediction` of the unlabeled and the held-out test cases with the final V-Net.

The units of work and one timed unit of each kind come from the stage modules themselves (``iterations_left``,
``cases_left``, ``timed_step``, ``timed_pass``; :mod:`SFRSegmentLib.run.estimate`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

from ..base.config import RetrainConfig, RunConfig
from ..base.config_io import to_dict
from ..base.device import resolve_device
from ..base.distributed import barrier, ranks
from ..base.errors import PathLike
from ..base.progress import Cancellation, Progress, ProgressEvent
from ..data.cohort import Case, Cohort
from ..evaluation.metrics import evaluate_cases, summarise_splits, write_metrics_csv
from ..models.vnet import load_vnet
from ..stages import finetune as finetune_stage
from ..stages import pseudolabel as pseudolabel_stage
from ..stages import retrain as retrain_stage
from ..stages.confidence import recorded
from ..stages.inference import PREDICTION_SUFFIXES, InferenceConfig, predict_cases
from ..stages.sfrplus import ROUND_RECORD, round_folder, run_sfrplus
from ..storage.provenance import MISSING, Inputs, case_files, forget, identity_of, stale_reason, write_record
from ..storage.runfolder import CONFIDENCE_TABLE, RunFolder
from .estimate import StageWork

Truths = Mapping[str, Mapping[str, Path]]
"""Split → case name → true label file: what a run scores its predictions against."""


class Stage(ABC):
    """One stage of a run, bound to its cohort, run folder and configuration."""

    name: str
    """The stage's name in progress events, timings and ``--redo``."""
    depends_on: FrozenSet[str] = frozenset()
    """Stages whose new outputs are this stage's inputs."""

    def __init__(self, cohort: Cohort, run: RunFolder, config: RunConfig) -> None:
        self.cohort, self.run_folder, self.config = cohort, run, config

    @abstractmethod
    def work_left(self, upstream_changes: bool) -> StageWork:
        """What this stage still has to do in the run folder; all of it when ``upstream_changes``."""

    @abstractmethod
    def run(self, progress: Progress, cancellation: Optional[Cancellation]) -> None:
        """Do (or resume) the stage, reusing what is current."""


class FineTuning(Stage):
    name = "finetune"

    def work_left(self, upstream_changes: bool) -> StageWork:
        return StageWork(self.name, finetune_iterations=finetune_stage.iterations_left(
            self.run_folder, self.cohort, self.config.finetune))

    def run(self, progress: Progress, cancellation: Optional[Cancellation]) -> None:
        finetune_stage.finetune(self.cohort, self.run_folder, self.config.finetune, progress, cancellation)


class PseudoLabelling(Stage):
    name = "pseudolabel"
    depends_on = frozenset({"finetune"})

    def work_left(self, upstream_changes: bool) -> StageWork:
        cases = (tuple(self.cohort.unlabeled) if upstream_changes
                 else pseudolabel_stage.cases_left(self.run_folder, self.cohort, self.config.pseudolabel))
        return StageWork(self.name, pseudolabel_cases=cases)

    def run(self, progress: Progress, cancellation: Optional[Cancellation]) -> None:
        pseudolabel_stage.pseudolabel(self.cohort, self.run_folder, self.config.pseudolabel, progress, cancellation)


class ReTraining(Stage):
    name = "retrain"
    depends_on = frozenset({"pseudolabel"})

    def work_left(self, upstream_changes: bool) -> StageWork:
        settings = self.config.retrain
        left = (settings.iterations if upstream_changes
                else retrain_stage.iterations_left(self.run_folder, self.cohort, settings))
        return StageWork(self.name, retrain=settings, retrain_iterations=left)

    def run(self, progress: Progress, cancellation: Optional[Cancellation]) -> None:
        retrain_stage.retrain(self.cohort, self.run_folder, self.config.retrain, progress=progress,
                              cancellation=cancellation)


class SfrPlusRounds(Stage):
    """SFR+'s rounds after R. An unfinished round counts whole: which cases are confident is known only once it
    runs, so its work is an upper bound."""

    name = "sfrplus"
    depends_on = frozenset({"retrain"})

    @property
    def rounds(self) -> List[RunFolder]:
        return [round_folder(self.run_folder, r) for r in range(1, self.config.sfrplus.rounds + 1)]

    def work_left(self, upstream_changes: bool) -> StageWork:
        config, unlabeled = self.config, tuple(self.cohort.unlabeled)
        left = len([here for here in self.rounds if upstream_changes or not (here.root / ROUND_RECORD).is_file()])
        return StageWork(self.name, finetune_iterations=config.finetune.iterations * left,
                         pseudolabel_cases=unlabeled * left, retrain=config.retrain,
                         retrain_iterations=config.retrain.iterations * left, predict_cases=unlabeled * left)

    def run(self, progress: Progress, cancellation: Optional[Cancellation]) -> None:
        config = self.config

        def finetune_fn(cohort: Cohort, run: RunFolder, init_weights: Optional[PathLike]) -> Path:
            settings = dataclasses.replace(config.finetune, init_weights=str(init_weights) if init_weights else None)
            return finetune_stage.finetune(cohort, run, settings, progress, cancellation)

        def pseudolabel_fn(cohort: Cohort, run: RunFolder, cases: Sequence[Case], sam_weights: PathLike) -> Path:
            return pseudolabel_stage.pseudolabel(cohort, run, config.pseudolabel, progress, cancellation,
                                                 cases=cases, sam_weights=sam_weights)

        def retrain_fn(cohort: Cohort, run: RunFolder, pseudo_labels: Dict[str, Path]) -> Path:
            return retrain_stage.retrain(cohort, run, config.retrain, pseudo_labels, progress, cancellation)

        run_sfrplus(self.cohort, self.run_folder, finetune_fn, pseudolabel_fn, retrain_fn, config.sfrplus,
                    config.inference, progress)


class Baseline(Stage):
    """``baseline_method`` re-trained without pseudo-labels into ``RUN/baseline``, its predictions and metrics."""

    name = "baseline"

    def __init__(self, cohort: Cohort, run: RunFolder, config: RunConfig, truths: Truths) -> None:
        super().__init__(cohort, run, config)
        self.truths = truths
        self.metrics: Optional[Path] = None

    def work_left(self, upstream_changes: bool) -> StageWork:
        baseline, settings = self.run_folder.baseline, baseline_settings(self.config)
        left = retrain_stage.iterations_left(baseline, self.cohort, settings)
        return StageWork(self.name, retrain=settings, retrain_iterations=left,
                         predict_cases=_predictions_left(predicted_cases(self.cohort), baseline.prediction_dir,
                                                         baseline.vnet_weights, self.config, left > 0))

    def run(self, progress: Progress, cancellation: Optional[Cancellation]) -> None:
        baseline = self.run_folder.baseline
        vnet = retrain_stage.retrain(self.cohort, baseline, baseline_settings(self.config), progress=progress,
                                     cancellation=cancellation)
        predict_stale(vnet, predicted_cases(self.cohort), baseline.prediction_dir, self.config, progress)
        self.metrics = evaluate_run(baseline, self.truths, self.cohort, self.config.baseline_method, progress)


class Prediction(Stage):
    """The unlabeled and held-out test cases predicted with the run's final V-Net (R's, or the last SFR+ round's)."""

    name = "predict"
    depends_on = frozenset({"retrain", "sfrplus"})

    @property
    def vnet(self) -> Path:
        if self.config.sfr_plus:
            return round_folder(self.run_folder, self.config.sfrplus.rounds).vnet_weights
        return self.run_folder.vnet_weights

    def work_left(self, upstream_changes: bool) -> StageWork:
        return StageWork(self.name, predict_cases=_predictions_left(
            predicted_cases(self.cohort), self.run_folder.prediction_dir, self.vnet, self.config, upstream_changes))

    def run(self, progress: Progress, cancellation: Optional[Cancellation]) -> None:
        predict_stale(self.vnet, predicted_cases(self.cohort), self.run_folder.prediction_dir, self.config, progress)


def run_stages(cohort: Cohort, run: RunFolder, config: RunConfig, truths: Optional[Truths] = None) -> List[Stage]:
    """The stages a run with ``config`` goes through, in order; ``truths`` are what the baseline is scored against."""
    stages: List[Stage] = []
    if config.retrain.uses_pseudo_labels:
        stages += [FineTuning(cohort, run, config), PseudoLabelling(cohort, run, config)]
    stages.append(ReTraining(cohort, run, config))
    if config.sfr_plus:
        stages.append(SfrPlusRounds(cohort, run, config))
    if config.baseline_method:
        stages.append(Baseline(cohort, run, config, truths or {}))
    stages.append(Prediction(cohort, run, config))
    return stages


def remaining_work(cohort: Cohort, run: RunFolder, config: RunConfig) -> List[StageWork]:
    """What each training and prediction stage of a run still has to do in ``run``, for the estimate.

    Current outputs (:mod:`SFRSegmentLib.storage.provenance`) are left out; a stage whose upstream output is made
    again is counted whole (its inputs change), one stopped midway counts the iterations its checkpoint has still to
    do. Prediction counts the unlabeled and the held-out test cases (:func:`predicted_cases`).
    """
    changed: set = set()
    work = []
    for stage in run_stages(cohort, run, config):
        left = stage.work_left(upstream_changes=bool(changed & stage.depends_on))
        if left.has_work:
            changed.add(stage.name)
        work.append(left)
    return work


# ---------------------------------------------------------------------------------------------------------------
# Prediction and scoring, shared by the run and its baseline


def baseline_settings(config: RunConfig) -> RetrainConfig:
    return dataclasses.replace(config.retrain, ssl_method=config.baseline_method, pseudo_labels="none",
                               init_weights=config.baseline_init_weights or config.retrain.init_weights)


def predicted_cases(cohort: Cohort) -> List[Case]:
    """The cases a trained V-Net predicts at the end of a run: the unlabeled ones, then the held-out test cases."""
    return cohort.unlabeled + cohort.test


def predict_stale(vnet: Path, cases: Sequence[Case], out_dir: Path, config: RunConfig, progress: Progress) -> None:
    """Predict the cases whose predictions in ``out_dir`` are missing or stale (:func:`prediction_inputs`)."""
    inputs = prediction_inputs(cases, vnet, config.inference)
    stale = _stale_predictions(cases, out_dir, inputs)
    if ranks().is_main:
        for name, reason in stale.items():
            if reason != MISSING:
                say(progress, "predict", f"the prediction of case {name} is stale ({reason}): predicting it again")
            forget(prediction_files(out_dir, name))
    pending = [case for case in cases if case.name in stale]
    if not pending:
        return
    model, info = load_vnet(vnet, resolve_device(config.device))
    predict_cases(model, info, pending, out_dir, config.inference, progress,
                  on_written=lambda name: write_record(prediction_files(out_dir, name), inputs[name]))


_PREDICTION_EXECUTION_ONLY = ("device", "sw_batch_size")
"""Inference options that do not change a prediction."""


def prediction_inputs(cases: Sequence[Case], vnet: Path, config: InferenceConfig) -> Dict[str, Inputs]:
    """Case name → what its prediction is computed from: the inference options that change it, the image's SHA-256
    and the V-Net's identity (``missing`` while it does not exist)."""
    options = {name: value for name, value in to_dict(config).items() if name not in _PREDICTION_EXECUTION_ONLY}
    upstream = {"V-Net": identity_of(vnet) if vnet.is_file() else "missing"}
    return {case.name: Inputs(options, case_files([case], labels=False), upstream) for case in cases}


def prediction_files(out_dir: Path, name: str) -> List[Path]:
    """A case's prediction files; the first one carries the record."""
    return [out_dir / f"{name}{suffix}" for suffix in PREDICTION_SUFFIXES]


def _stale_predictions(cases: Sequence[Case], out_dir: Path, inputs: Mapping[str, Inputs]) -> Dict[str, str]:
    """Case name → why its prediction in ``out_dir`` must be made (again), for the cases where it must."""
    reasons = {case.name: stale_reason(prediction_files(out_dir, case.name), inputs[case.name]) for case in cases}
    confidences = recorded(out_dir / CONFIDENCE_TABLE)
    for name, reason in reasons.items():
        if reason is None and name not in confidences:
            reasons[name] = "its confidence is not in confidence.csv"
    return {name: reason for name, reason in reasons.items() if reason is not None}


def _predictions_left(cases: Sequence[Case], out_dir: Path, vnet: Path, config: RunConfig,
                      vnet_changes: bool) -> Tuple[Case, ...]:
    if vnet_changes:
        return tuple(cases)
    stale = _stale_predictions(cases, out_dir, prediction_inputs(cases, vnet, config.inference))
    return tuple(case for case in cases if case.name in stale)


def evaluate_run(run: RunFolder, truths: Truths, cohort: Cohort, method: str, progress: Progress) -> Optional[Path]:
    """Score the predictions of ``run`` (trained with ``method``, which the progress messages name) against
    ``truths`` into its metrics table, one split after the other (rank 0; the others wait for it); None when there
    is nothing to score."""
    if not truths:
        return None
    if ranks().is_main:
        rows = [row for split, cases in truths.items()
                for row in evaluate_cases({name: (run.prediction(name), truth) for name, truth in cases.items()},
                                          sorted(cohort.classes), split)]
        write_metrics_csv(rows, run.metrics)
        for split, summaries in summarise_splits(rows).items():
            for summary in summaries:
                dice = summary.dice
                spread = f" ± {dice.std:.4f}" if dice.n > 1 else ""
                say(progress, "evaluate", f"{method}: {split} cases, class {summary.class_value}: Dice "
                                          f"{dice.mean:.4f}{spread} over {summary.n_cases} cases", metric=dice.mean)
    barrier()
    return run.metrics


def say(progress: Progress, stage: str, message: str, metric: Optional[float] = None) -> None:
    progress(ProgressEvent(stage, 1, 1, metric=metric, message=message))
