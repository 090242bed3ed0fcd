"""What the job server's client and server share, with the standard library only (the command line imports it
whether or not it talks to a server)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
TOKEN_ENVIRONMENT = "SFRSEGMENT_TOKEN"
"""The environment variable a client reads the token from when no --token-file is given."""
SERVER_JOB_FILE = "server-job.json"
"""In a client's ``--out`` folder: the server, the job and a fingerprint of what was sent (see :mod:`.remote`)."""

# How the client's errors begin, so that other front ends (the Slicer module) recognise them and say what to check
# in their own terms.
TOKEN_REFUSED = "the server refused the token"
UNREACHABLE = "cannot reach the SFRSegment server"
TLS_FAILED = "TLS with the SFRSegment server"


class ServerError(Exception):
    """The server refused a request or could not be reached; ``str(error)`` says what to check. ``status`` is the
    HTTP status (0 when no answer came)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def add_server_options(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """``--server URL --token-file FILE --ca-file FILE``: run a command on a job server instead of here."""
    parser.add_argument("--server", metavar="URL", required=required,
                        help="run on an SFRSegment job server (python -m SFRSegmentLib serve) instead of here, e.g. "
                             "https://gpu.example.org:8765")
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help=f"file holding the server's token (else ${TOKEN_ENVIRONMENT}; never on the command "
                             "line)")
    parser.add_argument("--ca-file", type=Path, metavar="FILE",
                        help="the server's TLS certificate (or its authority's), when it is not publicly trusted")
