"""Small real runs that the rerun tests share: `python -m SFRSegmentLib run` at the small preset in a subprocess,
on a synthetic cohort of one labeled and three unlabeled cases (with true labels)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Mapping

from SFRSegmentLib.research.synthetic import TRUTH_FOLDER, make_synthetic_cohort

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "finetune": {"iterations": 3, "checkpoint_every": 3},
    "retrain": {"iterations": 4, "checkpoint_every": 2, "lr_step": 1000},
    "inference": {"stride_xy": 24, "stride_z": 8},
    "estimate": False,
}
"""A few iterations of each stage: enough to write every output."""


def run_command(cohort: Path, out: Path, config: Mapping[str, object], *extra: str) -> List[str]:
    """``run`` as a user types it, with ``config`` written beside the run folder."""
    config_file = out.parent / f"{out.name}-config.json"
    config_file.write_text(json.dumps(config))
    return [sys.executable, "-m", "SFRSegmentLib", "run", "--cohort", str(cohort), "--out", str(out), "--preset",
            "small", "--config", str(config_file), "--progress", "jsonl", "--device", "cpu", "--truth",
            str(cohort / TRUTH_FOLDER), *extra]


def run(cohort: Path, out: Path, config: Mapping[str, object] = TINY, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(run_command(cohort, out, config, *extra), cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def events(stdout: str) -> List[Dict[str, object]]:
    """The progress events a ``--progress jsonl`` run printed."""
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def finished_run(root: Path, config: Mapping[str, object] = TINY) -> Path:
    """Make ``root/cohort`` (1 labeled, 3 unlabeled cases) and finish ``root/run`` on it; returns the run folder."""
    make_synthetic_cohort(root / "cohort", n_cases=4, n_labeled=1, n_classes=1, seed=3,
                          size_range=((48, 52), (48, 52), (16, 18)))
    result = run(root / "cohort", root / "run", config)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"
