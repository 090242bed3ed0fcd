"""Updates (`python -m SFRSegmentLib run --from PARENT`, real subprocesses at the small preset): a new unlabeled case
takes over the parent's SAM and pseudo-labels; a correction continues SAM and the V-Net from the parent's weights;
an update of an update works; the parent's files never change."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.provenance import read_record
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.research.synthetic import TRUTH_FOLDER, make_synthetic_cohort
from SFRSegmentLib.run.update import lineage, read_parent
from small_runs import TINY, events, run

CONFIG = {**TINY, "finetune": {"iterations": 4, "checkpoint_every": 4},
          "retrain": {"iterations": 5, "checkpoint_every": 5, "lr_step": 1000}, "baseline_method": "mt"}


FULL = {"finetune": 4, "retrain": 5, "finetune_lr": 1e-3, "retrain_lr": 0.01}
"""The lineage's full schedule: the first run's iterations and learning rates."""


def _run(cohort: Path, out: Path, *extra: str, config: Dict[str, object] = CONFIG) -> List[Dict[str, object]]:
    result = run(cohort, out, config, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return events(result.stdout)


def _trained(events: List[Dict[str, object]], stage: str) -> List[int]:
    return [e["step"] for e in events if e["stage"] == stage and e["loss"] is not None]


def _contents(folder: Path) -> Dict[str, tuple]:
    """Every file under ``folder``: SHA-256 and modification time."""
    return {str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != ".lock"}


def _weights(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lineage_runs(tmp_path_factory):
    """A parent run on 1 labeled + 3 unlabeled cases; update 1 adds a fourth unlabeled case; update 2 (from update
    1) labels a formerly unlabeled case with its true label (the correction). The parent's files are recorded
    before the updates."""
    root = tmp_path_factory.mktemp("lineage")
    cohort = root / "cohort"
    make_synthetic_cohort(cohort, n_cases=5, n_labeled=1, n_classes=1, seed=4,
                          size_range=((48, 52), (48, 52), (16, 18)))
    held_back = root / "held_back"
    shutil.move(str(cohort / "case_004"), held_back)
    parent = root / "parent"
    _run(cohort, parent)
    before = _contents(parent)

    shutil.move(str(held_back), cohort / "case_004")
    first = root / "first"
    first_events = _run(cohort, first, "--from", str(parent))

    shutil.copy(cohort / TRUTH_FOLDER / "case_002" / "label.nrrd", cohort / "case_002" / "label.nrrd")
    second = root / "second"
    second_events = _run(cohort, second, "--from", str(first),
                         config={**CONFIG, "update": {"batchnorm_statistics": "frozen"}})
    return {"cohort": cohort, "parent": RunFolder(parent), "before": before, "first": RunFolder(first), "first_events": first_events,
            "second": RunFolder(second), "second_events": second_events}


def test_the_parent_run_is_never_changed(lineage_runs):
    assert _contents(lineage_runs["parent"].root) == lineage_runs["before"]


def test_a_new_unlabeled_case_takes_over_sam_and_the_other_pseudo_labels(lineage_runs):
    parent, first, events = lineage_runs["parent"], lineage_runs["first"], lineage_runs["first_events"]
    assert not _trained(events, "finetune")
    assert read_record(first.sam_weights)["id"] == read_record(parent.sam_weights)["id"]
    assert first.sam_weights.stat().st_ino == parent.sam_weights.stat().st_ino  # a link, not a copy
    for case in ("case_001", "case_002", "case_003"):
        assert read_record(first.pseudo_label(case))["id"] == read_record(parent.pseudo_label(case))["id"]
        assert first.pseudo_label(case).stat().st_mtime_ns == parent.pseudo_label(case).stat().st_mtime_ns
    assert read_record(first.pseudo_label("case_004")) is not None and not parent.pseudo_label("case_004").exists()
    # The V-Net, then the baseline, continue from the parent's for ceil(5 × 0.15) = 1 iteration.
    assert _trained(events, "retrain") == [1, 1]
    record = read_record(first.vnet_weights)
    assert record["inputs"]["upstream"]["V-Net re-training continues from"] == read_record(parent.vnet_weights)["id"]
    options = record["inputs"]["options"]
    assert (options["iterations"], options["lr"], options["ssl"]["consistency_rampup"]) == (1, 0.001, 0.0)
    assert options["batchnorm_statistics"] == "batch"  # re-estimated from the update's batches
    old, new = _weights(parent.vnet_weights)["state_dict"], _weights(first.vnet_weights)["state_dict"]
    assert any(not torch.equal(old[name], new[name]) for name in old if name.endswith("running_mean"))
    assert any(not torch.equal(old[name], new[name]) for name in old if name.endswith(".weight"))
    # The saved V-Net is the parent's and the continued student's average (update.parent_share 0.5).
    assert options["init_weights_share"] == 0.5
    student = _weights(first.retrain_checkpoint)["student"]
    for name, tensor in new.items():
        if tensor.is_floating_point():
            assert torch.allclose(tensor, (old[name] + student[name]) / 2, atol=1e-6), name
    assert any(not torch.equal(new[name], student[name]) for name in new if name.endswith(".weight"))
    # The baseline continues the parent's baseline, not the parent's SFR V-Net.
    baseline = read_record(first.baseline.vnet_weights)["inputs"]
    assert baseline["upstream"]["V-Net re-training continues from"] == read_record(parent.baseline.vnet_weights)["id"]
    assert baseline["options"]["method"] == "mt" and baseline["options"]["iterations"] == 1
    manifest = json.loads(first.manifest.read_text())["update"]
    assert manifest["parent"] == str(parent.root.resolve()) and manifest["added"] == ["case_004"]
    assert manifest["corrected"] == [] and manifest["full_schedule"] == FULL


def test_a_correction_continues_sam_and_the_v_net_and_an_update_of_an_update_works(lineage_runs):
    first, second, events = lineage_runs["first"], lineage_runs["second"], lineage_runs["second_events"]
    # ceil(4 × .25) and ceil(5 × .15) (the V-Net, then the baseline)
    assert _trained(events, "finetune") == [1] and _trained(events, "retrain") == [1, 1]
    sam = read_record(second.sam_weights)["inputs"]
    assert sam["upstream"] == {"SAM weights fine-tuning continues from": read_record(first.sam_weights)["id"]}
    assert "label of case case_002" in sam["files"] and sam["options"]["lr"] == pytest.approx(1e-4)
    old, new = _weights(first.sam_weights), _weights(second.sam_weights)
    assert any(not torch.equal(old[name], new[name]) for name in old)
    old, new = _weights(first.vnet_weights)["state_dict"], _weights(second.vnet_weights)["state_dict"]
    assert read_record(second.vnet_weights)["inputs"]["options"]["batchnorm_statistics"] == "frozen"
    assert all(torch.equal(old[name], new[name]) for name in old if name.endswith(("running_mean", "running_var")))
    assert any(not torch.equal(old[name], new[name]) for name in old if name.endswith(".weight"))
    # SAM changed, so every pseudo-label is new; case_002 is labeled now and has none.
    assert not second.pseudo_label("case_002").exists()
    for case in ("case_001", "case_003", "case_004"):
        assert read_record(second.pseudo_label(case))["id"] != read_record(first.pseudo_label(case))["id"]
    manifest = json.loads(second.manifest.read_text())["update"]
    assert manifest["parent"] == str(first.root.resolve()) and manifest["corrected"] == ["case_002"]
    assert manifest["full_schedule"] == FULL  # not shortened twice
    chain = lineage(second)
    assert [step["run"].root for step in chain] == [lineage_runs["parent"].root.resolve(), first.root.resolve(),
                                                     second.root]
    report = second.report.read_text()
    assert "Lineage" in report and "corrected: case_002" in report and "added: case_004" in report


def test_an_update_needs_a_finished_parent_and_another_folder(lineage_runs, tmp_path):
    parent = lineage_runs["parent"].root
    with pytest.raises(InputError, match="another folder than --from"):
        read_parent(parent, parent)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(InputError, match="config.json is missing"):
        read_parent(unfinished, tmp_path / "new")
    without_baseline = tmp_path / "without_baseline"
    shutil.copytree(parent, without_baseline)
    shutil.rmtree(RunFolder(without_baseline).baseline.root)
    result = run(lineage_runs["cohort"], tmp_path / "update", CONFIG, "--from", str(without_baseline))
    assert result.returncode == 2 and "no baseline V-Net to continue" in result.stderr
    assert "baseline_method" in result.stderr and not (tmp_path / "update" / "retrain").exists()
