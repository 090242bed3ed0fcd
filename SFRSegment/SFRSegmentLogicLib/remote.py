"""Compute on a server: where the module's jobs run, how that choice is kept, and what the engine is told.

The module never talks to the server itself. A job on a server runs the same child process as a local one, the
engine's command line with ``--server URL`` (:mod:`SFRSegmentLib.jobserver.remote`): it uploads the job folder's
cohort, follows the server's job with the same JSON-lines progress and exit codes, and downloads the results into the
job folder's ``run/``, which the module imports as after a local run. Cancelling it (SIGTERM) cancels the server's
job, which saves its checkpoint; rerunning the same command continues that job (``run/server-job.json``).

The choice ("this computer" or a server, with its URL, token and an optional CA certificate) is the user's and the
computer's, not the scene's: it is kept in the application's settings (:func:`load_compute_settings`; in Slicer,
``qt.QSettings()``), never in the parameter node, so a saved or shared scene carries no token. The token reaches the
engine in its environment (``SFRSEGMENT_TOKEN``), never on its command line, which other users can read.

Standard library only (with the engine's stdlib-only :mod:`SFRSegmentLib.jobserver.protocol`), like :mod:`.process`.
"""

from __future__ import annotations

import json
import os
import stat
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from SFRSegmentLib.base.errors import ERROR_PREFIX, InputError
from SFRSegmentLib.jobserver.protocol import (
    SERVER_JOB_FILE,
    TLS_FAILED,
    TOKEN_ENVIRONMENT,
    TOKEN_REFUSED,
    UNREACHABLE,
)

from .process import EngineFailed

COMPUTE_ON_KEY = "SFRSegment/ComputeOn"
SERVER_URL_KEY = "SFRSegment/ServerURL"
SERVER_TOKEN_KEY = "SFRSegment/ServerToken"
SERVER_CA_FILE_KEY = "SFRSegment/ServerCAFile"
"""The application settings' keys (QSettings) of the compute choice."""
THIS_COMPUTER = "local"
A_SERVER = "server"
"""The values of :data:`COMPUTE_ON_KEY`."""
REMOTE_CANCEL_GRACE_S = 120.0
"""How long the engine's client may take to end after a cancel: it tells the server, then waits until the server's
engine has saved its checkpoint and stopped, so that Run continues from there. (Killed earlier, only the waiting
stops: the server's job still saves and stops.)"""


@dataclass(frozen=True)
class ComputeServer:
    """An SFRSegment job server (``python -m SFRSegmentLib serve``) to run jobs on."""

    url: str
    """Its address, e.g. ``https://gpu.example.org:8765`` (an SSH tunnel: ``http://127.0.0.1:8765``)."""
    token: str = field(repr=False)
    """The server's token (its token file's content); kept out of ``repr`` so that it never reaches a log."""
    ca_file: Optional[Path] = None
    """The server's self-signed certificate (or its authority's), when the system does not trust it."""

    def check(self) -> None:
        """Raise the InputError that says what to fill in unless the URL, the token and the CA file can be used."""
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"the server URL {self.url!r} is not an address like https://gpu.example.org:8765 (or "
                             "http://127.0.0.1:8765 through an SSH tunnel): set it under Compute on.", field="url")
        if not self.token.strip():
            raise InputError("no token for the server: paste the server's token (its token file's content) under "
                             "Compute on.", field="token")
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise InputError("the server's CA certificate is not a file: under Compute on, choose the server's "
                             "certificate (.pem), or clear the field when its certificate is publicly trusted.",
                             self.ca_file, "ca_file")

    def arguments(self) -> List[str]:
        """The engine's options that send a command to this server (the token goes in :meth:`environment`)."""
        return ["--server", self.url] + ([] if self.ca_file is None else ["--ca-file", str(self.ca_file)])

    def environment(self, base: Mapping[str, str]) -> Dict[str, str]:
        """``base`` with the token, where the engine's client reads it."""
        return {**base, TOKEN_ENVIRONMENT: self.token.strip()}


@dataclass(frozen=True)
class ComputeSettings:
    """What the user chose under Compute on: this computer, or a server (its URL, token and CA file are kept while
    this computer is chosen, for the next time)."""

    on_server: bool = False
    url: str = ""
    token: str = field(default="", repr=False)
    ca_file: str = ""

    def server(self) -> Optional[ComputeServer]:
        """The server to run on; None for this computer."""
        if not self.on_server:
            return None
        return ComputeServer(self.url.strip(), self.token.strip(), Path(self.ca_file) if self.ca_file else None)


def load_compute_settings(settings: Any) -> ComputeSettings:
    """The compute choice kept in ``settings`` (a QSettings); this computer when none was kept."""
    def text(key: str) -> str:
        value = settings.value(key, "")
        return "" if value is None else str(value)

    return ComputeSettings(text(COMPUTE_ON_KEY) == A_SERVER, text(SERVER_URL_KEY), text(SERVER_TOKEN_KEY),
                           text(SERVER_CA_FILE_KEY))


def store_compute_settings(settings: Any, compute: ComputeSettings) -> None:
    """Keep ``compute`` in ``settings`` (a QSettings) and write it to disk; a file that holds a token is made
    readable by its owner only (POSIX), as the server's own token file is."""
    settings.setValue(COMPUTE_ON_KEY, A_SERVER if compute.on_server else THIS_COMPUTER)
    settings.setValue(SERVER_URL_KEY, compute.url.strip())
    settings.setValue(SERVER_TOKEN_KEY, compute.token.strip())
    settings.setValue(SERVER_CA_FILE_KEY, compute.ca_file)
    settings.sync()
    path = Path(settings.fileName()) if settings.fileName() else None
    if compute.token.strip() and os.name != "nt" and path is not None and path.is_file():
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def server_url(server: Optional[ComputeServer]) -> Optional[str]:
    """The URL a job folder records for where it runs: None for this computer."""
    return None if server is None else server.url


def place(url: Optional[str]) -> str:
    """Where a job runs, in words."""
    return "this computer" if url is None else f"the server {url}"


def server_job_id(run_root: Path) -> str:
    """The server's id of the job whose results the run folder ``run_root`` holds (its ``server-job.json``)."""
    record = Path(run_root) / SERVER_JOB_FILE
    try:
        return str(json.loads(record.read_text(encoding="utf-8"))["job"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"this job's record of its server job cannot be read ({error}); the job cannot be continued "
                         "from the server. Run again.", record) from error


class ComputeServerError(EngineFailed):
    """The engine's client could not use the server (not reached, TLS refused, token refused); the message says what
    to check in the module's terms."""

    @property
    def bad_input(self) -> bool:
        return True  # like bad input: the message says what to fix, and is all there is to show


CHECKS = {
    TOKEN_REFUSED: "Check the token under Compute on: it must be the server's token (the content of its token file, "
                   "DATA/token on the server).",
    TLS_FAILED: "Check under Compute on that the URL starts with https:// only when the server serves TLS, and, when "
                "its certificate is self-signed, choose that certificate as CA certificate.",
    UNREACHABLE: "Check under Compute on the server URL (http or https, host and port), that the server runs "
                 "(python -m SFRSegmentLib serve on the GPU computer), and that the network, a VPN or an SSH tunnel "
                 "lets this computer through.",
}
"""What to check in the module for each of the engine's client errors (:mod:`SFRSegmentLib.jobserver.protocol`)."""


def explained(error: Exception) -> Exception:
    """``error`` of a job on a server; when its engine ended on a client error (its error output's line naming
    one of :data:`CHECKS`), a :class:`ComputeServerError` with that line and what to check, else ``error`` itself."""
    if not isinstance(error, EngineFailed):
        return error
    for line in reversed(str(error).splitlines()):
        text = line[len(ERROR_PREFIX):] if line.startswith(ERROR_PREFIX) else line
        for phrase, check in CHECKS.items():
            if phrase in text:
                return ComputeServerError(f"{text}\n\n{check}", error.exit_code)
    return error
