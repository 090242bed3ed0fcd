"""The Slicer module's job launcher and JSON-lines parser, against real child processes (no Slicer needed).

A small script written by the tests plays the engine: it prints progress lines, log lines and errors, fails on
request, or starts a grandchild and waits to be cancelled.
"""

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SFRSegment"))

from SFRSegmentLogicLib.process import (  # noqa: E402
    EngineCancelled,
    EngineFailed,
    EngineJob,
    ChildProcessRunner,
    ProgressEvent,
    Status,
    engine_environment,
    parse_progress_line,
)

def run_with_packages_blocked(blocked: tuple, code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python with the module's folders on the path and the ``blocked`` packages made
    unimportable, as inside Slicer before the engine's requirements are installed."""
    setup = f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); "
    path = os.pathsep.join([str(ROOT / "SFRSegment"), str(ROOT)])
    return subprocess.run([sys.executable, "-c", setup + code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path})


def test_the_process_module_imports_without_the_engine_dependencies():
    # Inside Slicer it must work before torch, tqdm, numpy and the rest are installed.
    completed = run_with_packages_blocked(
        ("torch", "tqdm", "numpy", "monai", "SimpleITK", "segment_anything"),
        "import SFRSegmentLogicLib.process as p; print(p.parse_progress_line('{\"stage\": \"x\"}').stage)")
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "x"


FAKE_ENGINE = textwrap.dedent('''
    import json, signal, subprocess, sys, time

    mode = sys.argv[1]
    if mode == "progress":
        for step in (1, 2, 3):
            print(json.dumps({"stage": "finetune", "step": step, "total": 3, "loss": 1.0 / step, "metric": None,
                              "eta_s": 3 - step, "message": ""}), flush=True)
        print("plain log line", flush=True)
        print("{not json", flush=True)
        print(json.dumps({"no": "stage"}), flush=True)
        print(json.dumps({"stage": "retrain", "step": 1, "total": 2, "message": "ü on stdout"}), flush=True)
        print("warning on stderr", file=sys.stderr, flush=True)
    elif mode == "bad-input":
        print("validating", file=sys.stderr)
        print("error: 2 of 3 cases have problems:\\n  a: label a.nrrd is empty\\n  b: image b.nrrd is 2D",
              file=sys.stderr)
        sys.exit(2)
    elif mode == "fail":
        for index in range(30):
            print(f"err {index}", file=sys.stderr)
        sys.exit(3)
    elif mode in ("tree", "stubborn-tree", "orphan"):
        if mode == "stubborn-tree":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the grandchild too
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(json.dumps({"stage": "tree", "step": 0, "total": 0, "message": str(grandchild.pid)}), flush=True)
        if mode != "orphan":
            time.sleep(600)
''')


@pytest.fixture()
def fake_engine(tmp_path):
    script = tmp_path / "fake_engine.py"
    script.write_text(FAKE_ENGINE, encoding="utf-8")

    def start(mode, **job_options):
        events, logs = [], []
        process = ChildProcessRunner().start([sys.executable, str(script), mode],
                                             engine_environment(os.environ, ROOT), tmp_path)
        job = EngineJob(process, on_progress=events.append, on_log=logs.append, **job_options)
        return job, events, logs

    return start


def _is_gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie waiting to be reaped counts as ended)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" in status.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_for_event(job, events, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not events:
        assert time.monotonic() < deadline, "no progress event from the child"
        assert not job.poll(), f"the child ended early: {job.outcome}"
        time.sleep(0.02)
    return events[0]


def test_progress_events_and_log_lines_of_a_real_child(fake_engine):
    job, events, logs = fake_engine("progress")
    polls = []
    outcome = job.wait(between_polls=lambda: polls.append(1), interval_s=0.02)
    assert outcome.status == Status.SUCCEEDED and outcome.exit_code == 0
    assert [(e.stage, e.step, e.total) for e in events] == [("finetune", 1, 3), ("finetune", 2, 3),
                                                            ("finetune", 3, 3), ("retrain", 1, 2)]
    assert [e.loss for e in events[:3]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert events[0].metric is None and events[0].eta_s == 2
    assert events[3].message == "ü on stdout"
    assert events[2].fraction == 1.0
    # Malformed and foreign JSON lines are not progress: they go to the log as they are (stdout in order; stderr is
    # read by another thread, so its place among them is not fixed).
    assert [line for line in logs if line != "warning on stderr"] == ["plain log line", "{not json", '{"no": "stage"}']
    assert "warning on stderr" in logs
    assert job.last_event == events[-1]
    assert polls, "wait() must call between_polls while the child runs"
    job.raise_for_outcome()  # success: nothing raised


def test_failure_reports_the_exit_code_and_the_last_stderr_lines(fake_engine):
    job, _, logs = fake_engine("fail")
    outcome = job.wait(interval_s=0.02)
    assert outcome.status == Status.FAILED and outcome.exit_code == 3
    assert "exit code 3" in outcome.message
    assert "err 29" in outcome.message and "err 10" in outcome.message
    assert "err 9\n" not in outcome.message + "\n"  # only the last 20 lines are quoted
    assert len(logs) == 30  # all of them went to the log
    with pytest.raises(EngineFailed, match="err 29"):
        job.raise_for_outcome()


def test_bad_input_shows_the_engines_whole_message_over_several_lines(fake_engine):
    job, _, _ = fake_engine("bad-input")
    outcome = job.wait(interval_s=0.02)
    assert outcome.status == Status.FAILED and outcome.exit_code == 2
    assert outcome.message == "2 of 3 cases have problems:\n  a: label a.nrrd is empty\n  b: image b.nrrd is 2D"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks process states through /proc")
def test_cancel_stops_the_child_and_its_grandchild(fake_engine):
    job, events, _ = fake_engine("tree")
    grandchild = int(_wait_for_event(job, events).message)
    child = job.process.pid
    assert not _is_gone(child) and not _is_gone(grandchild)
    job.cancel()
    outcome = job.wait(interval_s=0.02)
    assert outcome.status == Status.CANCELLED
    assert _is_gone(child)
    deadline = time.monotonic() + 5
    while not _is_gone(grandchild):
        assert time.monotonic() < deadline, "the grandchild survived the cancel"
        time.sleep(0.02)
    with pytest.raises(EngineCancelled):
        job.raise_for_outcome()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="checks process states through /proc")
def test_cancel_kills_a_tree_that_ignores_sigterm_after_the_grace_period(fake_engine):
    job, events, _ = fake_engine("stubborn-tree", cancel_grace_s=0.5)
    grandchild = int(_wait_for_event(job, events).message)
    started = time.monotonic()
    job.cancel()
    outcome = job.wait(interval_s=0.02)
    assert outcome.status == Status.CANCELLED
    assert 0.4 < time.monotonic() - started < 10, "SIGKILL must follow the grace period"
    deadline = time.monotonic() + 5
    while not (_is_gone(job.process.pid) and _is_gone(grandchild)):
        assert time.monotonic() < deadline, "a process of the tree survived"
        time.sleep(0.02)


def test_a_leftover_grandchild_holding_the_pipes_does_not_hang_the_job(fake_engine):
    job, events, _ = fake_engine("orphan")
    try:
        outcome = job.wait(interval_s=0.05)
        assert outcome.status == Status.SUCCEEDED
    finally:
        job.process.kill()  # the grandchild shares the job's process group


def test_cancel_after_the_end_changes_nothing(fake_engine):
    job, _, _ = fake_engine("progress")
    job.wait(interval_s=0.02)
    job.cancel()
    assert job.outcome.status == Status.SUCCEEDED


@pytest.mark.parametrize("line", [
    "", "text", "{", "[1, 2]", '{"step": 1}', '{"stage": 3}', '{"stage": "x", "step": "many"}',
    '{"stage": "x", "loss": "high"}', "null",
])
def test_lines_that_are_not_progress_events(line):
    assert parse_progress_line(line) is None


def test_progress_line_with_missing_optional_fields():
    event = parse_progress_line('  {"stage": "predict", "step": 2, "total": 0}\r\n')
    assert event == ProgressEvent("predict", 2, 0)
    assert event.fraction is None  # an unknown length
    assert event.level == "info"


def test_an_unknown_level_reads_as_info():
    event = parse_progress_line('{"stage": "estimate", "step": 1, "total": 1, "level": "critical"}')
    assert event == ProgressEvent("estimate", 1, 1)


def test_the_parser_reads_what_the_engine_writes():
    progress = pytest.importorskip("SFRSegmentLib.base.progress")
    assert progress.ProgressEvent is ProgressEvent  # one definition, in SFRSegmentLib.base.events
    stream = io.StringIO()
    reporter = progress.JsonLinesReporter(stream)
    sent = [progress.ProgressEvent("finetune", 5, 10, loss=0.25, metric=0.8, eta_s=12.5, message="half"),
            progress.ProgressEvent("retrain", 0, 6000),
            progress.ProgressEvent("estimate", 3, 3, eta_s=86400.0, message="a day", level="warning")]
    for event in sent:
        reporter(event)
    received = [parse_progress_line(line) for line in stream.getvalue().splitlines()]
    assert [dataclasses.asdict(e) for e in received] == [dataclasses.asdict(e) for e in sent]


def test_engine_environment_makes_the_engine_importable_and_unbuffered(tmp_path):
    environment = engine_environment({"PYTHONPATH": os.pathsep.join(["/a", "/b"]), "KEEP": "1"}, tmp_path)
    assert environment["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/a", "/b"]
    assert environment["PYTHONUNBUFFERED"] == "1" and environment["KEEP"] == "1"
    assert json.loads(json.dumps(environment)) == environment
