"""The job server's HTTP API (FastAPI). Every request needs ``Authorization: Bearer <token>``.

=======  ===========================================  ===================================================================
method   path (under ``/v1``)                         what it does
=======  ===========================================  ===================================================================
GET      ``/server``                                  the server's version and slots (a client's connection check)
GET      ``/jobs``                                    every job: id, kind, parent, state, exit code, message, events
POST     ``/jobs``                                    ``{"kind": "run"|"predict", "parent": id|null}``: a new job, uploading
GET      ``/jobs/{id}``                               one job, with its place in the queue
PUT      ``/jobs/{id}/inputs?name=N``                 upload file N (raw body, streamed; header ``X-SHA256``)
POST     ``/jobs/{id}/start``                         queue the job with its configuration (see store.JobStore.start)
GET      ``/jobs/{id}/events?after=N``                server-sent events after event N (or ``Last-Event-ID``)
POST     ``/jobs/{id}/cancel``                        cancel a queued or running job
POST     ``/jobs/{id}/resume``                        queue a cancelled, failed or interrupted job again
GET      ``/jobs/{id}/results``                       the result files: name, size, SHA-256
GET      ``/jobs/{id}/results/file?name=N``           download one result file
DELETE   ``/jobs/{id}``                               delete a job that is not queued or running
=======  ===========================================  ===================================================================

Each event is sent as ``id: N``, ``event: progress|log|state`` and ``data:`` the JSON record of ``events.jsonl``; the
stream ends once the job is not queued or running and every event was sent. Errors are JSON ``{"detail": message}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from typing import Any, AsyncIterator, Dict, Optional

from fastapi import Body, FastAPI, Header, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .jobqueue import JobQueue
from .store import JobError, JobState, JobStore

API_VERSION = 1
KEEPALIVE_S = 15.0
EVENT_POLL_S = 0.2


class TokenCheck:
    """ASGI middleware: every HTTP request without the right bearer token gets 401, before any route or body is
    looked at (so an unknown path or a malformed request tells nothing to a client without the token). The token is
    compared in constant time (:func:`hmac.compare_digest`)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = ("a valid token is required: send 'Authorization: Bearer <token>' with the token from the "
                           "server's token file" if given else "no token given: send 'Authorization: Bearer <token>'")
                response = JSONResponse({"detail": message}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(store: JobStore, queue: JobQueue, token: str, version: str = "") -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await queue.start()
        yield
        await queue.shutdown()

    app = FastAPI(title="SFRSegment job server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(TokenCheck, token=token)

    @app.exception_handler(JobError)
    async def job_error(request: Request, error: JobError) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status)

    @app.get("/v1/server")
    async def server() -> Dict[str, Any]:
        return {"api": API_VERSION, "version": version, "slots": len(queue.free_slots) + len(queue.running)}

    @app.get("/v1/jobs")
    async def jobs() -> Dict[str, Any]:
        return {"jobs": [store.describe(job) for job in store.jobs()]}

    @app.post("/v1/jobs", status_code=201)
    async def create(body: Dict[str, Any] = Body(...)) -> Dict[str, Any]:
        job = store.create(str(body.get("kind")), body.get("parent"))
        return store.describe(job)

    @app.get("/v1/jobs/{job_id}")
    async def job(job_id: str) -> Dict[str, Any]:
        folder = store.job(job_id)
        return {**store.describe(folder), "queue_position": queue.position(job_id)}

    @app.put("/v1/jobs/{job_id}/inputs", status_code=201)
    async def upload(job_id: str, name: str, request: Request, x_sha256: str = Header("")) -> Dict[str, Any]:
        folder = store.job(job_id)
        length = request.headers.get("content-length")
        size = int(length) if length and length.isdigit() else None
        return await store.receive_file(folder, name, x_sha256, size, request.stream())

    @app.post("/v1/jobs/{job_id}/start")
    async def start(job_id: str, body: Dict[str, Any] = Body(...)) -> Dict[str, Any]:
        folder = store.job(job_id)
        store.start(folder, body)
        queue.submit(folder)
        return {**store.describe(folder), "events_from": store.journal(folder).count - 1}

    @app.post("/v1/jobs/{job_id}/cancel")
    async def cancel(job_id: str) -> Dict[str, Any]:
        folder = store.job(job_id)
        queue.cancel(folder)
        return store.describe(folder)

    @app.post("/v1/jobs/{job_id}/resume")
    async def resume(job_id: str) -> Dict[str, Any]:
        folder = store.job(job_id)
        store.resume(folder)
        queue.submit(folder)
        return {**store.describe(folder), "events_from": store.journal(folder).count - 1}

    @app.delete("/v1/jobs/{job_id}")
    async def delete(job_id: str) -> Dict[str, Any]:
        folder = store.job(job_id)
        store.delete(folder)
        return {"id": job_id, "deleted": True}

    @app.get("/v1/jobs/{job_id}/results")
    async def results(job_id: str) -> Dict[str, Any]:
        folder = store.job(job_id)
        return {"id": job_id, "state": folder.state.value, "files": store.results(folder)}

    @app.get("/v1/jobs/{job_id}/results/file")
    async def result_file(job_id: str, name: str) -> FileResponse:
        return FileResponse(store.result_file(store.job(job_id), name))

    @app.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, after: Optional[int] = None,
                     last_event_id: Optional[str] = Header(None)) -> StreamingResponse:
        folder = store.job(job_id)
        if after is None:
            after = int(last_event_id) if last_event_id and last_event_id.lstrip("-").isdigit() else -1
        return StreamingResponse(_event_stream(store, folder, after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _event_stream(store: JobStore, job, after: int) -> AsyncIterator[bytes]:
    """The job's events numbered above ``after``, then each new one as it comes, until the job is neither queued nor
    running and every event was sent."""
    waited = 0.0
    pending = b""
    with open(job.events, "rb") as stream:
        while True:
            try:
                active = JobState(job.read_state()["state"]) in (JobState.QUEUED, JobState.RUNNING)
            except FileNotFoundError:  # deleted meanwhile
                return
            data = stream.read()
            if data:
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    record = json.loads(line)
                    if record["n"] > after:
                        yield (f"id: {record['n']}\nevent: {record['kind']}\n"
                               f"data: {json.dumps(record, ensure_ascii=False)}\n\n").encode("utf-8")
                waited = 0.0
                continue
            if not active:
                return
            await asyncio.sleep(EVENT_POLL_S)
            waited += EVENT_POLL_S
            if waited >= KEEPALIVE_S:
                waited = 0.0
                yield b": keep-alive\n\n"
