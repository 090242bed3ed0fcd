"""Atomic output under real failures: a disk that fills up mid-write and a process killed mid-write.

The full disk is real to the writer: a child process runs with RLIMIT_FSIZE (SIGXFSZ ignored), so every write past
the limit fails as on a full disk (EFBIG instead of ENOSPC), inside numpy, ITK, pynrrd and torch alike.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from SFRSegmentLib.storage.volumes import Volume, read_volume, write_volume

REPO = Path(__file__).resolve().parents[1]
LIMIT = 64 * 1024
"""Bytes a child may write per file: far less than the files it tries to write."""
FULL_DISK = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT}))
"""


def run_with_full_disk(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a child whose writes fail past :data:`LIMIT` bytes (imports come before the limit)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code).replace("#FULL_DISK", FULL_DISK)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def folder_bytes(folder: Path) -> Dict[str, bytes]:
    """Every entry of ``folder`` (file name → content; hidden temporary folders show up as names too)."""
    return {p.name: p.read_bytes() if p.is_file() else b"<folder>" for p in folder.iterdir()}


def assert_clear_error(result: subprocess.CompletedProcess, target: Path) -> None:
    assert result.returncode != 0
    assert f"{target}: could not write the file; the disk may be full" in result.stderr, result.stderr[-3000:]
    assert "The above exception was the direct cause" in result.stderr  # the writer's own error is chained


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".seg.nrrd"])
def test_a_full_disk_keeps_the_previous_volume_and_leaves_no_partial(tmp_path, suffix):
    target = tmp_path / f"case{suffix}"
    write_volume(Volume(np.ones((4, 4, 4), np.uint8)), target)
    before = folder_bytes(tmp_path)
    result = run_with_full_disk(f"""
        import numpy as np
        from SFRSegmentLib.storage.volumes import Volume, write_volume
        rng = np.random.default_rng(0)
        array = rng.integers(0, 200, (96, 96, 96)).astype(np.uint8)  # random: compresses to far more than the limit
        #FULL_DISK
        write_volume(Volume(array), {str(target)!r})
    """)
    assert_clear_error(result, target)
    assert folder_bytes(tmp_path) == before
    np.testing.assert_array_equal(read_volume(target).array, 1)


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "checkpoint.pt"
    torch.save({"iteration": 3}, target)
    before = folder_bytes(tmp_path)
    result = run_with_full_disk(f"""
        import torch
        from SFRSegmentLib.storage.atomic import atomic_path
        state = {{"iteration": 4, "weights": torch.randn(100_000)}}
        #FULL_DISK
        with atomic_path({str(target)!r}) as tmp:
            torch.save(state, tmp)
    """)
    assert_clear_error(result, target)
    assert folder_bytes(tmp_path) == before
    assert torch.load(target, weights_only=True) == {"iteration": 3}


def test_the_command_line_reports_a_full_disk_without_a_traceback(tmp_path):
    out = tmp_path / "cohort"
    result = run_with_full_disk(f"""
        import sys
        from SFRSegmentLib.cli import main
        #FULL_DISK
        sys.exit(main(["synth", "--out", {str(out)!r}, "--cases", "2", "--labeled", "1"]))
    """)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and "could not write the file; the disk may be full" in result.stderr
    assert "Traceback" not in result.stderr
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_a_process_killed_mid_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous checkpoint")
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from SFRSegmentLib.storage.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * 1_000_000)
                f.flush()
                print("writing", flush=True)
                while True:
                    f.write(b"x" * 1_000)
    """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.communicate(timeout=60)
    assert writer.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"previous checkpoint"
    others = [p for p in tmp_path.iterdir() if p != target]
    # The killed writer could not clean up its hidden temporary folder; nothing else is there.
    assert len(others) == 1 and others[0].is_dir()
    assert others[0].name.startswith(".checkpoint.pt.") and others[0].name.endswith(".partial")
    assert os.path.getsize(others[0] / "checkpoint.pt") >= 1_000_000
