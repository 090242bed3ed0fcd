"""The run folder's lock: one process per folder, released by the OS however its holder ends, and the cleanup of the
temporary folders that killed writers leave behind. Real processes, real file locks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.runfolder import RunFolder

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent("""
    import sys, time
    from SFRSegmentLib.storage.runfolder import RunFolder
    with RunFolder(sys.argv[1]).exclusive():
        print("locked", flush=True)
        time.sleep(600)
""")

WRITER = textwrap.dedent("""
    import sys, time
    from SFRSegmentLib.storage.atomic import atomic_path
    with atomic_path(sys.argv[1]) as partial:
        partial.write_bytes(b"half")
        print("writing", flush=True)
        time.sleep(600)
""")


def start_holder(run: Path) -> subprocess.Popen:
    """A real second process that takes the lock on ``run`` and keeps it until killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_process_is_refused_while_the_first_runs_and_admitted_after_it_is_killed(tmp_path):
    run = tmp_path / "run"
    holder = start_holder(run)
    try:
        with pytest.raises(InputError) as refused:
            with RunFolder(run).exclusive():
                pass
        message = str(refused.value)
        assert str(run) in message and f"pid {holder.pid}" in message and "another SFRSegment process" in message
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean exit: the OS must release the lock
        holder.wait()
    with RunFolder(run).exclusive() as folder:
        assert folder.root == run
        assert (run / ".lock").read_text(encoding="utf-8").strip() == str(os.getpid())


def test_whether_a_folder_is_in_use_is_asked_without_taking_its_lock(tmp_path):
    run = RunFolder(tmp_path / "run")
    assert not run.in_use() and not run.root.exists()  # nothing is created
    holder = start_holder(run.root)
    try:
        assert run.in_use() and run.in_use()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not run.in_use()
    with run.exclusive():  # the probe released what it took
        assert run.in_use()  # another open file of this process is refused too, as another process would be
    assert not run.in_use()


def test_the_lock_is_released_when_the_body_ends_even_by_an_error(tmp_path):
    run = RunFolder(tmp_path / "run")
    with pytest.raises(RuntimeError, match="stage failed"):
        with run.exclusive():
            raise RuntimeError("stage failed")
    with run.exclusive():
        pass


def test_taking_the_lock_removes_the_temporary_folders_of_killed_writers(tmp_path):
    run = RunFolder(tmp_path / "run")
    kept = run.pseudolabel_dir / "case_1.label.nrrd"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"complete")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run.pseudolabel_dir / "case_2.label.nrrd")],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)  # killed between writing and renaming: no cleanup code runs
    writer.wait()
    stale = [p for p in run.pseudolabel_dir.iterdir() if p.name.endswith(".partial")]
    assert len(stale) == 1 and (stale[0] / "case_2.label.nrrd").read_bytes() == b"half"
    with run.exclusive():
        assert sorted(p.name for p in run.pseudolabel_dir.iterdir()) == ["case_1.label.nrrd"]
        assert kept.read_bytes() == b"complete"
