"""Fault injection (issue #15) for the weights cache and the model catalog: each file kind × each damage of
:data:`test_faults.DAMAGES`, tried through the calls users reach (``resolve_checkpoint``, ``available_offline``, and
for the catalog also ``python -m SFRSegmentLib finetune``) against a real HTTP server on 127.0.0.1.

Cache files are recovered: a damaged checkpoint fails its SHA-256 and is downloaded again, a damaged partial download
is resumed or restarted, a damaged checksum stamp is ignored and rewritten. A damaged catalog is an InputError (exit 2
on the command line) that names the file and says what to do. No case may leave a wrong file in use.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest
import torch

from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.models.sam import catalog
from SFRSegmentLib.models.sam.weights import available_offline, find_cached, resolve_checkpoint
from test_faults import DAMAGES
from test_weights import PAYLOAD, PAYLOAD_SHA256, _isolated_environment, serve, tiny_entry  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


def _other_checkpoint(path: Path) -> None:
    """A well-formed checkpoint of another model."""
    torch.save({"w": torch.zeros(3)}, path)


def _other_json(path: Path) -> None:
    """Well-formed JSON with the wrong keys and a foreign format version."""
    path.write_text(json.dumps({"format": "sfrsegment-other/99", "values": [1, 2]}), encoding="utf-8")


@dataclass(frozen=True)
class FileKind:
    """A file the weights code reads back: its name in the cache folder (or the catalog's role), how a damaged copy
    of the wrong schema is made, and whether the damage is recovered (else: an InputError naming the file)."""

    name: str
    wrong_schema: Callable[[Path], None]
    recovers: bool


CHECKPOINT = FileKind("tiny.pth", _other_checkpoint, recovers=True)
PARTIAL = FileKind("tiny.pth.part", _other_checkpoint, recovers=True)
STAMP = FileKind("tiny.pth.sha256", _other_json, recovers=True)
CATALOG_OVERRIDE = FileKind("$SFRSEGMENT_MODELS_JSON", _other_json, recovers=False)
BUNDLED_CATALOG = FileKind("Resources/Models.json", _other_json, recovers=False)
FILE_KINDS: Tuple[FileKind, ...] = (CHECKPOINT, PARTIAL, STAMP, CATALOG_OVERRIDE, BUNDLED_CATALOG)
CASES = [(kind, damage) for kind in FILE_KINDS for damage in DAMAGES]


def damage(path: Path, kind: FileKind, how: str) -> None:
    """Damage ``path`` in the way ``how`` names (:data:`test_faults.DAMAGES`, with the kind's own wrong schema)."""
    damages: Dict[str, Callable[[Path], None]] = {**DAMAGES, "wrong schema": kind.wrong_schema}
    damages[how](path)


def write_catalog(path: Path, url: str) -> Path:
    """A catalog holding only the served tiny checkpoint."""
    path.write_text(json.dumps({"models": [dataclasses.asdict(tiny_entry(url))]}), encoding="utf-8")
    return path


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve) -> Tuple[Path, Path, object]:  # noqa: F811
    """A served tiny checkpoint, a catalog for it (both as the override and as the bundled copy) and a cache
    holding its verified download. Returns (cache, catalog override, server)."""
    server = serve()
    override = write_catalog(tmp_path / "Models.json", server.url)
    (tmp_path / "bundled").mkdir()
    bundled = write_catalog(tmp_path / "bundled" / "Models.json", server.url)
    monkeypatch.setattr(catalog, "BUNDLED_CATALOG_LOCATIONS", (bundled,))
    monkeypatch.setenv(catalog.MODELS_JSON_ENV, str(override))
    cache = tmp_path / "cache"
    assert resolve_checkpoint("tiny", cache=cache).read_bytes() == PAYLOAD
    return cache, override, server


@pytest.mark.parametrize("kind, how", CASES, ids=[f"{kind.name}-{how}" for kind, how in CASES])
def test_damaged_weights_file(setup, kind: FileKind, how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, override, server = setup
    target = cache / "tiny.pth"
    if kind is PARTIAL:  # an interrupted download: the first half received, nothing final yet
        (cache / kind.name).write_bytes(PAYLOAD[: len(PAYLOAD) // 2])
        target.unlink()
        (cache / STAMP.name).unlink()
    if kind is BUNDLED_CATALOG:
        monkeypatch.delenv(catalog.MODELS_JSON_ENV)
        path = catalog.BUNDLED_CATALOG_LOCATIONS[0]
    else:
        path = override if kind is CATALOG_OVERRIDE else cache / kind.name
    damage(path, kind, how)

    if kind.recovers:
        assert_recovered(kind, how, cache, target)
    else:
        assert_clear_error(path, cache)


def assert_recovered(kind: FileKind, how: str, cache: Path, target: Path) -> None:
    """No damaged file is taken for the checkpoint; the next resolve ends with the verified file and a good stamp."""
    if kind is CHECKPOINT and how != "missing":
        assert not available_offline("tiny", cache=cache), "a damaged checkpoint passed for the cached one"
    assert resolve_checkpoint("tiny", cache=cache).read_bytes() == PAYLOAD
    assert json.loads((cache / STAMP.name).read_text(encoding="utf-8"))["sha256"] == PAYLOAD_SHA256
    assert not (cache / PARTIAL.name).exists()
    assert find_cached(catalog.load_catalog()["tiny"], cache) == target
    assert available_offline("tiny", cache=cache)


def assert_clear_error(path: Path, cache: Path) -> None:
    """Both entry points stop with an InputError that names the catalog and says what to do."""
    for call in (lambda: resolve_checkpoint("tiny", cache=cache), lambda: available_offline("tiny", cache=cache)):
        with pytest.raises(InputError) as caught:
            call()
        assert caught.value.path == path
        assert "fix it" in str(caught.value) or "reinstall" in str(caught.value)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic cohort, for the command line to get as far as the checkpoint."""
    folder = tmp_path_factory.mktemp("cohort")
    subprocess.run([sys.executable, "-m", "SFRSegmentLib", "synth", "--out", str(folder), "--cases", "3",
                    "--labeled", "1"], check=True, capture_output=True)
    return folder


@pytest.mark.parametrize("how", list(DAMAGES))
def test_damaged_catalog_stops_the_command_line_with_exit_2(setup, cohort: Path, tmp_path: Path, how: str) -> None:
    _, override, _ = setup
    damage(override, CATALOG_OVERRIDE, how)
    done = subprocess.run(
        [sys.executable, "-m", "SFRSegmentLib", "finetune", "--cohort", str(cohort), "--out", str(tmp_path / "run"),
         "--preset", "small", "--checkpoint", "tiny", "--iterations", "1", "--progress", "none"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert str(override) in last and "unset SFRSEGMENT_MODELS_JSON" in last and "Traceback" not in done.stderr
