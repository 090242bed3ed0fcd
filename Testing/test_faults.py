"""Fault injection (issue #15): every file of a run folder that the engine reads back, damaged the way disks, copies
and crashes damage files, and `run` killed with SIGKILL inside each stage; then `python -m SFRSegmentLib run` (a real
subprocess, small preset) is run again.

The cases come from two tables: :data:`FILE_KINDS` × :data:`DAMAGES` (each rerun ends with a full recovery, or with
exit 2 and a message naming the file) and :data:`KILL_POINTS` (each killed run, rerun, ends with the outputs of an
uninterrupted run, bit for bit: every stage is deterministic on the CPU and resumes its RNG state from its
checkpoint). One finished run is made per module and copied per case. By default a few cases run (the issue's two,
each damage once, each stage's outputs) and the kills are chained through one run; ``pytest -m faults_sweep`` tries
every kind in every way and kills each stage at several points.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.models.vnet import MODEL_FORMAT, load_vnet
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.stages.finetune import load_finetuned_sam
from SFRSegmentLib.stages.sfrplus import _previous_sam_weights
from small_runs import TINY, events, finished_run, run, run_command

REPO = Path(__file__).resolve().parents[1]
CONFIG = {**TINY, "finetune": {"iterations": 3, "checkpoint_every": 1}}
CASE = "case_001"
"""The unlabeled case whose files are damaged."""

Event = Dict[str, object]


# ---------------------------------------------------------------------------------------------------------------
# Damages


def _wrong_schema(path: Path) -> None:
    """A well-formed file of the same type with the wrong keys, shape or format version."""
    name = path.name
    if name.endswith(".json"):
        path.write_text(json.dumps({"format": "sfrsegment-other/99", "values": [1, 2]}))
    elif name.endswith(".npy"):
        np.save(path, np.zeros((2, 3), np.float64))
    elif name.endswith(".pt"):
        torch.save({"format": "sfrsegment-other/99", "state_dict": {"w": torch.zeros(2)}}, path)
    elif name.endswith(".csv"):
        path.write_text("column,other\nx,y\n")
    elif name.endswith((".nrrd", ".nii.gz")):
        sitk.WriteImage(sitk.Image(5, 6, 7, sitk.sitkFloat32), str(path))
    else:
        path.write_text("<p>another document</p>\n")


DAMAGES: Dict[str, Callable[[Path], None]] = {
    "missing": lambda path: path.unlink(),
    "empty": lambda path: path.write_bytes(b""),
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "garbage": lambda path: path.write_bytes(np.random.default_rng(15).bytes(max(path.stat().st_size, 64))),
    "wrong schema": _wrong_schema,
}


@dataclass(frozen=True)
class FileKind:
    """A file of the run folder: its path in it, the outputs deleted first so that a rerun reads the file back (a run
    stopped inside the stage that wrote it), and whether the engine reads it back at all (files it only writes are
    rewritten by every rerun, so there is nothing to announce)."""

    path: str
    unfinished: Tuple[str, ...] = ()
    read_back: bool = True


FILE_KINDS: Tuple[FileKind, ...] = (
    FileKind("config.json", read_back=False),
    FileKind("manifest.json", read_back=False),
    FileKind("finetune/checkpoint.pt", unfinished=("finetune/sam_trainable.pt",)),
    FileKind("finetune/sam_trainable.pt"),
    FileKind("finetune/sam_trainable.json"),
    FileKind("finetune/sam_trainable.pt.provenance.json"),
    FileKind("finetune/log.csv", read_back=False),
    FileKind(f"pseudolabels/{CASE}.label.nrrd"),
    FileKind(f"pseudolabels/{CASE}.prob.npy"),
    FileKind(f"pseudolabels/{CASE}.label.nrrd.provenance.json"),
    FileKind("pseudolabels/confidence.csv", read_back=False),
    FileKind("retrain/checkpoint.pt", unfinished=("retrain/vnet.pt",)),
    FileKind("retrain/vnet.pt"),
    FileKind("retrain/vnet.json"),
    FileKind("retrain/vnet.pt.provenance.json"),
    FileKind("retrain/log.csv", read_back=False),
    FileKind(f"predictions/{CASE}.seg.nrrd"),
    FileKind(f"predictions/{CASE}.nii.gz"),
    FileKind(f"predictions/{CASE}.seg.nrrd.provenance.json"),
    FileKind("metrics.csv", read_back=False),
    FileKind("report.html", read_back=False),
    FileKind("provenance.json", read_back=False),
    FileKind("timings.json", read_back=False),
)
"""Every kind of file in a finished run folder (:mod:`SFRSegmentLib.storage.runfolder`; one case stands for all). The logs
are read back only by the report, which notes a damaged one; the next training of the stage rewrites it."""

EXIT2: Dict[Tuple[str, str], str] = {}
"""(file, damage) → the field an exit-2 message names, for the cases that stop instead of recovering. None: every
file of a run folder can be recomputed, so every case recovers."""

ALL_CASES = [(kind, damage) for kind in FILE_KINDS for damage in DAMAGES]
_KINDS = {kind.path: kind for kind in FILE_KINDS}
DEFAULT_CASES = [(_KINDS[path], damage) for path, damage in (
    ("retrain/checkpoint.pt", "truncated"),  # the two cases the issue reports
    (f"pseudolabels/{CASE}.prob.npy", "truncated"),
    ("finetune/sam_trainable.json", "wrong schema"),
    (f"pseudolabels/{CASE}.label.nrrd.provenance.json", "garbage"),
    ("retrain/vnet.pt", "empty"),
    (f"predictions/{CASE}.nii.gz", "missing"),
    ("config.json", "garbage"),
)]
"""The cases tried by default: the issue's two, each damage, each stage's outputs and a file only written."""


def _case_id(case: Tuple[FileKind, str]) -> str:
    return f"{case[0].path}-{case[1].replace(' ', '_')}"


# ---------------------------------------------------------------------------------------------------------------
# Runs


def _command(cohort: Path, out: Path) -> List[str]:
    return run_command(cohort, out, CONFIG)


def _run(cohort: Path, out: Path) -> subprocess.CompletedProcess:
    return run(cohort, out, CONFIG)


def _run_until(cohort: Path, out: Path, point: Callable[[Event], bool]) -> bool:
    """Start ``run`` and SIGKILL it as soon as it prints an event ``point`` accepts; False when it finished first."""
    process = subprocess.Popen(_command(cohort, out), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith("{") and point(json.loads(line)):
                os.kill(process.pid, signal.SIGKILL)
                return True
        return False
    finally:
        process.stdout.close()
        process.wait(timeout=600)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Tuple[Path, Path]:
    """(cohort, run folder) of one finished run: one labeled case, three unlabeled ones with true labels."""
    root = tmp_path_factory.mktemp("finished")
    return root / "cohort", finished_run(root, CONFIG)


# ---------------------------------------------------------------------------------------------------------------
# Final outputs


def _final_outputs(run: Path) -> Dict[str, object]:
    """What a run computed: fine-tuned SAM and V-Net tensors, pseudo-label and prediction arrays, metrics rows."""
    folder = RunFolder(run)
    outputs: Dict[str, object] = {"metrics": folder.metrics.read_text()}
    for name, path in (("SAM", folder.sam_weights), ("V-Net", folder.vnet_weights)):
        state = torch.load(path, map_location="cpu", weights_only=True)
        outputs[name] = state.get("state_dict", state)
    for path in sorted(folder.pseudolabel_dir.glob("*.prob.npy")):
        outputs[path.name] = np.load(path)
    for path in sorted([*folder.pseudolabel_dir.glob("*.nrrd"), *folder.prediction_dir.glob("*.seg.nrrd")]):
        outputs[path.relative_to(run).as_posix()] = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return outputs


def _assert_equal_outputs(run: Path, reference: Path) -> None:
    got, expected = _final_outputs(run), _final_outputs(reference)
    assert sorted(got) == sorted(expected)
    assert got["metrics"] == expected["metrics"]
    for name in ("SAM", "V-Net"):
        assert sorted(got[name]) == sorted(expected[name])
        unequal = [key for key in got[name] if not torch.equal(got[name][key], expected[name][key])]
        assert not unequal, f"{name} tensors differ: {unequal[:5]}"
    for name in got:
        if name not in ("metrics", "SAM", "V-Net"):
            assert np.array_equal(got[name], expected[name]), name


# ---------------------------------------------------------------------------------------------------------------
# Damaged files


def _check_damaged(finished: Tuple[Path, Path], tmp_path: Path, kind: FileKind, damage: str) -> str:
    """Damage ``kind`` in a copy of the finished run, rerun, assert the outcome; "recovered" or "exit 2"."""
    cohort, reference = finished
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for output in kind.unfinished:
        (run / output).unlink()
    target = run / kind.path
    DAMAGES[damage](target)
    result = _run(cohort, run)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if (kind.path, damage) in EXIT2:
        assert result.returncode == 2 and str(target) in result.stderr, result.stderr[-3000:]
        return "exit 2"
    assert result.returncode == 0, result.stderr[-3000:]
    if kind.read_back and damage != "missing":
        messages = " ".join(str(e["message"]) for e in events(result.stdout) if e["message"])
        assert target.name in messages, f"no progress message names {target.name}: {messages[-2000:]}"
    _assert_equal_outputs(run, reference)
    return "recovered"


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=_case_id)
def test_a_damaged_file_is_recomputed_or_named(finished, tmp_path, case):
    _check_damaged(finished, tmp_path, *case)


@pytest.mark.faults_sweep
@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_every_file_damaged_every_way(finished, tmp_path, case):
    _check_damaged(finished, tmp_path, *case)


# ---------------------------------------------------------------------------------------------------------------
# Kills


@dataclass(frozen=True)
class KillPoint:
    """Where a run is killed: the first progress event of ``stage`` that ``when`` accepts."""

    name: str
    stage: str
    when: Callable[[Event], bool]

    def __call__(self, event: Event) -> bool:
        return event["stage"] == self.stage and self.when(event)


def _after_step(step: int) -> Callable[[Event], bool]:
    return lambda event: event["loss"] is not None and event["step"] == step


def _after_message(prefix: str) -> Callable[[Event], bool]:
    return lambda event: str(event["message"] or "").startswith(prefix)


KILL_POINTS: Tuple[KillPoint, ...] = (
    KillPoint("fine-tuning step 1", "finetune", _after_step(1)),
    KillPoint("fine-tuning step 2", "finetune", _after_step(2)),
    KillPoint("first pseudo-label", "pseudolabel", _after_message("case_001: computed")),
    KillPoint("second pseudo-label", "pseudolabel", _after_message("case_002: computed")),
    KillPoint("re-training step 1", "retrain", _after_step(1)),
    KillPoint("re-training step 3", "retrain", _after_step(3)),
    KillPoint("first prediction", "predict", _after_message("predicted case_001")),
    KillPoint("second prediction", "predict", _after_message("predicted case_002")),
)
CHAINED = KILL_POINTS[1::2]
"""One point per stage, for the chained default test."""


def _kill_and_finish(cohort: Path, run: Path, points: Sequence[KillPoint]) -> None:
    """Kill ``run`` at each point in turn (each rerun resumes the previous one), then let it finish."""
    for point in points:
        assert _run_until(cohort, run, point), f"the run finished before {point.name}"
    result = _run(cohort, run)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_run_killed_in_every_stage_in_turn_ends_as_an_uninterrupted_one(finished, tmp_path):
    cohort, reference = finished
    _kill_and_finish(cohort, tmp_path / "run", CHAINED)
    _assert_equal_outputs(tmp_path / "run", reference)


@pytest.mark.faults_sweep
@pytest.mark.parametrize("point", KILL_POINTS, ids=lambda point: point.name.replace(" ", "_"))
def test_a_run_killed_at_each_point_ends_as_an_uninterrupted_one(finished, tmp_path, point):
    cohort, reference = finished
    _kill_and_finish(cohort, tmp_path / "run", [point])
    _assert_equal_outputs(tmp_path / "run", reference)


# ---------------------------------------------------------------------------------------------------------------
# Readers of engine files a user can also give by hand (trained weights, SFR+ round records)


def _load_sam(run: Path) -> None:
    load_finetuned_sam(RunFolder(run).sam_weights)


def _load_round(run: Path) -> None:
    _previous_sam_weights(RunFolder(run), 2)


READERS: Tuple[Tuple[str, Callable[[Path], None]], ...] = (
    ("retrain/vnet.pt", lambda run: load_vnet(RunFolder(run).vnet_weights)),
    ("finetune/sam_trainable.pt", _load_sam),
    ("finetune/sam_trainable.json", _load_sam),
    ("sfrplus/round1/round.json", _load_round),
)
"""File → the engine function that reads it outside the pipeline's own checks."""


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("reader", READERS, ids=lambda reader: reader[0])
def test_readers_name_a_damaged_file(finished, tmp_path, reader, damage):
    path, read = reader
    run = tmp_path / "run"
    shutil.copytree(finished[1], run)
    round_record = run / READERS[-1][0]
    round_record.parent.mkdir(parents=True)
    round_record.write_text(json.dumps({"sam_weights": str(RunFolder(run).sam_weights)}))
    DAMAGES[damage](run / path)
    with pytest.raises(InputError) as raised:
        read(run)
    assert raised.value.path == run / path


def test_a_v_net_file_of_the_right_format_but_wrong_content_is_named(tmp_path):
    path = tmp_path / "vnet.pt"
    torch.save({"format": MODEL_FORMAT, "info": {"classes": {}}, "state_dict": {}}, path)
    with pytest.raises(InputError, match="re-train it") as raised:
        load_vnet(path)
    assert raised.value.path == path
