"""Weights cache and downloads, against a real HTTP server on 127.0.0.1 serving a small real torch checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import torch

from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.models.sam import catalog, weights
from SFRSegmentLib.models.sam.catalog import ModelEntry
from SFRSegmentLib.models.sam.weights import (
    DownloadError,
    cache_dir,
    download,
    find_cached,
    import_local,
    load_state_dict,
    resolve_checkpoint,
)

CHECKPOINT_PATH = "/tiny.pth"


def tiny_checkpoint() -> bytes:
    """A real (small) torch checkpoint: the state dict of an nn.Linear."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(32, 16).state_dict(), buffer)
    return buffer.getvalue()


PAYLOAD = tiny_checkpoint()
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class CheckpointServer(ThreadingHTTPServer):
    """Serves PAYLOAD at CHECKPOINT_PATH and logs every request's headers.

    ``supports_range``: answer ``Range: bytes=N-`` with 206 (else ignore it and send 200 with everything).
    ``cut_first_after``: on the first request, close the connection after that many body bytes.
    ``announce_length``: send Content-Length (else the body simply ends when the connection closes).
    """

    def __init__(
        self, supports_range: bool = True, cut_first_after: Optional[int] = None, announce_length: bool = True
    ):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.supports_range = supports_range
        self.cut_first_after = cut_first_after
        self.announce_length = announce_length
        self.requests: List[Dict[str, str]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{CHECKPOINT_PATH}"


class _Handler(BaseHTTPRequestHandler):
    server: CheckpointServer

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        with self.server.lock:
            self.server.requests.append(dict(self.headers))
            first = len(self.server.requests) == 1
        if self.path != CHECKPOINT_PATH:
            self.send_error(404)
            return
        start, status = 0, 200
        asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if asked and self.server.supports_range:
            start, status = int(asked.group(1)), 206
            if start >= len(PAYLOAD):
                self.send_error(416)
                return
        body = PAYLOAD[start:]
        self.send_response(status)
        if self.server.announce_length:
            self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.end_headers()
        if first and self.server.cut_first_after is not None:
            body = body[: self.server.cut_first_after]  # then the connection closes: an interrupted transfer
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the test output clean
        pass


Serve = Callable[..., CheckpointServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start CheckpointServer(s) in threads; shut them all down after the test."""
    started: List[Tuple[CheckpointServer, threading.Thread]] = []

    def start(**options: object) -> CheckpointServer:
        server = CheckpointServer(**options)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the user's cache or catalog overrides, or writes to ~/.cache."""
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path / "default-cache"))
    monkeypatch.delenv(catalog.MODELS_JSON_ENV, raising=False)
    monkeypatch.delenv(weights.MODEL_URL_ENV_PREFIX + "TINY", raising=False)


def tiny_entry(url: str, **changes: object) -> ModelEntry:
    """A catalog entry for the served checkpoint, made from the real SAM ViT-B entry (the mirror route)."""
    entry = dataclasses.replace(
        catalog.get_model("sam_vit_b"),
        id="tiny", filename="tiny.pth", url=url, sha256=PAYLOAD_SHA256, size_bytes=len(PAYLOAD),
    )
    return dataclasses.replace(entry, **changes)


def tiny_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str = "https://example.invalid/t.pth") -> Path:
    """Point SFRSEGMENT_MODELS_JSON at a catalog holding just the tiny entry."""
    entry = dataclasses.asdict(tiny_entry(url))
    path = tmp_path / "Models.json"
    path.write_text(json.dumps({"models": [entry]}), encoding="utf-8")
    monkeypatch.setenv(catalog.MODELS_JSON_ENV, str(path))
    return path


def cache_listing(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


class Progress:
    """Records the (bytes_done, bytes_total) calls."""

    def __init__(self) -> None:
        self.calls: List[Tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


# --- cache folder ------------------------------------------------------------------------------------------------


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path / "env"))
    assert cache_dir(tmp_path / "option") == tmp_path / "option"
    assert cache_dir() == tmp_path / "env"
    monkeypatch.delenv(weights.CACHE_DIR_ENV)
    assert cache_dir() == tmp_path / "xdg" / "sfrsegment"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == tmp_path / "home" / ".cache" / "sfrsegment"
    assert all(p.is_dir() for p in (tmp_path / "option", tmp_path / "env", tmp_path / "xdg" / "sfrsegment"))


# --- download ------------------------------------------------------------------------------------------------------


def test_download_verifies_caches_and_reports_progress(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(weights, "CHUNK_BYTES", 1024)  # several chunks, so progress is reported along the way
    server = serve()
    progress = Progress()
    path = download(tiny_entry(server.url), cache=tmp_path / "cache", progress=progress)
    assert path == tmp_path / "cache" / "tiny.pth"
    assert path.read_bytes() == PAYLOAD
    assert cache_listing(path.parent) == ["tiny.pth", "tiny.pth.sha256"]
    assert json.loads((path.parent / "tiny.pth.sha256").read_text())["sha256"] == PAYLOAD_SHA256
    state = load_state_dict(path)
    assert set(state) == {"weight", "bias"} and tuple(state["weight"].shape) == (16, 32)
    done = [d for d, _ in progress.calls]
    assert progress.calls[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert len(progress.calls) > 2 and done == sorted(done)


def test_second_call_uses_the_cache_without_network_or_hashing(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve()
    entry = tiny_entry(server.url)
    first = download(entry, cache=tmp_path)

    def no_hashing(path: object) -> str:
        raise AssertionError("the stamp should make hashing unnecessary")

    monkeypatch.setattr(weights, "file_sha256", no_hashing)
    assert download(entry, cache=tmp_path) == first
    assert find_cached(entry, cache=tmp_path) == first
    assert len(server.requests) == 1


def test_changed_cached_file_is_detected_and_downloaded_again(serve: Serve, tmp_path: Path) -> None:
    server = serve()
    entry = tiny_entry(server.url)
    path = download(entry, cache=tmp_path)
    path.write_bytes(bytes(len(PAYLOAD)))  # same size, other content: the stamp no longer fits the file
    assert find_cached(entry, cache=tmp_path) is None
    assert download(entry, cache=tmp_path).read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_force_downloads_again(serve: Serve, tmp_path: Path) -> None:
    server = serve()
    entry = tiny_entry(server.url)
    download(entry, cache=tmp_path)
    download(entry, cache=tmp_path, force=True)
    assert len(server.requests) == 2


def test_hash_mismatch_keeps_nothing(serve: Serve, tmp_path: Path) -> None:
    server = serve()
    entry = tiny_entry(server.url, sha256="0" * 64)
    with pytest.raises(DownloadError) as caught:
        download(entry, cache=tmp_path)
    message = str(caught.value)
    assert f"expected {'0' * 64}, got {PAYLOAD_SHA256}" in message and "nothing was kept" in message
    assert cache_listing(tmp_path) == []


@pytest.mark.parametrize(
    "announce_length, message",
    [(True, f"offers {len(PAYLOAD)} bytes, expected 100.*nothing was kept"),
     (False, "sent more than the expected 100 bytes; nothing was kept")],
    ids=["announced", "unannounced"],
)
def test_oversized_file_is_refused_and_nothing_kept(
    serve: Serve, tmp_path: Path, announce_length: bool, message: str
) -> None:
    server = serve(announce_length=announce_length)
    with pytest.raises(DownloadError, match=message):
        download(tiny_entry(server.url, size_bytes=100), cache=tmp_path)
    assert cache_listing(tmp_path) == []


def test_interrupted_download_resumes_with_range(serve: Serve, tmp_path: Path) -> None:
    cut = 700
    server = serve(cut_first_after=cut)
    entry = tiny_entry(server.url)
    with pytest.raises(DownloadError, match=f"closed after {cut} of {len(PAYLOAD)} bytes.*next call resumes"):
        download(entry, cache=tmp_path)
    assert (tmp_path / "tiny.pth.part").read_bytes() == PAYLOAD[:cut]
    progress = Progress()
    path = download(entry, cache=tmp_path, progress=progress)
    assert path.read_bytes() == PAYLOAD
    assert server.requests[1].get("Range") == f"bytes={cut}-"
    assert progress.calls[0] == (cut, len(PAYLOAD)) and progress.calls[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert cache_listing(tmp_path) == ["tiny.pth", "tiny.pth.sha256"]


def test_server_without_range_support_restarts_from_zero(serve: Serve, tmp_path: Path) -> None:
    server = serve(supports_range=False, cut_first_after=700)
    entry = tiny_entry(server.url)
    with pytest.raises(DownloadError, match="closed after 700"):
        download(entry, cache=tmp_path)
    path = download(entry, cache=tmp_path)
    assert server.requests[1].get("Range") == "bytes=700-"  # asked, but the server answered 200 with everything
    assert path.read_bytes() == PAYLOAD


def test_partial_file_longer_than_the_server_file_is_restarted(serve: Serve, tmp_path: Path) -> None:
    server = serve()
    entry = tiny_entry(server.url, size_bytes=len(PAYLOAD) + 100, sha256=None)
    (tmp_path / "tiny.pth.part").write_bytes(PAYLOAD + b"x" * 50)  # the server answers 416 to the resume
    with pytest.raises(DownloadError, match=f"offers {len(PAYLOAD)} bytes, expected {len(PAYLOAD) + 100}"):
        download(entry, cache=tmp_path, allow_unverified=True)
    assert [r.get("Range") for r in server.requests] == [f"bytes={len(PAYLOAD) + 50}-", None]
    assert cache_listing(tmp_path) == []


def test_unverified_entry_needs_allow_unverified(serve: Serve, tmp_path: Path) -> None:
    server = serve()
    entry = tiny_entry(server.url, sha256=None)
    with pytest.raises(InputError, match="no SHA-256 in the catalog.*allow_unverified=True"):
        download(entry, cache=tmp_path)
    assert server.requests == []
    assert download(entry, cache=tmp_path, allow_unverified=True).read_bytes() == PAYLOAD


def test_http_error_and_unreachable_server_are_download_errors(serve: Serve, tmp_path: Path) -> None:
    server = serve()
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(tiny_entry(server.url.replace(CHECKPOINT_PATH, "/missing.pth")), cache=tmp_path)
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match="import_local"):
        download(tiny_entry(f"http://127.0.0.1:{closed_port}/tiny.pth"), cache=tmp_path, timeout=5)
    assert cache_listing(tmp_path) == []


def test_env_overrides_for_catalog_url_and_cache(serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve()
    tiny_catalog(tmp_path, monkeypatch)  # its URL, example.invalid, cannot be reached
    monkeypatch.setenv(weights.MODEL_URL_ENV_PREFIX + "TINY", server.url)
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path / "env-cache"))
    path = resolve_checkpoint("tiny")
    assert path == tmp_path / "env-cache" / "tiny.pth" and path.read_bytes() == PAYLOAD
    assert len(server.requests) == 1
    monkeypatch.setenv(weights.MODEL_URL_ENV_PREFIX + "TINY", "file:///etc/passwd")
    with pytest.raises(InputError, match="SFRSEGMENT_MODEL_URL_TINY must be an http"):
        download(catalog.get_model("tiny"), force=True)
    assert path.read_bytes() == PAYLOAD  # the refused override cost nothing


# --- resolve_checkpoint -------------------------------------------------------------------------------------------


def test_resolve_model_id_uses_the_cache_or_refuses_to_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_catalog(tmp_path, monkeypatch)
    with pytest.raises(InputError, match="not on this machine.*import_local"):
        resolve_checkpoint("tiny", cache=tmp_path / "cache", download_missing=False)
    source = tmp_path / "downloaded-elsewhere.pth"
    source.write_bytes(PAYLOAD)
    imported = import_local(source, cache=tmp_path / "cache")
    assert resolve_checkpoint("tiny", cache=tmp_path / "cache", download_missing=False) == imported


def test_resolve_path_checks_files_named_like_catalog_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_catalog(tmp_path, monkeypatch)
    custom = tmp_path / "my_finetune.pth"
    custom.write_bytes(b"anything")
    assert resolve_checkpoint(str(custom)) == custom  # not a catalog name: used as is
    genuine = tmp_path / "models" / "tiny.pth"
    genuine.parent.mkdir()
    genuine.write_bytes(PAYLOAD)
    assert resolve_checkpoint(genuine) == genuine
    genuine.write_bytes(PAYLOAD[::-1])
    with pytest.raises(InputError, match=f"named like the catalog model 'tiny'.*expected {PAYLOAD_SHA256}"):
        resolve_checkpoint(genuine)


def test_resolve_unknown_id_or_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_catalog(tmp_path, monkeypatch)
    with pytest.raises(InputError, match="neither a checkpoint file nor a known model; known models: tiny"):
        resolve_checkpoint("sam_vit_q")
    with pytest.raises(InputError, match="checkpoint file not found"):
        resolve_checkpoint(str(tmp_path / "gone.pth"))


# --- import_local -------------------------------------------------------------------------------------------------


def test_import_matching_file_under_the_catalog_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_catalog(tmp_path, monkeypatch)
    source = tmp_path / "from-usb-stick.pth"
    source.write_bytes(PAYLOAD)
    path = import_local(source, cache=tmp_path / "cache")
    assert path == tmp_path / "cache" / "tiny.pth" and path.read_bytes() == PAYLOAD
    assert cache_listing(path.parent) == ["tiny.pth", "tiny.pth.sha256"]
    assert source.is_file()  # copied, not moved


def test_import_with_explicit_entry(tmp_path: Path) -> None:
    source = tmp_path / "weights.bin.pth"
    source.write_bytes(PAYLOAD)
    entry = tiny_entry("https://example.invalid/tiny.pth", filename="renamed.pth")
    assert import_local(source, entry=entry, cache=tmp_path / "cache").name == "renamed.pth"
    with pytest.raises(InputError, match="matches no catalog model"):
        import_local(source, entry=dataclasses.replace(entry, sha256="1" * 64), cache=tmp_path / "cache")


def test_import_unknown_file_needs_allow_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tiny_catalog(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    source = tmp_path / "custom_sam.pth"
    source.write_bytes(b"some other checkpoint")
    with pytest.raises(InputError, match="matches no catalog model.*allow_unknown=True"):
        import_local(source, cache=cache)
    assert cache_listing(cache) == []
    with caplog.at_level(logging.WARNING, logger=weights.__name__):
        path = import_local(source, cache=cache, allow_unknown=True)
    assert path == cache / "custom_sam.pth" and path.read_bytes() == source.read_bytes()
    assert "not in the model catalog" in caplog.text
    assert cache_listing(cache) == ["custom_sam.pth"]


def test_import_never_puts_a_wrong_file_under_a_catalog_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_catalog(tmp_path, monkeypatch)
    impostor = tmp_path / "tiny.pth"
    impostor.write_bytes(b"not the real thing")
    with pytest.raises(InputError, match="named like the catalog model 'tiny'"):
        import_local(impostor, cache=tmp_path / "cache", allow_unknown=True)
    assert cache_listing(tmp_path / "cache") == []


# --- load_state_dict ----------------------------------------------------------------------------------------------


class NotAWeight:
    """An arbitrary object, which a weights-only load must refuse to unpickle."""


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable PyTorch checkpoint"),
        (b"these are not weights\n", "not a readable PyTorch checkpoint"),
        (PAYLOAD[: len(PAYLOAD) // 2], "not a readable PyTorch checkpoint"),
        ("code", "not a readable PyTorch checkpoint"),
        ("list", "expected a state dict"),
    ],
    ids=["empty", "text", "truncated", "pickled-object", "not-a-dict"],
)
def test_load_state_dict_refuses_corrupt_files(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "bad.pth"
    if content == "code":
        torch.save({"object": NotAWeight()}, path)
    elif content == "list":
        torch.save([torch.zeros(2)], path)
    else:
        path.write_bytes(content)
    with pytest.raises(InputError, match=message) as caught:
        load_state_dict(path)
    assert caught.value.path == path
