"""Several processes with real ``torchrun`` (gloo, CPU): gradient synchronisation, the EMA teacher, sharded
pseudo-labelling, rank-0 writing, and equality with one process at the same global batch.

The stages run in Testing/distributed_worker.py, once with 2 processes (per-rank fine-tuning batch 1) and once as
a single process (batch 2); each rank dumps its in-memory state next to the run folder.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest
import torch

from SFRSegmentLib.data.cohort import discover_cohort
from SFRSegmentLib.base.config import RetrainConfig
from SFRSegmentLib.storage.provenance import read_record
from SFRSegmentLib.stages.retrain import retrain
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.research.synthetic import make_synthetic_cohort

WORKER = Path(__file__).with_name("distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
from distributed_worker import RETRAIN  # noqa: E402

FINETUNE_TOLERANCE = 1e-4
"""Largest absolute difference allowed between the fine-tuned weights of 2 processes × batch 1 and 1 process ×
batch 2, a tenth of one AdamW step at lr 1e-3. The data and the loss are the same and the losses agree to 6
digits, but the gradients are summed in another order, and AdamW divides each gradient by its own magnitude: for
weights whose true gradient is zero (attention key biases, to which softmax is blind) the float32 rounding noise
becomes a step of up to ~lr. Measured: 2.4e-5 after 3 steps."""


def launch(command) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    make_synthetic_cohort(root, n_cases=5, n_labeled=2, size_range=((36, 40), (36, 40), (16, 18)),
                          spacing=(0.8, 0.8, 3.2))
    return root


@pytest.fixture(scope="module")
def two_processes(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
            str(cohort), str(out), "1"])
    return out


@pytest.fixture(scope="module")
def one_process(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    launch([sys.executable, str(WORKER), str(cohort), str(out), "2"])
    return out


def load(path: Path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_fine_tuning_keeps_the_ranks_identical(two_processes):
    rank0, rank1 = (load(two_processes / f"rank{r}" / "sam_trainable.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    written = load(RunFolder(two_processes / "run").sam_weights)
    assert all(torch.equal(written[k], rank0[k]) for k in rank0)


def test_two_processes_train_like_one_with_the_global_batch(two_processes, one_process):
    two = load(two_processes / "rank0" / "sam_trainable.pt")
    one = load(one_process / "rank0" / "sam_trainable.pt")
    gap = max((two[k] - one[k]).abs().max().item() for k in two)
    assert gap <= FINETUNE_TOLERANCE
    run = RunFolder(two_processes / "run")
    assert json.loads(run.sam_weights_info.read_text())["iterations"] == 3
    assert read_record(run.sam_weights)["inputs"]["options"]["processes"] == 2
    log = list(csv.DictReader(open(RunFolder(two_processes / "run").finetune_log)))
    reference = list(csv.DictReader(open(RunFolder(one_process / "run").finetune_log)))
    assert [float(r["loss"]) for r in log] == pytest.approx([float(r["loss"]) for r in reference], rel=1e-4)


def test_pseudolabelling_is_sharded_and_covers_every_case_once(two_processes, cohort):
    shares = [json.loads((two_processes / f"rank{r}" / "pseudolabelled.json").read_text()) for r in (0, 1)]
    unlabeled = sorted(case.name for case in discover_cohort(cohort).unlabeled)
    assert all(shares) and sorted(shares[0] + shares[1]) == unlabeled
    run = RunFolder(two_processes / "run")
    assert all(run.pseudo_label(name).is_file() and run.pseudo_probabilities(name).is_file() for name in unlabeled)
    rows = list(csv.DictReader(open(run.confidence_table)))
    assert sorted(row["case"] for row in rows) == unlabeled


def test_retraining_keeps_student_and_teacher_identical_across_ranks(two_processes):
    rank0, rank1 = (load(two_processes / f"rank{r}" / "retrain.pt") for r in (0, 1))
    for network in ("student", "teacher"):
        assert all(torch.equal(rank0[network][k], rank1[network][k]) for k in rank0[network]), network
    assert not all(torch.equal(rank0["student"][k], rank0["teacher"][k]) for k in rank0["student"])


def test_rank_zero_writes_one_checkpoint_with_every_ranks_generator(two_processes):
    run = RunFolder(two_processes / "run")
    state = torch.load(run.retrain_checkpoint, map_location="cpu", weights_only=True)
    assert state["processes"] == 2 and len(state["torch_rng"]) == 2
    assert not torch.equal(state["torch_rng"][0], state["torch_rng"][1])
    leftovers = [p for p in run.root.rglob("*") if p.name.startswith(".") or p.suffix in (".tmp", ".part")]
    assert leftovers == []


def test_a_checkpoint_of_another_number_of_processes_is_not_resumed(two_processes, cohort, tmp_path):
    run = RunFolder(tmp_path / "run")
    (run.root / "retrain").mkdir(parents=True)
    source = RunFolder(two_processes / "run")
    run.retrain_checkpoint.write_bytes(source.retrain_checkpoint.read_bytes())
    events = []
    retrain(discover_cohort(cohort), run, RetrainConfig(**RETRAIN), pseudo_labels={}, progress=events.append)
    assert events[0].message.startswith(f"not resuming {run.retrain_checkpoint}: options changed: processes")
    assert [e.step for e in events if e.loss is not None][0] == 1


def test_torchrun_runs_the_whole_pipeline_with_one_voice(cohort, tmp_path):
    """``torchrun -m SFRSegmentLib run``: every stage with 2 processes, JSON lines from rank 0 only, one set of
    outputs, predictions of every unlabeled case."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "patch_size": [32, 32, 16],
        "finetune": {"iterations": 2, "checkpoint_every": 2},
        "retrain": {"iterations": 2, "batch_labeled": 1, "batch_unlabeled": 1, "checkpoint_every": 2},
        "inference": {"stride_xy": 16, "stride_z": 8},
        "baseline_method": None, "estimate": False,
    }))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "SFRSegmentLib", "run", "--cohort", str(cohort), "--out", str(out), "--preset", "small",
               "--config", str(config), "--progress", "jsonl", "--device", "cpu", "--truth", str(cohort / "truth")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-5000:]
    events = [json.loads(line) for line in result.stdout.splitlines()]
    finished = [e for e in events if e["stage"] == "retrain" and e["step"] == e["total"] == 2]
    assert len(finished) == 1  # one rank reports
    assert [e["stage"] for e in events].count("report") == 1
    unlabeled = sorted(case.name for case in discover_cohort(cohort).unlabeled)
    predicted = [e["message"] for e in events if e["stage"] == "predict"]
    assert sorted(m.removeprefix("predicted ") for m in predicted) == unlabeled
    run = RunFolder(out)
    assert all((run.prediction_dir / f"{name}.seg.nrrd").is_file() for name in unlabeled)
    rows = list(csv.DictReader(open(run.metrics)))
    assert sorted(row["case"] for row in rows) == unlabeled
    assert read_record(run.sam_weights)["inputs"]["options"]["processes"] == 2
    assert read_record(run.vnet_weights)["inputs"]["options"]["processes"] == 2


def test_a_signal_to_torchrun_stops_every_rank_at_a_checkpoint_and_a_rerun_resumes(cohort, tmp_path):
    """SIGTERM to torchrun (what a scheduler or the Slicer module's Cancel sends): torchrun passes it to both ranks,
    they agree to stop at the same iteration, rank 0 saves the checkpoint, and the same command then finishes."""
    run = RunFolder(tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "SFRSegmentLib", "finetune", "--cohort", str(cohort), "--out", str(run.root), "--preset", "small",
               "--iterations", "40", "--patch", "32", "32", "16", "--checkpoint-every", "1000", "--progress", "jsonl",
               "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        try:
            for line in launcher.stdout:
                event = json.loads(line)
                if event["stage"] == "finetune" and event["step"] >= 3:
                    launcher.send_signal(signal.SIGTERM)
                    break
            launcher.stdout.read()
            launcher.wait(timeout=120)
        finally:
            launcher.kill()
    log = (tmp_path / "stderr.txt").read_text()
    assert launcher.returncode != 0
    assert log.count("cancelled: the last checkpoint is saved") == 2, log[-3000:]  # both ranks stopped cleanly
    stopped_at = load(run.finetune_checkpoint)["iteration"]
    assert 3 <= stopped_at < 40  # the only checkpoint is the one saved on the stop (--checkpoint-every 1000)
    assert not run.sam_weights.exists()

    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    events = [json.loads(line) for line in resumed.stdout.splitlines()]
    assert f"resumed at iteration {stopped_at}" in [e["message"] for e in events]
    trained = [e["step"] for e in events if e["stage"] == "finetune" and e["loss"] is not None]
    assert trained == list(range(stopped_at + 1, 41))  # continued, not restarted, one rank reporting
    with open(run.finetune_log, newline="") as handle:
        assert [int(row["iteration"]) for row in csv.DictReader(handle)] == list(range(40))  # each once (0-based)
