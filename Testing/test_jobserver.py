"""The job server (``python -m SFRSegmentLib serve``) as a real uvicorn process on 127.0.0.1, driven by the command
line's client mode (``run/predict/jobs --server``) and by the HTTP client.

Every wait here polls for a state with a deadline (a server being ready, a job's event); no test asserts on time.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import httpx
import numpy as np
import pytest
import SimpleITK as sitk

from SFRSegmentLib.base.errors import EXIT_BAD_INPUT
from SFRSegmentLib.jobserver.client import JobServerClient
from SFRSegmentLib.jobserver.protocol import ServerError
from SFRSegmentLib.jobserver.store import file_sha256
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.research.synthetic import TRUTH_FOLDER, make_synthetic_cohort

from small_runs import TINY, events, run, run_command

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 240.0
"""Upper bound of every wait for a state (never reached when things work)."""
LONGER = {**TINY, "retrain": {"method": "mt", "iterations": 10, "checkpoint_every": 2, "lr_step": 1000}}
"""A run whose re-training is long enough to stop it in the middle (Mean Teacher: no SAM stages, to save time)."""
ENDLESS = {**TINY, "retrain": {"iterations": 100000, "lr_step": 1000}}
"""A run that is always cancelled before it ends."""


class Server:
    """``python -m SFRSegmentLib serve`` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, data: Path, *extra: str, host: str = "127.0.0.1", ca_file: Optional[Path] = None,
                 file_size_limit: Optional[int] = None) -> None:
        self.data, self.extra, self.host, self.ca_file = data, extra, host, ca_file
        self.file_size_limit = file_size_limit
        """Bytes any file the server and its engines write may reach; past it a write fails as on a full disk."""
        self.token_file = data / "token"
        self.log = data.parent / f"{data.name}-server.log"
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        self.port = free_port()
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "SFRSegmentLib", "serve", "--host", self.host, "--port", str(self.port),
                 "--data", str(self.data), "--token-file", str(self.token_file), *self.extra],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._limit_file_size)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if self.client().server()["api"] == 1:
                    return self
            except (ServerError, OSError):
                time.sleep(0.2)
        raise AssertionError(f"the server did not answer:\n{self.log.read_text()}")

    def _limit_file_size(self) -> None:
        """In the server's process before it starts; its engines inherit the limit and the ignored SIGXFSZ, so a
        write past the limit fails with EFBIG, as one on a full disk fails with ENOSPC."""
        if self.file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.file_size_limit, self.file_size_limit))

    def client(self) -> JobServerClient:
        return JobServerClient(self.url, self.token, self.ca_file)

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([*args, "--server", self.url, "--token-file", str(self.token_file)], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.kill()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def engine(*args: str) -> List[str]:
    return [sys.executable, "-m", "SFRSegmentLib", *map(str, args)]


def without_writer_date(path: Path) -> bytes:
    """The file's bytes without the NRRD header's "# on <date>" comment that the writer adds (the one part that is
    not a function of the data)."""
    data = path.read_bytes()
    if not path.name.endswith(".nrrd"):
        return data
    header, _, body = data.partition(b"\n\n")
    return b"\n".join(line for line in header.split(b"\n") if not line.startswith(b"# on ")) + b"\n\n" + body


def wait_for(condition, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def cohort_upload(client: JobServerClient, cohort: Path, config: Dict) -> Dict:
    """Create a run job, upload the synthetic cohort's files and start it, as the command line does."""
    job = client.create("run")
    files, cases = {}, []
    for i, folder in enumerate(sorted(p for p in cohort.iterdir() if p.name.startswith("case_"))):
        entry = {"name": folder.name}
        for kind in ("image", "label"):
            if (folder / f"{kind}.nrrd").is_file():
                name = f"cases/{i:04d}/{kind}.nrrd"
                files[name] = folder / f"{kind}.nrrd"
                entry[kind] = name
        cases.append(entry)
    hashes = {name: file_sha256(path) for name, path in files.items()}
    for name, path in files.items():
        client.upload(job["id"], name, path, hashes[name])
    return client.start(job["id"], {"preset": "small", "config": {**config, "device": "cpu"},
                                    "cohort": {"classes": json.loads((cohort / "classes.json").read_text()),
                                               "cases": cases}, "files": hashes})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jobserver-cohort") / "cohort"
    make_synthetic_cohort(root, n_cases=4, n_labeled=1, n_classes=1, seed=3, size_range=((48, 52), (48, 52), (16, 18)))
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("jobserver") / "data", "--max-file-mb", "1").start()
    yield server
    server.stop()


# ---------------------------------------------------------------------------------------------------------------
# The full cycle against a local run


def test_a_run_and_a_prediction_on_the_server_equal_the_same_done_locally(server, cohort, tmp_path):
    local = run(cohort, tmp_path / "local", TINY)
    assert local.returncode == 0, local.stderr[-3000:]
    command = run_command(cohort, tmp_path / "remote", TINY)
    remote = server.cli(*command)
    assert remote.returncode == 0, remote.stderr[-3000:]

    # The same progress protocol: every stdout line a JSON event, the stages in the local run's order.
    assert all(line.startswith("{") for line in remote.stdout.splitlines())
    stages = lambda out: list(dict.fromkeys(e["stage"] for e in events(out)))  # noqa: E731
    assert stages(remote.stdout) == stages(local.stdout)
    dice_line = next(line for line in local.stderr.splitlines() if line.startswith("mean Dice"))
    assert dice_line in remote.stderr.splitlines()

    # Bit-identical predictions, confidence and metrics (a .seg.nrrd's header differs in the writer's date only).
    local_run, remote_run = RunFolder(tmp_path / "local"), RunFolder(tmp_path / "remote")
    predicted = sorted(p.name for p in local_run.prediction_dir.iterdir() if not p.name.endswith(".provenance.json"))
    assert len(predicted) == 3 * 2 + 1
    for name in predicted:
        assert without_writer_date(local_run.prediction_dir / name) == \
            without_writer_date(remote_run.prediction_dir / name), name
    assert remote_run.metrics.read_bytes() == local_run.metrics.read_bytes()
    assert remote_run.vnet_weights.is_file() and remote_run.report.is_file()
    assert not remote_run.retrain_checkpoint.exists()  # checkpoints stay on the server
    job_id = json.loads((tmp_path / "remote" / "server-job.json").read_text())["job"]

    # Predict a new image with the server job's model, and locally with the local run's.
    image = cohort / "case_000" / "image.nrrd"
    local_predict = subprocess.run(engine("predict", "--model", tmp_path / "local", "--images", image, "--out",
                                          tmp_path / "local-predict", "--preset", "small", "--device", "cpu"),
                                   cwd=REPO, capture_output=True, text=True, timeout=300)
    assert local_predict.returncode == 0, local_predict.stderr
    remote_predict = server.cli(*engine("predict", "--model", job_id, "--images", image, "--out",
                                        tmp_path / "remote-predict", "--preset", "small", "--device", "cpu"))
    assert remote_predict.returncode == 0, remote_predict.stderr
    assert f"wrote {tmp_path / 'remote-predict' / 'case_000.seg.nrrd'}" in remote_predict.stdout
    for name in ("case_000.seg.nrrd", "case_000.nii.gz", "confidence.csv"):
        assert without_writer_date(tmp_path / "local-predict" / name) == \
            without_writer_date(tmp_path / "remote-predict" / name), name

    # Rerunning the same command finds the finished job and downloads it again; the jobs commands see both jobs.
    again = server.cli(*command)
    assert again.returncode == 0 and "uploading" not in again.stderr and dice_line in again.stdout + again.stderr
    listed = server.cli(*engine("jobs", "list"))
    assert listed.returncode == 0
    rows = {line.split()[0]: line.split()[1:3] for line in listed.stdout.splitlines()[1:]}
    assert rows[job_id] == ["run", "finished"]
    predict_id = next(job for job, (kind, _) in rows.items() if kind == "predict")
    assert rows[predict_id] == ["predict", "finished"]
    assert server.cli(*engine("jobs", "delete", predict_id)).returncode == 0
    assert predict_id not in server.cli(*engine("jobs", "list")).stdout
    gone = server.cli(*engine("jobs", "show", predict_id))
    assert gone.returncode == 2 and f"no job '{predict_id}' on this server" in gone.stderr


# ---------------------------------------------------------------------------------------------------------------
# Security


ENDPOINTS = [("GET", "/v1/server"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/{id}"),
             ("PUT", "/v1/jobs/{id}/inputs?name=a.nrrd"), ("POST", "/v1/jobs/{id}/start"),
             ("GET", "/v1/jobs/{id}/events"), ("POST", "/v1/jobs/{id}/cancel"), ("POST", "/v1/jobs/{id}/resume"),
             ("GET", "/v1/jobs/{id}/results"), ("GET", "/v1/jobs/{id}/results/file?name=metrics.csv"),
             ("DELETE", "/v1/jobs/{id}"), ("GET", "/v1/no-such-endpoint"), ("GET", "/docs")]


def test_every_endpoint_refuses_a_missing_or_wrong_token(server, tmp_path):
    job = server.client().create("run")["id"]
    token = server.token
    assert stat.S_IMODE(server.token_file.stat().st_mode) == 0o600 and len(token) >= 40
    for wrong in (None, "Bearer", f"Bearer {token[:-1]}", f"Bearer {token}x", f"Bearer {'x' * len(token)}",
                  f"Basic {token}", token):
        headers = {} if wrong is None else {"Authorization": wrong}
        for method, path in ENDPOINTS:
            response = httpx.request(method, server.url + path.format(id=job), headers=headers, json={},
                                     timeout=30)
            assert response.status_code == 401, (method, path, wrong, response.text)
            assert "token" in response.json()["detail"]
    assert server.client().job(job)["state"] == "uploading"  # nothing was done to it

    # The command line: no token, a wrong one; never one on the command line.
    no_token = subprocess.run(engine("jobs", "list", "--server", server.url), cwd=REPO, capture_output=True,
                              text=True, env={k: v for k, v in os.environ.items() if k != "SFRSEGMENT_TOKEN"})
    assert no_token.returncode == 2 and "--token-file" in no_token.stderr and "SFRSEGMENT_TOKEN" in no_token.stderr
    wrong = subprocess.run(engine("jobs", "list", "--server", server.url), cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "SFRSEGMENT_TOKEN": "not-the-token"})
    assert wrong.returncode == 2 and "refused the token" in wrong.stderr
    right = subprocess.run(engine("jobs", "list", "--server", server.url), cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "SFRSEGMENT_TOKEN": token})
    assert right.returncode == 0 and job in right.stdout
    assert "--token " not in subprocess.run(engine("run", "--help"), cwd=REPO, capture_output=True,
                                            text=True).stdout

    # A token file that others may read is refused; a new one is created owner-only.
    loose = tmp_path / "loose-token"
    loose.write_text("secret\n")
    loose.chmod(0o644)
    refused = subprocess.run(engine("serve", "--data", tmp_path / "data", "--token-file", loose, "--port",
                                    free_port()), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "chmod 600" in refused.stderr


def test_traversal_names_oversized_uploads_bad_hashes_and_unknown_jobs_are_refused(server, tmp_path):
    client = server.client()
    job = client.create("run")["id"]
    inputs = server.data / "jobs" / job / "inputs"
    small = tmp_path / "small.nrrd"
    small.write_bytes(b"x" * 1000)
    for name in ("../escape.nrrd", "cases/../../escape.nrrd", "/etc/passwd", ".hidden.nrrd", "cases/.lock",
                 "a\\b.nrrd", "C:/x.nrrd", "a//b.nrrd", "./a.nrrd", "a\x01b"):
        with pytest.raises(ServerError) as refused:
            client.upload(job, name, small)
        assert refused.value.status == 400 and "refused" in str(refused.value), name
    assert not any((server.data / "jobs").glob("escape*")) and not (server.data / "escape.nrrd").exists()

    big = tmp_path / "big.nrrd"
    big.write_bytes(b"x" * (2**20 + 1))
    with pytest.raises(ServerError) as too_big:
        client.upload(job, "big.nrrd", big)
    assert too_big.value.status == 413 and "--max-file-mb" in str(too_big.value)
    # Without a Content-Length the size is counted as the body streams in.
    chunked = httpx.put(f"{server.url}/v1/jobs/{job}/inputs", params={"name": "big.nrrd"},
                        headers={"Authorization": f"Bearer {server.token}", "X-SHA256": file_sha256(big)},
                        content=iter([b"x" * 2**19] * 3), timeout=60)
    assert chunked.status_code == 413
    with pytest.raises(ServerError) as mismatch:
        client.upload(job, "small.nrrd", small, sha256="0" * 64)
    assert mismatch.value.status == 422 and "SHA-256 mismatch" in str(mismatch.value)

    # A client that disconnects mid-upload leaves nothing that a start could use.
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall((f"PUT /v1/jobs/{job}/inputs?name=half.nrrd HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"{server.token}\r\nX-SHA256: {file_sha256(small)}\r\nContent-Length: 1000\r\n\r\n").encode()
                    + b"x" * 400)
    wait_for(lambda: not [p for p in inputs.rglob("*") if p.is_file()], "the half upload's temporary file to go")
    for missing in ({"half.nrrd": file_sha256(small)}, {"big.nrrd": file_sha256(big)}):
        with pytest.raises(ServerError) as not_there:
            client.start(job, {"cohort": {"cases": [{"name": "a", "image": next(iter(missing))}]},
                               "files": missing})
        assert not_there.value.status == 409 and "not uploaded" in str(not_there.value)

    # Options naming the server's files are not the client's to set.
    client.upload(job, "small.nrrd", small)
    elsewhere = tmp_path / "not-the-job"  # a folder of the server's machine outside every job
    for config, field in (({"truth_dir": str(elsewhere)}, "truth_dir"),
                          ({"retrain": {"init_weights": str(elsewhere / "vnet.pt")}}, "retrain.init_weights"),
                          ({"finetune": {"base_checkpoint": str(elsewhere / "sam.pth")}}, "finetune.base_checkpoint")):
        with pytest.raises(ServerError) as path_option:
            client.start(job, {"config": config, "cohort": {"cases": [{"name": "a", "image": "small.nrrd"}]},
                               "files": {"small.nrrd": file_sha256(small)}})
        assert path_option.value.status == 400 and field in str(path_option.value)
    assert client.job(job)["state"] == "uploading"

    for unknown in ("20990101-000000-00000000", "nope", "..", "..%2F..%2Fetc"):
        for call in (client.job, client.cancel, client.resume, client.delete, client.results, client.events):
            with pytest.raises(ServerError) as not_found:
                list(call(unknown)) if call == client.events else call(unknown)
            assert not_found.value.status == 404, (unknown, call)
            if "." not in unknown:  # the others do not even reach a job's route
                assert f"no job {unknown!r} on this server" in str(not_found.value)
    outside = httpx.get(f"{server.url}/v1/jobs/{job}/results/file", params={"name": "../job.json"},
                        headers={"Authorization": f"Bearer {server.token}"})
    assert outside.status_code == 400 and "refused" in outside.json()["detail"]


def test_tls_with_a_self_signed_certificate_and_the_warning_without_it(tmp_path):
    key, certificate = tmp_path / "key.pem", tmp_path / "cert.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                           str(certificate), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                           "subjectAltName=IP:127.0.0.1"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    server = Server(tmp_path / "tls", "--ssl-certfile", str(certificate), "--ssl-keyfile", str(key),
                    ca_file=certificate).start()
    try:
        assert server.url.startswith("https://") and server.client().jobs() == []
        with pytest.raises(ServerError) as untrusted:
            JobServerClient(server.url, server.token).jobs()
        assert "TLS" in str(untrusted.value) and "--ca-file" in str(untrusted.value)
        listed = server.cli(*engine("jobs", "list", "--ca-file", certificate))
        assert listed.returncode == 0, listed.stderr
    finally:
        server.stop()
    assert "WITHOUT TLS" not in server.log.read_text()

    exposed = Server(tmp_path / "exposed", host="0.0.0.0").start()
    exposed.stop()
    assert "WARNING: listening on 0.0.0.0 WITHOUT TLS" in exposed.log.read_text()


# ---------------------------------------------------------------------------------------------------------------
# Faults


def test_a_server_killed_mid_run_lists_the_job_interrupted_and_resumes_it_from_its_checkpoint(cohort, tmp_path):
    server = Server(tmp_path / "data").start()
    try:
        started = cohort_upload(server.client(), cohort, LONGER)
        job = started["id"]
        seen = []
        for record in server.client().events(job, started["events_from"]):
            if record["kind"] == "progress":
                seen.append(record["event"])
                if record["event"]["stage"] == "retrain" and record["event"]["step"] >= 4:
                    break
        server.kill()  # SIGKILL: no shutdown code of the server runs
        run_folder = RunFolder(server.data / "jobs" / job / "run")
        assert wait_for(lambda: not run_folder.in_use(), "the engine to stop after its server died")
        assert run_folder.retrain_checkpoint.is_file()

        server.start()
        listed = {entry["id"]: entry for entry in server.client().jobs()}
        assert listed[job]["state"] == "interrupted" and "resume" in listed[job]["message"]
        resumed = server.cli(*engine("jobs", "resume", job, "--out", tmp_path / "results", "--progress", "jsonl"))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        after = events(resumed.stdout)
        retrain_steps = [e["step"] for e in after if e["stage"] == "retrain" and e["step"] > 0]
        assert min(retrain_steps) > 4 and max(retrain_steps) == LONGER["retrain"]["iterations"]
        assert server.client().job(job)["state"] == "finished" and server.client().job(job)["attempts"] == 2
        assert len(list((tmp_path / "results" / "predictions").glob("*.seg.nrrd"))) == 3
    finally:
        server.stop()


def test_two_clients_uploading_and_starting_at_once_both_get_queued_jobs(cohort, tmp_path):
    server = Server(tmp_path / "data", "--slots", "1").start()
    try:
        barrier, started, errors = threading.Barrier(2), [], []

        def client_start() -> None:
            try:
                barrier.wait(30)
                started.append(cohort_upload(server.client(), cohort, ENDLESS))
            except Exception as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=client_start) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE_S)
        assert errors == [] and len(started) == 2 and started[0]["id"] != started[1]["id"]
        assert all(s["state"] == "queued" for s in started)
        client = server.client()
        states = lambda: {j["id"]: j["state"] for j in client.jobs()}  # noqa: E731
        first = wait_for(lambda: next((i for i, s in states().items() if s == "running"), None), "a running job")
        second = next(s["id"] for s in started if s["id"] != first)
        assert states()[second] == "queued" and client.job(second)["queue_position"] == 0  # one slot: it waits
        client.cancel(first)
        for record in client.events(second):
            if record["kind"] == "state" and record["state"] == "running":
                assert client.job(first)["state"] == "cancelled"  # the slot was freed before the second started
                client.cancel(second)
        assert states() == {first: "cancelled", second: "cancelled"}
    finally:
        server.stop()


def test_a_bad_cohort_ends_the_job_with_the_engines_own_message_shown_to_the_client(server, cohort, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cohort, broken)
    label = next(broken.glob("case_*/label.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 20, 20), np.uint8)), str(label))  # not the image's size
    client = server.client()
    job = cohort_upload(client, broken, TINY)  # straight to the server: nothing checked on this side
    ended = wait_for(lambda: (lambda j: j if j["state"] not in ("queued", "running") else None)(client.job(job["id"])),
                     "the job's end")
    assert ended["state"] == "failed" and ended["exit_code"] == EXIT_BAD_INPUT
    assert f"{label.parent.name}: " in ended["message"]  # every line of the engine's message: the case, the reason
    assert "does not match image" in ended["message"] and "(20, 20, 10) in the label" in ended["message"]
    assert str(server.data) not in ended["message"]  # paths inside the job only
    shown = server.cli(*engine("jobs", "show", job["id"]))
    assert "does not match image" in shown.stdout + shown.stderr


def test_a_full_disk_ends_the_job_with_the_engines_own_message(cohort, tmp_path):
    server = Server(tmp_path / "data", file_size_limit=2 * 2 ** 20).start()  # the uploads fit, a checkpoint not
    try:
        client = server.client()
        job = cohort_upload(client, cohort, TINY)
        ended = wait_for(lambda: (lambda j: j if j["state"] not in ("queued", "running") else None)(
            client.job(job["id"])), "the job's end")
        assert ended["state"] == "failed" and ended["exit_code"] not in (0, None)
        assert "could not write the file; the disk may be full" in ended["message"]
        assert str(server.data) not in ended["message"]
        assert client.job(job["id"])["state"] == "failed"  # the server itself still answers
    finally:
        server.stop()
