"""The command line as a user runs it: real subprocesses of ``python -m SFRSegmentLib``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from SFRSegmentLib.storage.volumes import Segment, Volume, read_volume, write_volume
from SFRSegmentLib.models.sam.stitching import NON_SLICE_GREY

REPO = Path(__file__).resolve().parents[1]
LA_CASE = REPO.parent / "shared" / "data" / "LA" / "06SR5RBREL16DQ6M8LWS"


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SFRSegmentLib", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _case(tmp_path: Path, label_spacing=(1.0, 1.0, 2.0)) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    image = Volume(rng.normal(50, 10, (20, 18, 6)).astype(np.float32), spacing=(1.0, 1.0, 2.0), origin=(5, 6, 7))
    label = Volume(np.zeros((20, 18, 6), np.uint8), spacing=label_spacing, origin=(5, 6, 7))
    label.array[5:10, 4:9, 1:4] = 1
    label.segments = [Segment(1, "tumour", (1.0, 0.0, 0.0))]
    return write_volume(image, tmp_path / "image.nrrd"), write_volume(label, tmp_path / "label.seg.nrrd")


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("info", "stitch-preview", "cohort", "synth", "demo"):
        assert command in result.stdout


def test_info_prints_geometry_and_label_counts(tmp_path):
    image, label = _case(tmp_path)
    result = run_cli("info", image, "--label", label)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "20 x 18 x 6" in out and "spacing:    1, 1, 2 mm" in out and "origin:     5, 6, 7 mm" in out
    assert "tumour" in out and f"{5 * 5 * 3:>10} voxels" in out
    assert f"{20 * 18 * 6 - 75:>10} voxels" in out


def test_info_on_invalid_input_exits_2_with_the_validation_error(tmp_path):
    image, label = _case(tmp_path, label_spacing=(1.0, 1.0, 3.0))
    result = run_cli("info", image, "--label", label)
    assert result.returncode == 2
    assert "label.seg.nrrd" in result.stderr and "spacing is (1, 1, 2) in the image but (1, 1, 3)" in result.stderr
    assert "Traceback" not in result.stderr
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    result = run_cli("info", tmp_path / "bad.nii.gz")
    assert result.returncode == 2 and "bad.nii.gz" in result.stderr and "corrupt" in result.stderr


def test_stitch_preview_writes_the_mosaic_with_the_overlay(tmp_path):
    image, label = _case(tmp_path)
    out = tmp_path / "previews" / "mosaic.png"
    result = run_cli("stitch-preview", image, "--label", label, "--out", out, "--patch", 16, 16, 6, "--canvas", 64)
    assert result.returncode == 0, result.stderr
    rgb = np.asarray(Image.open(out).convert("RGB"))
    assert rgb.shape == (64, 64, 3)
    # 16×16 slices in a 4×4 grid of 16-pixel tiles: centre padding puts 5 empty tiles before the 6 slices.
    assert (rgb[:16, :16] == NON_SLICE_GREY).all()
    # The 5×5×3 labeled block lies inside the central 16×16×6 patch: exactly its 75 pixels are tinted red.
    reddish = (rgb[..., 0].astype(int) - rgb[..., 1].astype(int)) > 60
    assert reddish.sum() == 75
    assert (rgb[16:32, 16:32] != NON_SLICE_GREY).any(axis=-1).all()  # tile 5 holds slice 0: no grey gutter at 16 px


@pytest.mark.skipif(not LA_CASE.is_dir(), reason="../shared/data/LA is not present")
def test_stitch_preview_of_an_la_case_at_the_paper_patch(tmp_path):
    out = tmp_path / "la.png"
    result = run_cli("stitch-preview", LA_CASE / "image.nrrd", "--label", LA_CASE / "label.nrrd", "--out", out)
    assert result.returncode == 0, result.stderr
    rgb = np.asarray(Image.open(out).convert("RGB"))
    assert rgb.shape == (1024, 1024, 3)
    # The 81st tile (row 8, col 8) of the 9×9 grid is the one empty tile; tile 80 starts at -1 + 8·114 = 911.
    assert (rgb[912:, 912:] == NON_SLICE_GREY).all()
    # Tile 70 (row 7, col 7) holds slice 70: its pixels 798..909 are image, not the uniform grey of empty tiles.
    assert (rgb[798:910, 798:910] == NON_SLICE_GREY).all(axis=-1).mean() < 0.05


def test_cohort_reports_labeled_and_unlabeled_cases(tmp_path):
    result = run_cli("synth", "--out", tmp_path / "c", "--cases", 3, "--labeled", 1, "--seed", 4)
    assert result.returncode == 0, result.stderr
    result = run_cli("cohort", tmp_path / "c", "--validate")
    assert result.returncode == 0, result.stderr
    assert "Labeled (1): case_000" in result.stdout and "Unlabeled (2): case_001, case_002" in result.stdout
    assert "all 3 cases are valid" in result.stdout
    label = read_volume(tmp_path / "c" / "case_000" / "label.nrrd")
    label.array[:] = 0
    write_volume(label, tmp_path / "c" / "case_000" / "label.nrrd")
    result = run_cli("cohort", tmp_path / "c", "--validate")
    assert result.returncode == 2 and "case_000" in result.stderr and "empty" in result.stderr


@pytest.mark.parametrize("flags, estimate", [((), True), (("--no-estimate",), False)])
def test_run_estimates_the_run_time_unless_told_not_to(tmp_path, flags, estimate):
    result = run_cli("run", "--cohort", tmp_path, "--out", tmp_path / "run", "--preset", "small", *flags,
                     "--print-config")
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["estimate"] is estimate and config["estimate_warn_hours"] == 3.0


def test_no_option_is_taken_by_torchrun():
    # Under `torchrun … -m SFRSegmentLib CMD ARGS`, torchrun's parser also reads ARGS and takes any option that is a
    # prefix of one of its own (argparse abbreviations): it would fail (`--run` vs `--run-path`) or silently eat it.
    import argparse

    from torch.distributed.run import get_args_parser

    from SFRSegmentLib.cli import build_parser

    theirs = {s for action in get_args_parser()._actions for s in action.option_strings}
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    ours = {(name, s) for name, parser in commands.items() for action in parser._actions
            for s in action.option_strings if s not in ("-h", "--help")}
    assert len(commands) >= 10 and len(ours) > 50
    taken = sorted((name, s) for name, s in ours if any(t.startswith(s) for t in theirs))
    assert taken == []


# ---------------------------------------------------------------------------------------------------------------
# Options: one configuration behind every command


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["run", "retrain"])
def test_a_cuda_device_without_cuda_stops_at_once_saying_so(tmp_path, command):
    result = run_cli(command, "--cohort", tmp_path / "not-read", "--out", tmp_path / "run", "--preset", "small",
                     "--device", "cuda:0")
    assert result.returncode == 2, result.stderr
    assert "CUDA is not available on this machine" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was read or written before the check
    result = run_cli(command, "--cohort", tmp_path, "--out", tmp_path / "run", "--device", "gpu")
    assert result.returncode == 2 and "cuda:N" in result.stderr


def test_run_prints_what_really_runs(tmp_path):
    config = tmp_path / "acmt.json"
    config.write_text(json.dumps({"preset": "small", "retrain": {"method": "sfr_acmt"}}))
    result = run_cli("run", "--cohort", tmp_path, "--out", tmp_path / "run", "--config", config, "--patch", 32, 32,
                     16, "--device", "cuda:1", "--print-config")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["preset"] == "small" and printed["patch_size"] == [32, 32, 16]  # the file's preset, --patch
    assert printed["finetune"]["patch_size"] == printed["retrain"]["patch_size"] == [32, 32, 16]
    assert printed["finetune"]["iterations"] == 150 and printed["retrain"]["iterations"] == 200  # small's
    assert printed["retrain"]["lr_schedule"] == "poly"  # AC-MT's own schedule, where the preset sets none
    assert {printed[section]["device"] for section in ("finetune", "pseudolabel", "retrain", "inference")} == \
        {"cuda:1"}
    result = run_cli("run", "--cohort", tmp_path, "--out", tmp_path / "run", "--config", config, "--preset", "cpu",
                     "--print-config")
    assert result.returncode == 2 and "preset is 'small' here but --preset says 'cpu'" in result.stderr


@pytest.mark.parametrize("preset_name", ["paper", "cpu", "small"])
def test_one_stage_commands_start_from_the_same_presets_as_run(preset_name, tmp_path):
    from SFRSegmentLib.cli import _stage_config, build_parser
    from SFRSegmentLib.base.config import preset

    resolved = preset(preset_name).resolved(n_classes=1)
    common = ["--cohort", str(tmp_path), "--out", str(tmp_path / "run"), "--preset", preset_name]
    for command, section in (("finetune", "finetune"), ("pseudolabel", "pseudolabel"), ("retrain", "retrain")):
        args = build_parser().parse_args([command, *common])
        assert _stage_config(args, section, n_classes=1) == getattr(resolved, section), command
    args = build_parser().parse_args(["predict", "--model", "m", "--images", "i", "--out", "o", "--preset",
                                      preset_name])
    assert _stage_config(args, "inference") == resolved.inference
    args = build_parser().parse_args(["retrain", *common, "--lr", "0.02", "--patch", "32", "32", "16"])
    changed = _stage_config(args, "retrain")
    assert (changed.lr, changed.patch_size) == (0.02, (32, 32, 16))


def test_flags_show_the_presets_values_from_the_configuration():
    result = run_cli("finetune", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "(default: paper 112 112 80, cpu 128 128 4, small 48 48 16)" in text  # --patch
    assert "(default: paper 6000, cpu 100, small 150)" in text  # --iterations
    assert "{auto,fp32,bf16,bf16_if_native}" in text
