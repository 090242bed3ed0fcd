"""The run-time estimate: what is counted (checked against MONAI's own window count), the warning in the JSON lines,
and that finished stages are left out. Timings are only checked to be positive and finite."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import List, Sequence

import pytest
import torch
from monai.inferers import sliding_window_inference

from SFRSegmentLib.storage.checkpoint import FORMAT
from SFRSegmentLib.base.config import RunConfig, parse_method, preset
from SFRSegmentLib.stages.confidence import write_table
from SFRSegmentLib.base.config_io import with_overrides
from SFRSegmentLib.data.cohort import Case, Cohort
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.base.events import format_duration
from SFRSegmentLib.run.estimate import StageWork, StepTimes, estimate_run, estimate_stages
from SFRSegmentLib.stages.inference import PREDICTION_SUFFIXES, monai_overlap
from SFRSegmentLib.storage.volumes import read_volume
from SFRSegmentLib.run.stages import prediction_inputs, remaining_work
from SFRSegmentLib.storage.provenance import Inputs, write_record
from SFRSegmentLib.stages.retrain import retrain_inputs
from SFRSegmentLib.stages.finetune import finetune_inputs
from SFRSegmentLib.stages.pseudolabel import case_inputs
from SFRSegmentLib.base.progress import JsonLinesReporter
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.research.synthetic import make_synthetic_cohort

TIMES = StepTimes(finetune_iteration=2.0, pseudolabel_pass=3.0, retrain_iteration={"sfr_mt": 5.0, "supervised": 7.0},
                  predict_pass=11.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """One labeled and three unlabeled cases of different shapes, some smaller than the windows along an axis."""
    root = tmp_path_factory.mktemp("cohort") / "synthetic"
    return make_synthetic_cohort(root, n_cases=4, n_labeled=1, seed=3, size_range=((40, 90), (44, 70), (16, 30)))


def small_config(cohort: Cohort, **overrides: object) -> RunConfig:
    config = with_overrides(preset("small"), {"device": "cpu", "finetune": {"iterations": 7},
                                              "retrain": {"iterations": 13}, **overrides})
    return config.resolved(len(cohort.classes))


def monai_calls(case: Case, roi: Sequence[int], overlap: object, batch_size: int) -> int:
    """How often MONAI's sliding window calls the network on the case's image (as stages P and predict run it)."""
    calls: List[int] = []

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        calls.append(windows.shape[0])
        return windows

    shape = read_volume(case.image).shape
    sliding_window_inference(torch.zeros((1, 1) + shape), roi_size=roi, sw_batch_size=batch_size,
                             predictor=predictor, overlap=overlap, mode="constant")
    return len(calls)


def events(stream: io.StringIO) -> List[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_each_stage_is_its_counts_times_the_seconds_per_step(cohort):
    config = small_config(cohort, sfr_plus=True, sfrplus={"rounds": 2}, baseline_method="supervised")
    stages = estimate_stages(remaining_work(cohort, RunFolder("/nonexistent/run"), config), TIMES, config)

    unlabeled = cohort.unlabeled
    sam_passes = sum(monai_calls(case, config.finetune.patch_size, config.pseudolabel.overlap,
                                 config.pseudolabel.windows_per_batch) for case in unlabeled)
    window = config.inference.for_model(config.retrain.patch_size)  # the V-Net's training patch
    vnet_passes = sum(monai_calls(case, window.patch_size, monai_overlap(window), window.sw_batch_size)
                      for case in unlabeled)
    assert sam_passes > len(unlabeled) and vnet_passes > len(unlabeled)  # several windows per case
    expected = {
        "finetune": [(7, 2.0)],
        "pseudolabel": [(sam_passes, 3.0)],
        "retrain": [(13, 5.0)],
        "sfrplus": [(2 * 7, 2.0), (2 * sam_passes, 3.0), (2 * 13, 5.0), (2 * vnet_passes, 11.0)],
        "baseline": [(13, 7.0), (vnet_passes, 11.0)],
        "predict": [(vnet_passes, 11.0)],
    }
    assert [stage.stage for stage in stages] == list(expected)
    for stage in stages:
        assert [(item.count, item.seconds_each) for item in stage.items] == expected[stage.stage]
        assert stage.seconds == pytest.approx(sum(count * each for count, each in expected[stage.stage]))
        assert format_duration(stage.seconds) in stage.describe()


def test_held_out_test_cases_count_in_prediction_only(cohort, tmp_path):
    held_out = make_synthetic_cohort(tmp_path / "held_out", n_cases=2, n_labeled=2, seed=4,
                                     size_range=((40, 60), (44, 60), (16, 24)))
    test = [dataclasses.replace(case, name=f"test_{i}") for i, case in enumerate(held_out.cases)]
    config = small_config(cohort, sfr_plus=True, sfrplus={"rounds": 1}, baseline_method="supervised")
    work = {stage.stage: stage
            for stage in remaining_work(dataclasses.replace(cohort, test=test), RunFolder(tmp_path / "run"), config)}
    predicted = (*cohort.unlabeled, *test)
    assert work["predict"].predict_cases == predicted == work["baseline"].predict_cases
    unlabeled = tuple(cohort.unlabeled)  # no training stage, nor SFR+'s scoring, sees a test case
    assert work["pseudolabel"].pseudolabel_cases == unlabeled == work["sfrplus"].pseudolabel_cases
    assert work["sfrplus"].predict_cases == unlabeled
    stages = {stage.stage: stage for stage in estimate_stages(list(work.values()), TIMES, config)}
    window = config.inference.for_model(config.retrain.patch_size)
    vnet_passes = sum(monai_calls(case, window.patch_size, monai_overlap(window), window.sw_batch_size)
                      for case in predicted)
    assert [(item.count, item.seconds_each) for item in stages["predict"].items] == [(vnet_passes, 11.0)]


def _make_outputs(outputs: Sequence[Path], inputs: Inputs) -> None:
    """Stand-ins for a stage's output files, with the record of ``inputs`` (the estimate reads only the records)."""
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    write_record(outputs, inputs)


def test_current_outputs_are_left_out_and_stale_ones_count_with_everything_after_them(cohort, tmp_path):
    config = small_config(cohort, sfr_plus=True, sfrplus={"rounds": 2})
    run = RunFolder(tmp_path / "run")
    current, stale, *others = cohort.unlabeled
    _make_outputs([run.sam_weights, run.sam_weights_info], finetune_inputs(config.finetune, cohort, None))
    labels = case_inputs(cohort, cohort.unlabeled, config.pseudolabel, run.sam_weights)
    _make_outputs(run.pseudo_label_files(current.name), labels[current.name])
    _make_outputs(run.pseudo_label_files(stale.name),
                  dataclasses.replace(labels[stale.name], upstream={"SAM weights": "an earlier fine-tuning"}))
    work = {stage.stage: stage for stage in remaining_work(cohort, run, config)}
    assert work["finetune"] == StageWork("finetune")
    assert work["pseudolabel"].pseudolabel_cases == (stale, *others)
    assert work["retrain"].retrain_iterations == 13  # its pseudo-labels change, so does the V-Net
    sfrplus = work["sfrplus"]
    assert (sfrplus.finetune_iterations, sfrplus.retrain_iterations) == (2 * 7, 2 * 13)
    assert sfrplus.pseudolabel_cases == tuple(cohort.unlabeled) * 2 == sfrplus.predict_cases
    assert work["predict"].predict_cases == tuple(cohort.unlabeled)

    no_sfrplus = dataclasses.replace(config, sfr_plus=False)
    stream = io.StringIO()
    estimate = estimate_run(cohort, no_sfrplus, remaining_work(cohort, run, no_sfrplus), JsonLinesReporter(stream))
    assert [stage.stage for stage in estimate.stages] == ["pseudolabel", "retrain", "predict"]
    assert not any(event["message"].startswith("finetune") for event in events(stream))
    for stage in estimate.stages:
        assert all(math.isfinite(item.seconds_each) and item.seconds_each > 0 for item in stage.items)

    for case in (stale, *others):  # now every pseudo-label is current, and so are the V-Net and one prediction
        _make_outputs(run.pseudo_label_files(case.name), labels[case.name])
    pseudo_labels = {case.name: run.pseudo_label(case.name) for case in cohort.unlabeled}
    _make_outputs([run.vnet_weights, run.vnet_weights.with_suffix(".json")],
                  retrain_inputs(config.retrain, cohort, pseudo_labels))
    predictions = prediction_inputs(cohort.unlabeled, run.vnet_weights, config.inference)
    _make_outputs([run.prediction(current.name, suffix) for suffix in PREDICTION_SUFFIXES],
                  predictions[current.name])
    work = {stage.stage: stage for stage in remaining_work(cohort, run, no_sfrplus)}
    assert work["predict"].predict_cases == tuple(cohort.unlabeled)  # a prediction counts with its confidence row
    write_table(run.prediction_confidence, {current.name: 0.9})
    work = {stage.stage: stage for stage in remaining_work(cohort, run, no_sfrplus)}
    assert (work["pseudolabel"].pseudolabel_cases, work["retrain"].retrain_iterations) == ((), 0)
    assert work["predict"].predict_cases == (stale, *others)


def test_a_stage_stopped_midway_counts_what_its_checkpoint_has_left(cohort, tmp_path):
    config = small_config(cohort)
    run = RunFolder(tmp_path / "run")
    run.finetune_dir.mkdir(parents=True)
    run.retrain_dir.mkdir()
    finetune_from = finetune_inputs(config.finetune, cohort, None).as_dict()
    torch.save({"format": FORMAT, "iteration": 4, "inputs": finetune_from}, run.finetune_checkpoint)
    assert {s.stage: s for s in remaining_work(cohort, run, config)}["finetune"].finetune_iterations == 7 - 4
    torch.save({"format": FORMAT, "iteration": 4, "inputs": {**finetune_from, "options": {}}}, run.finetune_checkpoint)
    assert {s.stage: s for s in remaining_work(cohort, run, config)}["finetune"].finetune_iterations == 7  # stale

    mean_teacher = dataclasses.replace(config, retrain=dataclasses.replace(config.retrain, **parse_method("mt")))
    torch.save({"format": FORMAT, "iteration": 5, "inputs": retrain_inputs(mean_teacher.retrain, cohort, {}).as_dict()},
               run.retrain_checkpoint)
    work = {stage.stage: stage for stage in remaining_work(cohort, run, mean_teacher)}
    assert work["retrain"].retrain_iterations == 13 - 5

    run.retrain_checkpoint.write_bytes(b"damaged")  # counted in full here; the stage itself reports it
    assert {s.stage: s for s in remaining_work(cohort, run, mean_teacher)}["retrain"].retrain_iterations == 13


@pytest.mark.parametrize("warn_hours, warns", [(1e-9, True), (1e9, False)])
def test_the_estimate_warns_in_the_json_lines_only_above_the_threshold(cohort, warn_hours, warns):
    config = small_config(cohort, estimate_warn_hours=warn_hours)
    stream = io.StringIO()
    work = [StageWork("retrain"), StageWork("predict", predict_cases=tuple(cohort.unlabeled))]  # V-Net passes only
    estimate = estimate_run(cohort, config, work, JsonLinesReporter(stream))

    sent = events(stream)
    assert {event["stage"] for event in sent} == {"estimate"}
    assert sent[1]["message"].startswith("predict: ")
    total = sent[2]
    assert total["level"] == "info" and total["step"] == total["total"] == 2
    assert total["eta_s"] == pytest.approx(estimate.total_s) and 0 < estimate.total_s < math.inf
    warnings = [event for event in sent if event["level"] == "warning"]
    if warns:
        assert warnings == [sent[-1]] and len(sent) == 4
        assert "more than 1e-09 h" in warnings[0]["message"] and "CUDA GPU" in warnings[0]["message"]
        assert "--preset cpu" in warnings[0]["message"]
    else:
        assert warnings == [] and len(sent) == 3


def test_nothing_left_is_an_estimate_of_zero(cohort):
    config = small_config(cohort)
    stream = io.StringIO()
    estimate = estimate_run(cohort, config, [StageWork("finetune"), StageWork("predict")], JsonLinesReporter(stream))
    assert estimate.stages == () and estimate.total_s == 0
    assert [event["eta_s"] for event in events(stream)] == [None, 0]


def test_the_warning_threshold_must_be_positive():
    with pytest.raises(InputError, match="estimate_warn_hours must be positive"):
        with_overrides(preset("small"), {"estimate_warn_hours": 0})


@pytest.mark.parametrize("seconds, text", [(0.42, "0.4 s"), (12.4, "12 s"), (260, "4 min 20 s"),
                                           (41 * 3600 + 5 * 60 + 10, "41 h 05 min")])
def test_durations_read_naturally(seconds, text):
    assert format_duration(seconds) == text
