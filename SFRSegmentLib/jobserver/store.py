"""The job server's jobs on disk: one job folder per job under ``DATA/jobs``, documented here once.

::

    DATA/
      token                              the access token (see serve.py), unless --token-file names another file
      jobs/<job id>/                     one job (id: <yyyymmdd>-<hhmmss>-<8 hex digits>)
        job.json                         kind (run | predict), parent job, created; the start request once started
        state.json                       uploading | queued | running | finished | failed | cancelled | interrupted,
                                         the engine's exit code and message, the number of attempts
        inputs.json                      every uploaded file: its name, size and SHA-256 (written after each upload)
        inputs/                          the uploaded files under the names the client gave (checked: see
                                         :func:`input_path`); a run's cohort.json manifest written at its start
        config.json                      the client's configuration overrides, given to the engine's --config
        run/                             a run's engine run folder (runfolder.py)
        predictions/                     a predict job's <case>.seg.nrrd, <case>.nii.gz, confidence.csv
        events.jsonl                     the job's numbered events: the engine's progress, its log lines, the
                                         job's state changes (what the progress stream sends; see :class:`Journal`)
        engine.stdout.log, engine.stderr.log   the engine's output, every attempt appended

A file under ``inputs/`` exists only once it arrived whole and its SHA-256 matched the client's: an upload is
written to a hidden ``.<name>.*.partial`` file beside it and renamed (:mod:`SFRSegmentLib.storage.atomic`'s rule), so a client
that disconnects leaves no file a start could use. A job starts only when every file its start request names is in
``inputs.json`` with the SHA-256 the request gives.

Everything here runs in the server's event loop thread, one call at a time: a state check and the change it allows
happen with no ``await`` between them, so two requests never both pass a check that only one of them may pass.
"""

from __future__ import annotations

import datetime as _dt
import enum
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Iterator, List, Mapping, Optional, Sequence

from ..base.errors import PathLike
from ..storage.atomic import atomic_write_text

JOBS_FOLDER = "jobs"
JOB_ID_PATTERN = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{8}")
KINDS = ("run", "predict")
COHORT_MANIFEST = "cohort.json"
"""The run's cohort, written by the server into ``inputs/`` at its start (the engine's manifest layout)."""
MAX_NAME_DEPTH = 8
MAX_NAME_BYTES = 1024
CHUNK_BYTES = 1 << 20

RESULT_EXCLUDED_NAMES = ("checkpoint.pt",)
"""Run-folder files that are not results: training checkpoints (large, and only useful to the server's resume)."""
RESULT_EXCLUDED_SUFFIXES = (".prob.npy",)
"""Nor the pseudo-labels' probability arrays (large; the pseudo-labels' .label.nrrd files are results)."""

CLIENT_PATH_OPTIONS = ("truth_dir", "baseline_init_weights", "finetune.init_weights", "retrain.init_weights")
"""Options that name files on the machine the engine runs on: a client cannot set them (the server sets those it
needs from the job's uploads and its parent job), so that no client reads a path outside its jobs."""
CATALOG_OPTION = "finetune.base_checkpoint"
"""A catalog model id (or null) from a client; a file path is refused for the same reason."""


class JobState(str, enum.Enum):
    UPLOADING = "uploading"
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def ended(self) -> bool:
        """Whether the job's engine has stopped and will not start again unless resumed."""
        return self in ENDED_STATES


ENDED_STATES = (JobState.FINISHED, JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED)
RESUMABLE_STATES = (JobState.FAILED, JobState.CANCELLED, JobState.INTERRUPTED)


class JobError(Exception):
    """A request the server refuses: ``status`` is the HTTP status, ``message`` says what is wrong and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class JobFolder:
    """The paths of one job folder (see the module docstring). Creating the object touches nothing on disk."""

    root: Path

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def record(self) -> Path:
        return self.root / "job.json"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def inputs_record(self) -> Path:
        return self.root / "inputs.json"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def stdout_log(self) -> Path:
        return self.root / "engine.stdout.log"

    @property
    def stderr_log(self) -> Path:
        return self.root / "engine.stderr.log"

    def read_record(self) -> Dict[str, Any]:
        return _read_json(self.record)

    def read_state(self) -> Dict[str, Any]:
        return _read_json(self.state_file)

    @property
    def state(self) -> JobState:
        return JobState(self.read_state()["state"])

    @property
    def kind(self) -> str:
        return self.read_record()["kind"]

    @property
    def outputs(self) -> Path:
        """The folder of the job's results: the run folder of a run, the predictions of a predict job."""
        return self.run if self.kind == "run" else self.predictions


def input_path(folder: Path, name: str) -> Path:
    """The file ``name`` (a client's relative name, '/'-separated) inside ``folder``; a :class:`JobError` (400) when
    the name could leave the folder or is not a plain relative file name."""
    problem = _name_problem(name)
    if problem:
        raise JobError(400, f"file name {name!r} refused: {problem}")
    path = folder.joinpath(*name.split("/"))
    if not path.resolve().is_relative_to(folder.resolve()):  # a symbolic link inside the job folder, say
        raise JobError(400, f"file name {name!r} refused: it leads outside the job's folder")
    return path


def _name_problem(name: str) -> str:
    if not name or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"expected 1 to {MAX_NAME_BYTES} bytes"
    if "\\" in name or "\x00" in name or any(ord(c) < 32 for c in name):
        return "backslashes and control characters are not allowed"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "expected a relative name, not an absolute path"
    parts = name.split("/")
    if len(parts) > MAX_NAME_DEPTH:
        return f"at most {MAX_NAME_DEPTH} levels of folders"
    for part in parts:
        if part in ("", ".", ".."):
            return "empty, '.' and '..' parts are not allowed (names cannot leave the job's folder)"
        if part.startswith("."):
            return f"hidden names ({part!r}) are not allowed"
    return ""


def job_id_problem(job_id: str) -> str:
    return "" if JOB_ID_PATTERN.fullmatch(job_id) else "job ids look like 20260101-120000-0123abcd"


class JobStore:
    """The jobs under ``DATA/jobs`` and what may be done to each in its state."""

    def __init__(self, data_dir: PathLike, max_file_bytes: int, max_job_bytes: int) -> None:
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / JOBS_FOLDER
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.max_file_bytes = max_file_bytes
        self.max_job_bytes = max_job_bytes
        self.journals: Dict[str, Journal] = {}

    # -- finding jobs --------------------------------------------------------------------------------------------

    def job(self, job_id: str) -> JobFolder:
        """The job ``job_id``; a :class:`JobError` 404 for an id that no job of this server has."""
        if job_id_problem(job_id):
            raise JobError(404, f"no job {job_id!r} on this server ({job_id_problem(job_id)})")
        folder = JobFolder(self.jobs_dir / job_id)
        if not folder.state_file.is_file():
            raise JobError(404, f"no job {job_id!r} on this server (the jobs command's list shows them)")
        return folder

    def jobs(self) -> List[JobFolder]:
        """Every job, oldest first (ids sort by their creation time)."""
        return [JobFolder(p) for p in sorted(self.jobs_dir.iterdir())
                if JOB_ID_PATTERN.fullmatch(p.name) and (p / "state.json").is_file()]

    def describe(self, job: JobFolder) -> Dict[str, Any]:
        """What a client is told about a job: no path of the server's machine."""
        record, state = job.read_record(), job.read_state()
        return {"id": job.id, "kind": record["kind"], "parent": record.get("parent"), "created": record["created"],
                "state": state["state"], "exit_code": state.get("exit_code"), "message": state.get("message", ""),
                "attempts": state.get("attempts", 0), "updated": state.get("updated"),
                "events": self.journal(job).count}

    def journal(self, job: JobFolder) -> "Journal":
        if job.id not in self.journals:
            self.journals[job.id] = Journal(job.events)
        return self.journals[job.id]

    # -- the life of a job ---------------------------------------------------------------------------------------

    def create(self, kind: str, parent_id: Optional[str]) -> JobFolder:
        if kind not in KINDS:
            raise JobError(400, f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if kind == "predict" and parent_id is None:
            raise JobError(400, "parent: a predict job needs the finished run job whose model it applies")
        if parent_id is not None:
            parent = self.job(parent_id)
            if parent.kind != "run" or parent.state is not JobState.FINISHED:
                raise JobError(409, f"parent job {parent_id} is a {parent.kind} job in state {parent.state.value}; "
                                    "expected a finished run job (its model is used)")
        now = _dt.datetime.now()
        job = JobFolder(self.jobs_dir / f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(4)}")
        job.root.mkdir()
        _write_json(job.record, {"kind": kind, "parent": parent_id, "created": now.isoformat(timespec="seconds")})
        _write_json(job.inputs_record, {})
        self.set_state(job, JobState.UPLOADING)
        return job

    def set_state(self, job: JobFolder, state: JobState, message: str = "", exit_code: Optional[int] = None,
                  attempts: Optional[int] = None) -> None:
        """Record the job's state and add it to its events (the progress stream's ``state`` events)."""
        previous = job.read_state() if job.state_file.is_file() else {}
        record = {"state": state.value, "message": message, "exit_code": exit_code,
                  "attempts": previous.get("attempts", 0) if attempts is None else attempts,
                  "updated": _dt.datetime.now().isoformat(timespec="seconds")}
        _write_json(job.state_file, record)
        self.journal(job).append({"kind": "state", "state": state.value, "message": message, "exit_code": exit_code})

    async def receive_file(self, job: JobFolder, name: str, sha256: str, size: Optional[int],
                           chunks: AsyncIterator[bytes]) -> Dict[str, Any]:
        """Write the uploaded file ``name`` from ``chunks`` and keep it only when complete and its SHA-256 is
        ``sha256``; returns its record (name, size, sha256)."""
        self._require_state(job, (JobState.UPLOADING,), "upload files to it")
        if not re.fullmatch(r"[0-9a-f]{64}", sha256 or ""):
            raise JobError(400, f"{name}: the X-SHA256 header must be the file's SHA-256, 64 lower-case hex digits")
        target = input_path(job.inputs, name)
        limit = self.max_file_bytes
        if size is not None and size > limit:
            raise JobError(413, f"{name}: {size} bytes is more than this server accepts per file ({limit} bytes, "
                                "serve --max-file-mb)")
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        digest, received = hashlib.sha256(), 0
        try:
            with os.fdopen(handle, "wb") as stream:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > limit:
                        raise JobError(413, f"{name}: more than this server accepts per file ({limit} bytes, serve "
                                            "--max-file-mb); nothing of it was kept")
                    digest.update(chunk)
                    stream.write(chunk)
            if digest.hexdigest() != sha256:
                raise JobError(422, f"{name}: SHA-256 mismatch: the client said {sha256}, the server received "
                                    f"{received} bytes with SHA-256 {digest.hexdigest()}; nothing of it was kept, "
                                    "upload it again")
            self._require_state(job, (JobState.UPLOADING,), "upload files to it")
            uploaded = _read_json(job.inputs_record)
            total = received + sum(entry["size"] for key, entry in uploaded.items() if key != name)
            if total > self.max_job_bytes:
                raise JobError(413, f"{name}: the job's files would total {total} bytes, more than this server "
                                    f"accepts per job ({self.max_job_bytes} bytes, serve --max-job-gb)")
            os.replace(temporary, target)
            uploaded[name] = {"size": received, "sha256": sha256}
            _write_json(job.inputs_record, uploaded)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        return {"name": name, "size": received, "sha256": sha256}

    def start(self, job: JobFolder, request: Mapping[str, Any]) -> None:
        """Check the start request against the uploads, write what the engine reads, and queue the job."""
        self._require_state(job, (JobState.UPLOADING,), "start it (it was started already)")
        files = _mapping(request.get("files"), "files")
        uploaded = _read_json(job.inputs_record)
        for name, sha256 in files.items():
            input_path(job.inputs, name)
            if name not in uploaded:
                raise JobError(409, f"{name}: not uploaded (or its upload did not complete); upload it, then start")
            if uploaded[name]["sha256"] != sha256:
                raise JobError(409, f"{name}: the upload's SHA-256 is {uploaded[name]['sha256']}, the start request "
                                    f"names {sha256}; upload the file again")

        def uploaded_name(name: Any, field: str) -> str:
            if not isinstance(name, str) or name not in files:
                raise JobError(400, f"{field}: {name!r} is not one of the files the start request lists")
            return name

        record = job.read_record()
        config = _mapping(request.get("config", {}), "config")
        _check_client_options(config, prefix="" if record["kind"] == "run" else "inference.")
        preset = request.get("preset")
        if preset is not None and not isinstance(preset, str):
            raise JobError(400, f"preset: expected a preset name, got {preset!r}")
        start: Dict[str, Any] = {"preset": preset}
        if record["kind"] == "run":
            cohort = _mapping(request.get("cohort"), "cohort")
            manifest: Dict[str, Any] = {}
            if cohort.get("classes") is not None:
                manifest["classes"] = _mapping(cohort["classes"], "cohort.classes")
            for key in ("cases", "test"):
                entries = cohort.get(key, [])
                if not isinstance(entries, list):
                    raise JobError(400, f"cohort.{key}: expected a list of cases")
                manifest[key] = [_case_entry(entry, f"cohort.{key}[{i}]", uploaded_name)
                                 for i, entry in enumerate(entries)]
            truth = request.get("truth")
            if truth is not None:
                input_path(job.inputs, truth)
                if not any(name.startswith(truth + "/") for name in files):
                    raise JobError(400, f"truth: no uploaded file lies in the folder {truth!r}")
            redo = request.get("redo", [])
            if not isinstance(redo, list) or not all(isinstance(stage, str) for stage in redo):
                raise JobError(400, "redo: expected a list of stage names")
            atomic_write_text(job.inputs / COHORT_MANIFEST, json.dumps(manifest, indent=2))
            start.update(truth=truth, redo=redo)
        else:
            images = request.get("images")
            if not isinstance(images, list) or not images:
                raise JobError(400, "images: expected a non-empty list of uploaded image files")
            start["images"] = [uploaded_name(name, f"images[{i}]") for i, name in enumerate(images)]
            device = request.get("device")
            if device is not None and not isinstance(device, str):
                raise JobError(400, f"device: expected a device name, got {device!r}")
            start["device"] = device
        _write_json(job.config, config)
        _write_json(job.record, {**record, "start": start})
        self.set_state(job, JobState.QUEUED)

    def resume(self, job: JobFolder) -> None:
        self._require_state(job, RESUMABLE_STATES, "resume it")
        if job.kind == "run" and _run_folder_in_use(job.run):
            raise JobError(409, "an engine process still works in this job's run folder (started by an earlier "
                                "server); wait for it to end, then resume")
        self.set_state(job, JobState.QUEUED, "resumed: the engine continues from the last checkpoints")

    def delete(self, job: JobFolder) -> None:
        self._require_state(job, (JobState.UPLOADING,) + ENDED_STATES, "delete it (cancel it first)")
        doomed = job.root.with_name(f".deleted-{job.id}")
        os.replace(job.root, doomed)  # gone from the list at once, even if removing the files takes a while
        self.journals.pop(job.id, None)
        shutil.rmtree(doomed, ignore_errors=True)

    def _require_state(self, job: JobFolder, allowed: Sequence[JobState], action: str) -> None:
        state = job.state
        if state not in allowed:
            raise JobError(409, f"job {job.id} is {state.value}: cannot {action}; possible in state "
                                f"{' or '.join(s.value for s in allowed)}")

    # -- results -------------------------------------------------------------------------------------------------

    def results(self, job: JobFolder) -> List[Dict[str, Any]]:
        """The job's result files (name relative to its results folder, size, SHA-256), sorted by name."""
        root = job.outputs
        listed = []
        for path in sorted(_files_under(root)):
            name = path.relative_to(root).as_posix()
            listed.append({"name": name, "size": path.stat().st_size, "sha256": file_sha256(path)})
        return listed

    def result_file(self, job: JobFolder, name: str) -> Path:
        root = job.outputs
        path = input_path(root, name)
        if not path.is_file() or not _is_result(path.relative_to(root)):
            raise JobError(404, f"job {job.id} has no result file {name!r} (the results list names them)")
        return path


class Journal:
    """A job's numbered events, one JSON object per line in ``events.jsonl``; event ``n`` is line ``n`` (from 0).

    Only the server's event loop appends (whole lines, flushed at once); readers take complete lines only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        if path.is_file():
            with open(path, "rb") as stream:
                self.count = sum(1 for line in stream if line.endswith(b"\n"))

    def append(self, record: Mapping[str, Any]) -> int:
        number = self.count
        line = json.dumps({"n": number, **record}, ensure_ascii=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as stream:
            stream.write(line)
        self.count += 1
        return number


def file_sha256(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_under(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        return
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and _is_result(path.relative_to(root)):
            yield path


def _is_result(relative: Path) -> bool:
    return (not any(part.startswith(".") for part in relative.parts) and relative.name not in RESULT_EXCLUDED_NAMES
            and not relative.name.endswith(RESULT_EXCLUDED_SUFFIXES))


def _case_entry(entry: Any, where: str, uploaded_name) -> Dict[str, Any]:
    entry = _mapping(entry, where)
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise JobError(400, f"{where}.name: expected the case's name")
    case = {"name": name, "image": uploaded_name(entry.get("image"), f"{where}.image")}
    if entry.get("label") is not None:
        case["label"] = uploaded_name(entry["label"], f"{where}.label")
    return case


def _check_client_options(config: Mapping[str, Any], prefix: str = "") -> None:
    """Refuse the options that would make the engine read a file outside the job (see CLIENT_PATH_OPTIONS)."""
    for path, value in _dotted(config, prefix):
        if path in CLIENT_PATH_OPTIONS:
            raise JobError(400, f"config: {path} names a file on the server and cannot be set by a client (the "
                                "server sets it from the job's uploads and its parent job)")
        if path == CATALOG_OPTION and value is not None and not (
                isinstance(value, str) and re.fullmatch(r"[a-z][a-z0-9_]*", value)):
            raise JobError(400, f"config: {path} {value!r}: a client may name a catalog model id (e.g. sam_vit_b) or "
                                "null, not a file on the server")


def _dotted(config: Mapping[str, Any], prefix: str) -> Iterator[tuple]:
    for key, value in config.items():
        if isinstance(value, Mapping):
            yield from _dotted(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _run_folder_in_use(run: Path) -> bool:
    from ..storage.runfolder import RunFolder

    return RunFolder(run).in_use()


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise JobError(400, f"{field}: expected a JSON object, got {type(value).__name__}")
    return value


def _read_json(path: Path) -> Dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, content: Any) -> None:
    atomic_write_text(path, json.dumps(content, indent=2))
