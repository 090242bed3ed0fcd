"""SFR+: confidence, the split, and the round driver with fake stage functions that record what they get."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pytest
import torch

from SFRSegmentLib.base.config import InferenceConfig, SFRPlusConfig
from SFRSegmentLib.data.cohort import Case, Cohort, load_case
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.stages.inference import predict_volume
from SFRSegmentLib.models.vnet import VNetInfo, save_vnet
from SFRSegmentLib.storage.volumes import read_volume, write_volume
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.stages.confidence import volume_confidence
from SFRSegmentLib.stages.sfrplus import run_sfrplus, run_sfrplus_round, split_by_confidence
from SFRSegmentLib.research.synthetic import TRUTH_FOLDER, make_synthetic_cohort
from SFRSegmentLib.models.vnet import VNet

INFERENCE = InferenceConfig(patch_size=(32, 32, 16), stride_xy=16, stride_z=8, device="cpu")


def test_volume_confidence_by_hand() -> None:
    probabilities = np.array([[0.9, 0.2, 0.6, 1.0], [0.1, 0.8, 0.4, 0.0]])  # 4 voxels, argmax 0, 1, 0, 0
    assert volume_confidence(probabilities) == pytest.approx((0.9 + 0.8 + 0.6 + 1.0) / 4)
    assert volume_confidence(probabilities, "foreground") == pytest.approx(0.8)
    assert volume_confidence(probabilities[:, [0, 3]], "foreground") == 0.0


def test_split_is_at_or_above_the_threshold() -> None:
    confident, uncertain = split_by_confidence({"a": 0.99, "b": 0.985, "c": 0.9849}, 0.985)
    assert confident == ["a", "b"] and uncertain == ["c"]


def test_defaults_are_the_suggested_minimal_reading() -> None:
    config = SFRPlusConfig()
    assert (config.threshold, config.rounds, config.confidence_voxels, config.confident_label_source,
            config.sam_start, config.confident_in_retraining) == (0.985, 1, "all", "vnet", "continue", "ssl_only")
    with pytest.raises(InputError, match="confident_in_retraining"):
        SFRPlusConfig(confident_in_retraining="sometimes")


# ---------------------------------------------------------------------------------------------------------------
# The round driver


def vnet_with_bias(background: float, foreground: float) -> VNet:
    """A small random V-Net (seed 0 predicts about half of each synthetic volume as foreground)."""
    torch.manual_seed(0)
    model = VNet(n_filters=4).eval()
    with torch.no_grad():
        model.out_conv.bias[:] = torch.tensor([background, foreground])
    return model


@dataclass
class FakeStages:
    """Stage functions that record their arguments and write what the real ones would."""

    cohort: Cohort
    model: VNet
    finetune_calls: List[dict] = field(default_factory=list)
    pseudolabel_calls: List[dict] = field(default_factory=list)
    retrain_calls: List[dict] = field(default_factory=list)

    def finetune(self, *, cohort: Cohort, run: RunFolder, init_weights: Optional[Path]) -> Path:
        self.finetune_calls.append(dict(cohort=cohort, run=run, init_weights=init_weights))
        run.sam_weights.parent.mkdir(parents=True, exist_ok=True)
        run.sam_weights.write_bytes(b"sam")
        return run.sam_weights

    def pseudolabel(self, *, cohort: Cohort, run: RunFolder, cases: Sequence[Case], sam_weights: Path) -> None:
        self.pseudolabel_calls.append(dict(cohort=cohort, run=run, cases=list(cases), sam_weights=sam_weights))
        for case in cases:
            truth = read_volume(self.cohort.root / TRUTH_FOLDER / case.name / "label.nrrd")
            write_volume(truth, run.pseudo_label(case.name))

    def retrain(self, *, cohort: Cohort, run: RunFolder, pseudo_labels: Mapping[str, Path]) -> Path:
        self.retrain_calls.append(dict(cohort=cohort, run=run, pseudo_labels=dict(pseudo_labels)))
        info = VNetInfo(classes=dict(cohort.classes), patch_size=(32, 32, 16), n_filters=4)
        return save_vnet(run.vnet_weights, self.model, info)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    return make_synthetic_cohort(tmp_path_factory.mktemp("cohort"), n_cases=5, n_labeled=1,
                                 size_range=((32, 40), (32, 40), (16, 20)))


def sfr_run(cohort: Cohort, root: Path, model: VNet) -> RunFolder:
    """A finished SFR run: V-Net, SAM weights and the SAM pseudo-labels of every unlabeled case."""
    run = RunFolder(root)
    FakeStages(cohort, model).retrain(cohort=cohort, run=run, pseudo_labels={})
    run.sam_weights.parent.mkdir(parents=True)
    run.sam_weights.write_bytes(b"sam round 0")
    FakeStages(cohort, model).pseudolabel(cohort=cohort, run=run, cases=cohort.unlabeled, sam_weights=run.sam_weights)
    return run


def confidences_of(model: VNet, cohort: Cohort) -> Dict[str, float]:
    return {case.name: volume_confidence(predict_volume(model, read_volume(case.image), INFERENCE)[1])
            for case in cohort.unlabeled}


def threshold_between_second_and_third(confidences: Mapping[str, float]) -> float:
    ordered = sorted(confidences.values())
    return (ordered[1] + ordered[2]) / 2


def test_round_scores_splits_and_calls_the_stages(cohort: Cohort, tmp_path: Path) -> None:
    model = vnet_with_bias(0.0, 0.0)
    run = sfr_run(cohort, tmp_path / "run", model)
    confidences = confidences_of(model, cohort)
    tau = threshold_between_second_and_third(confidences)
    stages = FakeStages(cohort, model)
    result = run_sfrplus_round(cohort, run, 1, stages.finetune, stages.pseudolabel, stages.retrain,
                               SFRPlusConfig(threshold=tau), INFERENCE)

    expected_confident = sorted(name for name, c in confidences.items() if c >= tau)
    assert len(expected_confident) == 2
    assert result.run.root == run.root / "sfrplus" / "round1"
    assert sorted(result.confident) == expected_confident
    assert sorted(result.uncertain) == sorted(set(confidences) - set(expected_confident))
    assert result.confidences == pytest.approx(confidences, abs=1e-6)

    (finetune,) = stages.finetune_calls
    assert finetune["run"] == result.run and finetune["init_weights"] == run.sam_weights  # continue from θ*
    labeled = {case.name: case.label for case in finetune["cohort"].labeled}
    assert set(labeled) == {cohort.labeled[0].name, *expected_confident}
    for name in expected_confident:  # the V-Net's argmax, written on the image's grid
        image, label = load_case(next(c for c in finetune["cohort"].cases if c.name == name), cohort.classes)
        predicted, _ = predict_volume(model, image, INFERENCE, cohort.classes)
        np.testing.assert_array_equal(label.array, predicted.array)
    assert len(cohort.labeled) == 1  # the caller's cohort is untouched

    (pseudolabel,) = stages.pseudolabel_calls
    assert sorted(c.name for c in pseudolabel["cases"]) == sorted(result.uncertain)
    assert pseudolabel["sam_weights"] == result.sam_weights == result.run.sam_weights

    (retrain,) = stages.retrain_calls
    assert retrain["cohort"] is cohort  # confident volumes stay unlabeled, with their SSL terms ...
    assert retrain["pseudo_labels"] == {n: result.run.pseudo_label(n) for n in result.uncertain}  # ... and no PL
    assert result.vnet_weights == result.run.vnet_weights

    with open(result.run.root / "confidence.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["confidence"]) for r in table] == sorted(float(r["confidence"]) for r in table)
    assert {r["case"] for r in table if r["split"] == "confident"} == set(expected_confident)
    record = json.loads((result.run.root / "round.json").read_text())
    assert record["sam_weights"] == str(result.sam_weights) and record["round"] == 1


def test_second_round_continues_from_the_first(cohort: Cohort, tmp_path: Path) -> None:
    model = vnet_with_bias(0.0, 0.0)
    run = sfr_run(cohort, tmp_path / "run", model)
    tau = threshold_between_second_and_third(confidences_of(model, cohort))
    stages = FakeStages(cohort, model)
    with pytest.raises(InputError, match="round 1 has not finished"):
        run_sfrplus_round(cohort, run, 2, stages.finetune, stages.pseudolabel, stages.retrain,
                          SFRPlusConfig(threshold=tau), INFERENCE)
    first, second = run_sfrplus(cohort, run, stages.finetune, stages.pseudolabel, stages.retrain,
                                SFRPlusConfig(threshold=tau, rounds=2, sam_start="continue"), INFERENCE)
    assert second.run.root == run.root / "sfrplus" / "round2"
    assert stages.finetune_calls[-1]["init_weights"] == first.sam_weights


@pytest.mark.parametrize("choice", ["pseudo_label", "labeled", "excluded"])
def test_confident_volumes_in_retraining(cohort: Cohort, tmp_path: Path, choice: str) -> None:
    model = vnet_with_bias(0.0, 0.0)
    run = sfr_run(cohort, tmp_path / "run", model)
    tau = threshold_between_second_and_third(confidences_of(model, cohort))
    stages = FakeStages(cohort, model)
    config = SFRPlusConfig(threshold=tau, confident_in_retraining=choice, sam_start="restart",
                           confident_label_source="sam")
    result = run_sfrplus_round(cohort, run, 1, stages.finetune, stages.pseudolabel, stages.retrain, config,
                               INFERENCE)
    assert stages.finetune_calls[0]["init_weights"] is None  # restart from the base checkpoint
    finetune_labels = {c.name: c.label for c in stages.finetune_calls[0]["cohort"].labeled}
    assert all(finetune_labels[n] == run.pseudo_label(n) for n in result.confident)  # the SFR run's SAM labels
    (retrain,) = stages.retrain_calls
    uncertain = {n: result.run.pseudo_label(n) for n in result.uncertain}
    names = {c.name for c in retrain["cohort"].cases}
    if choice == "pseudo_label":
        assert retrain["pseudo_labels"] == {**uncertain, **{n: run.pseudo_label(n) for n in result.confident}}
    elif choice == "labeled":
        assert {c.name for c in retrain["cohort"].labeled} == {cohort.labeled[0].name, *result.confident}
        assert retrain["pseudo_labels"] == uncertain
    else:
        assert names == {c.name for c in cohort.cases} - set(result.confident)
        assert retrain["pseudo_labels"] == uncertain


def test_confident_but_empty_predictions_count_as_uncertain(cohort: Cohort, tmp_path: Path) -> None:
    model = vnet_with_bias(10.0, -10.0)  # everything background, with confidence ≈ 1
    run = sfr_run(cohort, tmp_path / "run", model)
    stages = FakeStages(cohort, model)
    result = run_sfrplus_round(cohort, run, 1, stages.finetune, stages.pseudolabel, stages.retrain,
                               SFRPlusConfig(), INFERENCE)
    assert all(c > 0.985 for c in result.confidences.values())
    assert result.confident == [] and sorted(result.uncertain) == sorted(c.name for c in cohort.unlabeled)
    assert stages.finetune_calls == []  # nothing new to fine-tune SAM on: keep its weights
    assert result.sam_weights == run.sam_weights
