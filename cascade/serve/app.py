"""The studio's HTTP face: a Starlette app serving one page (plain HTML, CSS and JS from `static/`, nothing
from elsewhere) and a small JSON API.

    GET  /                         the page
    GET  /api/info                 bundle, device, stages and their defaults, limits, eval.md
    POST /api/uploads?name=&kind=  an image (or a drawn mask) as the raw request body -> gallery item
    GET  /api/images               the gallery, newest first
    GET  /api/images/ID.png        one image's PNG with its text chunks (?download=1: as an attachment)
    POST /api/jobs                 a job request (JSON; see `forms`) -> the job and its place in the queue
    GET  /api/jobs?client=         the jobs of one page (all without client)
    GET  /api/jobs/ID              one job: state, place, per-stage progress, its images
    POST /api/jobs/ID/cancel       cancel a queued or running job
    GET  /api/events?client=       Server-Sent Events: that page's jobs on every change; when the stream
                                   closes (the page was closed) its unfinished jobs are cancelled
    POST /api/clients/ID/close     the same, from the page's own `pagehide` beacon

Every error is a JSON `{"error": "one line"}` with a 4xx status (413 too large, 429 the queue is full) (5xx for a bug, whose traceback goes to
the server's log only); nothing a request sends stops the server.
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cascade.errors import UserError
from cascade.serve.jobs import QueueFull
from cascade.serve.studio import Studio

log = logging.getLogger("cascade.serve")

STATIC = Path(__file__).parent / "static"
MAX_JSON_BYTES = 64 * 1024
DRAIN_BYTES = 64 * 2**20  # a refused body is read and dropped up to this size (see _drain)
DRAIN_S = 10.0
KEEPALIVE_S = 15.0
POLL_S = 0.1  # how often an event stream looks at the queue's version (no thread waits per page)


class TooLarge(UserError):
    pass


async def _drain(stream, declared: int | None) -> None:
    """Read and drop the rest of a refused body, at most DRAIN_BYTES for at most DRAIN_S seconds.

    A server that answers 413 and closes with the body still unread makes the kernel reset the connection,
    and the reset can overtake the answer: the client then sees "connection reset" instead of the one-line
    error (1 in 5 requests of 2 MB here). Bodies past the cap are not read; those clients may still lose it.
    """
    if declared is not None and declared > DRAIN_BYTES:
        return

    async def read_rest():
        size = 0
        async for chunk in stream:
            size += len(chunk)
            if size > DRAIN_BYTES:
                return

    try:
        await asyncio.wait_for(read_rest(), DRAIN_S)
    except (asyncio.TimeoutError, ClientDisconnect):
        pass


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes: nothing past it is kept, and the rest is drained
    (up to DRAIN_BYTES) so that the client can read the refusal."""
    declared = request.headers.get("content-length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    stream = request.stream()
    if declared is not None and declared > limit:
        await _drain(stream, declared)
        raise TooLarge(f"the request is {declared / 2**20:.1f} MB; the limit is {limit / 2**20:g} MB")
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await _drain(stream, declared)
            raise TooLarge(f"the request is over the limit of {limit / 2**20:g} MB")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json(request: Request):
    data = await _body(request, MAX_JSON_BYTES)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError("the request body is not JSON") from None


def create_app(studio: Studio) -> Starlette:
    """The app for one started studio (the caller starts and stops its worker)."""

    async def page(request: Request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def info(request: Request):
        return JSONResponse(studio.info())

    async def upload(request: Request):
        data = await _body(request, studio.max_upload_bytes)
        name = request.query_params.get("name", "upload.png")
        kind = request.query_params.get("kind", "image")
        # decoding takes a moment for a large image: off the event loop, so progress keeps streaming
        return JSONResponse(await asyncio.to_thread(studio.upload, data, name, kind), status_code=201)

    async def images(request: Request):
        return JSONResponse({"images": studio.gallery.listing()})

    async def image(request: Request):
        item = studio.gallery.get(request.path_params["id"])
        headers = {"Cache-Control": "private, max-age=3600"}
        if request.query_params.get("download"):
            headers["Content-Disposition"] = f'attachment; filename="{item.name}"'
        return Response(item.png, media_type="image/png", headers=headers)

    async def submit(request: Request):
        body = await _json(request)
        return JSONResponse(await asyncio.to_thread(studio.submit, body), status_code=202)

    async def jobs(request: Request):
        return JSONResponse(studio.queue.snapshot(request.query_params.get("client")))

    async def job(request: Request):
        return JSONResponse(studio.queue.describe(studio.queue.get(request.path_params["id"])))

    async def cancel(request: Request):
        return JSONResponse(studio.queue.describe(studio.queue.cancel(request.path_params["id"])))

    async def close_client(request: Request):
        return JSONResponse({"cancelled": studio.queue.cancel_client(request.path_params["client"])})

    async def events(request: Request):
        client = request.query_params.get("client", "")
        if not client:
            raise UserError("events needs ?client=ID (the page's id)")

        async def stream():
            version, quiet = -1, 0.0
            try:
                while not studio.closing.is_set():
                    if studio.queue.version != version:
                        snapshot = studio.queue.snapshot(client)
                        version, quiet = snapshot["version"], 0.0
                        yield f"data: {json.dumps(snapshot)}\n\n"
                    elif quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield ": keep-alive\n\n"
                    await asyncio.sleep(POLL_S)
                    quiet += POLL_S
            finally:  # the page went away (or the server stops): its queued and running jobs are not wanted
                studio.queue.cancel_client(client)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def user_error(request: Request, err: UserError):
        status = 413 if isinstance(err, TooLarge) else 429 if isinstance(err, QueueFull) else 400
        return JSONResponse({"error": str(err)}, status_code=status)

    async def http_error(request: Request, err: HTTPException):
        return JSONResponse({"error": err.detail}, status_code=err.status_code)

    async def bug(request: Request, err: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({err.__class__.__name__}); the server's log has the details"},
                            status_code=500)

    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/uploads", upload, methods=["POST"]),
        Route("/api/images", images),
        Route("/api/images/{id}.png", image),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs", jobs),
        Route("/api/jobs/{id}", job),
        Route("/api/jobs/{id}/cancel", cancel, methods=["POST"]),
        Route("/api/events", events),
        Route("/api/clients/{client}/close", close_client, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={UserError: user_error, HTTPException: http_error,
                                                        Exception: bug})
