"""``python -m SFRSegmentLib serve``: the token file, the warnings about the network, TLS, and uvicorn.

The token file holds one line, the token. When it is missing, a new random token (32 bytes, URL-safe) is written into
it, created readable and writable by its owner only (0600). A token file that others can read is refused on POSIX
(as ssh refuses such a key): an administrator who gives a token makes the file 0600 too.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..base.errors import InputError
from .protocol import DEFAULT_HOST, DEFAULT_PORT  # noqa: F401  (the defaults of serve)

TOKEN_BYTES = 32


def read_or_create_token(path: Path) -> str:
    """The token in ``path``; when the file is missing, a new token written into a new 0600 file."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(token + "\n")
        print(f"wrote a new access token to {path} (readable by its owner only); give it to the server's users",
              file=sys.stderr)
        return token
    if os.name == "posix":
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InputError(f"the token file can be read by other users (mode {stat.S_IMODE(mode):o}); make it "
                             f"readable by its owner only: chmod 600 {path}", path, "token-file")
    return read_token_file(path)


def read_token_file(path: Path) -> str:
    """The token a token file holds (its first line, stripped); an :class:`InputError` when there is none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read the token file: {error.strerror or error}", path, "token-file") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not token:
        raise InputError("the token file is empty; it should hold the server's token on its first line", path,
                         "token-file")
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(host: str, port: int, data: Path, token_file: Optional[Path], slots: int, gpus: Sequence[str],
          processes_per_job: int, certfile: Optional[Path], keyfile: Optional[Path], max_file_mb: float,
          max_job_gb: float) -> int:
    import uvicorn

    from .app import create_app
    from .jobqueue import JobQueue
    from .store import JobStore

    if (certfile is None) != (keyfile is None):
        raise InputError("TLS needs both --ssl-certfile and --ssl-keyfile", field="ssl-certfile")
    for path in (certfile, keyfile):
        if path is not None and not path.is_file():
            raise InputError("file not found", path, "ssl-certfile" if path == certfile else "ssl-keyfile")
    if gpus:
        slots = len(gpus)
    if slots < 1 or processes_per_job < 1:
        raise InputError("--slots and --processes-per-job must be at least 1", field="slots")
    data.mkdir(parents=True, exist_ok=True)
    token_path = token_file or data / "token"
    token = read_or_create_token(token_path)
    store = JobStore(data, int(max_file_mb * 2**20), int(max_job_gb * 2**30))
    queue = JobQueue(store, slots, gpus, processes_per_job)
    app = create_app(store, queue, token, version=_version())
    scheme = "https" if certfile else "http"
    if not is_loopback(host) and certfile is None:
        print("=" * 100 + f"\nWARNING: listening on {host} WITHOUT TLS: the token and every image travel unencrypted "
              "over the network.\nUse --ssl-certfile and --ssl-keyfile (a certificate from your hospital's IT), or "
              "listen on 127.0.0.1 and reach the server through an SSH tunnel.\n" + "=" * 100, file=sys.stderr)
    print(f"SFRSegment job server: {scheme}://{host}:{port}, jobs in {store.jobs_dir}, token in {token_path}, "
          f"{slots} slot(s)" + (f" on GPUs {', '.join(gpus)}" if gpus else ""), file=sys.stderr)
    config = uvicorn.Config(app, host=host, port=port, ssl_certfile=str(certfile) if certfile else None,
                            ssl_keyfile=str(keyfile) if keyfile else None, timeout_graceful_shutdown=5,
                            log_level="info", lifespan="on")
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("SFRSegmentLib")
    except Exception:
        return ""
