"""Stage P: the window → mosaic → SAM → window path, the files and confidence table, caching, the key overfit
check (a SAM fine-tuned to near-perfection on a volume reproduces its truth), and the ``pseudolabel`` command."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import SFRSegmentLib.stages.pseudolabel as pseudolabel_module
from SFRSegmentLib.base.config import PseudoLabelConfig, preset
from SFRSegmentLib.data.cohort import discover_cohort
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.volumes import read_volume
from SFRSegmentLib.base.progress import Cancellation, Cancelled
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.stages.finetune import finetune, training_layout
from SFRSegmentLib.stages.pseudolabel import predict_probabilities, pseudolabel, stored_confidence
from SFRSegmentLib.models.sam.stitching import mosaic_layout
from SFRSegmentLib.research.synthetic import make_synthetic_cohort

REPO = Path(__file__).resolve().parents[1]
PATCH = (32, 32, 16)
SMALL = preset("small").resolved(n_classes=2)
SPACING = (0.8, 0.8, 3.2)


class VoxelwiseModel(nn.Module):
    """A stand-in for SAM whose class-1 logit is the mosaic pixel itself and class-0 logit 0, so that the
    probability of class 1 at each voxel is sigmoid(intensity) whatever window and tile the voxel lands in."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(images), images], dim=1)


@pytest.mark.parametrize("shape", [(50, 45, 37), (20, 24, 9)])  # overlapping windows; smaller than one window
def test_windows_go_through_the_mosaics_back_to_their_voxels(shape):
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    layout = mosaic_layout(PATCH, canvas=256)
    probabilities = predict_probabilities(VoxelwiseModel(), volume, layout, overlap=0.5, windows_per_batch=3)
    assert probabilities.shape == (2,) + shape and probabilities.dtype == torch.float32
    expected = torch.sigmoid(torch.from_numpy(volume))
    assert torch.allclose(probabilities[1], expected, atol=1e-6)
    assert torch.allclose(probabilities.sum(0), torch.ones(shape), atol=1e-6)


# --- a run on a tiny two-class cohort ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def labeled_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudolabel")
    cohort = make_synthetic_cohort(root / "cohort", n_cases=4, n_labeled=2, n_classes=2, spacing=SPACING,
                                   size_range=((36, 44), (36, 44), (16, 20)))
    run = RunFolder(root / "run")
    finetune(cohort, run, dataclasses.replace(SMALL.finetune, patch_size=PATCH, iterations=2))
    pseudolabel(cohort, run, SMALL.pseudolabel)
    return cohort, run


def test_pseudo_labels_have_the_image_geometry_and_probabilities_sum_to_one(labeled_run):
    cohort, run = labeled_run
    assert [c.name for c in cohort.unlabeled] == ["case_002", "case_003"]
    for case in cohort.unlabeled:
        image = read_volume(case.image)
        label = read_volume(run.pseudo_label(case.name))
        assert label.shape == image.shape and label.array.dtype == np.uint8
        assert label.spacing == image.spacing and label.origin == image.origin
        assert np.array_equal(label.direction, image.direction)
        assert set(np.unique(label.array)) <= {0, 1, 2}
        stored = np.load(run.pseudo_probabilities(case.name))
        assert stored.dtype == np.uint8 and stored.shape == (3,) + image.shape
        assert np.abs(stored.sum(0, dtype=np.int64) - 255).max() <= 1.5  # 3 values rounded by at most ½ each
        agree = np.mean(np.argmax(stored, axis=0) == label.array)
        assert agree > 0.99  # the label is the argmax before quantisation: only near-ties may differ


def test_confidence_table_is_sorted_and_matches_the_stored_probabilities(labeled_run):
    _, run = labeled_run
    lines = run.confidence_table.read_text().splitlines()
    assert lines[0] == "case,confidence" and len(lines) == 3
    rows = [(name, float(value)) for name, value in (line.split(",") for line in lines[1:])]
    assert [c for _, c in rows] == sorted(c for _, c in rows)
    for name, confidence in rows:
        assert 1 / 3 <= confidence <= 1  # the largest of 3 probabilities
        assert confidence == pytest.approx(stored_confidence(np.load(run.pseudo_probabilities(name))), abs=1e-6)


def test_the_windows_are_the_patch_and_canvas_sam_was_fine_tuned_on(labeled_run, monkeypatch, tmp_path):
    cohort, run = labeled_run
    other = RunFolder(tmp_path)
    shutil.copytree(run.finetune_dir, other.finetune_dir)
    layouts = []

    def recording(patch_size, sam, depth_padding):
        layouts.append((tuple(patch_size), sam.image_size, depth_padding))
        return training_layout(patch_size, sam, depth_padding)

    monkeypatch.setattr(pseudolabel_module, "training_layout", recording)
    pseudolabel(cohort, other, SMALL.pseudolabel, cases=cohort.unlabeled[:1])
    assert layouts == [(PATCH, SMALL.finetune.sam.image_size, "centre")]  # not the preset's 48×48×16


def test_a_second_call_does_no_work_and_redo_recomputes(labeled_run, monkeypatch):
    cohort, run = labeled_run
    files = sorted(run.pseudolabel_dir.iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although every case is cached")

    with monkeypatch.context() as patch:
        patch.setattr(pseudolabel_module, "load_finetuned_sam", must_not_load)
        events = []
        pseudolabel(cohort, run, SMALL.pseudolabel, events.append)
    assert sorted(run.pseudolabel_dir.iterdir()) == files and [f.stat().st_mtime_ns for f in files] == stamps
    assert [e.message for e in events] == ["case_002: cached", "case_003: cached"]
    pseudolabel(cohort, run, dataclasses.replace(SMALL.pseudolabel, redo=True), cases=cohort.unlabeled[:1])
    assert run.pseudo_label("case_002").stat().st_mtime_ns != stamps[files.index(run.pseudo_label("case_002"))]
    assert run.pseudo_label("case_003").stat().st_mtime_ns == stamps[files.index(run.pseudo_label("case_003"))]


def test_cancellation_writes_nothing_for_the_case_in_progress(labeled_run, tmp_path):
    cohort, run = labeled_run
    other = RunFolder(tmp_path)
    shutil.copytree(run.finetune_dir, other.finetune_dir)
    cancellation = Cancellation()
    cancellation.request()
    with pytest.raises(Cancelled):
        pseudolabel(cohort, other, SMALL.pseudolabel, cancellation=cancellation)
    assert not other.pseudolabel_dir.exists() or not any(other.pseudolabel_dir.glob("case_*"))


def test_pseudolabel_needs_a_fine_tuned_sam(labeled_run, tmp_path):
    cohort, _ = labeled_run
    with pytest.raises(InputError, match="run the finetune stage first"):
        pseudolabel(cohort, RunFolder(tmp_path), SMALL.pseudolabel)
    with pytest.raises(InputError, match="overlap"):
        PseudoLabelConfig(overlap=1.0)


# --- the key check: a SAM fine-tuned to near-perfection on a volume labels that volume ------------------------

def test_overfit_sam_reproduces_the_truth_through_stitch_sam_unstitch_and_overlaps(tmp_path):
    source = make_synthetic_cohort(tmp_path / "source", n_cases=1, n_labeled=1, spacing=SPACING,
                                   size_range=((48, 52), (48, 52), (20, 24)))
    truth = source.cases[0].label
    cohort_root = tmp_path / "cohort"
    for name, files in (("train", ("image.nrrd", "label.nrrd")), ("same_unlabeled", ("image.nrrd",))):
        (cohort_root / name).mkdir(parents=True)
        for file in files:
            shutil.copy(source.cases[0].image.parent / file, cohort_root / name / file)
    cohort = discover_cohort(cohort_root)
    run = RunFolder(tmp_path / "run")
    small = preset("small").resolved(n_classes=1)
    config = dataclasses.replace(small.finetune, patch_size=PATCH, iterations=300, lr=3e-3, rot_flip=False,
                                 mosaic_rot_flip=False, checkpoint_every=300)
    finetune(cohort, run, config)
    pseudolabel(cohort, run, dataclasses.replace(small.pseudolabel, overlap=0.5))
    predicted = read_volume(run.pseudo_label("same_unlabeled")).array == 1
    expected = read_volume(truth).array == 1
    dice = 2 * np.sum(predicted & expected) / (predicted.sum() + expected.sum())
    assert dice > 0.9, dice


# --- command line -------------------------------------------------------------------------------------------------

def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SFRSegmentLib", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))


def test_cli_finetune_then_pseudolabel(tmp_path):
    cohort = make_synthetic_cohort(tmp_path / "cohort", n_cases=3, n_labeled=1, spacing=SPACING,
                                   size_range=((36, 40), (36, 40), (16, 18)))
    common = ("--cohort", cohort.root, "--out", tmp_path / "run", "--preset", "small", "--progress", "none")
    result = run_cli("finetune", *common, "--iterations", 1, "--patch", *PATCH)
    assert result.returncode == 0, result.stderr
    result = run_cli("pseudolabel", *common, "--overlap", 0.25)
    assert result.returncode == 0, result.stderr
    run = RunFolder(tmp_path / "run")
    for case in ("case_001", "case_002"):
        assert run.pseudo_label(case).is_file() and run.pseudo_probabilities(case).is_file()
        assert case in result.stdout
    assert "case,confidence" in result.stdout and run.confidence_table.is_file()


def test_cli_pseudolabel_on_a_bad_cohort_or_without_fine_tuning_exits_2(tmp_path):
    result = run_cli("pseudolabel", "--cohort", tmp_path / "missing", "--out", tmp_path / "run")
    assert result.returncode == 2 and "no such folder" in result.stderr and "Traceback" not in result.stderr
    cohort = make_synthetic_cohort(tmp_path / "cohort", n_cases=2, n_labeled=1, size_range=((16, 16),) * 3)
    result = run_cli("pseudolabel", "--cohort", cohort.root, "--out", tmp_path / "run", "--preset", "small")
    assert result.returncode == 2 and "run the finetune stage first" in result.stderr
