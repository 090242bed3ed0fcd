"""Stage F: the loss against hand computations, the augmentations, the schedule, the files a run writes, reloading,
resuming, the preconditions, and the ``finetune`` command."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

import SFRSegmentLib.stages.finetune as finetune_module
from SFRSegmentLib.base.config import FinetuneConfig, preset
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.base.progress import Cancellation, Cancelled, ProgressEvent
from SFRSegmentLib.storage.provenance import read_record
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.stages.finetune import (
    RANDOM_INIT_MESSAGE,
    MosaicBatches,
    bezier_slices,
    build_base_sam,
    finetune,
    load_finetuned_sam,
    load_training_volume,
    training_layout,
)
from SFRSegmentLib.models.sam.lora import LoRAQKV
from SFRSegmentLib.stages.losses import SFRLoss
from SFRSegmentLib.models.sam.weights import file_sha256
from SFRSegmentLib.research.synthetic import make_synthetic_cohort

REPO = Path(__file__).resolve().parents[1]
PATCH = (32, 32, 16)  # an 8×8 grid on the small config's 256² canvas, 16 tiles used
SIZES = ((36, 40), (36, 40), (16, 18))


def small_config(**overrides) -> FinetuneConfig:
    """The small preset's fine-tuning (small SAM, random initialisation), a few iterations on PATCH."""
    return dataclasses.replace(preset("small").resolved().finetune,
                               **{"patch_size": PATCH, "iterations": 4, "checkpoint_every": 2, **overrides})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_synthetic_cohort(tmp_path_factory.mktemp("cohort"), n_cases=3, n_labeled=2, size_range=SIZES,
                                 spacing=(0.8, 0.8, 3.2))


def read_log(run: RunFolder) -> List[Dict[str, str]]:
    with open(run.finetune_log, newline="") as stream:
        return list(csv.DictReader(stream))


def load_weights(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# --- loss -------------------------------------------------------------------------------------------------------

# Two samples of three pixels, two classes: logits (background, foreground) and labels (255 = gutter).
LOGITS = [[(0.0, 0.0), (1.0, -1.0), (2.0, 0.0)], [(0.0, 1.0), (-1.0, 0.0), (0.5, 0.5)]]
LABELS = [[0, 1, 255], [1, 255, 0]]


def hand_loss(dice_counts_ignored: bool) -> float:
    """½(CE + soft Dice) pixel by pixel in plain Python: CE over the non-255 pixels; Dice per class over the whole
    batch with squared denominators and ε = 1e-10, averaged over both classes."""
    eps = 1e-10
    ce_terms, sums = [], {c: {"pg": 0.0, "pp": 0.0, "gg": 0.0} for c in (0, 1)}
    for sample_logits, sample_labels in zip(LOGITS, LABELS):
        for (l0, l1), label in zip(sample_logits, sample_labels):
            p = [math.exp(l0) / (math.exp(l0) + math.exp(l1)), math.exp(l1) / (math.exp(l0) + math.exp(l1))]
            if label != 255:
                ce_terms.append(-math.log(p[label]))
            elif not dice_counts_ignored:
                continue
            for c in (0, 1):
                g = 1.0 if label == c else 0.0
                sums[c]["pg"] += p[c] * g
                sums[c]["pp"] += p[c] * p[c]
                sums[c]["gg"] += g * g
    ce = sum(ce_terms) / len(ce_terms)
    dice = sum(1 - (2 * s["pg"] + eps) / (s["pp"] + s["gg"] + eps) for s in sums.values()) / 2
    return 0.5 * (ce + dice)


@pytest.mark.parametrize("dice_counts_ignored", [False, True])
def test_loss_matches_a_hand_computation(dice_counts_ignored):
    logits = torch.tensor(LOGITS).permute(0, 2, 1)[:, :, None, :]  # (B=2, C=2, 1, 3)
    labels = torch.tensor(LABELS)[:, None, :]  # (2, 1, 3)
    loss = SFRLoss(dice_counts_ignored)(logits, labels)
    assert loss.item() == pytest.approx(hand_loss(dice_counts_ignored), abs=1e-6)


def test_the_two_dice_readings_differ_only_through_the_gutter_pixels():
    logits = torch.tensor(LOGITS).permute(0, 2, 1)[:, :, None, :]
    labels = torch.tensor(LABELS)[:, None, :]
    assert hand_loss(True) != pytest.approx(hand_loss(False), abs=1e-3)
    # With the gutter logits changed, only the official reading changes.
    changed = logits.clone()
    changed[0, :, 0, 2] = torch.tensor([-3.0, 3.0])
    assert SFRLoss()(changed, labels).item() == pytest.approx(SFRLoss()(logits, labels).item(), abs=1e-7)
    assert SFRLoss(True)(changed, labels).item() != pytest.approx(SFRLoss(True)(logits, labels).item(), abs=1e-3)


# --- augmentation and batches ---------------------------------------------------------------------------------

def test_bezier_maps_each_chosen_slice_monotonically_into_0_1():
    rng = np.random.default_rng(0)
    patch = np.linspace(-2, 3, 8 * 8 * 6, dtype=np.float32).reshape(8, 8, 6)
    assert np.array_equal(bezier_slices(patch, 0.0, rng), patch)
    mapped = bezier_slices(patch, 1.0, rng)
    assert mapped.min() >= 0 and mapped.max() <= 1
    for k in range(patch.shape[2]):
        order = np.argsort(patch[..., k], axis=None)
        assert np.all(np.diff(mapped[..., k].ravel()[order]) >= 0)  # monotone
        assert np.all(mapped[..., k][patch[..., k] <= 0] == 0) and np.all(mapped[..., k][patch[..., k] >= 1] == 1)
    assert not np.allclose(mapped[..., 0], np.clip(patch[..., 0], 0, 1))  # not the identity on [0, 1]


def test_mosaic_batches_give_stitched_images_and_labels(cohort):
    config = small_config(batch_size=3, bezier_p=0.5)
    layout = training_layout(PATCH, config.sam, config.depth_padding)
    volumes = [load_training_volume(case, cohort.classes) for case in cohort.labeled]
    batches = MosaicBatches(volumes, layout, config, torch.device("cpu"))
    images, labels = batches.sample(0, np.random.default_rng(0))
    assert images.shape == (3, 1, 256, 256) and images.dtype == torch.float32
    assert labels.shape == (3, 256, 256) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) == {0, 1, 255}
    assert int((labels != 255).sum()) == 3 * math.prod(PATCH)  # every voxel of each patch, nothing else
    assert torch.all(images[labels.unsqueeze(1) == 255] == 0)  # gutters and empty tiles of the image are 0
    # Every pass over the labeled cases visits each of them once.
    assert sorted(batches.case_index(s) for s in range(4, 6)) == [0, 1]


# --- a run ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    """A 4-iteration run; the model that trained is captured for comparison."""
    built = []

    def capture(*args, **kwargs):
        built.append(build_base_sam(*args, **kwargs))
        return built[-1]

    run = RunFolder(tmp_path_factory.mktemp("run"))
    events: List[ProgressEvent] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune_module, "build_base_sam", capture)
        weights = finetune(cohort, run, small_config(), progress=events.append)
    return run, weights, built[0], events


def test_a_run_writes_its_files_and_reports_progress(trained, cohort):
    run, weights, model, events = trained
    assert weights == run.sam_weights
    for path in (run.finetune_checkpoint, run.sam_weights, run.sam_weights_info, run.finetune_log):
        assert path.is_file()
    assert events[0].message == RANDOM_INIT_MESSAGE
    assert [e.step for e in events if e.loss is not None] == [1, 2, 3, 4]
    assert all(e.total == 4 and e.stage == "finetune" and np.isfinite(e.loss) for e in events[1:])
    info = json.loads(run.sam_weights_info.read_text())
    assert info["weights_sha256"] == file_sha256(run.sam_weights)
    assert info["base_checkpoint"] is None and info["init_seed"] == 1337 and info["iterations"] == 4
    assert info["sam_config"]["image_size"] == 256 and info["class_values"] == [1]
    assert info["patch_size"] == list(PATCH)
    files = read_record(run.sam_weights)["inputs"]["files"]
    assert sorted(files) == ["image of case case_000", "image of case case_001", "label of case case_000",
                             "label of case case_001"]
    assert files["label of case case_001"] == file_sha256(cohort.labeled[1].label)


def test_learning_rate_follows_the_poly_schedule(trained):
    rows = read_log(trained[0])
    assert [int(r["iteration"]) for r in rows] == [0, 1, 2, 3]
    for row in rows:
        expected = 1e-3 * (1 - int(row["iteration"]) / 4) ** 0.9
        assert float(row["lr"]) == pytest.approx(expected, rel=1e-9)
        assert np.isfinite(float(row["loss"]))


def test_weights_file_holds_only_the_trainable_weights(trained):
    run, _, model, _ = trained
    saved = load_weights(run.sam_weights)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(saved)
    assert not any(key.startswith("image_encoder.") and not key.split(".")[-1].startswith(("a_", "b_"))
                   for key in saved)
    n_values = sum(t.numel() for t in saved.values())
    assert n_values < 0.7 * sum(t.numel() for t in model.state_dict().values())
    assert run.sam_weights.stat().st_size < 4 * n_values * 1.02 + 100_000  # float32, little overhead


def test_frozen_encoder_weights_are_unchanged_and_lora_trained(trained):
    _, _, model, _ = trained
    fresh = build_base_sam(model.config, None, 1337)
    fresh_state = fresh.state_dict()
    for name, parameter in model.image_encoder.named_parameters():
        before = fresh_state[f"image_encoder.{name}"]
        if parameter.requires_grad:
            continue
        assert torch.equal(parameter.detach(), before), name
    lora = [m for m in model.modules() if isinstance(m, LoRAQKV)]
    assert lora and all(m.b_q.abs().sum() > 0 for m in lora)  # B starts at zero; training moved it


def test_saved_weights_reload_into_a_fresh_model_with_identical_outputs(trained):
    run, _, model, _ = trained
    reloaded, info = load_finetuned_sam(run.sam_weights)
    images = torch.randn(2, 1, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(images), model.eval()(images))


def test_a_finished_run_returns_at_once_and_another_configuration_fine_tunes_again(trained, cohort, tmp_path):
    run, _, _, _ = trained
    stamp = run.sam_weights.stat().st_mtime_ns
    events: List[ProgressEvent] = []
    assert finetune(cohort, run, small_config(device="cpu", checkpoint_every=3), events.append) == run.sam_weights
    assert [e.message for e in events] == ["already fine-tuned"] and run.sam_weights.stat().st_mtime_ns == stamp

    copy = RunFolder(tmp_path / "copy")
    shutil.copytree(run.root, copy.root)
    first = read_record(copy.sam_weights)
    events = []
    finetune(cohort, copy, small_config(lr=2e-3), events.append)
    messages = [e.message for e in events if e.message]
    assert messages[0] == "the fine-tuned SAM is stale (options changed: lr): fine-tuning again"
    assert messages[1].startswith(f"not resuming {copy.finetune_checkpoint}: options changed: lr;")
    second = read_record(copy.sam_weights)
    assert second["id"] != first["id"] and second["inputs"]["options"]["lr"] == 2e-3
    assert [e.step for e in events if e.loss is not None] == [1, 2, 3, 4]


def test_resuming_after_a_stop_ends_with_the_weights_of_an_uninterrupted_run(cohort, tmp_path):
    config = small_config(iterations=4, checkpoint_every=3)
    straight = RunFolder(tmp_path / "straight")
    finetune(cohort, straight, config)

    stopped = RunFolder(tmp_path / "stopped")
    cancellation = Cancellation()

    def stop_after_two(event: ProgressEvent) -> None:
        if event.step == 2:
            cancellation.request()

    with pytest.raises(Cancelled, match="iteration 2 of 4"):
        finetune(cohort, stopped, config, stop_after_two, cancellation)
    assert torch.load(stopped.finetune_checkpoint, weights_only=True)["iteration"] == 2
    assert not stopped.sam_weights.exists() and len(read_log(stopped)) == 2
    events: List[ProgressEvent] = []
    finetune(cohort, stopped, config, events.append)
    assert events[1].message == "resumed at iteration 2" and [e.step for e in events[2:]] == [3, 4]
    expected, resumed = load_weights(straight.sam_weights), load_weights(stopped.sam_weights)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.allclose(expected[key], resumed[key], rtol=0, atol=1e-6), key
    assert read_log(stopped) == read_log(straight)


def test_one_labeled_case_fills_the_batch_with_its_own_patches(tmp_path):
    cohort = make_synthetic_cohort(tmp_path / "one", n_cases=2, n_labeled=1, size_range=SIZES)
    run = RunFolder(tmp_path / "run")
    finetune(cohort, run, small_config(batch_size=3, iterations=1))
    assert len(read_log(run)) == 1 and run.sam_weights_info.is_file()


def test_init_weights_start_from_an_earlier_fine_tuning(trained, cohort, tmp_path):
    run, _, _, _ = trained
    warm = RunFolder(tmp_path / "warm")
    finetune(cohort, warm, small_config(iterations=1, lr=1e-12, init_weights=str(run.sam_weights)))
    before, after = load_weights(run.sam_weights), load_weights(warm.sam_weights)
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=1e-6) for k in before)
    upstream = read_record(warm.sam_weights)["inputs"]["upstream"]
    assert upstream == {"SAM weights fine-tuning continues from": read_record(run.sam_weights)["id"]}
    with pytest.raises(InputError, match="another base checkpoint"):
        finetune(cohort, RunFolder(tmp_path / "other"),
                 small_config(iterations=1, seed=7, init_weights=str(run.sam_weights)))


def test_preconditions_are_input_errors(cohort, tmp_path):
    with pytest.raises(InputError, match="allow_random_init"):
        FinetuneConfig(base_checkpoint=None)
    with pytest.raises(InputError, match="bezier_p"):
        small_config(bezier_p=1.5)
    with pytest.raises(InputError, match="num_classes=2"):
        finetune(cohort, RunFolder(tmp_path), preset("small").resolved(n_classes=2).finetune)
    with pytest.raises(InputError, match="does not fit"):
        finetune(cohort, RunFolder(tmp_path), small_config(patch_size=(300, 300, 4)))


# --- command line -------------------------------------------------------------------------------------------------

def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SFRSegmentLib", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def test_cli_finetune_small_preset_with_json_progress(cohort, tmp_path):
    result = run_cli("finetune", "--cohort", cohort.root, "--out", tmp_path, "--preset", "small", "--iterations", 2,
                     "--patch", *PATCH, "--progress", "jsonl")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[0]["message"] == RANDOM_INIT_MESSAGE and [e["step"] for e in events[1:]] == [1, 2]
    assert set(events[1]) == {"stage", "step", "total", "loss", "metric", "eta_s", "message", "level"}
    assert RANDOM_INIT_MESSAGE in result.stderr and "sam_trainable.pt" in result.stderr
    assert RunFolder(tmp_path).sam_weights_info.is_file() and len(read_log(RunFolder(tmp_path))) == 2


def test_cli_finetune_on_a_bad_cohort_exits_2(tmp_path):
    (tmp_path / "case_a").mkdir()
    (tmp_path / "case_a" / "scan.nrrd").write_bytes(b"")
    result = run_cli("finetune", "--cohort", tmp_path, "--out", tmp_path / "run", "--preset", "small")
    assert result.returncode == 2
    assert "case_a" in result.stderr and "no image file" in result.stderr and "Traceback" not in result.stderr


def test_cli_paper_preset_offline_says_how_to_use_a_local_checkpoint(cohort, tmp_path):
    env = {"SFRSEGMENT_CACHE_DIR": str(tmp_path / "cache"),
           "SFRSEGMENT_MODEL_URL_SAM_VIT_B": "http://127.0.0.1:9/sam_vit_b_01ec64.pth"}  # refused at once: offline
    result = run_cli("finetune", "--cohort", cohort.root, "--out", tmp_path / "run", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "sam_vit_b" in result.stderr and "import_local" in result.stderr and "--checkpoint FILE" in result.stderr
    assert not (tmp_path / "run" / "finetune").exists()
