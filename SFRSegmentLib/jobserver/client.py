"""The job server's client (httpx): every endpoint of :mod:`.app` as a method, errors as :class:`ServerError` whose
message says what to check.

The progress stream (:meth:`JobServerClient.events`) reconnects from the last event it received when the connection
drops, a few times, so a laptop's network hiccup does not lose or repeat an event.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import httpx

from ..base.errors import PathLike
from ..storage.atomic import atomic_path
from .protocol import TLS_FAILED, TOKEN_ENVIRONMENT, TOKEN_REFUSED, UNREACHABLE, ServerError
from .store import CHUNK_BYTES, file_sha256

RECONNECTS = 5
RECONNECT_WAIT_S = 2.0


class JobServerClient:
    def __init__(self, url: str, token: str, ca_file: Optional[PathLike] = None, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        verify: Any = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        self.http = httpx.Client(base_url=self.url + "/v1", headers={"Authorization": f"Bearer {token}"},
                                 verify=verify, timeout=httpx.Timeout(timeout_s))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "JobServerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise self._unreachable(error) from None
        _raise_for_status(response)
        return response.json()

    def _unreachable(self, error: Exception) -> ServerError:
        text = str(error) or type(error).__name__
        if "CERTIFICATE" in text.upper() or "SSL" in text.upper():
            return ServerError(f"{TLS_FAILED} at {self.url} failed ({text}): check that the URL starts with https:// "
                               "only when the server uses TLS, and give its certificate with --ca-file when it is "
                               "self-signed")
        return ServerError(f"{UNREACHABLE} at {self.url} ({text}): check the URL and port, "
                           "that the server runs (python -m SFRSegmentLib serve), and that the network or an SSH "
                           "tunnel lets you through")

    def server(self) -> Dict[str, Any]:
        return self._request("GET", "/server")

    def jobs(self) -> List[Dict[str, Any]]:
        return self._request("GET", "/jobs")["jobs"]

    def job(self, job_id: str) -> Dict[str, Any]:
        return self._request("GET", f"/jobs/{job_id}")

    def create(self, kind: str, parent: Optional[str] = None) -> Dict[str, Any]:
        return self._request("POST", "/jobs", json={"kind": kind, "parent": parent})

    def upload(self, job_id: str, name: str, path: PathLike, sha256: Optional[str] = None) -> Dict[str, Any]:
        """Send the file at ``path`` as ``name``, streamed, with its SHA-256 (computed when not given)."""
        path = Path(path)
        sha256 = sha256 or file_sha256(path)

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as stream:
                yield from iter(lambda: stream.read(CHUNK_BYTES), b"")

        headers = {"X-SHA256": sha256, "Content-Length": str(path.stat().st_size),
                   "Content-Type": "application/octet-stream"}
        return self._request("PUT", f"/jobs/{job_id}/inputs", params={"name": name}, headers=headers,
                             content=chunks())

    def start(self, job_id: str, request: Mapping[str, Any]) -> Dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/start", json=dict(request))

    def cancel(self, job_id: str) -> Dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/cancel")

    def resume(self, job_id: str) -> Dict[str, Any]:
        return self._request("POST", f"/jobs/{job_id}/resume")

    def delete(self, job_id: str) -> Dict[str, Any]:
        return self._request("DELETE", f"/jobs/{job_id}")

    def results(self, job_id: str) -> List[Dict[str, Any]]:
        return self._request("GET", f"/jobs/{job_id}/results")["files"]

    def download(self, job_id: str, entry: Mapping[str, Any], out_dir: PathLike) -> Path:
        """Download the result file ``entry`` (from :meth:`results`) into ``out_dir`` under its name, atomically,
        checking its SHA-256."""
        name = str(entry["name"])
        target = Path(out_dir).joinpath(*name.split("/"))
        if not target.resolve().is_relative_to(Path(out_dir).resolve()):
            raise ServerError(f"the server named a result file {name!r} outside the output folder; refused")
        with atomic_path(target) as temporary:
            try:
                with self.http.stream("GET", f"/jobs/{job_id}/results/file", params={"name": name}) as response:
                    _raise_for_status(response)
                    with open(temporary, "wb") as stream:
                        for chunk in response.iter_bytes(CHUNK_BYTES):
                            stream.write(chunk)
            except httpx.HTTPError as error:
                raise self._unreachable(error) from None
            got = file_sha256(temporary)
            if got != entry["sha256"]:
                raise ServerError(f"{name}: the downloaded file's SHA-256 is {got}, the server listed "
                                  f"{entry['sha256']}; download it again")
        return target

    def events(self, job_id: str, after: int = -1) -> Iterator[Dict[str, Any]]:
        """The job's events numbered above ``after``, as they come, until the server ends the stream (the job is
        neither queued nor running and every event was sent). A dropped connection is resumed from the last event
        received."""
        reconnects = 0
        while True:
            try:
                with self.http.stream("GET", f"/jobs/{job_id}/events", params={"after": after},
                                      timeout=httpx.Timeout(60.0, read=None)) as response:
                    _raise_for_status(response)
                    for record in _server_sent_events(response.iter_lines()):
                        after = record["n"]
                        reconnects = 0
                        yield record
                return
            except (httpx.TransportError, httpx.RemoteProtocolError) as error:
                reconnects += 1
                if reconnects > RECONNECTS:
                    raise self._unreachable(error) from None
                time.sleep(RECONNECT_WAIT_S)


def _server_sent_events(lines: Iterator[str]) -> Iterator[Dict[str, Any]]:
    data: List[str] = []
    for line in lines:
        if line == "":
            if data:
                yield json.loads("\n".join(data))
                data = []
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    response.read()
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    if not isinstance(detail, str):
        detail = json.dumps(detail) if detail is not None else (response.text[:500] or response.reason_phrase)
    if response.status_code == 401:
        detail += (f" ({TOKEN_REFUSED}: check --token-file or ${TOKEN_ENVIRONMENT}; the token is in "
                   "the server's token file)")
    raise ServerError(detail, response.status_code)


def token_from(token_file: Optional[PathLike]) -> str:
    """The token from ``token_file``, else from ``$SFRSEGMENT_TOKEN`` (never from the command line, where other
    users could read it in the process list)."""
    from ..base.errors import InputError
    from .serve import read_token_file

    if token_file is not None:
        return read_token_file(Path(token_file))
    token = os.environ.get(TOKEN_ENVIRONMENT, "").strip()
    if not token:
        raise InputError(f"a server needs its token: give --token-file FILE (the server's token file, or a copy) or "
                         f"set {TOKEN_ENVIRONMENT}", field="token-file")
    return token
