"""The whole SFR run: validate → fine-tune SAM → pseudo-label → re-train (→ SFR+) → predict → evaluate → report.

Training sees the cohort's cases only (``Cohort.cases``). Its held-out test cases (``Cohort.test``) are validated
with them, predicted with the unlabeled cases after training and scored against their own labels; the unlabeled
cases are scored too when ``config.truth_dir`` gives their true labels. ``metrics.csv`` marks each row's split
(:data:`SFRSegmentLib.evaluation.metrics.SPLITS`), and the headline numbers (:func:`SFRSegmentLib.evaluation.metrics.mean_dice`, the baseline
comparison) are the
test cases' when there are any.

Every stage reads what the previous one wrote into the run folder (:mod:`SFRSegmentLib.storage.runfolder`) and reuses an
output only while the inputs recorded beside it are the current ones (:mod:`SFRSegmentLib.storage.provenance`): rerunning
the same command continues at the first unfinished stage, and inside a stage from its last checkpoint; after an
edited label, image or option, or a deleted output, exactly what depends on it is recomputed, and the progress stream
says why. ``redo`` deletes a stage's outputs (and those of the stages after it) first. At the end
``RUN/provenance.json`` lists the identity of every output the results came from.
All inputs are validated before any training starts; then (unless ``config.estimate`` is off) the time of what is
left is estimated and reported, with a warning when it exceeds ``config.estimate_warn_hours``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Collection, Dict, Iterator, Optional, Sequence, Tuple

import torch

from ..base.choices import STAGES
from ..base.config import RunConfig
from ..base.config_io import to_dict
from ..base.device import resolve_device
from ..base.distributed import barrier, on_main_rank, ranks
from ..base.errors import InputError, PathLike
from ..base.progress import Cancellation, Progress, ProgressEvent, ignore_progress
from ..data.cohort import Cohort, discover_cohort, validate_cohort
from ..evaluation.metrics import TEST_SPLIT, UNLABELED_SPLIT, find_label_files
from ..evaluation.report import comparison_section, lineage_section, plan_section, provenance_section, write_report
from ..models.sam.weights import available_offline
from ..storage.atomic import atomic_write_text
from ..storage.provenance import file_digest, read_record
from ..storage.runfolder import RunFolder
from .estimate import estimate_run
from .plan import plan_config, plan_record
from .stages import (
    Baseline,
    Prediction,
    Truths,
    evaluate_run,
    predicted_cases,
    prediction_files,
    remaining_work,
    run_stages,
    say,
)
from .update import UPDATE_KEY, Parent, corrected_summary, prepare_update, read_parent
from .update import lineage as update_lineage


# What to lower when a stage runs out of GPU memory.
_MEMORY_SETTINGS = {
    "finetune": "finetune.batch_size, or set finetune.sam.gradient_checkpointing to true",
    "pseudolabel": "pseudolabel.windows_per_batch",
    "retrain": "retrain.batch_labeled / retrain.batch_unlabeled or retrain.patch_size",
    "sfrplus": "finetune.batch_size and retrain.batch_labeled / batch_unlabeled",
    "baseline": "retrain.batch_labeled / retrain.batch_unlabeled or retrain.patch_size",
    "predict": "inference.sw_batch_size",
}


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message names the stage and the setting to lower."""


@dataclass
class PipelineResult:
    run: RunFolder
    cohort: Cohort
    vnet: Path
    metrics: Optional[Path]
    baseline_metrics: Optional[Path]
    report: Path
    config: RunConfig
    """The configuration the run used (after :meth:`RunConfig.resolved` and a missing SAM's fallback)."""


def run_pipeline(cohort_path: PathLike, out: PathLike, config: RunConfig, progress: Progress = ignore_progress,
                 cancellation: Optional[Cancellation] = None, redo: Sequence[str] = (),
                 test: Optional[PathLike] = None, parent: Optional[PathLike] = None,
                 given: Collection[str] = ()) -> PipelineResult:
    """Run (or resume) every stage of SFR on the cohort at ``cohort_path`` into the run folder ``out``.

    ``test`` is a folder (or manifest) of held-out labeled cases, added to those a manifest ``cohort_path`` lists
    under ``"test"`` (:func:`SFRSegmentLib.data.cohort.discover_cohort`): never trained on, predicted and scored at the end.
    ``config`` is resolved here (:meth:`RunConfig.resolved`); its device is checked first, before any input is read.
    ``parent`` is a finished run folder to update (:mod:`SFRSegmentLib.run.update`): SAM and the V-Net continue from its
    weights with short schedules, and what did not change is taken over from it.
    """
    run = RunFolder(out)
    clock = StageClock()
    cohort, truths, config, planned = _prepared(cohort_path, config, progress, test, given)
    update = read_parent(parent, out) if parent is not None else None
    if config.preset == "small":
        say(progress, "validate", "preset small is a toy configuration for tests and demos, not for real data: use "
                                   "--preset cpu without a GPU, --preset paper with one")
    clock.lap("validate")
    # One process per run folder: a second run on it stops here (rank 0 holds the lock for all ranks).
    with on_main_rank(run.exclusive()):
        return _run_stages(cohort, truths, run, config, progress, cancellation, redo, clock, update, planned)


def plan_run(cohort_path: PathLike, out: PathLike, config: RunConfig, progress: Progress = ignore_progress,
             test: Optional[PathLike] = None, given: Collection[str] = ()) -> Dict[str, object]:
    """What :func:`run_pipeline` would do, without training: validate the cohort, plan from it, time a few steps of
    each stage with work left in ``out`` (:func:`~SFRSegmentLib.run.estimate.estimate_run`), and write it all to the
    run folder's ``plan.json`` (returned: the plan's record, or ``planned: null`` when planning is off, and
    ``estimate``). A run in ``out`` afterwards starts from the same plan."""
    run = RunFolder(out)
    cohort, _, config, planned = _prepared(cohort_path, config, progress, test, given)
    with on_main_rank(run.exclusive()):
        estimate = estimate_run(cohort, config, remaining_work(cohort, run, config), progress)
        record = {**(planned or {"planned": None}), "estimate": estimate.record()}
        if ranks().is_main:
            atomic_write_text(run.plan, json.dumps(record, indent=2) + "\n")
    return record


def _prepared(cohort_path: PathLike, config: RunConfig, progress: Progress, test: Optional[PathLike],
              given: Collection[str]) -> Tuple[Cohort, Truths, RunConfig, Optional[Dict[str, object]]]:
    """The validated cohort, its true labels, the run's planned and resolved configuration and the plan's record
    (None when planning is off)."""
    resolve_device(config.device)  # a device this machine lacks stops the run now, not after validation
    cohort = discover_cohort(cohort_path, test=test)
    say(progress, "validate", f"validating {len(cohort.cases)} cases"
         + (f" and {len(cohort.test)} held-out test cases" if cohort.test else ""))
    validate_cohort(cohort)
    if not cohort.unlabeled:
        raise InputError("the cohort has no unlabeled case: SFR needs unlabeled volumes to pseudo-label",
                         cohort.root)
    truths = _truths(cohort, config)  # a missing true label stops the run now, not after training
    config, plan, found = plan_config(config, cohort, given)
    planned = None if plan is None else plan_record(config, plan, found)
    if plan is not None:
        say(progress, "validate", f"plan from the cohort: {plan.summary()}")
    return cohort, truths, _without_missing_sam(config.resolved(len(cohort.classes)), progress), planned


def _run_stages(cohort: Cohort, truths: Truths, run: RunFolder, config: RunConfig, progress: Progress,
                cancellation: Optional[Cancellation], redo: Sequence[str], clock: StageClock,
                parent: Optional[Parent], planned: Optional[Dict[str, object]]) -> PipelineResult:
    """Every stage in order, in a run folder this process holds (see :func:`run_pipeline`); ``planned`` is the
    plan's record (:func:`SFRSegmentLib.run.plan.plan_record`), written to ``plan.json``."""
    if ranks().is_main:  # under torchrun rank 0 writes the run folder (SFRSegmentLib.base.distributed)
        _remove_outputs(run, redo)
    barrier()
    update_section = None
    if parent is not None:
        config, update_section = prepare_update(parent, cohort, config, run, adopt=ranks().is_main)
        say(progress, "validate", f"updating {parent.run.root}: {corrected_summary(update_section)}")
    if ranks().is_main:
        atomic_write_text(run.config, json.dumps(to_dict(config), indent=2) + "\n")
        if planned is not None:
            atomic_write_text(run.plan, json.dumps(planned, indent=2) + "\n")
        record = manifest(cohort, config)
        if update_section is not None:
            record[UPDATE_KEY] = update_section
        atomic_write_text(run.manifest, json.dumps(record, indent=2) + "\n")
    barrier()
    if config.estimate:
        estimate_run(cohort, config, remaining_work(cohort, run, config), progress)
        clock.lap("estimate")

    stages = run_stages(cohort, run, config, truths)
    for stage in stages:
        with _stage(stage.name, clock):
            stage.run(progress, cancellation)
    vnet = next(stage.vnet for stage in stages if isinstance(stage, Prediction))
    baseline_metrics = next((stage.metrics for stage in stages if isinstance(stage, Baseline)), None)
    metrics = evaluate_run(run, truths, cohort, config.retrain.method, progress)
    clock.lap("evaluate")
    report = run.report
    if ranks().is_main:
        lineage = provenance_summary(run, cohort, vnet, truths)
        atomic_write_text(run.provenance, json.dumps(lineage, indent=2) + "\n")
        chain = [(step["run"].root, corrected_summary(step["update"]), step["seconds"])
                 for step in update_lineage(run)]
        sections = (comparison_section(metrics, baseline_metrics, config.retrain.method, config.baseline_method)
                    + plan_section(planned) + lineage_section(chain) + provenance_section(lineage))
        report = write_report(run, cohort, extra_sections=sections,
                              truths={name: path for cases in truths.values() for name, path in cases.items()})
        say(progress, "report", f"report written to {report}")
        clock.lap("report")
        atomic_write_text(run.timings, json.dumps(clock.seconds, indent=2) + "\n")
    barrier()
    return PipelineResult(run, cohort, vnet, metrics, baseline_metrics, report, config)


def _without_missing_sam(config: RunConfig, progress: Progress) -> RunConfig:
    """``config``, or with ``sam_missing = "skip"`` and no pretrained SAM on this machine, its method without the
    SFR term (announced by a warning event): SAM fine-tuned from random weights would teach the V-Net noise."""
    checkpoint = config.finetune.base_checkpoint
    if not config.retrain.uses_pseudo_labels or config.sam_missing != "skip" or available_offline(checkpoint):
        return config
    progress(ProgressEvent(
        "validate", 1, 1, level="warning",
        message=f"no pretrained SAM checkpoint ({checkpoint or 'none given'}) is on this machine, so SAM is not "
                f"fine-tuned (never from random weights): re-training {config.retrain.ssl_method} without the SFR term instead "
                f"of {config.retrain.method}{' and without SFR+' if config.sfr_plus else ''}. To use SAM, download or "
                f"import the checkpoint (docs/user-guide.md, SAM weights) and start a new run."))
    return dataclasses.replace(config, retrain=dataclasses.replace(config.retrain, pseudo_labels="none"),
                               sfr_plus=False)


def manifest(cohort: Cohort, config: RunConfig) -> Dict[str, object]:
    """What the run used: package versions, device, seeds and the SHA-256 of every input file."""
    packages = ("SFRSegmentLib", "torch", "numpy", "monai", "SimpleITK", "segment-anything", "slicerio", "pynrrd")
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = resolve_device(config.device)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": versions,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "seeds": {"finetune": config.finetune.seed, "retrain": config.retrain.seed},
        "cohort": str(cohort.root),
        "inputs": {
            case.name: {"split": split, "image": _file_record(case.image),
                        "label": _file_record(case.label) if case.label else None}
            for split, cases in (("train", cohort.cases), (TEST_SPLIT, cohort.test)) for case in cases
        },
    }


def _file_record(path: Path) -> Dict[str, str]:
    return {"path": str(path), "sha256": file_digest(path)}


def provenance_summary(run: RunFolder, cohort: Cohort, vnet: Path, truths: Truths) -> Dict[str, object]:
    """The identity of every output the run's results came from (``RUN/provenance.json``): the fine-tuned SAM, each
    pseudo-label, the V-Net, each prediction, and for the metrics the SHA-256 of each true label. None marks an
    output the run did not make (no SAM stage, for example)."""
    def identity(path: Path) -> Optional[str]:
        record = read_record(path)
        return None if record is None else record["id"]

    return {
        "fine-tuned SAM": identity(run.sam_weights),
        "pseudo-labels": {case.name: identity(run.pseudo_label(case.name)) for case in cohort.unlabeled},
        "V-Net": identity(vnet),
        "V-Net file": str(vnet.relative_to(run.root)),
        "predictions": {case.name: identity(prediction_files(run.prediction_dir, case.name)[0])
                        for case in predicted_cases(cohort)},
        "true labels": {name: file_digest(path) for cases in truths.values() for name, path in cases.items()},
    }


def _remove_outputs(run: RunFolder, redo: Sequence[str]) -> None:
    """Delete the outputs of the first stage named in ``redo`` and of every stage after it."""
    unknown = [s for s in redo if s not in STAGES]
    if unknown:
        raise InputError(f"unknown stage {unknown[0]!r} for --redo; expected one of {', '.join(STAGES)}",
                         field="redo")
    if not redo:
        return
    first = min(STAGES.index(s) for s in redo)
    outputs = {
        "finetune": [run.finetune_dir], "pseudolabel": [run.pseudolabel_dir], "retrain": [run.retrain_dir],
        "sfrplus": [run.root / "sfrplus"], "baseline": [run.baseline.root],
        "predict": [run.prediction_dir], "evaluate": [run.metrics], "report": [run.report],
    }
    for stage in STAGES[first:]:
        for path in outputs[stage]:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


@contextlib.contextmanager
def _stage(name: str, clock: StageClock) -> Iterator[None]:
    """Time a training or prediction stage, and turn a CUDA out-of-memory error into one that says which setting to
    lower."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        raise OutOfMemory(f"GPU out of memory during {name}; lower {_MEMORY_SETTINGS[name]} "
                          f"(with --config), or run on a larger GPU") from exc
    clock.lap(name)


class StageClock:
    """Wall seconds per stage of one invocation (``RUN/timings.json``): each :meth:`lap` charges the time since the
    previous one to its stage. A resumed run's stages count only what this invocation did."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 3)
        self._last = now


def _truths(cohort: Cohort, config: RunConfig) -> Dict[str, Dict[str, Path]]:
    """What the run scores, test split first: each test case against its own label, and with ``config.truth_dir``
    each unlabeled case against its true label there (InputError naming the cases that have none)."""
    truths = {TEST_SPLIT: {case.name: case.label for case in cohort.test}} if cohort.test else {}
    if config.truth_dir:
        found = find_label_files(Path(config.truth_dir), "truth")
        missing = [case.name for case in cohort.unlabeled if case.name not in found]
        if missing:
            raise InputError(f"no true label of the unlabeled case(s) {', '.join(missing)} (expected <case>.<ext> "
                             "or <case>/label.<ext>)", config.truth_dir, "truth_dir")
        truths[UNLABELED_SPLIT] = {case.name: found[case.name] for case in cohort.unlabeled}
    return truths
