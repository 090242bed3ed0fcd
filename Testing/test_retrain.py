"""Stage R: schedules, the two-stream sampler, aligned crops, a short run of every method, resumption, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from SFRSegmentLib.base.choices import METHODS
from SFRSegmentLib.base.config import RetrainConfig, SSLConfig, parse_method, preset
from SFRSegmentLib.base.config_io import with_overrides
from SFRSegmentLib.data.cohort import Cohort
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.models.vnet import load_vnet
from SFRSegmentLib.storage.volumes import read_volume, write_volume
from SFRSegmentLib.base.progress import Cancellation, Cancelled, ProgressEvent
from SFRSegmentLib.storage.provenance import read_record
from SFRSegmentLib.stages.retrain import (
    TrainingCase,
    TwoStreamSampler,
    class_volumes,
    draw_batch,
    learning_rate,
    plausible_pseudo_labels,
    retrain,
)
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.research.synthetic import TRUTH_FOLDER, make_synthetic_cohort

REPO = Path(__file__).resolve().parents[1]
TINY = dict(patch_size=(32, 32, 16), iterations=2, lr_schedule="step", checkpoint_every=1, device="cpu", n_filters=4)
"""A few iterations of a narrow V-Net on small patches: seconds on a CPU."""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """One labeled and three unlabeled synthetic cases."""
    root = tmp_path_factory.mktemp("cohort")
    return make_synthetic_cohort(root, n_cases=4, n_labeled=1, size_range=((40, 48), (40, 48), (20, 24)))


def run_with_pseudo_labels(cohort: Cohort, root: Path) -> RunFolder:
    """A run folder whose cached pseudo-labels are the held-out truths (as stage P would write them)."""
    run = RunFolder(root)
    for case in cohort.unlabeled:
        write_volume(read_volume(cohort.root / TRUTH_FOLDER / case.name / "label.nrrd"), run.pseudo_label(case.name))
    return run


def state_dict(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


# ---------------------------------------------------------------------------------------------------------------
# Units


def test_learning_rate_schedules() -> None:
    step = RetrainConfig(iterations=6000, lr_schedule="step")
    assert [learning_rate(i, step) for i in (0, 2499, 2500, 4999, 5000, 5999)] == pytest.approx(
        [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])
    poly = RetrainConfig(lr_schedule="poly", iterations=100)
    assert learning_rate(0, poly) == 0.01
    assert learning_rate(50, poly) == pytest.approx(0.01 * 0.5 ** 0.9)


def test_defaults_are_the_reference_recipe() -> None:
    config = preset("paper").resolved().retrain
    assert (config.method, config.iterations, config.patch_size, config.batch_labeled, config.batch_unlabeled) == (
        "sfr_mt", 6000, (112, 112, 80), 2, 2)
    assert (config.ssl_method, config.pseudo_labels) == ("mt", "sam")
    assert (config.lr, config.momentum, config.weight_decay, config.lr_step, config.lr_gamma, config.seed) == (
        0.01, 0.9, 1e-4, 2500, 0.1, 1337)
    assert config.lr_schedule == "step"
    assert config.ssl == SSLConfig() and config.ssl.pseudo_label_weight == 1.0 and config.ssl.ema_decay == 0.99


@pytest.mark.parametrize("method", ["acmt", "sfr_acmt"])
def test_ac_mt_runs_its_own_scripts_schedule_unless_told_otherwise(method: str) -> None:
    def resolved(name: str, **retrain: object) -> RetrainConfig:
        return with_overrides(preset(name), {"retrain": {"method": method, **retrain}}).resolved().retrain

    assert (resolved("paper").lr_schedule, resolved("paper").iterations) == ("poly", 8000)
    assert (resolved("paper", iterations=100).lr_schedule, resolved("paper", iterations=100).iterations) == \
        ("poly", 100)
    assert resolved("paper", lr_schedule="step").lr_schedule == "step"
    assert (resolved("cpu").lr_schedule, resolved("cpu").iterations) == ("poly", 1500)  # the preset's own schedule
    assert (resolved("small").lr_schedule, resolved("small").iterations) == ("poly", 200)
    uamt = with_overrides(preset("paper"), {"retrain": {"method": "uamt"}}).resolved().retrain
    assert (uamt.lr_schedule, uamt.iterations) == ("step", 6000)


def test_stage_options_are_checked() -> None:
    with pytest.raises(InputError, match="patch_size"):
        RetrainConfig(patch_size=(30, 32, 16))
    with pytest.raises(InputError, match="unknown method"):
        RetrainConfig(**parse_method("sfr_magicnet"))


def test_two_stream_sampler_with_a_single_labeled_case() -> None:
    rng = np.random.default_rng(0)
    sampler = TwoStreamSampler(n_labeled=1, n_unlabeled=3, batch_labeled=2, batch_unlabeled=2)
    batches = [sampler.next_batch(rng) for _ in range(6)]
    assert all(labeled == [0, 0] for labeled, _ in batches)
    unlabeled = [i for _, u in batches for i in u]  # 12 draws = 4 permutations of 3 cases
    for start in range(0, 12, 3):
        assert sorted(unlabeled[start:start + 3]) == [0, 1, 2]
    restored = TwoStreamSampler(1, 3, 2, 2)
    restored.load_state_dict(sampler.state_dict())
    rng_copy = np.random.default_rng(0)
    rng_copy.bit_generator.state = rng.bit_generator.state
    assert [restored.next_batch(rng_copy) for _ in range(4)] == [sampler.next_batch(rng) for _ in range(4)]


def test_crops_and_their_targets_are_cut_together() -> None:
    rng = np.random.default_rng(1)
    shape = (40, 36, 20)
    image = rng.normal(size=shape).astype(np.float32)
    target = (image > 0).astype(np.uint8)  # a function of the voxel value: survives only an aligned crop
    labeled = [TrainingCase("l", image, target)]
    unlabeled = [TrainingCase("u", image, target), TrainingCase("v", image, None)]
    config = RetrainConfig(patch_size=(32, 32, 16), batch_labeled=2, batch_unlabeled=2)
    sampler = TwoStreamSampler(1, 2, 2, 2)
    for _ in range(5):
        batch = draw_batch(labeled, unlabeled, sampler, rng, config, True, torch.device("cpu"))
        images = batch.images[:, 0]
        assert torch.equal(batch.labels, (images[:2] > 0).long())
        for row, has in enumerate(batch.has_pseudo_label.tolist()):
            expected = (images[2 + row] > 0).long() if has else torch.zeros_like(batch.pseudo_labels[row])
            assert torch.equal(batch.pseudo_labels[row], expected)
        assert batch.has_pseudo_label.sum() == 1


# ---------------------------------------------------------------------------------------------------------------
# Runs


def test_near_empty_pseudo_labels_are_left_out_of_the_sfr_term_and_the_rest_kept(cohort: Cohort,
                                                                                  tmp_path: Path) -> None:
    run = run_with_pseudo_labels(cohort, tmp_path / "run")
    missed, partial, whole = (case.name for case in cohort.unlabeled)
    smallest = class_volumes(cohort.labeled[0].label, [1])[1]
    for name, keep in ((missed, 0.0), (partial, 0.05)):  # SAM found nothing, or 5 % of the structure's voxels
        label = read_volume(run.pseudo_label(name))
        inside = np.flatnonzero(label.array == 1)
        array = label.array.copy().ravel()
        array[inside[int(keep * inside.size):]] = 0
        write_volume(label.with_array(array.reshape(label.array.shape)), run.pseudo_label(name))
    paths = {case.name: run.pseudo_label(case.name) for case in cohort.unlabeled}
    shares = {name: class_volumes(path, [1])[1] / smallest for name, path in paths.items()}
    assert shares[missed] == 0 and shares[partial] < shares[whole]
    threshold = (shares[partial] + shares[whole]) / 2
    events = []
    kept = plausible_pseudo_labels(cohort, paths, threshold, events.append)
    assert kept == {whole: paths[whole]}
    assert [e.message.split(":")[0] for e in events] == sorted([missed, partial])
    assert all("left out of the SFR term" in e.message for e in events)
    assert plausible_pseudo_labels(cohort, paths, 0.0) == paths  # 0: every one is used
    # In a re-training: the left-out cases are named, it trains, and a rerun reuses the V-Net.
    config = RetrainConfig(**parse_method("sfr_mt"), pseudo_label_min_volume=threshold, **TINY)
    events = []
    retrain(cohort, run, config, progress=events.append)
    assert sum("left out of the SFR term" in e.message for e in events) == 2 and run.vnet_weights.is_file()
    events = []
    retrain(cohort, run, config, progress=events.append)
    assert [e.message for e in events] == ["already re-trained"]


@pytest.mark.parametrize("method", METHODS)
def test_short_run_of_every_method_writes_the_run_files(cohort: Cohort, tmp_path: Path, method: str) -> None:
    run = run_with_pseudo_labels(cohort, tmp_path / "run")
    config = RetrainConfig(**parse_method(method), **TINY)
    weights = retrain(cohort, run, config)
    assert weights == run.vnet_weights and run.retrain_checkpoint.is_file()
    model, info = load_vnet(run.root)
    assert info.classes == cohort.classes and info.patch_size == (32, 32, 16)
    assert json.loads(run.vnet_weights.with_suffix(".json").read_text())["training"]["ssl_method"] == parse_method(method)["ssl_method"]
    with open(run.retrain_log, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert all(float(r["lr"]) == 0.01 and np.isfinite(float(r["loss"])) for r in rows)
    expected_terms = {"supervised"} | ({"consistency"} if method.replace("sfr_", "") in ("mt", "uamt", "acmt")
                                       else set()) | ({"pseudo_label"} if method.startswith("sfr") else set())
    assert {k for k in rows[0] if not k.endswith("_weight")} - {"iteration", "lr", "loss"} == expected_terms
    total = sum(float(rows[0][t]) * (float(rows[0][f"{t}_weight"]) if t != "supervised" else 1.0)
                for t in expected_terms)
    assert float(rows[0]["loss"]) == pytest.approx(total, rel=1e-5)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(cohort: Cohort, tmp_path: Path) -> None:
    config = RetrainConfig(**{**TINY, "iterations": 3, "checkpoint_every": 2}, **parse_method("sfr_uamt"),
                           ssl=SSLConfig(uamt_passes=2))
    whole = run_with_pseudo_labels(cohort, tmp_path / "whole")
    retrain(cohort, whole, config)

    parts = run_with_pseudo_labels(cohort, tmp_path / "parts")
    cancellation = Cancellation()

    def stop_after_the_first(event: ProgressEvent) -> None:
        cancellation.request()

    with pytest.raises(Cancelled):
        retrain(cohort, parts, config, progress=stop_after_the_first, cancellation=cancellation)
    assert not parts.vnet_weights.exists()
    assert torch.load(parts.retrain_checkpoint, weights_only=True)["iteration"] == 1  # saved off-schedule
    events = []
    retrain(cohort, parts, dataclasses.replace(config, checkpoint_every=5), progress=events.append)
    assert events[0].message == "resumed at iteration 1" and [e.step for e in events[1:]] == [2, 3]

    expected, resumed = state_dict(whole.vnet_weights), state_dict(parts.vnet_weights)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.allclose(expected[name].double(), resumed[name].double(), rtol=0, atol=1e-6), name
    assert whole.retrain_log.read_text() == parts.retrain_log.read_text()
    teacher_whole = torch.load(whole.retrain_checkpoint, weights_only=True)["method"]["teacher"]
    teacher_parts = torch.load(parts.retrain_checkpoint, weights_only=True)["method"]["teacher"]
    assert all(torch.allclose(teacher_whole[k].double(), teacher_parts[k].double(), atol=1e-6) for k in teacher_whole)


def test_other_options_retrain_instead_of_reusing_or_resuming(cohort: Cohort, tmp_path: Path) -> None:
    run = run_with_pseudo_labels(cohort, tmp_path / "run")
    retrain(cohort, run, RetrainConfig(**parse_method("sfr"), **TINY))
    first = read_record(run.vnet_weights)
    events = []
    retrain(cohort, run, RetrainConfig(**parse_method("sfr"), **TINY), progress=events.append)
    assert [e.message for e in events] == ["already re-trained"] and read_record(run.vnet_weights) == first

    events = []
    retrain(cohort, run, RetrainConfig(**parse_method("sfr"), lr=0.02, **TINY), progress=events.append)
    messages = [e.message for e in events if e.message]
    assert messages[0] == "the V-Net is stale (options changed: lr): re-training it again"
    assert messages[1].startswith(f"not resuming {run.retrain_checkpoint}: options changed: lr;")
    assert [e.step for e in events if e.loss is not None] == [1, 2]  # from iteration 0, not from the old checkpoint
    second = read_record(run.vnet_weights)
    assert second["id"] != first["id"] and second["inputs"]["options"]["lr"] == 0.02


def test_frozen_batchnorm_statistics_keep_the_initial_ones_while_the_weights_train(cohort: Cohort,
                                                                                   tmp_path: Path) -> None:
    first = run_with_pseudo_labels(cohort, tmp_path / "first")
    retrain(cohort, first, RetrainConfig(**parse_method("sfr_mt"), **TINY))
    with pytest.raises(InputError, match="frozen BatchNorm statistics need trained ones"):
        retrain(cohort, run_with_pseudo_labels(cohort, tmp_path / "scratch"),
                RetrainConfig(**parse_method("sfr_mt"), batchnorm_statistics="frozen", **TINY))
    before = state_dict(first.vnet_weights)
    running = [name for name in before if name.endswith(("running_mean", "running_var"))]
    trained = [name for name in before if name.endswith((".weight", ".bias"))]
    assert running and trained
    for statistics in ("frozen", "batch"):
        run = run_with_pseudo_labels(cohort, tmp_path / statistics)
        retrain(cohort, run, RetrainConfig(**parse_method("sfr_mt"), init_weights=str(first.vnet_weights),
                                           batchnorm_statistics=statistics, **TINY))
        after = state_dict(run.vnet_weights)
        assert any(not torch.equal(before[name], after[name]) for name in trained)
        kept = [torch.equal(before[name], after[name]) for name in running]
        assert all(kept) if statistics == "frozen" else not any(kept), statistics


def test_missing_pseudo_label_is_named(cohort: Cohort, tmp_path: Path) -> None:
    run = run_with_pseudo_labels(cohort, tmp_path / "run")
    missing = run.pseudo_label(cohort.unlabeled[1].name)
    missing.unlink()
    with pytest.raises(InputError) as error:
        retrain(cohort, run, RetrainConfig(**parse_method("sfr_mt"), **TINY))
    assert str(missing) in str(error.value)
    retrain(cohort, run, RetrainConfig(**parse_method("mt"), **TINY))  # methods without pseudo-labels do not need them


def test_explicit_pseudo_labels_may_cover_only_some_cases(cohort: Cohort, tmp_path: Path) -> None:
    run = run_with_pseudo_labels(cohort, tmp_path / "run")
    only_one = {cohort.unlabeled[0].name: run.pseudo_label(cohort.unlabeled[0].name)}
    retrain(cohort, run, RetrainConfig(**parse_method("sfr_acmt"), **TINY), pseudo_labels=only_one)
    assert run.vnet_weights.is_file()


def test_cli_retrain(cohort: Cohort, tmp_path: Path) -> None:
    run = run_with_pseudo_labels(cohort, tmp_path / "run")
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"n_filters": 4, "iterations": 50}))  # the flags win over the file
    command = [sys.executable, "-m", "SFRSegmentLib", "retrain", "--cohort", str(cohort.root), "--out", str(run.root),
               "--method", "sfr_mt", "--iterations", "2", "--patch", "32", "32", "16", "--batch-labeled", "1",
               "--batch-unlabeled", "1", "--device", "cpu", "--progress", "jsonl", "--config", str(options)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(e["stage"], e["step"], e["total"]) for e in events] == [("retrain", 1, 2), ("retrain", 2, 2)]
    training = json.loads(run.vnet_weights.with_suffix(".json").read_text())["training"]
    assert (training["batch_labeled"], training["batch_unlabeled"], training["patch_size"]) == (1, 1, [32, 32, 16])
    assert (training["n_filters"], training["iterations"]) == (4, 2)

    run.pseudo_label(cohort.unlabeled[2].name).unlink()
    run.retrain_checkpoint.unlink()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "pseudo-label missing" in result.stderr and cohort.unlabeled[2].name in result.stderr
