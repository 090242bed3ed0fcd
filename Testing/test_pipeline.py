"""The whole pipeline as users run it: `python -m SFRSegmentLib run` in real subprocesses, killed and resumed."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from SFRSegmentLib.base.config import preset
from SFRSegmentLib.base.config_io import with_overrides
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.volumes import read_volume, write_volume
from SFRSegmentLib.evaluation.metrics import CSV_COLUMNS, SPLIT_COLUMN, case_metrics
from SFRSegmentLib.models.sam.weights import file_sha256
from SFRSegmentLib.research.synthetic import make_synthetic_cohort
from test_runfolder import start_holder  # a real process holding a run folder's lock

REPO = Path(__file__).resolve().parents[1]
EVENT_KEYS = {"stage", "step", "total", "loss", "metric", "eta_s", "message", "level"}


def _command(cohort: Path, out: Path, config: Path, *extra: str) -> list:
    return [sys.executable, "-m", "SFRSegmentLib", "run", "--cohort", str(cohort), "--out", str(out),
            "--preset", "small", "--config", str(config), "--progress", "jsonl", "--device", "cpu", *extra]


def _write_config(path: Path, retrain_iterations: int, checkpoint_every: int, estimate_warn_hours: float = 3.0
                  ) -> Path:
    path.write_text(json.dumps({
        "finetune": {"iterations": 4, "checkpoint_every": 2},
        "retrain": {"iterations": retrain_iterations, "checkpoint_every": checkpoint_every, "lr_step": 1000},
        "inference": {"stride_xy": 24, "stride_z": 8},
        "estimate_warn_hours": estimate_warn_hours,
    }))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort") / "synthetic"
    make_synthetic_cohort(root, n_cases=3, n_labeled=1, n_classes=1, seed=5,
                          size_range=((48, 56), (48, 56), (16, 20)))
    return root


def test_run_streams_json_lines_and_writes_every_output(cohort, tmp_path):
    config = _write_config(tmp_path / "config.json", retrain_iterations=3, checkpoint_every=3,
                           estimate_warn_hours=1e-6)
    out = tmp_path / "run"
    result = subprocess.run(_command(cohort, out, config, "--truth", str(cohort / "truth")), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]  # every stdout line is one JSON object
    assert events and all(set(e) == EVENT_KEYS for e in events)
    stages = list(dict.fromkeys(e["stage"] for e in events))
    assert stages[:6] == ["validate", "estimate", "finetune", "pseudolabel", "retrain", "predict"]
    assert any("not for real data" in e["message"] for e in events if e["stage"] == "validate")
    assert stages[-1] == "report"
    estimate = [e["message"].split(":")[0] for e in events if e["stage"] == "estimate"]
    assert estimate[1:-2] == ["finetune", "pseudolabel", "retrain", "predict"]  # between "timing" and the total
    warnings = [e for e in events if e["level"] == "warning"]
    assert [e["stage"] for e in warnings] == ["estimate"] and "more than 1e-06 h" in warnings[0]["message"]
    assert warnings[0]["eta_s"] > 0
    finetune_steps = [e["step"] for e in events if e["stage"] == "finetune" and e["loss"] is not None]
    assert finetune_steps == [1, 2, 3, 4] and all(e["total"] == 4 for e in events if e["stage"] == "finetune")

    unlabeled = ["case_001", "case_002"]
    classes = json.loads((cohort / "classes.json").read_text())
    for case in unlabeled:
        seg = read_volume(out / "predictions" / f"{case}.seg.nrrd")
        image = read_volume(cohort / case / "image.nrrd")
        assert seg.shape == image.shape and np.allclose(seg.origin, image.origin)
        assert [s.name for s in seg.segments] == [classes["1"]]
        assert read_volume(out / "predictions" / f"{case}.nii.gz").shape == image.shape
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [SPLIT_COLUMN, *CSV_COLUMNS] and sorted(r["case"] for r in rows) == unlabeled
    assert {r["split"] for r in rows} == {"unlabeled"}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["case_000"]["label"]["sha256"] == file_sha256(cohort / "case_000" / "label.nrrd")
    assert manifest["packages"]["torch"] == torch.__version__ and manifest["device"] == "cpu"
    saved = json.loads((out / "config.json").read_text())
    assert saved["retrain"]["iterations"] == 3 and saved["finetune"]["sam"]["num_classes"] == 1
    report = (out / "report.html").read_text()
    assert "case_001" in report and "<svg" in report


def test_killed_run_resumes_from_the_last_checkpoint(cohort, tmp_path):
    config = _write_config(tmp_path / "config.json", retrain_iterations=24, checkpoint_every=4)
    out = tmp_path / "run"
    process = subprocess.Popen(_command(cohort, out, config), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    killed_after = None
    for line in process.stdout:
        event = json.loads(line)
        if event["stage"] == "retrain" and event["step"] >= 9:
            killed_after = event["step"]
            process.send_signal(signal.SIGTERM)
            break
    remaining = process.communicate(timeout=300)
    assert killed_after is not None, remaining[1][-3000:]
    assert process.returncode == 130, remaining[1][-3000:]
    assert "rerun the same command to resume" in remaining[1]
    checkpoint = torch.load(out / "retrain" / "checkpoint.pt", weights_only=False)
    saved_iteration = checkpoint["iteration"]
    assert killed_after <= saved_iteration < 24
    assert not (out / "retrain" / "vnet.pt").exists()

    result = subprocess.run(_command(cohort, out, config), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    estimate = [e["message"].split(":")[0] for e in events if e["stage"] == "estimate"]
    assert estimate[1:-1] == ["retrain", "predict"]  # fine-tuning and pseudo-labels are finished
    retrain_steps = [e["step"] for e in events if e["stage"] == "retrain" and e["loss"] is not None]
    assert retrain_steps[0] == saved_iteration + 1 and retrain_steps[-1] == 24
    assert f"resumed at iteration {saved_iteration}" in [e["message"] for e in events if e["stage"] == "retrain"]
    assert not [e for e in events if e["stage"] == "finetune" and e["loss"] is not None]  # F was not redone
    assert (out / "retrain" / "vnet.pt").is_file()


def test_a_bad_case_stops_the_run_before_training(cohort, tmp_path):
    broken = tmp_path / "broken"
    make_synthetic_cohort(broken, n_cases=3, n_labeled=1, seed=2, size_range=((40, 44), (40, 44), (16, 18)))
    label = read_volume(broken / "case_000" / "label.nrrd")
    label.spacing = (9.0, 9.0, 9.0)
    write_volume(label, broken / "case_000" / "label.nrrd")
    config = _write_config(tmp_path / "config.json", 2, 2)
    result = subprocess.run(_command(broken, tmp_path / "run", config), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "case_000" in result.stderr and "spacing" in result.stderr
    assert not (tmp_path / "run" / "finetune").exists()


def test_a_second_run_on_a_folder_in_use_stops_without_touching_it(cohort, tmp_path):
    out = tmp_path / "run"
    holder = start_holder(out)
    try:
        config = _write_config(tmp_path / "config.json", 2, 2)
        result = subprocess.run(_command(cohort, out, config), cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2
    assert f"pid {holder.pid}" in result.stderr and str(out) in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no config, manifest or stage folder written


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(InputError) as info:
        with_overrides(preset("small"), {"retrain": {"patch_size": [50, 48, 16]}}, source=tmp_path / "c.json")
    assert "patch_size" in str(info.value) and "c.json" in str(info.value)
    result = subprocess.run([sys.executable, "-m", "SFRSegmentLib", "run", "--cohort", "x", "--out", "y",
                             "--preset", "small", "--print-config"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    printed = json.loads(result.stdout)
    assert printed["preset"] == "small" and (printed["retrain"]["ssl_method"], printed["retrain"]["pseudo_labels"]) == ("mt", "sam")
    assert json.loads(json.dumps(printed)) == printed


TEST_CASES = ("case_003", "case_004")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Tuple[Path, Path, Path]:
    """A cohort (case_000 labeled, case_001-002 unlabeled with truth/) and two test folders of case_003 and
    case_004 with different labels: the true ones (``test_a``), and the same with every voxel below the median i of
    the foreground erased (``test_b``). The test cases are not in the cohort folder."""
    root = tmp_path_factory.mktemp("held_out")
    cohort = root / "synthetic"
    make_synthetic_cohort(cohort, n_cases=5, n_labeled=1, n_classes=1, seed=5,
                          size_range=((48, 56), (48, 56), (16, 20)))
    for name in TEST_CASES:
        label = read_volume(cohort / "truth" / name / "label.nrrd")
        halved = label.array.copy()
        halved[: int(np.median(np.argwhere(halved > 0)[:, 0]))] = 0
        for variant, array in (("test_a", label.array), ("test_b", halved)):
            (root / variant / name).mkdir(parents=True)
            shutil.copy(cohort / name / "image.nrrd", root / variant / name / "image.nrrd")
            write_volume(dataclasses.replace(label, array=array), root / variant / name / "label.nrrd")
        shutil.rmtree(cohort / name)
        shutil.rmtree(cohort / "truth" / name)
    return cohort, root / "test_a", root / "test_b"


def _read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_test_cases_are_scored_but_never_change_training(held_out, tmp_path):
    """Two runs that differ only in the test labels (and in --truth, which only evaluation reads) train bit-identical
    SAM and V-Net weights, and score the test cases differently, each against its own labels."""
    cohort, test_a, test_b = held_out
    config = _write_config(tmp_path / "config.json", retrain_iterations=3, checkpoint_every=3)
    config.write_text(json.dumps(dict(json.loads(config.read_text()), estimate=False, baseline_method="supervised")))
    runs = {"a": tmp_path / "run_a", "b": tmp_path / "run_b"}
    events = {}
    extras = {"a": ("--test", str(test_a), "--truth", str(cohort / "truth")), "b": ("--test", str(test_b))}
    for key, extra in extras.items():
        result = subprocess.run(_command(cohort, runs[key], config, *extra), cwd=REPO, capture_output=True, text=True,
                                timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        events[key] = [json.loads(line) for line in result.stdout.splitlines()]
        assert "mean Dice on the held-out test cases (sfr_mt): " in result.stderr

    for weights in ("finetune/sam_trainable.pt", "retrain/vnet.pt", "baseline/retrain/vnet.pt"):
        a, b = (torch.load(runs[key] / weights, map_location="cpu", weights_only=True) for key in "ab")
        a, b = (state.get("state_dict", state) for state in (a, b))
        assert list(a) == list(b) and all(torch.equal(a[name], b[name]) for name in a), weights
    for case in ("case_001", "case_002"):
        assert (runs["a"] / "pseudolabels" / f"{case}.prob.npy").read_bytes() == (
            runs["b"] / "pseudolabels" / f"{case}.prob.npy").read_bytes()

    rows = {key: _read_rows(run / "metrics.csv") for key, run in runs.items()}
    assert [(r["split"], r["case"]) for r in rows["a"]] == [
        ("test", "case_003"), ("test", "case_004"), ("unlabeled", "case_001"), ("unlabeled", "case_002")]
    assert [(r["split"], r["case"]) for r in rows["b"]] == [("test", "case_003"), ("test", "case_004")]
    for key, test_dir in (("a", test_a), ("b", test_b)):
        for row in rows[key][:2]:
            prediction = read_volume(runs[key] / "predictions" / f"{row['case']}.seg.nrrd")
            image = read_volume(test_dir / row["case"] / "image.nrrd")
            assert prediction.shape == image.shape and np.allclose(prediction.origin, image.origin)
            assert np.allclose(prediction.spacing, image.spacing)
            truth = read_volume(test_dir / row["case"] / "label.nrrd")
            (expected,) = case_metrics(prediction.array, truth.array, truth.spacing, [1])
            assert float(row["dice"]) == pytest.approx(expected.dice, abs=1e-12)
    for case, row_a, row_b in zip(TEST_CASES, rows["a"], rows["b"]):
        assert row_a["dice"] != row_b["dice"], f"{case}: different test labels, same Dice"
    dice_a = [float(r["dice"]) for r in rows["a"][:2]]
    (said,) = [e for e in events["a"] if e["stage"] == "evaluate" and e["message"].startswith("sfr_mt: test")]
    assert said["metric"] == pytest.approx(np.mean(dice_a))
    assert said["message"] == (f"sfr_mt: test cases, class 1: Dice {np.mean(dice_a):.4f} ± "
                               f"{np.std(dice_a, ddof=1):.4f} over 2 cases")

    baseline = _read_rows(runs["a"] / "baseline" / "metrics.csv")
    assert [(r["split"], r["case"]) for r in baseline][:2] == [("test", "case_003"), ("test", "case_004")]
    manifest = json.loads((runs["a"] / "manifest.json").read_text())
    assert {name: record["split"] for name, record in manifest["inputs"].items()} == {
        "case_000": "train", "case_001": "train", "case_002": "train", "case_003": "test", "case_004": "test"}
    assert manifest["inputs"]["case_004"]["label"]["sha256"] == file_sha256(test_a / "case_004" / "label.nrrd")
    report = (runs["a"] / "report.html").read_text()
    test_at = report.index("<h3>Held-out test cases: 2 cases</h3>")
    assert test_at < report.index("<h3>Unlabeled cases (transductive): 2 cases</h3>")
    assert f"{100 * np.mean(dice_a):.2f} ± {100 * np.std(dice_a, ddof=1):.2f}" in report[test_at:]
    assert "Mean Dice on the held-out test cases: <b>supervised</b>" in report
