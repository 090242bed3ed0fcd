"""The plan made from the cohort's fingerprint: on real left-atrium scans it is the cpu preset as tuned there, on
real cine cardiac MRI (10 mm slices) it keeps the slices, pools them late and rotates in-plane only; a value set by
hand wins; and an anisotropic cohort runs end to end with its plan written to the run folder and the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk

from SFRSegmentLib.config import CPU_PATCH, CPU_SPACING, preset
from SFRSegmentLib.config_io import given_paths, with_overrides
from SFRSegmentLib.data import discover_cohort
from SFRSegmentLib.plan import LARGEST_COMPONENT_SHARE, fingerprint, make_plan, plan_config
from SFRSegmentLib.volumes import read_volume
from small_runs import events, run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
THICK_SLICES = ((2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2))


def manifest(tmp_path: Path, root: Path, labeled: List[str], unlabeled: List[str], classes: Dict[str, str]) -> Path:
    cases = [{"name": name, "image": str(root / name / "image.nrrd"), "label": str(root / name / "label.nrrd")}
             for name in labeled] + [{"name": name, "image": str(root / name / "image.nrrd")} for name in unlabeled]
    path = tmp_path / "cohort.json"
    path.write_text(json.dumps({"classes": classes, "cases": cases}))
    return path


@pytest.mark.skipif(not (SHARED / "LA" / "train.list").is_file(), reason="needs ../shared/data/LA")
def test_on_real_left_atrium_scans_the_plan_is_the_cpu_preset(tmp_path) -> None:
    names = (SHARED / "LA" / "train.list").read_text().split()
    cohort = discover_cohort(manifest(tmp_path, SHARED / "LA", names[:2], names[2:3], {"1": "left atrium"}))
    cpu = preset("cpu")
    planned, plan, found = plan_config(cpu, cohort)
    assert found.median_spacing == pytest.approx((0.625,) * 3)
    assert plan.spacing == CPU_SPACING and plan.patch_size == CPU_PATCH
    assert plan.downsampling == ((2, 2, 2),) * 4 and not plan.in_plane_rotation_only
    assert found.largest_component_shares[1] >= LARGEST_COMPONENT_SHARE and plan.largest_component
    assert planned == cpu  # every planned value is what the preset was tuned to on LA: today's LA Dice stands


@pytest.mark.skipif(not (SHARED / "ACDC" / "train.list").is_file(), reason="needs ../shared/data/ACDC")
def test_on_real_cine_cardiac_mri_the_plan_keeps_the_thick_slices(tmp_path) -> None:
    names = (SHARED / "ACDC" / "train.list").read_text().split()
    classes = {"1": "right ventricle", "2": "myocardium", "3": "left ventricle"}
    cohort = discover_cohort(manifest(tmp_path, SHARED / "ACDC", names[:4], names[4:6], classes))
    found = fingerprint(cohort)
    depths = [read_volume(case.image).shape[2] for case in cohort.cases]
    assert found.median_spacing == pytest.approx((1.5, 1.5, 10.0))
    assert found.median_shape[2] == int(np.median(depths))
    config, plan, _ = plan_config(preset("cpu"), cohort)
    assert plan.spacing == (1.5, 1.5, 10.0)  # the 10 mm axis keeps its own spacing; in-plane above the 1.25 budget
    assert plan.downsampling == THICK_SLICES
    depth = plan.patch_size[2]
    assert depth % 4 == 0 and depth <= found.median_shape[2] < depth + 4  # the median slice count, pooled twice
    assert all(side % 16 == 0 for side in plan.patch_size[:2])
    assert np.prod(plan.patch_size) <= np.prod(CPU_PATCH)  # within the preset's voxel budget
    assert plan.in_plane_rotation_only and plan.stride_z <= depth // 2
    cpu = preset("cpu")  # a wider window steps as far, in windows, as the preset's: same overlap, not 4× the windows
    assert plan.stride_xy * min(CPU_PATCH[:2]) == cpu.inference.stride_xy * min(plan.patch_size[:2])
    assert config.retrain.downsampling == THICK_SLICES and config.retrain.spacing == (1.5, 1.5, 10.0)
    assert config.finetune.spacing == (1.5, 1.5, 10.0) and config.patch_size == plan.patch_size
    resolved = config.resolved(3)
    assert resolved.retrain.patch_size == plan.patch_size


def write_volume(path: Path, array: np.ndarray, spacing) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def thick_slice_cohort(root: Path, n_labeled: int = 2, n_unlabeled: int = 2) -> Path:
    """Synthetic cine-like volumes (1.5 × 1.5 × 10 mm, 7 slices): class 1 one blob, class 2 two separate blobs,
    written as real NRRD files; unlabeled cases keep their true labels under ``truth/`` for scoring."""
    rng = np.random.default_rng(0)
    spacing = (1.5, 1.5, 10.0)
    for index in range(n_labeled + n_unlabeled):
        shape = (56 + 4 * index, 52, 7)
        label = np.zeros(shape, np.uint8)
        label[10:26, 12:30, 1:6] = 1
        label[34:44, 8:18, 2:5] = 2
        label[34:44, 34:44, 2:5] = 2
        image = (label * 0.8 + rng.normal(0, 0.2, shape)).astype(np.float32)
        name = f"case{index}"
        write_volume(root / name / "image.nrrd", image, spacing)
        folder = root / name if index < n_labeled else root / "truth" / name
        write_volume(folder / "label.nrrd", label, spacing)
    return root


def test_a_value_set_by_hand_wins_and_planning_can_be_turned_off(tmp_path) -> None:
    cohort = discover_cohort(thick_slice_cohort(tmp_path / "cohort"))
    found = fingerprint(cohort)
    assert found.largest_component_shares[1] == 1.0 and found.largest_component_shares[2] == pytest.approx(0.5)
    plan = make_plan(found, preset("cpu"))
    assert not plan.largest_component  # class 2 is two pieces: keeping one would delete the other
    assert plan.patch_size[2] == 4 and plan.downsampling == THICK_SLICES
    overrides = {"patch_size": [96, 96, 16], "inference": {"largest_component": True}}
    config, _, _ = plan_config(with_overrides(preset("cpu"), overrides), cohort, given_paths(overrides))
    assert config.patch_size == (96, 96, 16) and config.inference.largest_component  # even the preset's own value
    assert config.retrain.spacing == (1.5, 1.5, 10.0) and not config.pseudolabel.largest_component
    off = dataclasses.replace(preset("cpu"), plan=dataclasses.replace(preset("cpu").plan, enabled=False))
    assert plan_config(off, cohort) == (off, None, None)


def test_a_thick_slice_cohort_runs_end_to_end_on_its_plan(tmp_path) -> None:
    cohort = thick_slice_cohort(tmp_path / "cohort", n_labeled=1, n_unlabeled=2)
    config = {"plan": {"enabled": True}, "retrain": {"method": "mt", "iterations": 3, "checkpoint_every": 3},
              "estimate": False}
    result = run(cohort, tmp_path / "run", config)
    assert result.returncode == 0, result.stderr[-3000:]
    messages = [e.get("message", "") for e in events(result.stdout)]
    assert any("plan from the cohort" in m and "10 mm" in m for m in messages)
    planned = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert planned["planned"]["retrain.downsampling"]["used"] == [list(s) for s in THICK_SLICES]
    assert planned["fingerprint"]["median_spacing"] == [1.5, 1.5, 10.0]
    used = json.loads((tmp_path / "run" / "config.json").read_text())
    assert used["retrain"]["spacing"] == [1.5, 1.5, 10.0] and used["retrain"]["patch_size"][2] == 4
    vnet = json.loads((tmp_path / "run" / "retrain" / "vnet.json").read_text())
    assert vnet["downsampling"] == [list(s) for s in THICK_SLICES]
    for name in ("case1", "case2"):  # predictions on each image's own grid
        prediction = read_volume(next((tmp_path / "run" / "predictions").glob(f"{name}.*")))
        image = read_volume(cohort / name / "image.nrrd")
        assert prediction.shape == image.shape and prediction.spacing == pytest.approx(image.spacing)
    assert "Plan" in (tmp_path / "run" / "report.html").read_text()
