"""Provenance: what each output of a run was computed from, so that an output is reused only while its inputs are.

Every stage output (the fine-tuned SAM, each case's pseudo-label, the V-Net, each case's prediction) has a record
beside it, ``<output>.provenance.json``, written after the output itself (its presence marks the output complete):

* ``id``: a fresh random identity, made each time the output is computed. Downstream records name their upstream
  outputs by it, so recomputing an output (even to the same bytes) makes everything computed from it stale;
* ``inputs`` (:class:`Inputs`): the stage's options that change the output, the SHA-256 of every input file it
  read (images, labels, checkpoints), and the identities of the upstream outputs it used.
* ``outputs``: file name → SHA-256 of each file of the output as written, so that a file damaged or replaced
  afterwards (cut short by a copy, overwritten, garbage) counts as stale and is recomputed instead of being read.

On a rerun a stage compares the recorded inputs with the current ones (:func:`stale_reason`); an output is reused
only when they are equal, otherwise it is recomputed and the progress stream says why ("SAM weights changed",
"label of case X changed", "options changed: retrain.iterations"). A file without a record (one the user gave, or
one made before records existed) is identified by its content hash (:func:`identity_of`).

File hashes are memoised per process by path, size and modification time (:func:`file_digest`): each input is read
once per run however many stages use it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..base.config_io import merged
from ..base.errors import PathLike
from .atomic import atomic_write_text

RECORD_SUFFIX = ".provenance.json"
FORMAT = "sfrsegment-provenance/1"
MISSING = "not computed yet"
"""The reason :func:`stale_reason` gives when the output (or its record) does not exist: nothing to announce."""

_digests: Dict[Tuple[str, int, int], str] = {}


def file_digest(path: PathLike) -> str:
    """SHA-256 of a file's content, memoised by (absolute path, size, modification time in ns)."""
    path = Path(path).absolute()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()
    return _digests[key]


@dataclass(frozen=True)
class Inputs:
    """What one output is computed from: ``options`` (the stage's settings that change the output, as plain JSON
    values), ``files`` (description → SHA-256 of an input file) and ``upstream`` (description → identity of an
    upstream output). Descriptions are what a stale message shows ("label of case X", "SAM weights")."""

    options: Mapping[str, Any]
    files: Mapping[str, str] = field(default_factory=dict)
    upstream: Mapping[str, str] = field(default_factory=dict)
    added_options: Mapping[str, Any] = field(default_factory=dict)
    """Options added after records existed → the value a record without them was made with (so that adding an
    option does not make every earlier output stale); nested like the options; not recorded, only used to read older
    records."""

    def as_dict(self) -> Dict[str, Any]:
        # A JSON round trip makes tuples lists, so that a record read back compares equal.
        return json.loads(json.dumps({"options": self.options, "files": dict(self.files),
                                      "upstream": dict(self.upstream)}, sort_keys=True))

    def changes_from(self, recorded: Optional[Mapping[str, Any]]) -> List[str]:
        """What differs between ``recorded`` (an :meth:`as_dict` read back) and these inputs, in words; empty when
        equal."""
        sections = ("options", "files", "upstream")
        if not isinstance(recorded, Mapping) or not all(isinstance(recorded.get(s) or {}, Mapping) for s in sections):
            return ["no record of its inputs"]
        now = self.as_dict()
        options = _changed_fields(merged(self.added_options, recorded.get("options") or {}), now["options"])
        changes = [f"options changed: {', '.join(options)}"] if options else []
        for kind in ("upstream", "files"):
            before, after = recorded.get(kind) or {}, now[kind]
            for name in sorted(set(before) | set(after)):
                if name not in before:
                    changes.append(f"{name} added")
                elif name not in after:
                    changes.append(f"{name} removed")
                elif before[name] != after[name]:
                    changes.append(f"{name} changed")
        return changes


def record_path(output: PathLike) -> Path:
    """Where the record of ``output`` lives: ``<output>.provenance.json`` beside it."""
    output = Path(output)
    return output.with_name(output.name + RECORD_SUFFIX)


def read_record(output: PathLike) -> Optional[Dict[str, Any]]:
    """The record of ``output``, or None when it is missing or unreadable (then the output counts as stale)."""
    try:
        record = json.loads(record_path(output).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("id"), str):
        return None
    return record


def write_record(outputs: Sequence[PathLike], inputs: Inputs) -> str:
    """Record that ``outputs`` (the files of one output, already written; the record goes beside the first) were
    computed from ``inputs``, with the SHA-256 of each file; returns the output's new identity."""
    identity = uuid.uuid4().hex
    record = {"format": FORMAT, "id": identity, "output": Path(outputs[0]).name, "inputs": inputs.as_dict(),
              "outputs": {Path(path).name: file_digest(path) for path in outputs}}
    atomic_write_text(record_path(outputs[0]), json.dumps(record, indent=2, sort_keys=True) + "\n")
    return identity


def forget(outputs: Iterable[PathLike]) -> None:
    """Delete outputs and their records (records first: an output without its record is never reused)."""
    outputs = [Path(output) for output in outputs]
    for path in [record_path(output) for output in outputs] + outputs:
        path.unlink(missing_ok=True)


def identity_of(path: PathLike) -> str:
    """The identity of a file a stage consumes: its record's ``id``, or ``sha256:<content hash>`` for a file
    without one."""
    record = read_record(path)
    return record["id"] if record is not None else "sha256:" + file_digest(path)


def stale_reason(outputs: Sequence[PathLike], inputs: Inputs) -> Optional[str]:
    """None when every file of ``outputs`` exists and the record of the first one says it was computed from
    ``inputs``; otherwise why not (:data:`MISSING` when there is nothing yet)."""
    if not all(Path(path).is_file() for path in outputs):
        return MISSING
    record = read_record(outputs[0])
    if record is None:
        return (f"it has no provenance record ({record_path(outputs[0]).name} is missing or unreadable: made by an "
                "older version, interrupted or damaged)")
    changes = _damaged(outputs, record) + inputs.changes_from(record.get("inputs"))
    return "; ".join(changes) if changes else None


def _damaged(outputs: Sequence[PathLike], record: Mapping[str, Any]) -> List[str]:
    """The files of ``outputs`` whose SHA-256 differs from the one their record holds, in words (a record from before
    output digests, without ``outputs``, cannot vouch for them)."""
    written = record.get("outputs")
    if not isinstance(written, Mapping):
        return ["its record holds no SHA-256 of the output (made by an older version)"]
    return [f"{path} is damaged or was changed after it was written (its SHA-256 is not the recorded one)"
            for path in map(Path, outputs) if path.name in written and written[path.name] != file_digest(path)]


def case_files(cases: Iterable[Any], labels: bool = True) -> Dict[str, str]:
    """``image of case X`` (and, with ``labels``, ``label of case X`` where it has one) → SHA-256, for cohort cases
    (:class:`SFRSegmentLib.data.cohort.Case`)."""
    files = {}
    for case in cases:
        files[f"image of case {case.name}"] = file_digest(case.image)
        if labels and case.label is not None:
            files[f"label of case {case.name}"] = file_digest(case.label)
    return files


def _changed_fields(before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "") -> List[str]:
    """Dotted names of the options that differ (nested sections recurse)."""
    changed = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            changed += _changed_fields(old, new, f"{prefix}{name}.")
        elif old != new:
            changed.append(f"{prefix}{name}")
    return changed

