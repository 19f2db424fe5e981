"""A studio served on a free loopback port in a thread, and a small HTTP client for the serve tests (it holds
no tests)."""
from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

from PIL import Image


@contextmanager
def running(studio):
    """Serve `studio` (started here, stopped after) on 127.0.0.1 at a free port; yields the base URL."""
    from cascade.serve import _listen, server
    from cascade.serve.app import create_app

    sock = _listen("127.0.0.1", 0)
    studio.start()
    srv = server(create_app(studio))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        studio.closing.set()
        srv.should_exit = True
        studio.stop()
        thread.join(10)
        sock.close()


def call(url: str, *, body: bytes | dict | None = None, method: str | None = None,
         content_type: str = "application/json", timeout: float = 30) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; a dict body is sent as JSON."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def call_json(url: str, **kwargs) -> tuple[int, dict]:
    status, _, data = call(url, **kwargs)
    return status, json.loads(data)


def wait_for_job(base: str, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 60) -> dict:
    """Poll GET /api/jobs/ID until the job is in one of `states`."""
    deadline = time.monotonic() + timeout
    while True:
        status, job = call_json(f"{base}/api/jobs/{job_id}")
        assert status == 200, job
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']} after {timeout} s"
        time.sleep(0.05)


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def open_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
