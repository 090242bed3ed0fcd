"""The command line as the job server's client: ``run``, ``predict`` and ``jobs`` with ``--server URL``.

The output is a local run's: the engine's progress events drawn by the same reporter (``--progress bar|jsonl|none``),
the engine's log lines on stderr, the same exit status (0, 2 for bad input with the engine's ``error:`` line, 1,
130 after a cancel), and the result files written into ``--out`` (a run's results without its checkpoints and
probability arrays, a prediction's files). Ctrl-C (or SIGTERM) cancels the server's job, which saves its
checkpoint; a second Ctrl-C stops following and leaves the job to the server.

``--out`` keeps ``server-job.json``: the server, the job and a fingerprint of what was sent (files' SHA-256, options).
Rerunning the same command continues that job (resumes it when it stopped, follows it when it runs, downloads it
when it finished) instead of starting another, as rerunning a local run resumes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from ..base.config_io import merged
from ..base.errors import ERROR_PREFIX, EXIT_BAD_INPUT, InputError
from ..base.events import parse_progress_line
from ..storage.atomic import atomic_write_text
from .client import JobServerClient, token_from
from .protocol import SERVER_JOB_FILE, ServerError
from .store import file_sha256

EXIT_FAILURE = 1
EXIT_CANCELLED = 130


def connect(args: argparse.Namespace) -> JobServerClient:
    return JobServerClient(args.server, token_from(args.token_file), args.ca_file)


# ---------------------------------------------------------------------------------------------------------------
# run


def run_remotely(args: argparse.Namespace, overrides: Mapping[str, Any], given: Mapping[str, Any],
                 summary: Callable[[Path], str]) -> int:
    """``run --server``: upload the cohort, start (or continue) the job, follow it, download its results into
    ``--out``, and print ``summary(out)`` as a local run prints its summary."""
    from ..data.cohort import discover_cohort

    config = merged(overrides, given)
    truth = config.pop("truth_dir", None)
    cohort = discover_cohort(args.cohort, test=args.test)
    files: Dict[str, Path] = {}
    spec: Dict[str, Any] = {"classes": {str(k): v for k, v in cohort.classes.items()}}
    for key, folder, cases in (("cases", "cases", cohort.cases), ("test", "test", cohort.test)):
        spec[key] = []
        for i, case in enumerate(cases):
            entry = {"name": case.name, "image": _add_volume(files, f"{folder}/{i:04d}/image", case.image)}
            if case.label is not None:
                entry["label"] = _add_volume(files, f"{folder}/{i:04d}/label", case.label)
            spec[key].append(entry)
    if truth is not None:
        _add_folder(files, "truth", Path(truth))
    request = {"preset": args.preset, "config": config, "cohort": spec, "truth": "truth" if truth else None,
               "redo": list(args.redo), "files": {name: file_sha256(path) for name, path in files.items()}}
    parent = str(args.parent) if args.parent else None
    with connect(args) as client:
        outcome = _start_or_continue(client, args, "run", parent, request, files)
    if outcome:
        return outcome
    print(summary(Path(args.out)), file=sys.stderr if args.progress == "jsonl" else sys.stdout)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# predict


def predict_remotely(args: argparse.Namespace, section: Mapping[str, Any], device: Optional[str]) -> int:
    """``predict --server --model JOB``: the images predicted with the finished run job JOB's model."""
    from ..stages.inference import PREDICTION_SUFFIXES, collect_images

    files: Dict[str, Path] = {}
    images = [_add_volume(files, f"images/{i:04d}/{name}/image", path)
              for i, (name, path) in enumerate(collect_images(args.images).items())]
    request = {"preset": args.preset, "config": dict(section), "device": device, "images": images,
               "files": {name: file_sha256(path) for name, path in files.items()}}
    with connect(args) as client:
        outcome = _start_or_continue(client, args, "predict", str(args.model), request, files)
    if outcome:
        return outcome
    out = sys.stderr if args.progress == "jsonl" else sys.stdout
    for path in sorted(Path(args.out).iterdir()):
        if path.name.endswith(PREDICTION_SUFFIXES):
            print(f"wrote {path}", file=out)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# jobs


def jobs_command(args: argparse.Namespace) -> int:
    """``jobs list|show|follow|cancel|resume|download|delete``."""
    with connect(args) as client:
        if args.action == "list":
            rows = client.jobs()
            print(f"{'job':<25} {'kind':<8} {'state':<12} {'parent':<25} message")
            for job in rows:
                print(f"{job['id']:<25} {job['kind']:<8} {job['state']:<12} {job['parent'] or '-':<25} "
                      f"{job['message'].splitlines()[0] if job['message'] else ''}")
            return 0
        if not args.job:
            raise InputError(f"jobs {args.action} needs a job id (jobs list shows them)", field="job")
        if args.action == "show":
            print(json.dumps(client.job(args.job), indent=2))
            return 0
        if args.action == "cancel":
            print(f"job {args.job}: {client.cancel(args.job)['state']}")
            return 0
        if args.action == "delete":
            client.delete(args.job)
            print(f"deleted job {args.job}")
            return 0
        if args.action == "download":
            _require_out(args)
            _download(client, args.job, Path(args.out))
            return 0
        if args.action == "resume":
            after = client.resume(args.job)["events_from"]
        else:  # follow
            after = -1
        final = follow(client, args.job, after, args.progress)
        code = _outcome(final, args)
        if code == 0 and args.out:
            _download(client, args.job, Path(args.out))
        return code


# ---------------------------------------------------------------------------------------------------------------
# What the three share


def _start_or_continue(client: JobServerClient, args: argparse.Namespace, kind: str, parent: Optional[str],
                       request: Dict[str, Any], files: Mapping[str, Path]) -> int:
    """Start the job (or continue the one ``--out`` names), follow it, download its results; returns 0 when the
    results are in ``--out``, else the exit status to end with."""
    out = Path(args.out)
    fingerprint = hashlib.sha256(json.dumps({"kind": kind, "parent": parent, "request": request},
                                            sort_keys=True).encode("utf-8")).hexdigest()
    job = _earlier_job(client, out, fingerprint)
    after = -1
    if job is None or job["state"] == "uploading":
        if job is None:
            job = client.create(kind, parent)
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / SERVER_JOB_FILE, json.dumps(
                {"server": client.url, "job": job["id"], "fingerprint": fingerprint}, indent=2))
        print(f"job {job['id']} on {client.url}: uploading {len(files)} files", file=sys.stderr)
        for name, path in files.items():
            client.upload(job["id"], name, path, request["files"][name])
        after = client.start(job["id"], request)["events_from"]
    elif job["state"] in ("failed", "cancelled", "interrupted"):
        print(f"job {job['id']} on {client.url} is {job['state']}: resuming it", file=sys.stderr)
        after = client.resume(job["id"])["events_from"]
    elif job["state"] in ("queued", "running"):
        print(f"job {job['id']} on {client.url} is {job['state']}: following it", file=sys.stderr)
        after = job["events"] - 1
    final = follow(client, job["id"], after, args.progress) if job["state"] != "finished" else job
    code = _outcome(final, args)
    if code == 0:
        _download(client, job["id"], out)
    return code


def _earlier_job(client: JobServerClient, out: Path, fingerprint: str) -> Optional[Dict[str, Any]]:
    """The job that ``out/server-job.json`` names when it is this server's, made from the same request, and still
    there; else None (a new job is started)."""
    try:
        record = json.loads((out / SERVER_JOB_FILE).read_text(encoding="utf-8"))
        if record["server"] != client.url or record["fingerprint"] != fingerprint:
            return None
        return client.job(record["job"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    except ServerError as error:
        if error.status == 404:
            return None
        raise


def follow(client: JobServerClient, job_id: str, after: int, progress_kind: str) -> Dict[str, Any]:
    """Show the job's events after ``after`` as a local run shows them until its engine stops; returns the job.
    Ctrl-C or SIGTERM cancels the job (it saves its checkpoint) and goes on showing it to its end; a second one stops
    following."""
    from ..base.progress import make_reporter

    reporter = make_reporter(progress_kind)
    cancelling = False
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            try:
                for record in client.events(job_id, after):
                    after = record["n"]
                    _show(record, reporter, progress_kind)
                job = client.job(job_id)
                if job["state"] not in ("queued", "running"):
                    return job
            except KeyboardInterrupt:
                if cancelling:
                    print(f"stopped following job {job_id}; it goes on stopping on the server (jobs follow "
                          f"{job_id} shows it)", file=sys.stderr)
                    raise
                cancelling = True
                print(f"cancelling job {job_id}: the server's engine saves its checkpoint (Ctrl-C again to stop "
                      "waiting)", file=sys.stderr)
                client.cancel(job_id)
    finally:
        signal.signal(signal.SIGTERM, previous)
        close = getattr(reporter, "close", None)
        if close:
            close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _show(record: Mapping[str, Any], reporter: Callable, progress_kind: str) -> None:
    if record["kind"] == "progress":
        event = parse_progress_line(json.dumps(record["event"]))
        if event is not None:
            reporter(event)
    elif record["kind"] == "log":
        print(record["text"], file=sys.stderr)
    elif record["kind"] == "state" and record["state"] in ("queued", "running") and progress_kind != "none":
        print(f"[server] job {record['state']}" + (f": {record['message']}" if record.get("message") else ""),
              file=sys.stderr)


def _outcome(job: Mapping[str, Any], args: argparse.Namespace) -> int:
    """The exit status a local run would end with, and the message it would print that the engine's own output
    (already shown) does not hold."""
    state, code, message = job["state"], job.get("exit_code"), job.get("message") or ""
    rerun = "rerun the same command" if getattr(args, "out", None) and args.command != "jobs" else \
        f"jobs resume {job['id']}"
    if state == "finished":
        return 0
    if state == "cancelled":
        print(f"cancelled: the last checkpoint is saved on the server; {rerun} to resume", file=sys.stderr)
        return EXIT_CANCELLED
    if state == "interrupted":
        print(f"{ERROR_PREFIX}job {job['id']} was interrupted: {message}; {rerun} to resume it", file=sys.stderr)
        return EXIT_FAILURE
    if code is None:  # the server could not start the engine: nothing of the engine's was shown
        print(f"{ERROR_PREFIX}{message}", file=sys.stderr)
    return EXIT_BAD_INPUT if code == EXIT_BAD_INPUT else EXIT_FAILURE


def _download(client: JobServerClient, job_id: str, out: Path) -> int:
    entries = client.results(job_id)
    for entry in entries:
        client.download(job_id, entry, out)
    print(f"downloaded {len(entries)} result files of job {job_id} into {out}", file=sys.stderr)
    return len(entries)


def _require_out(args: argparse.Namespace) -> None:
    if not args.out:
        raise InputError("jobs download needs --out DIR", field="out")


def _add_volume(files: Dict[str, Path], stem: str, path: Path) -> str:
    """Add a volume file as ``stem`` + its ending (and a MetaImage header's data file beside it); returns its name."""
    from ..storage.volumes import file_suffix

    suffix = file_suffix(path)
    name = stem + suffix
    files[name] = Path(path)
    if suffix == ".mhd":
        data_file = _metaimage_data_file(Path(path))
        if data_file is not None:
            files[f"{stem.rsplit('/', 1)[0]}/{data_file.name}"] = data_file
    return name


def _metaimage_data_file(header: Path) -> Optional[Path]:
    for line in header.read_text(encoding="latin-1").splitlines():
        match = re.match(r"\s*ElementDataFile\s*=\s*(.+?)\s*$", line)
        if match and match.group(1) != "LOCAL" and "/" not in match.group(1):
            return header.parent / match.group(1)
    return None


def _add_folder(files: Dict[str, Path], prefix: str, folder: Path) -> None:
    if not folder.is_dir():
        raise InputError("expected a folder of true labels", folder, "truth")
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            files[f"{prefix}/{relative.as_posix()}"] = path


