"""Inference: the reference sliding window reproduced through MONAI, post-processing, model files, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import math
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch

from SFRSegmentLib.stages.confidence import read_table, volume_confidence
from SFRSegmentLib.base.config import InferenceConfig, RunConfig
from SFRSegmentLib.data.patches import zscore
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.base.events import parse_progress_line
from SFRSegmentLib.stages.inference import (
    keep_largest_components,
    monai_overlap,
    predict_volume,
    sliding_window_probabilities,
    window_starts,
)
from SFRSegmentLib.models.vnet import VNetInfo, load_vnet, save_vnet
from SFRSegmentLib.storage.volumes import Volume, read_volume
from SFRSegmentLib.research.synthetic import TRUTH_FOLDER, make_synthetic_cohort
from SFRSegmentLib.models.vnet import VNet

REPO = Path(__file__).resolve().parents[1]
LA_CASE = REPO.parent / "shared" / "data" / "LA" / "06SR5RBREL16DQ6M8LWS"
SMALL = InferenceConfig(patch_size=(32, 32, 16), stride_xy=9, stride_z=4, sw_batch_size=3, device="cpu")


def reference_test_single_case(net: torch.nn.Module, image: np.ndarray, stride_xy: int, stride_z: int,
                               patch_size: Tuple[int, int, int], num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """UA-MT's ``test_single_case`` written out plainly (CPU, one window at a time)."""
    w, h, d = image.shape
    pads = [max(p - s, 0) for p, s in zip(patch_size, image.shape)]
    padding = [(p // 2, p - p // 2) for p in pads]
    if any(pads):
        image = np.pad(image, padding, mode="constant", constant_values=0)
    ww, hh, dd = image.shape
    sx = math.ceil((ww - patch_size[0]) / stride_xy) + 1
    sy = math.ceil((hh - patch_size[1]) / stride_xy) + 1
    sz = math.ceil((dd - patch_size[2]) / stride_z) + 1
    score_map = np.zeros((num_classes,) + image.shape, dtype=np.float32)
    cnt = np.zeros(image.shape, dtype=np.float32)
    for x in range(sx):
        xs = min(stride_xy * x, ww - patch_size[0])
        for y in range(sy):
            ys = min(stride_xy * y, hh - patch_size[1])
            for z in range(sz):
                zs = min(stride_z * z, dd - patch_size[2])
                window = (slice(xs, xs + patch_size[0]), slice(ys, ys + patch_size[1]), slice(zs, zs + patch_size[2]))
                patch = torch.from_numpy(image[window][None, None].astype(np.float32))
                with torch.no_grad():
                    y1 = torch.softmax(net(patch), dim=1)[0].numpy()
                score_map[(slice(None),) + window] += y1
                cnt[window] += 1
    score_map = score_map / cnt[None]
    label_map = np.argmax(score_map, axis=0)
    crop = tuple(slice(p[0], p[0] + s) for p, s in zip(padding, (w, h, d)))
    return label_map[crop], score_map[(slice(None),) + crop]


def small_vnet(n_classes: int = 2, seed: int = 0) -> VNet:
    torch.manual_seed(seed)
    model = VNet(n_classes=n_classes, n_filters=4).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):  # non-trivial running statistics
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


# ---------------------------------------------------------------------------------------------------------------
# Window positions


def monai_window_starts(image_shape: Tuple[int, int, int], config: InferenceConfig) -> List[Tuple[int, ...]]:
    """The window corners MONAI's sliding window visits, read back from an input that encodes its coordinates."""
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in image_shape], indexing="ij"))
    starts = []

    def record(windows: torch.Tensor) -> torch.Tensor:
        starts.extend(tuple(int(v) for v in w[:, 0, 0, 0]) for w in windows)
        return windows[:, :1]

    from monai.inferers import sliding_window_inference

    sliding_window_inference(torch.from_numpy(grid)[None], config.patch_size, config.sw_batch_size, record,
                             overlap=monai_overlap(config), mode="constant")
    return starts


@pytest.mark.parametrize("shape, patch, strides", [
    ((175, 132, 88), (112, 112, 80), (18, 4)),  # an LA volume: 5 × 3 × 3 = 45 windows
    ((112, 113, 81), (112, 112, 80), (18, 4)),
    ((100, 70, 50), (32, 32, 16), (9, 5)),
    ((64, 64, 32), (32, 32, 16), (32, 16)),  # stride = patch: overlap 0
    ((47, 33, 17), (32, 32, 16), (1, 1)),
])
def test_monai_visits_the_reference_windows(shape, patch, strides) -> None:
    config = InferenceConfig(patch_size=patch, stride_xy=strides[0], stride_z=strides[1], sw_batch_size=7)
    expected = [(x, y, z) for x in window_starts(shape[0], patch[0], strides[0])
                for y in window_starts(shape[1], patch[1], strides[0])
                for z in window_starts(shape[2], patch[2], strides[1])]
    assert sorted(monai_window_starts(shape, config)) == sorted(expected)
    if shape == (175, 132, 88):
        assert len(expected) == 45


def test_window_starts_follow_the_reference_formula() -> None:
    assert window_starts(175, 112, 18) == [0, 18, 36, 54, 63]
    assert window_starts(88, 80, 4) == [0, 4, 8]
    assert window_starts(112, 112, 18) == [0]
    assert window_starts(20, 32, 9) == [0]  # padded up to the patch


def test_strides_larger_than_the_patch_are_refused() -> None:
    with pytest.raises(InputError, match="stride_xy"):
        InferenceConfig(patch_size=(32, 32, 16), stride_xy=33)
    window = InferenceConfig(patch_size=(32, 32, 8))  # the rule is the model's strides, known from its file
    with pytest.raises(InputError, match="inference.patch_size"):
        window.for_model((32, 32, 16))  # the reference V-Net: multiples of 16
    thin = ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))
    assert window.for_model((32, 32, 16), thin).patch_size == (32, 32, 8)
    with pytest.raises(InputError, match="inference.patch_size"):
        RunConfig(inference=InferenceConfig(patch_size=(30, 32, 16)))


# ---------------------------------------------------------------------------------------------------------------
# Predictions


@pytest.mark.parametrize("shape", [(45, 38, 20), (28, 40, 12)])  # the second is padded on two axes
def test_predictions_equal_the_reference_loop(shape) -> None:
    rng = np.random.default_rng(3)
    image = zscore(rng.normal(100, 20, size=shape).astype(np.float32))
    model = small_vnet(n_classes=3)
    labels, probabilities = reference_test_single_case(model, image, SMALL.stride_xy, SMALL.stride_z,
                                                       SMALL.patch_size, 3)
    ours = sliding_window_probabilities(model, image, SMALL).numpy()
    assert ours.shape == probabilities.shape == (3,) + shape
    np.testing.assert_allclose(ours, probabilities, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ours.argmax(axis=0), labels)


def la_calibrated_vnet(image: np.ndarray, patch: Tuple[int, int, int]) -> VNet:
    """A small V-Net whose BatchNorm running statistics are those of windows of ``image`` (cumulative over a few
    train-mode passes): its eval-mode output then varies across the volume, with class boundaries."""
    torch.manual_seed(6)
    model = VNet(n_filters=4)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None  # a cumulative average of the passes' statistics
    rng = np.random.default_rng(6)
    with torch.no_grad():
        for _ in range(4):
            corner = [int(rng.integers(0, size - p + 1)) for size, p in zip(image.shape, patch)]
            window = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            model(torch.from_numpy(np.ascontiguousarray(image[window]))[None, None])
    return model.eval()


@pytest.mark.skipif(not LA_CASE.is_dir(), reason="../shared/data/LA is not present")
def test_predictions_equal_the_reference_loop_on_an_la_volume() -> None:
    # Real LA intensities through folded BatchNorm and batched channels-last windows: the reference's probabilities
    # to float rounding, and its labels wherever its two probabilities are not tied within that rounding.
    image = zscore(read_volume(LA_CASE / "image.nrrd").array)[60:124, 40:104, 30:62]
    model = la_calibrated_vnet(image, SMALL.patch_size)
    labels, probabilities = reference_test_single_case(model, image, SMALL.stride_xy, SMALL.stride_z,
                                                       SMALL.patch_size, 2)
    ours = sliding_window_probabilities(model, image, SMALL).numpy()
    np.testing.assert_allclose(ours, probabilities, rtol=0, atol=1e-5)
    assert 0.05 < labels.mean() < 0.95  # a label map with boundaries, not one class everywhere
    decided = np.abs(probabilities[1] - probabilities[0]) > 2e-5
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(ours.argmax(axis=0)[decided], labels[decided])


def test_bf16_precision_is_close_to_float32() -> None:
    image = zscore(np.random.default_rng(5).normal(size=(40, 36, 18)).astype(np.float32))
    model = small_vnet()
    exact = sliding_window_probabilities(model, image, SMALL)
    fast = sliding_window_probabilities(model, image, dataclasses.replace(SMALL, precision="bf16"))
    assert fast.dtype == torch.float32 and 0 < float((fast - exact).abs().max()) < 0.05
    with pytest.raises(InputError, match="precision"):
        InferenceConfig(precision="fp16")


def test_predict_volume_keeps_geometry_and_maps_class_values() -> None:
    rng = np.random.default_rng(4)
    image = Volume(rng.normal(size=(40, 36, 18)).astype(np.float32), spacing=(0.7, 0.7, 2.0), origin=(1, 2, 3))
    model = small_vnet(n_classes=3)
    label, probabilities = predict_volume(model, image, SMALL, classes={2: "liver", 7: "spleen"})
    assert label.shape == image.shape and label.spacing == image.spacing and label.origin == image.origin
    assert label.array.dtype == np.uint8
    channels = probabilities.argmax(axis=0)
    np.testing.assert_array_equal(label.array, np.array([0, 2, 7], np.uint8)[channels])
    assert [(s.value, s.name) for s in label.segments] == [(2, "liver"), (7, "spleen")]
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)


def test_largest_component_post_processing() -> None:
    labels = np.zeros((20, 20, 12), dtype=np.int64)
    labels[1:4, 1:4, 1:4] = 1  # 27 voxels ...
    labels[4:7, 4:7, 4:7] = 1  # ... and 27 more touching them at one corner: one 26-connected component of 54
    labels[10:18, 10:15, 10:11] = 1  # 40 voxels elsewhere: the largest only under 6-connectivity
    labels[1:3, 15:18, 5:7] = 2  # class 2, a single blob
    kept = keep_largest_components(labels, n_classes=3)
    assert int((kept == 1).sum()) == 54 and not kept[10:18, 10:15, 10:11].any()
    assert np.array_equal(kept == 2, labels == 2)
    assert InferenceConfig().largest_component is False


def test_model_file_round_trip(tmp_path: Path) -> None:
    model = small_vnet()
    info = VNetInfo(classes={1: "atrium"}, patch_size=(32, 32, 16), n_filters=4, training={"method": "mt"})
    save_vnet(tmp_path / "vnet.pt", model, info)
    loaded, loaded_info = load_vnet(tmp_path / "vnet.pt")
    assert loaded_info == info and not loaded.training
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(InputError, match="no trained V-Net"):
        load_vnet(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------------
# Command line


def test_cli_predict_and_evaluate(tmp_path: Path) -> None:
    cohort = make_synthetic_cohort(tmp_path / "cohort", n_cases=3, n_labeled=1,
                                   size_range=((40, 48), (40, 48), (20, 24)))
    info = VNetInfo(classes=dict(cohort.classes), patch_size=(32, 32, 16), n_filters=4)
    save_vnet(tmp_path / "run" / "retrain" / "vnet.pt", small_vnet(), info)
    unlabeled = [str(case.image) for case in cohort.unlabeled]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "SFRSegmentLib", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    result = cli("predict", "--model", str(tmp_path / "run"), "--images", *unlabeled, "--out", str(tmp_path / "pred"),
                 "--stride-xy", "16", "--stride-z", "8", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for case in cohort.unlabeled:
        segmentation = read_volume(tmp_path / "pred" / f"{case.name}.seg.nrrd")
        nifti = read_volume(tmp_path / "pred" / f"{case.name}.nii.gz")
        np.testing.assert_array_equal(segmentation.array, nifti.array)
        assert [(s.value, s.name) for s in segmentation.segments] == [(1, "organ 1")]
        assert nifti.shape == read_volume(case.image).shape
    model, _ = load_vnet(tmp_path / "run" / "retrain" / "vnet.pt")
    expected = {case.name: volume_confidence(predict_volume(model, read_volume(case.image), InferenceConfig(
        stride_xy=16, stride_z=8, device="cpu").for_model(info.patch_size), info.classes)[1])
        for case in cohort.unlabeled}
    ranked = read_table(tmp_path / "pred" / "confidence.csv")
    assert [name for name, _ in ranked] == sorted(expected, key=expected.get)  # least confident first
    assert dict(ranked) == pytest.approx(expected, abs=1e-6)

    # The Slicer module's protocol: only JSON lines on stdout, one event per case as it is written.
    result = cli("predict", "--model", str(tmp_path / "run"), "--images", *unlabeled, "--out", str(tmp_path / "again"),
                 "--stride-xy", "16", "--stride-z", "8", "--device", "cpu", "--progress", "jsonl")
    assert result.returncode == 0, result.stderr
    events = [parse_progress_line(line) for line in result.stdout.splitlines()]
    assert [(e.stage, e.step, e.total) for e in events] == [("predict", 1, 2), ("predict", 2, 2)]
    assert sorted(e.message for e in events) == sorted(f"predicted {case.name}" for case in cohort.unlabeled)
    assert "wrote" in result.stderr

    result = cli("evaluate", "--pred", str(tmp_path / "pred"), "--truth", str(cohort.root / TRUTH_FOLDER),
                 "--out", str(tmp_path / "metrics.csv"))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["case"] for r in rows) == sorted(c.name for c in cohort.unlabeled)
    assert "dice" in result.stdout and f"{len(rows):>5}" in result.stdout  # the per-class summary line

    result = cli("predict", "--model", str(tmp_path / "nowhere"), "--images", *unlabeled, "--out", str(tmp_path))
    assert result.returncode == 2 and "no trained V-Net" in result.stderr
    # The window is the model's training patch (32×32×16 here), which the small preset's strides 32/8 still fit;
    # an explicit --patch replaces it and must suit the strides.
    result = cli("predict", "--model", str(tmp_path / "run"), "--images", unlabeled[0], "--out",
                 str(tmp_path / "pred2"), "--preset", "small", "--patch", "16", "16", "16", "--device", "cpu")
    assert result.returncode == 2 and "stride_xy 32 is larger than the window 16×16×16 (patch_size)" in result.stderr
    result = cli("predict", "--model", str(tmp_path / "run"), "--images", unlabeled[0], "--out",
                 str(tmp_path / "pred2"), "--preset", "small", "--device", "cpu")
    assert result.returncode == 0, result.stderr
