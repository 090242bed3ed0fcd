"""SFR+: split the unlabeled volumes by the re-trained V-Net's confidence and alternate SAM and V-Net updates.

The paper (docs/sfr-method.md §5) defines the confidence of unlabeled volume j as the mean over its voxels of the
largest softmax probability of the re-trained model, C_j = (1/N_v) Σ_v max_c p_c(v), and splits at τ = 0.985:
volumes with C_j ≥ τ ("confident") further fine-tune SAM, the others ("uncertain") get SAM pseudo-labels in
re-training. It leaves the rest open; :class:`~SFRSegmentLib.base.config.SFRPlusConfig` makes each open choice an
option, with the spec's suggested minimal reading as the default:

1. C_j on the whole volume (the reference sliding window, :mod:`SFRSegmentLib.stages.inference`), over all voxels;
2. SAM is fine-tuned again, continuing from the previous fine-tuned weights, on the labeled volumes plus the
   confident ones labeled with the V-Net's argmax;
3. the uncertain volumes get pseudo-labels from that SAM;
4. the V-Net is re-trained from scratch; the confident volumes stay unlabeled with their SSL terms but without a
   pseudo-label term;
5. one round.

A round lives in its own run folder ``RUN/sfrplus/round<r>/`` (finetune/, pseudolabels/, retrain/ as any run,
plus ``confidence.csv``, ``vnet_labels/<case>.label.nrrd`` and ``round.json``). Round r scores the V-Net of round
r − 1 (round 0 is the SFR run itself) and continues from its SAM weights. The stage functions are injected
(:class:`FinetuneFn`, :class:`PseudolabelFn`, :class:`RetrainFn`), so the driver is independent of SAM.

Two decisions of this implementation: a confident volume whose V-Net prediction holds no foreground at all is
treated as uncertain (a label without foreground teaches SAM nothing and is refused as a label); a round without
any confident volume skips fine-tuning and keeps the previous SAM weights (there is nothing new to learn from).
"""

from __future__ import annotations

import csv
import dataclasses
import io as text_io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from ..base.config import InferenceConfig, SFRPlusConfig
from ..base.device import resolve_device
from ..base.distributed import broadcast_from_main, map_cases, ranks
from ..base.errors import InputError
from ..base.progress import Progress, ProgressEvent, ignore_progress
from ..data.cohort import Case, Cohort
from ..models.vnet import load_vnet
from ..storage.atomic import atomic_write_text
from ..storage.runfolder import RunFolder
from ..storage.volumes import Volume, read_volume, write_volume
from .confidence import volume_confidence
from .inference import predict_volume

STAGE = "sfrplus"
ROUNDS_FOLDER = "sfrplus"
CONFIDENCE_FILE = "confidence.csv"
VNET_LABELS_FOLDER = "vnet_labels"
ROUND_RECORD = "round.json"


class FinetuneFn(Protocol):
    """Stage F: fine-tune SAM on the labeled cases of ``cohort`` into ``run``, starting from ``init_weights`` (the
    trainable SAM weights to continue from; None = the base checkpoint). Returns the trainable weights file."""

    def __call__(self, *, cohort: Cohort, run: RunFolder, init_weights: Optional[Path]) -> Path: ...


class PseudolabelFn(Protocol):
    """Stage P: write ``run.pseudo_label(case.name)`` for each of ``cases`` with the SAM weights ``sam_weights``."""

    def __call__(self, *, cohort: Cohort, run: RunFolder, cases: Sequence[Case], sam_weights: Path) -> None: ...


class RetrainFn(Protocol):
    """Stage R: re-train on ``cohort`` into ``run``, the pseudo-label term only for the cases in
    ``pseudo_labels`` (case name → label file). Returns the V-Net file."""

    def __call__(self, *, cohort: Cohort, run: RunFolder, pseudo_labels: Mapping[str, Path]) -> Path: ...


@dataclass(frozen=True)
class RoundResult:
    """What one round decided and produced."""

    round_index: int
    run: RunFolder
    confidences: Dict[str, float]
    confident: List[str]
    uncertain: List[str]
    sam_weights: Path
    vnet_weights: Path


# ---------------------------------------------------------------------------------------------------------------
# Confidence


def split_by_confidence(confidences: Mapping[str, float], threshold: float) -> Tuple[List[str], List[str]]:
    """(confident: C ≥ threshold, uncertain: the rest), each in the mapping's order."""
    confident = [name for name, c in confidences.items() if c >= threshold]
    return confident, [name for name in confidences if name not in confident]


def round_folder(run: RunFolder, round_index: int) -> RunFolder:
    """The run folder of round ``round_index`` (round 0 is the SFR run itself)."""
    return run if round_index == 0 else RunFolder(run.root / ROUNDS_FOLDER / f"round{round_index}")


def _previous_sam_weights(run: RunFolder, round_index: int) -> Path:
    """The SAM weights round ``round_index`` continues from: the SFR run's, or what the previous round used."""
    if round_index == 1:
        return run.sam_weights
    record = round_folder(run, round_index - 1).root / ROUND_RECORD
    if not record.is_file():
        raise InputError(f"round {round_index - 1} has not finished; run it before round {round_index}", record)
    try:
        return Path(json.loads(record.read_text(encoding="utf-8"))["sam_weights"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:  # damaged, or another format
        raise InputError(f"not a readable record of round {round_index - 1} ({type(error).__name__}: {error}); "
                         f"run round {round_index - 1} again (delete its folder, or rerun with --redo sfrplus)",
                         record, "sam_weights") from error


def _write_confidence_table(path: Path, confidences: Mapping[str, float], confident: Sequence[str]) -> None:
    """case, confidence, split; least confident first."""
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("case", "confidence", "split"))
    for name, confidence in sorted(confidences.items(), key=lambda item: item[1]):
        writer.writerow((name, repr(confidence), "confident" if name in confident else "uncertain"))
    atomic_write_text(path, buffer.getvalue())


def _score_volumes(run: RunFolder, round_index: int, cases: Sequence[Case], config: SFRPlusConfig,
                   inference: Optional[InferenceConfig], progress: Progress) -> Dict[str, Tuple[float, Volume]]:
    """Case name → (confidence, V-Net label map) with the V-Net of the previous round; under torchrun the ranks
    share the cases and the result is on rank 0 only (empty elsewhere)."""
    device = resolve_device(inference.device if inference else "auto")
    model, info = load_vnet(round_folder(run, round_index - 1).vnet_weights, device)
    inference = (inference or InferenceConfig()).for_model(info.patch_size, info.downsampling)
    scored: Dict[str, Tuple[float, Volume]] = {}

    def score(case: Case) -> Tuple[float, Volume]:
        labels, probabilities = predict_volume(model, read_volume(case.image), inference, info.classes, info.spacing,
                                               info.intensity_window)
        return volume_confidence(probabilities, config.confidence_voxels), labels

    def collect(case: Case, result: Tuple[float, Volume]) -> None:
        scored[case.name] = result
        progress(ProgressEvent(STAGE, len(scored), len(cases), metric=result[0],
                               message=f"round {round_index}: confidence of {case.name}"))

    map_cases(cases, score, collect)
    return scored


# ---------------------------------------------------------------------------------------------------------------
# Rounds


def run_sfrplus_round(cohort: Cohort, run: RunFolder, round_index: int, finetune_fn: FinetuneFn,
                      pseudolabel_fn: PseudolabelFn, retrain_fn: RetrainFn,
                      config: SFRPlusConfig = SFRPlusConfig(), inference: Optional[InferenceConfig] = None,
                      progress: Progress = ignore_progress) -> RoundResult:
    """One SFR+ round on ``cohort`` (the SFR run ``run`` must hold its V-Net, SAM weights and pseudo-labels).

    Scores the unlabeled volumes with the previous round's V-Net, writes the confident ones' labels, fine-tunes
    SAM on the labeled ∪ confident volumes, pseudo-labels the uncertain ones and re-trains, all into
    ``RUN/sfrplus/round<round_index>/``; see the module docstring for the choices ``config`` makes.
    """
    if round_index < 1:
        raise InputError(f"round_index must be at least 1, got {round_index}", field="round_index")
    here = round_folder(run, round_index)
    sam_weights = _previous_sam_weights(run, round_index)
    scored = _score_volumes(run, round_index, cohort.unlabeled, config, inference, progress)
    confidences: Dict[str, float] = {}
    confident_labels: Dict[str, Path] = {}
    if ranks().is_main:  # rank 0 holds the scores and writes the files; the others receive the decisions
        confidences = {name: confidence for name, (confidence, _) in scored.items()}
        confident = split_by_confidence(confidences, config.threshold)[0]
        confident_labels = _confident_labels(run, here, {name: scored[name][1] for name in confident}, config)
        confident = [name for name in confident if name in confident_labels]
        _write_confidence_table(here.root / CONFIDENCE_FILE, confidences, confident)
    confidences, confident_labels = broadcast_from_main((confidences, confident_labels))
    confident = [name for name in confidences if name in confident_labels]
    uncertain = [name for name in confidences if name not in confident]

    if confident:
        init_weights = sam_weights if config.sam_start == "continue" else None
        sam_weights = finetune_fn(cohort=_with_labels(cohort, confident_labels), run=here,
                                  init_weights=init_weights)
    uncertain_cases = [case for case in cohort.unlabeled if case.name in uncertain]
    if uncertain_cases:
        pseudolabel_fn(cohort=cohort, run=here, cases=uncertain_cases, sam_weights=sam_weights)
    retrain_cohort, pseudo_labels = _retraining_inputs(cohort, here, uncertain, confident_labels, config)
    vnet_weights = retrain_fn(cohort=retrain_cohort, run=here, pseudo_labels=pseudo_labels)

    result = RoundResult(round_index, here, confidences, confident, uncertain, Path(sam_weights), Path(vnet_weights))
    record = {"round": round_index, "config": dataclasses.asdict(config), "confidences": confidences,
              "confident": confident, "uncertain": uncertain, "sam_weights": str(sam_weights),
              "vnet_weights": str(vnet_weights)}
    if ranks().is_main:
        atomic_write_text(here.root / ROUND_RECORD, json.dumps(record, indent=2) + "\n")
    return result


def run_sfrplus(cohort: Cohort, run: RunFolder, finetune_fn: FinetuneFn, pseudolabel_fn: PseudolabelFn,
                retrain_fn: RetrainFn, config: SFRPlusConfig = SFRPlusConfig(),
                inference: Optional[InferenceConfig] = None, progress: Progress = ignore_progress
                ) -> List[RoundResult]:
    """``config.rounds`` rounds of :func:`run_sfrplus_round`, each scoring the previous round's V-Net."""
    return [run_sfrplus_round(cohort, run, r, finetune_fn, pseudolabel_fn, retrain_fn, config, inference, progress)
            for r in range(1, config.rounds + 1)]


def _confident_labels(run: RunFolder, here: RunFolder, predictions: Mapping[str, Volume],
                      config: SFRPlusConfig) -> Dict[str, Path]:
    """Case name → label file of each confident volume that has foreground (V-Net labels are written here)."""
    labels = {}
    for name, prediction in predictions.items():
        if config.confident_label_source == "sam":
            path = run.pseudo_label(name)
            has_foreground = bool(read_volume(path).array.any())
        else:
            path = here.root / VNET_LABELS_FOLDER / f"{name}.label.nrrd"
            has_foreground = bool(prediction.array.any())
            if has_foreground:
                write_volume(prediction, path)
        if has_foreground:
            labels[name] = path
    return labels


def _with_labels(cohort: Cohort, labels: Mapping[str, Path]) -> Cohort:
    """The cohort in memory with the cases in ``labels`` counted as labeled by those files."""
    cases = [dataclasses.replace(case, label=labels[case.name]) if case.name in labels else case
             for case in cohort.cases]
    return dataclasses.replace(cohort, cases=cases)


def _retraining_inputs(cohort: Cohort, here: RunFolder, uncertain: Sequence[str], confident_labels: Mapping[str, Path],
                       config: SFRPlusConfig) -> Tuple[Cohort, Dict[str, Path]]:
    """The cohort and pseudo-label files the re-training of this round gets (``confident_in_retraining``)."""
    pseudo_labels = {name: here.pseudo_label(name) for name in uncertain}
    choice = config.confident_in_retraining
    if choice == "pseudo_label":
        return cohort, {**pseudo_labels, **confident_labels}
    if choice == "labeled":
        return _with_labels(cohort, confident_labels), pseudo_labels
    if choice == "excluded":
        kept = [case for case in cohort.cases if case.name not in confident_labels]
        return dataclasses.replace(cohort, cases=kept), pseudo_labels
    return cohort, pseudo_labels
