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

from SFRSegmentLib.base.config import CPU_PATCH, CPU_SPACING, InferenceConfig, preset
from SFRSegmentLib.base.config_io import given_paths, with_overrides
from SFRSegmentLib.data.cohort import discover_cohort
from SFRSegmentLib.data.patches import normalize_intensities
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.stages.inference import predict_volume
from SFRSegmentLib.run.plan import LARGEST_COMPONENT_SHARE, fingerprint, make_plan, plan_config
from SFRSegmentLib.models.vnet import load_vnet
from SFRSegmentLib.storage.volumes import read_volume
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
    assert not found.looks_like_ct and plan.intensity_window is None  # MRI: each volume z-scored
    cpu = preset("cpu")  # a wider window steps as far, in windows, as the preset's: same overlap, not 4× the windows
    window = plan.window  # prediction spans the median slice plane in one window, at the patch's depth
    assert window[2] == depth and all(found.median_shape[a] <= window[a] < found.median_shape[a] + 16 for a in (0, 1))
    assert config.inference.patch_size == window
    assert plan.stride_xy * min(CPU_PATCH[:2]) == cpu.inference.stride_xy * min(window[:2])
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
    cpu = preset("cpu")  # the windows of prediction overlap as the preset's do, around the patch set by hand
    assert config.inference.stride_xy * min(CPU_PATCH[:2]) == cpu.inference.stride_xy * 96
    assert config.inference.stride_z * CPU_PATCH[2] == cpu.inference.stride_z * 16
    assert config.retrain.spacing == (1.5, 1.5, 10.0) and not config.pseudolabel.largest_component
    thin = {"patch_size": [80, 80, 8]}  # thin for the reference strides, but the plan's suit it
    config, _, _ = plan_config(with_overrides(preset("cpu"), thin), cohort, given_paths(thin))
    assert config.retrain.downsampling == THICK_SLICES and config.resolved(2).retrain.patch_size == (80, 80, 8)
    with pytest.raises(InputError, match=r"patch_size 80×80×8 is the V-Net's patch too"):
        with_overrides(preset("cpu"), thin).resolved(2)  # where the strides stay the reference's, it is refused
    window = {"inference": {"patch_size": [224, 256, 8]}}  # a prediction window that only the plan's strides fit
    assert with_overrides(preset("cpu"), window).resolved(2).inference.patch_size == (224, 256, 8)
    with pytest.raises(InputError, match="inference.patch_size"):
        with_overrides(preset("small"), window).resolved(2)  # no plan: the reference strides need multiples of 16
    with pytest.raises(InputError, match="inference.patch_size"):  # at prediction, the model's strides decide
        InferenceConfig(patch_size=(224, 256, 6)).for_model((128, 128, 8), THICK_SLICES)
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


def ct_cohort(root: Path, n_labeled: int = 2, n_unlabeled: int = 1) -> Path:
    """CT-like volumes in Hounsfield units (int16: air −1000 around a 40 HU body, a 120 ± 15 HU organ, bright
    bone specks of 1500 HU), 1 mm voxels, as real NRRD files."""
    rng = np.random.default_rng(1)
    for index in range(n_labeled + n_unlabeled):
        shape = (48, 48, 32)
        label = np.zeros(shape, np.uint8)
        label[14:30, 16:34, 8:24] = 1
        image = np.full(shape, -1000.0)
        image[4:44, 4:44, :] = 40 + rng.normal(0, 10, (40, 40, shape[2]))
        image[label == 1] = 120 + rng.normal(0, 15, int(label.sum()))
        image[rng.random(shape) < 0.002] = 1500
        name = f"ct{index}"
        write_volume(root / name / "image.nrrd", np.round(image).astype(np.int16), (1.0, 1.0, 1.0))
        folder = root / name if index < n_labeled else root / "truth" / name
        write_volume(folder / "label.nrrd", label, (1.0, 1.0, 1.0))
    return root


def test_a_ct_cohort_is_clipped_and_standardised_with_its_foreground_statistics(tmp_path) -> None:
    root = ct_cohort(tmp_path / "cohort")
    cohort = discover_cohort(root)
    found = fingerprint(cohort)
    assert found.integer_valued and min(found.minima) == -1000 and found.looks_like_ct
    organ = np.concatenate([read_volume(root / f"ct{i}" / "image.nrrd").array[
        read_volume(root / f"ct{i}" / "label.nrrd").array == 1] for i in range(2)]).astype(float)
    low, high, mean, std = found.foreground
    assert low == pytest.approx(np.percentile(organ, 0.5), abs=2) and high == pytest.approx(np.percentile(organ, 99.5),
                                                                                            abs=2)
    assert mean == pytest.approx(organ.mean(), abs=0.5) and std == pytest.approx(organ.std(), rel=0.02)
    config, plan, _ = plan_config(preset("cpu"), cohort)
    assert config.retrain.intensity_window == plan.intensity_window == found.foreground
    image = read_volume(root / "ct2" / "image.nrrd").array
    normalised = normalize_intensities(image, plan.intensity_window)
    assert normalised.min() == pytest.approx((low - mean) / std) and normalised.max() == pytest.approx(
        (high - mean) / std)  # air and bone are clipped to the organ's range, not stretched over −1000 … 1500
    body = (image > -500) & (image < low)
    assert np.all(normalised[body] == normalised.min())
    mri = discover_cohort(thick_slice_cohort(tmp_path / "mri"))  # float intensities: z-scored per volume
    assert make_plan(fingerprint(mri), preset("cpu")).intensity_window is None


def test_a_ct_run_records_its_normalisation_in_the_model_and_predicts_with_it(tmp_path) -> None:
    cohort = ct_cohort(tmp_path / "cohort", n_labeled=1, n_unlabeled=1)
    config = {"patch_size": [32, 32, 16], "plan": {"enabled": True},
              "retrain": {"method": "mt", "iterations": 2, "checkpoint_every": 2}, "estimate": False}
    result = run(cohort, tmp_path / "run", config)
    assert result.returncode == 0, result.stderr[-3000:]
    planned = json.loads((tmp_path / "run" / "plan.json").read_text())["planned"]["retrain.intensity_window"]
    assert planned["used"] == planned["plan"] and len(planned["plan"]) == 4 and "CT" in planned["reason"]
    _, info = load_vnet(tmp_path / "run")
    assert info.intensity_window == tuple(planned["plan"])
    image = read_volume(cohort / "ct1" / "image.nrrd")
    model, _ = load_vnet(tmp_path / "run")
    inference = InferenceConfig(patch_size=(32, 32, 16), stride_xy=16, stride_z=16, device="cpu")
    _, with_window = predict_volume(model, image, inference, info.classes, info.spacing, info.intensity_window)
    _, zscored = predict_volume(model, image, inference, info.classes, info.spacing)
    saved = read_volume(next((tmp_path / "run" / "predictions").glob("ct1.*")))
    assert np.array_equal(saved.array, with_window.argmax(0).astype(saved.array.dtype))  # the run used the window
    assert not np.allclose(with_window, zscored)


def test_plan_only_writes_the_plan_and_the_estimate_and_trains_nothing(tmp_path) -> None:
    cohort = thick_slice_cohort(tmp_path / "cohort", n_labeled=1, n_unlabeled=2)
    config = {"plan": {"enabled": True}, "retrain": {"method": "mt", "iterations": 30}, "estimate": False}
    result = run(cohort, tmp_path / "run", config, "--plan-only")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert record["planned"]["retrain.spacing"]["used"] == [1.5, 1.5, 10.0]
    stages = {stage["stage"]: stage for stage in record["estimate"]["stages"]}
    assert {"retrain", "predict"} <= set(stages) and "finetune" not in stages  # mt: no SAM stages
    assert all(stage["seconds"] > 0 for stage in stages.values())
    assert record["estimate"]["total_s"] == pytest.approx(sum(stage["seconds"] for stage in stages.values()))
    assert "(30 mt iterations" in stages["retrain"]["description"]
    messages = [e.get("message", "") for e in events(result.stdout)]
    assert any("plan from the cohort" in m for m in messages) and any("estimated time" in m for m in messages)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == ["plan.json"]
    for extra, named in ((("--from", str(tmp_path / "run")), "--from"), (("--server", "http://127.0.0.1:9"),
                                                                        "--server")):
        refused = run(cohort, tmp_path / "other", config, "--plan-only", *extra)
        assert refused.returncode != 0 and named in refused.stderr and not (tmp_path / "other").exists()
