"""One job at a time: a first-in first-out queue and the one worker thread that runs it.

The CPU (or the one GPU) is the limit, so jobs never run side by side: the others wait with their place
shown. A job's `work(progress)` is the pipeline call; `progress(stage, done, total)` records the step
counts for the page and raises `JobCancelled` once the job is cancelled, which is how a running job stops
between two sampling steps. Nothing here knows about HTTP or about the model.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from cascade.errors import UserError

log = logging.getLogger("cascade.serve")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
KEEP_FINISHED = 200  # finished jobs remembered for the page; older ones are forgotten


class JobCancelled(Exception):
    """Raised from the progress callback inside the pipeline when the job has been cancelled."""


class QueueFull(UserError):
    pass


@dataclass
class Job:
    kind: str
    client: str  # the page that asked; closing it cancels its jobs
    stages: list[str]  # the stages it runs, in order: one progress bar each
    work: Callable[[Callable[[str, int, int], None]], dict[str, Any]]  # work(progress) -> result fields
    request: dict[str, str] = field(default_factory=dict)  # what was asked, as shown on the page
    id: str = ""
    state: str = QUEUED
    progress: dict[str, list[int]] = field(default_factory=dict)  # stage -> [done, total]
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False


class JobQueue:
    """Jobs in submission order; `start()` runs them one by one on a daemon thread."""

    def __init__(self, max_queued: int = 16):
        self.max_queued = max_queued
        self.version = 0  # bumped on every change, so a watcher knows when to send a new snapshot
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self._running: Job | None = None
        self._stopped = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ asking
    def submit(self, job: Job) -> Job:
        with self._lock:
            if len(self._waiting) >= self.max_queued:
                raise QueueFull(f"the queue is full ({self.max_queued} jobs waiting); wait for one to finish "
                                "or cancel one")
            job.id = f"job{next(self._ids)}"
            job.progress = {name: [0, 0] for name in job.stages}
            self._jobs[job.id] = job
            self._waiting.append(job)
            self._changed()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise UserError(f"no job '{job_id}' (finished jobs are forgotten after {KEEP_FINISHED} more)")
            return self._jobs[job_id]

    def cancel(self, job_id: str) -> Job:
        """A queued job leaves the queue now; a running one stops at its next sampling step."""
        with self._lock:
            job = self.get(job_id)
            if job.state == QUEUED:
                self._waiting.remove(job)
                job.state = CANCELLED
            elif job.state == RUNNING:
                job.cancel_requested = True
            self._changed()
            return job

    def cancel_client(self, client: str) -> int:
        """Cancel every unfinished job of one page (it was closed); returns how many."""
        with self._lock:
            ids = [j.id for j in self._jobs.values() if j.client == client and j.state not in FINISHED]
            for job_id in ids:
                self.cancel(job_id)
            return len(ids)

    # ------------------------------------------------------------------ what the page shows
    def position(self, job: Job) -> int:
        """1 for the next job to run, 2 for the one after it, ...; 0 for a job that is not waiting."""
        with self._lock:
            return self._waiting.index(job) + 1 if job.state == QUEUED else 0

    def describe(self, job: Job) -> dict[str, Any]:
        with self._lock:
            return {"id": job.id, "kind": job.kind, "state": job.state, "position": self.position(job),
                    "stages": list(job.stages), "progress": {k: list(v) for k, v in job.progress.items()},
                    "request": dict(job.request), "error": job.error, **job.result}

    def snapshot(self, client: str | None = None) -> dict[str, Any]:
        """The jobs of `client` (all when None), oldest first, and the queue's length."""
        with self._lock:
            jobs = [self.describe(j) for j in self._jobs.values() if client is None or j.client == client]
            return {"version": self.version, "jobs": jobs, "waiting": len(self._waiting),
                    "running": self._running.id if self._running else None}

    # ------------------------------------------------------------------ the worker
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="cascade-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and let the worker finish (a running job stops at its next step)."""
        with self._lock:
            self._stopped = True
            for job in list(self._waiting) + ([self._running] if self._running else []):
                self.cancel(job.id)
            self._changed()
        if self._thread is not None:
            self._thread.join(timeout)

    def _changed(self) -> None:  # with the lock held
        self.version += 1
        self._lock.notify_all()

    def _next(self) -> Job | None:
        with self._lock:
            self._lock.wait_for(lambda: self._waiting or self._stopped)
            if self._stopped:
                return None
            job = self._running = self._waiting.popleft()
            job.state = RUNNING
            self._changed()
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            self._run(job)

    def _run(self, job: Job) -> None:
        def progress(stage: str, done: int, total: int) -> None:
            if job.cancel_requested:
                raise JobCancelled
            with self._lock:
                job.progress[stage] = [done, total]
                self._changed()

        state, result, error = DONE, {}, None
        try:
            result = job.work(progress)
        except JobCancelled:
            state = CANCELLED
        except UserError as err:
            state, error = FAILED, str(err)
        except Exception as err:  # the server keeps running; the page gets one line, the log the traceback
            log.exception("job %s (%s) failed", job.id, job.kind)
            first_line = (str(err).splitlines() or [""])[0]
            state, error = FAILED, f"the job failed: {err.__class__.__name__}: {first_line}"
        with self._lock:
            job.state, job.result, job.error = state, result if state == DONE else {}, error
            self._running = None
            self._forget_old()
            self._changed()

    def _forget_old(self) -> None:  # with the lock held
        finished = [j.id for j in self._jobs.values() if j.state in FINISHED]
        for job_id in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job_id]
