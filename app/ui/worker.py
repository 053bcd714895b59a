"""The engine runs off the GUI thread. THE one pattern used for it, everywhere in the app:

    EngineClient (GUI thread)  --queued signals-->  EngineWorker (QObject living on one QThread)
                               <--queued signals--

* One long-lived QThread ("kestrel-engine") owns the Engine. Every engine call (load, generate,
  count tokens, unload) is a slot of `EngineWorker`, invoked by emitting a request signal from the
  GUI thread, so calls run one after another on that thread and the engine needs no locking.
* `generate` iterates `engine.stream_chat(...)` and emits one `chunk` signal per engine chunk
  (cheap: queued into the GUI event loop). The GUI buffers the text and re-renders on a throttled
  timer, so a fast model can never flood the event loop with layout work.
* Stop: `EngineClient.cancel()` runs on the GUI thread; it marks the job cancelled and calls
  `engine.cancel()` (thread-safe, effective within one decode step). The worker also checks the
  mark between chunks, which covers a cancel that arrives before the engine's stream has started.
* Torch and the engine are imported on the worker thread at the first load, so the window opens
  without them.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal, Slot

from app.engine.types import Chunk, GenerationSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorReport:
    """What a dialog shows: a title, what happened, what to do."""

    kind: str      # "format" | "memory" | "tokenizer" | "generation" | "error" | "internal"
    title: str
    text: str
    hint: str


def describe_error(exc: BaseException, action: str) -> ErrorReport:
    """Turn an exception from the engine into words for a dialog. `action` is e.g. "load the model"."""
    from app.engine import errors

    if _is_out_of_memory(exc) and not isinstance(exc, errors.KestrelError):
        return ErrorReport("memory", "Out of GPU memory",
                           f"The GPU ran out of memory while trying to {action}.",
                           "Use a smaller context, a lower-bpw model or a Q4 cache, or close other GPU programs.")
    if isinstance(exc, errors.KestrelError):
        text = str(exc)
        hint = exc.hint or ""
        if hint and text.endswith(hint):
            text = text[: -len(hint)].rstrip()
        if isinstance(exc, errors.OutOfMemoryError):
            return ErrorReport("memory", "Out of GPU memory", _sentence(text),
                               hint or "Use a smaller context or a lower-bpw model.")
        if isinstance(exc, errors.ModelFormatError):
            return ErrorReport("format", "This model cannot be loaded", _sentence(text),
                               hint or "Download the model again, or pick another folder.")
        if isinstance(exc, errors.TokenizerError):
            return ErrorReport("tokenizer", "The model's tokenizer is broken", _sentence(text),
                               hint or "Download the model again, or pick another folder.")
        if isinstance(exc, errors.ContextFullError):
            return ErrorReport("context", "This chat is full", _sentence(text), hint)
        if isinstance(exc, errors.GenerationError):
            return ErrorReport("generation", "The reply could not be generated", _sentence(text), hint)
        return ErrorReport("error", f"Could not {action}", _sentence(text), hint)
    log.error("unexpected error while trying to %s", action, exc_info=exc)
    return ErrorReport("internal", f"Could not {action}",
                       f"An unexpected error happened: {type(exc).__name__}: {exc}",
                       "This is a bug in Kestrel. The app is still usable; details are in the log.")


def _sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] if text else text


def _is_out_of_memory(exc: BaseException) -> bool:
    return any(t.__name__ == "OutOfMemoryError" for t in type(exc).__mro__) or "out of memory" in str(exc).lower()


@dataclass(frozen=True)
class LoadRequest:
    path: str
    device: str = "auto"
    max_seq_len: int | None = None
    cache_mode: str = "fp16"
    rope_scale: float | None = None
    rope_alpha: float | None = None
    draft: str | None = None  # speculative decoding: draft model folder
    speculative: str | None = None  # "ngram" for prompt lookup (no draft model); None: the draft if any


class EngineWorker(QObject):
    """Owns the Engine; every slot runs on the engine thread (see module docstring)."""

    progress = Signal(float, str)
    loaded = Signal(object)             # ModelInfo
    load_failed = Signal(object)        # ErrorReport
    unloaded = Signal()
    chunk = Signal(int, object)         # job id, Chunk (text so far is the GUI's business)
    finished = Signal(int, object)      # job id, last Chunk (finish_reason set)
    failed = Signal(int, object)        # job id, ErrorReport
    counted = Signal(int, int)          # request id, prompt tokens

    def __init__(self) -> None:
        super().__init__()
        self.engine: Any = None
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        # Held for every generation on `engine`: the app's local server (app.server.shared) takes
        # the same lock, so the GUI and the server never generate on the one cache at once.
        self.generation_lock = threading.Lock()
        self._running: int | None = None

    # --- called from the GUI thread ------------------------------------------------------------

    def cancel(self, job: int) -> None:
        with self._lock:
            self._cancelled.add(job)
            running = self._running == job
        engine = self.engine
        if engine is not None and running:   # not while waiting for the lock: that is a server job
            engine.cancel()

    def _is_cancelled(self, job: int) -> bool:
        with self._lock:
            return job in self._cancelled

    # --- slots (engine thread) -----------------------------------------------------------------

    @Slot(object)
    def load(self, request: LoadRequest) -> None:
        try:
            if self.engine is not None:
                self._drop_engine()
            from app.engine.session import Engine  # torch is imported here, on this thread

            self.engine = Engine.load(request.path, request.device, max_seq_len=request.max_seq_len,
                                      cache_mode=request.cache_mode, rope_scale=request.rope_scale,
                                      rope_alpha=request.rope_alpha,
                                      progress=lambda f, m: self.progress.emit(float(f), str(m)),
                                      draft=request.draft, speculative=request.speculative)
        except Exception as e:  # noqa: BLE001 - every failure becomes a dialog; the app goes on
            self.engine = None
            self.load_failed.emit(describe_error(e, "load the model"))
            return
        self.loaded.emit(self.engine.info)

    @Slot()
    def unload(self) -> None:
        self._drop_engine()
        self.unloaded.emit()

    def _drop_engine(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                engine.cancel()                 # a local server's reply on it ends within one step
                with self.generation_lock:
                    engine.unload()
            except Exception:  # noqa: BLE001 - unloading must not fail the app
                log.exception("unloading the model failed")

    @Slot(int, list, object)
    def generate(self, job: int, messages: list[dict], settings: GenerationSettings) -> None:
        if self.engine is None:
            self.failed.emit(job, ErrorReport("generation", "No model loaded", "Load a model first.",
                                              "Open the model panel on the right and pick a model folder."))
            return
        last: Chunk | None = None
        t0 = time.perf_counter()
        try:
            with self.generation_lock:
                with self._lock:
                    self._running = job
                try:
                    if not self._is_cancelled(job):
                        stream = self.engine.stream_chat(messages, settings)
                        try:
                            for chunk in stream:
                                last = chunk
                                self.chunk.emit(job, chunk)
                                if self._is_cancelled(job) and chunk.finish_reason is None:
                                    self.engine.cancel()
                        finally:
                            stream.close()
                finally:
                    with self._lock:
                        self._running = None
        except Exception as e:  # noqa: BLE001 - OOM mid-reply etc.: report, keep the partial reply
            self.failed.emit(job, describe_error(e, "generate a reply"))
            return
        finally:
            with self._lock:
                self._cancelled.discard(job)
        if last is None:
            last = Chunk("", [], 0, 0, 0.0, time.perf_counter() - t0, "cancelled")
        elif last.finish_reason is None:
            last = replace(last, text="", token_ids=[], finish_reason="cancelled")
        self.finished.emit(job, last)

    @Slot(int, list)
    def count(self, request: int, messages: list[dict]) -> None:
        if self.engine is None:
            return
        try:
            self.counted.emit(request, int(self.engine.count_chat_tokens(messages)))
        except Exception:  # noqa: BLE001 - a count is informational only
            log.exception("counting prompt tokens failed")


class EngineClient(QObject):
    """GUI-thread handle on the engine thread. Emit-to-call; results arrive as `worker` signals."""

    _load = Signal(object)
    _generate = Signal(int, list, object)
    _count = Signal(int, list)
    _unload = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        # The engine thread holds the GIL between torch ops (sampling, detokenising). With Python's
        # default 5 ms switch interval the GUI thread can wait several slices per re-render; 1 ms
        # keeps event-loop stalls short at a negligible cost to generation speed.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        self.thread = QThread()
        self.thread.setObjectName("kestrel-engine")
        self.worker = EngineWorker()
        self.worker.moveToThread(self.thread)
        self._load.connect(self.worker.load)
        self._generate.connect(self.worker.generate)
        self._count.connect(self.worker.count)
        self._unload.connect(self.worker.unload)
        self._jobs = itertools.count(1)
        self.thread.start()

    def load(self, request: LoadRequest) -> None:
        self._load.emit(request)

    def unload(self) -> None:
        self._unload.emit()

    def generate(self, messages: list[dict], settings: GenerationSettings) -> int:
        job = next(self._jobs)
        self._generate.emit(job, messages, settings)
        return job

    def count_tokens(self, messages: list[dict]) -> int:
        request = next(self._jobs)
        self._count.emit(request, messages)
        return request

    def cancel(self, job: int) -> None:
        self.worker.cancel(job)

    def shutdown(self, timeout_ms: int = 10000) -> None:
        """Stop any reply, end the engine thread and free the model. Called when the window closes."""
        engine = self.worker.engine
        if engine is not None:
            engine.cancel()
        self.thread.quit()
        if self.thread.wait(timeout_ms):
            self.worker._drop_engine()   # the thread has ended, so touching the engine here is safe
