"""Server-side bookkeeping of engine jobs, each feeding its own asyncio queue.

`BatchQueue` (what the server uses): every generation goes to the engine's continuous-batching
scheduler at once and runs alongside the others; requests the scheduler cannot run go to
`SingleJob`, one at a time on the Generator, behind the same handle. Chunks are pushed into each
job's queue as fast as the engine makes them, so a slow reader delays only itself. Surface: `stream(kind, start)` -> JobStream,
`run(kind, fn)`, `cancel(job)`, `finished`, `shutdown()`.
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

from app.engine.batching import END
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

    def __init__(self, job: Job, queue: asyncio.Queue, owner: BatchQueue) -> None:
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


class BatchQueue:
    """Generation jobs for the engine's continuous-batching scheduler: they all run at once.

    One queue for every generation: `stream(kind, submit)` takes a function that submits the
    job to the scheduler with an `emit` callback and returns it (Engine.submit_chat / submit_text).
    The scheduler's thread calls `emit`, which only hands items to the event loop, so a slow reader
    never holds up the engine. Load and unload (`run`) take turns on a worker of their own; unloading
    lets running generations finish first (Engine.unload closes the scheduler).
    """

    def __init__(self, history: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kestrel-model")
        self._guard = threading.Lock()
        self._ids = itertools.count(1)
        self._live: dict[int, tuple[Job, Any]] = {}  # job id -> (record, scheduler job)
        self.finished: deque[Job] = deque(maxlen=history)

    @property
    def waiting(self) -> int:
        """Jobs not admitted yet (the paged cache or the batch is full)."""
        with self._guard:
            return sum(1 for _, handle in self._live.values() if getattr(handle, "started_at", None) is None)

    @property
    def running(self) -> Job | None:
        """One running job (None when idle)."""
        with self._guard:
            return next((job for job, _ in self._live.values()), None)

    @property
    def live(self) -> int:
        with self._guard:
            return len(self._live)

    def stream(self, kind: str, submit: Callable[[Callable[[object], None]], Any]) -> JobStream:
        """Submit a generation now; engine errors in the request (bad settings, prompt too long)
        raise here, before any response has begun."""
        job = Job(next(self._ids), kind)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the event loop closed (server shutting down): nobody is reading
                pass

        def emit(item: object) -> None:  # on the scheduler's thread
            if isinstance(item, Chunk):
                job.prompt_tokens = item.prompt_tokens
                job.generated_tokens = item.generated_tokens
                if item.finish_reason:
                    job.finish_reason = item.finish_reason
            elif isinstance(item, BaseException):
                job.finish_reason = "error"
            elif item is END:
                with self._guard:  # also waits for `stream` to have stored the handle
                    _, handle = self._live.pop(job.id, (job, None))
                    job.started_at = getattr(handle, "started_at", None) or job.queued_at
                    job.ended_at = time.monotonic()
                    job.finish_reason = job.finish_reason or getattr(handle, "finish_reason", None)
                    self.finished.append(job)
                item = _END
            put(item)

        with self._guard:
            handle = submit(emit)
            self._live[job.id] = (job, handle)
        return JobStream(job, out, self)  # type: ignore[arg-type]

    async def run(self, kind: str, fn: Callable[[], T]) -> T:
        """Run a blocking call (model load/unload) off the event loop, one at a time."""
        job = Job(next(self._ids), kind, started_at=time.monotonic())
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, fn)
            job.finish_reason = "stop"
            return result
        except BaseException:
            job.finish_reason = "error"
            raise
        finally:
            job.ended_at = time.monotonic()
            self.finished.append(job)

    def cancel(self, job: Job) -> None:
        """Stop `job` within one decode step (a finished one is left alone). Safe from any thread."""
        job.cancel_requested.set()
        with self._guard:
            entry = self._live.get(job.id)
        if entry is not None:
            entry[1].cancel()

    def shutdown(self) -> None:
        with self._guard:
            handles = [handle for _, handle in self._live.values()]
        for handle in handles:
            handle.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def batchable(settings: Any) -> bool:
    """Whether the batching scheduler can run a request: it has no per-row grammar, logprobs or
    adapters yet, so requests using them run one at a time on the engine's Generator instead."""
    return not (getattr(settings, "loras", None) or getattr(settings, "json_schema", None)
                or getattr(settings, "regex", None) or getattr(settings, "json_object", False)
                or getattr(settings, "logprobs", None) is not None)


class SingleJob:
    """A request on the single-sequence Generator, behind the same handle and `emit` protocol as a
    scheduler job (Chunk..., then END; an exception instead of chunks on failure). Such requests take
    turns on the Generator's own lock; cancel stops this one within one decode step."""

    _turn = threading.Lock()  # so cancel() only ever stops the request it belongs to

    def __init__(self, generator: Any) -> None:
        self.generator = generator
        self.started_at: float | None = None
        self.finish_reason: str | None = None
        self._cancelled = threading.Event()
        self._running = False

    @classmethod
    def start(cls, chunks: Callable[[], Iterator[Chunk]], emit: Callable[[object], None], generator: Any) -> SingleJob:
        job = cls(generator)
        threading.Thread(target=job._run, args=(chunks, emit), name="kestrel-single", daemon=True).start()
        return job

    def _run(self, chunks: Callable[[], Iterator[Chunk]], emit: Callable[[object], None]) -> None:
        try:
            with SingleJob._turn:
                if self._cancelled.is_set():
                    self.finish_reason = "cancelled"
                    return
                self.started_at = time.monotonic()
                self._running = True
                try:
                    for chunk in chunks():
                        if chunk.finish_reason:
                            self.finish_reason = chunk.finish_reason
                        emit(chunk)
                        if self._cancelled.is_set():
                            self.generator.cancel()
                finally:
                    self._running = False
        except BaseException as e:  # noqa: BLE001 - handed to the request, which answers in OpenAI's shape
            emit(e)
        finally:
            emit(END)

    def cancel(self) -> None:
        self._cancelled.set()
        if self._running:
            self.generator.cancel()
