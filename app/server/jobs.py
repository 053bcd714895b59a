"""One engine, one job at a time: a FIFO worker thread that feeds each job's own asyncio queue.

Why this shape: today's engine (one KV cache, one sequence) serves one request at a time, so requests
take turns in arrival order. The worker pushes a job's chunks into that job's queue as fast as the
engine makes them, so a slow reader delays only itself: its turn ends when its generation ends, not
when it has read everything. Continuous batching will replace `JobQueue` behind the same surface:
`stream(kind, start)` -> JobStream, `run(kind, fn)`, `cancel(job)`, `finished`, `shutdown()`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.engine.types import Chunk

log = logging.getLogger(__name__)
T = TypeVar("T")
_END = object()


@dataclass
class Job:
    """What the server knows about one request's turn on the engine (also kept after it ends)."""

    id: int
    kind: str
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    ended_at: float | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"; None until it ends
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)


class JobStream:
    """Async access to one streaming job's chunks; exceptions from the engine re-raise here."""

    def __init__(self, job: Job, queue: asyncio.Queue, owner: JobQueue) -> None:
        self.job = job
        self._queue = queue
        self._owner = owner
        self._done = False

    async def next(self) -> Chunk | None:
        """The next chunk, or None once the job has ended."""
        if self._done:
            return None
        item = await self._queue.get()
        if item is _END:
            self._done = True
            return None
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def cancel(self) -> None:
        self._owner.cancel(self.job)


class JobQueue:
    """FIFO of engine jobs run one at a time on a single worker thread.

    `interrupt` stops whatever the engine is generating (Engine.cancel); it is only ever called while
    the job it should stop is the one running, so cancelling a queued job never hits another one.
    """

    def __init__(self, interrupt: Callable[[], None], history: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kestrel-engine")
        self._interrupt = interrupt
        self._guard = threading.Lock()
        self._running: Job | None = None
        self._ids = itertools.count(1)
        self._waiting = 0
        self.finished: deque[Job] = deque(maxlen=history)

    # --- what the server calls -----------------------------------------------------------------

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def running(self) -> Job | None:
        return self._running

    def stream(self, kind: str, start: Callable[[], Iterator[Chunk]]) -> JobStream:
        """Queue a generation; `start` runs in the job's turn on the worker and returns its chunks."""
        job = Job(next(self._ids), kind)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop closed (server shutting down): nobody is reading
                pass

        self._waiting += 1
        self._pool.submit(self._pump, job, start, put)
        return JobStream(job, queue, self)

    async def run(self, kind: str, fn: Callable[[], T]) -> T:
        """Run a blocking call (model load/unload) in its turn, so it never overlaps a generation."""
        job = Job(next(self._ids), kind)
        self._waiting += 1
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, job, fn)

    def cancel(self, job: Job) -> None:
        """Stop `job`: a queued one is skipped when its turn comes, a running one stops within one
        decode step; a finished one is left alone. Safe from any thread."""
        job.cancel_requested.set()
        with self._guard:
            if self._running is job:
                self._interrupt()

    def shutdown(self) -> None:
        with self._guard:
            if self._running is not None:
                self._running.cancel_requested.set()
                self._interrupt()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- worker thread -------------------------------------------------------------------------

    def _begin(self, job: Job) -> bool:
        self._waiting -= 1
        with self._guard:
            if job.cancel_requested.is_set():
                job.finish_reason = "cancelled"
                job.ended_at = time.monotonic()
                self.finished.append(job)
                return False
            job.started_at = time.monotonic()
            self._running = job
            return True

    def _end(self, job: Job) -> None:
        with self._guard:
            self._running = None
        job.ended_at = time.monotonic()
        self.finished.append(job)

    def _pump(self, job: Job, start: Callable[[], Iterator[Chunk]], put: Callable[[object], None]) -> None:
        if not self._begin(job):
            put(_END)
            return
        try:
            for chunk in start():
                job.prompt_tokens = chunk.prompt_tokens
                job.generated_tokens = chunk.generated_tokens
                if chunk.finish_reason:
                    job.finish_reason = chunk.finish_reason
                put(chunk)
                if job.cancel_requested.is_set():
                    self._interrupt()  # a cancel that raced the engine's own start-of-run reset
        except BaseException as e:  # noqa: BLE001 - handed to the request that owns the job
            job.finish_reason = "error"
            if not isinstance(e, Exception):
                log.warning("job %s ended by %s", job.id, type(e).__name__)
            put(e)
        finally:
            self._end(job)
            put(_END)

    def _call(self, job: Job, fn: Callable[[], Any]) -> Any:
        if not self._begin(job):
            raise asyncio.CancelledError()
        try:
            result = fn()
            job.finish_reason = "stop"
            return result
        except BaseException:
            job.finish_reason = "error"
            raise
        finally:
            self._end(job)
