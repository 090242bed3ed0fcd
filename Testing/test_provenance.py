"""Provenance: records beside outputs, and reruns of `python -m SFRSegmentLib run` (real subprocesses) after a user
deletes an output, edits a label or an image, or changes an option: exactly what depends on the change is redone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from SFRSegmentLib.storage.volumes import read_volume, write_volume
from SFRSegmentLib.stages.confidence import read_table
from SFRSegmentLib.storage.provenance import (
    MISSING,
    Inputs,
    file_digest,
    identity_of,
    read_record,
    record_path,
    stale_reason,
    write_record,
)
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.models.sam.weights import file_sha256
from SFRSegmentLib.research.synthetic import TRUTH_FOLDER
from small_runs import TINY, events, finished_run, run

def test_inputs_name_what_changed(tmp_path):
    before = Inputs({"lr": 0.01, "ssl": {"ema": 0.99}}, {"label of case a": "1", "image of case b": "2"},
                    {"SAM weights": "x"})
    after = Inputs({"lr": 0.02, "ssl": {"ema": 0.9}}, {"label of case a": "3", "image of case c": "4"},
                   {"SAM weights": "y"})
    assert after.changes_from(before.as_dict()) == [
        "options changed: lr, ssl.ema", "SAM weights changed", "image of case b removed", "image of case c added",
        "label of case a changed"]
    assert before.changes_from(json.loads(json.dumps(before.as_dict()))) == []
    assert after.changes_from(None) == ["no record of its inputs"]
    assert after.changes_from({"options": 5, "files": []}) == ["no record of its inputs"]


def test_an_option_added_later_keeps_older_records_current_while_it_has_their_value():
    older = Inputs({"lr": 0.01}).as_dict()  # recorded before "flip" existed, when nothing was flipped
    assert Inputs({"lr": 0.01, "flip": False}, added_options={"flip": False}).changes_from(older) == []
    assert Inputs({"lr": 0.01, "flip": True}, added_options={"flip": False}).changes_from(older) == [
        "options changed: flip"]
    assert Inputs({"lr": 0.01, "flip": False}).changes_from(older) == ["options changed: flip"]
    assert "added_options" not in Inputs({"lr": 0.01}, added_options={"flip": False}).as_dict()


def test_an_option_added_to_a_section_later_is_read_into_that_section():
    older = Inputs({"lr": 0.01, "ssl": {"ema": 0.99}}).as_dict()
    added = {"ssl": {"agree": False}, "flip": False}
    assert Inputs({"lr": 0.01, "flip": False, "ssl": {"ema": 0.99, "agree": False}},
                  added_options=added).changes_from(older) == []
    assert Inputs({"lr": 0.01, "flip": False, "ssl": {"ema": 0.99, "agree": True}},
                  added_options=added).changes_from(older) == ["options changed: ssl.agree"]
    # a recorded value wins over the default: a record made with the option keeps what it was made with
    newer = Inputs({"lr": 0.01, "ssl": {"ema": 0.99, "agree": True}}).as_dict()
    assert Inputs({"lr": 0.01, "flip": False, "ssl": {"ema": 0.99, "agree": False}},
                  added_options=added).changes_from(newer) == ["options changed: ssl.agree"]


def test_records_identify_outputs_and_files_without_one_by_content(tmp_path):
    output, other = tmp_path / "out.nrrd", tmp_path / "second.nrrd"
    inputs = Inputs({"a": (1, 2)}, {"image of case x": "abc"})
    assert stale_reason([output], inputs) == MISSING
    output.write_bytes(b"volume")
    other.write_bytes(b"more")
    assert stale_reason([output, other], inputs).startswith("it has no provenance record")
    assert identity_of(output) == "sha256:" + file_sha256(output)
    identity = write_record([output], inputs)
    assert identity_of(output) == identity == read_record(output)["id"] and len(identity) == 32
    assert stale_reason([output, other], inputs) is None
    assert stale_reason([output, other], Inputs({"a": (1, 3)}, {"image of case x": "abc"})) == "options changed: a"
    other.unlink()
    assert stale_reason([output, other], inputs) == MISSING
    record_path(output).write_text("{not json")
    assert read_record(output) is None and identity_of(output).startswith("sha256:")
    assert write_record([output], inputs) != identity  # a recomputed output is a new one


def test_an_output_changed_after_its_record_is_stale_and_named(tmp_path):
    output, other = tmp_path / "out.nrrd", tmp_path / "out.npy"
    output.write_bytes(b"volume")
    other.write_bytes(b"probabilities")
    inputs = Inputs({"a": 1})
    write_record([output, other], inputs)
    assert stale_reason([output, other], inputs) is None
    other.write_bytes(b"probabil")  # cut short by a copy
    assert stale_reason([output, other], inputs) == (f"{other} is damaged or was changed after it was written (its "
                                                     "SHA-256 is not the recorded one)")
    record = read_record(output)
    del record["outputs"]
    record_path(output).write_text(json.dumps(record))
    assert "no SHA-256 of the output" in stale_reason([output], inputs)


def test_file_digest_follows_edits(tmp_path):
    path = tmp_path / "label.nrrd"
    path.write_bytes(b"one")
    first = file_digest(path)
    assert first == file_sha256(path) and file_digest(path) == first
    path.write_bytes(b"two, longer")
    assert file_digest(path) == file_sha256(path) != first


# ---------------------------------------------------------------------------------------------------------------
# Reruns of the whole pipeline

def _run(cohort: Path, out: Path, config: Dict[str, object]) -> List[Dict[str, object]]:
    """``run`` at the small preset as a user types it; the progress events it printed."""
    result = run(cohort, out, config)
    assert result.returncode == 0, result.stderr[-3000:]
    return events(result.stdout)


def _lineage(run: Path) -> Dict[str, object]:
    return json.loads(RunFolder(run).provenance.read_text())


def _messages(events: List[Dict[str, object]], stage: str) -> List[str]:
    return [e["message"] for e in events if e["stage"] == stage and e["message"]]


def _trained(events: List[Dict[str, object]], stage: str) -> List[int]:
    return [e["step"] for e in events if e["stage"] == stage and e["loss"] is not None]


def _mtimes(paths: List[Path]) -> List[int]:
    return [path.stat().st_mtime_ns for path in paths]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Tuple[Path, Path]:
    """(cohort, run folder) of one finished run: one labeled case, three unlabeled with true labels."""
    root = tmp_path_factory.mktemp("finished")
    return root / "cohort", finished_run(root)


@pytest.fixture()
def copy(finished, tmp_path) -> Tuple[Path, RunFolder]:
    """A private copy of the finished cohort and run folder, to change."""
    cohort, run = finished
    shutil.copytree(cohort, tmp_path / "cohort")
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "cohort", RunFolder(tmp_path / "run")


def test_a_finished_run_records_every_output_and_a_rerun_redoes_nothing(copy):
    cohort, run = copy
    before = _lineage(run.root)
    unlabeled = sorted(before["pseudo-labels"])
    assert len(unlabeled) == 3 and sorted(before["predictions"]) == unlabeled
    assert all(isinstance(value, str) for value in [before["fine-tuned SAM"], before["V-Net"],
                                                    *before["pseudo-labels"].values(), *before["predictions"].values()])
    record = read_record(run.pseudo_label(unlabeled[0]))
    assert record["inputs"]["upstream"] == {"SAM weights": before["fine-tuned SAM"]}
    assert record["inputs"]["files"] == {f"image of case {unlabeled[0]}":
                                         file_sha256(cohort / unlabeled[0] / "image.nrrd")}
    assert read_record(run.prediction(unlabeled[0]))["inputs"]["upstream"] == {"V-Net": before["V-Net"]}
    assert before["true labels"][unlabeled[0]] == file_sha256(cohort / TRUTH_FOLDER / unlabeled[0] / "label.nrrd")

    events = _run(cohort, run.root, TINY)
    assert not _trained(events, "finetune") and not _trained(events, "retrain")
    assert not [m for m in _messages(events, "predict") if m.startswith("predicted")]
    assert _lineage(run.root) == before


def test_the_predictions_confidence_table_ranks_the_predicted_cases_and_a_lost_one_is_made_again(copy):
    cohort, run = copy
    before = _lineage(run.root)
    ranked = read_table(run.prediction_confidence)
    assert sorted(name for name, _ in ranked) == sorted(before["predictions"])
    assert [value for _, value in ranked] == sorted(value for _, value in ranked)
    assert all(0 < value <= 1 for _, value in ranked)
    table = run.prediction_confidence.read_bytes()
    run.prediction_confidence.unlink()
    events = _run(cohort, run.root, TINY)
    assert not _trained(events, "retrain")
    assert all(f"the prediction of case {name} is stale (its confidence is not in confidence.csv): predicting it "
               "again" in _messages(events, "predict") for name in before["predictions"])
    assert run.prediction_confidence.read_bytes() == table  # the same V-Net and images: the same confidences


def test_deleting_finetune_redoes_sam_and_everything_after_it(copy):
    cohort, run = copy
    before = _lineage(run.root)
    old_predictions = _mtimes([run.prediction(name) for name in before["predictions"]])
    shutil.rmtree(run.finetune_dir)
    events = _run(cohort, run.root, TINY)
    after = _lineage(run.root)
    assert _trained(events, "finetune") == [1, 2, 3] and _trained(events, "retrain") == [1, 2, 3, 4]
    assert after["fine-tuned SAM"] != before["fine-tuned SAM"] and after["V-Net"] != before["V-Net"]
    for kind in ("pseudo-labels", "predictions"):
        assert all(after[kind][name] != before[kind][name] for name in before[kind])
    assert all(f"the pseudo-label of case {name} is stale (SAM weights changed): computing it again"
               in _messages(events, "pseudolabel") for name in before["pseudo-labels"])
    assert "the V-Net is stale (" in _messages(events, "retrain")[0]
    assert all(new != old for new, old in zip(_mtimes([run.prediction(n) for n in before["predictions"]]),
                                              old_predictions))
    assert read_record(run.vnet_weights)["id"] == after["V-Net"]  # the old records are gone with the old files


def test_an_edited_label_redoes_every_stage(copy):
    cohort, run = copy
    before = _lineage(run.root)
    label_file = next(cohort.glob("*/label.nrrd"))
    label = read_volume(label_file)
    array = label.array.copy()
    array[tuple(np.argwhere(array > 0)[0])] = 0
    write_volume(label.with_array(array), label_file)
    events = _run(cohort, run.root, TINY)
    after = _lineage(run.root)
    case = label_file.parent.name
    assert f"the fine-tuned SAM is stale (label of case {case} changed): fine-tuning again" in \
        _messages(events, "finetune")
    assert after["fine-tuned SAM"] != before["fine-tuned SAM"] and after["V-Net"] != before["V-Net"]
    assert set(after["pseudo-labels"].values()).isdisjoint(before["pseudo-labels"].values())
    assert set(after["predictions"].values()).isdisjoint(before["predictions"].values())


def test_an_edited_unlabeled_image_redoes_its_pseudo_label_and_what_reads_every_case(copy):
    cohort, run = copy
    before = _lineage(run.root)
    edited, *others = sorted(before["pseudo-labels"])
    untouched = _mtimes([path for name in others for path in run.pseudo_label_files(name)])
    image_file = cohort / edited / "image.nrrd"
    image = read_volume(image_file)
    write_volume(image.with_array(image.array + np.float32(1.0)), image_file)
    events = _run(cohort, run.root, TINY)
    after = _lineage(run.root)
    assert not _trained(events, "finetune") and after["fine-tuned SAM"] == before["fine-tuned SAM"]
    assert after["pseudo-labels"][edited] != before["pseudo-labels"][edited]
    assert all(after["pseudo-labels"][name] == before["pseudo-labels"][name] for name in others)
    assert _mtimes([path for name in others for path in run.pseudo_label_files(name)]) == untouched
    assert _messages(events, "pseudolabel").count(
        f"the pseudo-label of case {edited} is stale (image of case {edited} changed): computing it again") == 1
    # Re-training reads every case, so the V-Net is new, and every prediction is made again with it.
    assert after["V-Net"] != before["V-Net"] and _trained(events, "retrain") == [1, 2, 3, 4]
    assert f"image of case {edited} changed" in _messages(events, "retrain")[0]
    assert all(after["predictions"][name] != before["predictions"][name] for name in before["predictions"])


def test_changing_only_retrain_iterations_reuses_sam_and_pseudo_labels(copy):
    cohort, run = copy
    before = _lineage(run.root)
    sam_files = [run.sam_weights, run.sam_weights_info]
    label_files = [path for name in before["pseudo-labels"] for path in run.pseudo_label_files(name)]
    kept = _mtimes(sam_files + label_files)
    config = {**TINY, "retrain": {**TINY["retrain"], "iterations": 6}}
    events = _run(cohort, run.root, config)
    after = _lineage(run.root)
    assert _mtimes(sam_files + label_files) == kept
    assert (after["fine-tuned SAM"], after["pseudo-labels"]) == (before["fine-tuned SAM"], before["pseudo-labels"])
    assert _messages(events, "retrain")[0] == "the V-Net is stale (options changed: iterations): re-training it again"
    assert _trained(events, "retrain") == [1, 2, 3, 4, 5, 6]  # restarted: the old checkpoint was for 4 iterations
    assert after["V-Net"] != before["V-Net"]


def test_a_stale_checkpoint_of_an_interrupted_stage_is_not_resumed(copy):
    cohort, run = copy
    # As if re-training had been killed after its last checkpoint: the checkpoint is there, the V-Net is not.
    for path in (run.vnet_weights, record_path(run.vnet_weights)):
        path.unlink()
    config = {**TINY, "retrain": {**TINY["retrain"], "lr": 0.02}}
    events = _run(cohort, run.root, config)
    assert _messages(events, "retrain")[0].startswith(f"not resuming {run.retrain_checkpoint}: options changed: lr")
    assert _trained(events, "retrain") == [1, 2, 3, 4]

    run.vnet_weights.unlink()  # same options now: the checkpoint (iteration 4 of 4) is resumed, nothing is trained
    events = _run(cohort, run.root, config)
    assert "resumed at iteration 4" in _messages(events, "retrain") and not _trained(events, "retrain")
