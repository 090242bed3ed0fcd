"""The whole pipeline as users run it: `python -m SFRSegmentLib run` in real subprocesses, killed and resumed."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from SFRSegmentLib.config import preset
from SFRSegmentLib.config_io import with_overrides
from SFRSegmentLib.errors import InputError
from SFRSegmentLib.io import read_volume, write_volume
from SFRSegmentLib.metrics import CSV_COLUMNS
from SFRSegmentLib.sam.weights import file_sha256
from SFRSegmentLib.synthetic import make_synthetic_cohort
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
    assert list(rows[0]) == list(CSV_COLUMNS) and sorted(r["case"] for r in rows) == unlabeled
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
    retrain_steps = [e["step"] for e in events if e["stage"] == "retrain"]
    assert retrain_steps[0] == saved_iteration + 1 and retrain_steps[-1] == 24
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
    assert printed["preset"] == "small" and printed["retrain"]["method"] == "sfr_mt"
    assert json.loads(json.dumps(printed)) == printed
