"""The app's loaded Engine lent to its local server ("Local server" switch in the GUI).

Why a proxy and not the Engine itself: the GUI's engine thread and the server's job queue both
generate, and one Engine has one KV cache, so the two must take turns. Every generation through
this proxy holds `lock` (the GUI worker holds the same lock for its own replies), `cancel` only
reaches the engine while the server's own generation holds it (so stopping a server job never stops
the GUI's reply), and the engine is looked up per call, so a model loaded or unloaded in the app is
what the server serves next. Loading and unloading stay the app's business.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from app.engine.types import Chunk, GenerationSettings

from .config import ApiError


def _not_loaded() -> ApiError:
    return ApiError("no model is loaded in the Kestrel app; load one there first", status=503,
                    type="server_error", code="model_not_loaded")


class SharedEngine:
    def __init__(self, current: Callable[[], Any], lock: threading.Lock) -> None:
        self._current = current
        self._lock = lock
        self._holding = False

    @property
    def model(self) -> Any:
        engine = self._current()
        return engine.model if engine is not None else None

    def __getattr__(self, name: str) -> Any:  # info, tokenizer, template, count_chat_tokens ...
        engine = self._current()
        if engine is None or engine.model is None:
            raise _not_loaded()
        return getattr(engine, name)

    def _locked(self, start: Callable[[Any], Iterator[Chunk]]) -> Iterator[Chunk]:
        with self._lock:
            self._holding = True
            try:
                engine = self._current()
                if engine is None or engine.model is None:
                    raise _not_loaded()
                yield from start(engine)
            finally:
                self._holding = False

    def stream_chat(self, messages: list[dict], settings: GenerationSettings | None = None,
                    tools: list[dict] | None = None) -> Iterator[Chunk]:
        return self._locked(lambda e: e.stream_chat(messages, settings, tools=tools))

    # The server submits plain requests to the batching scheduler; here they take turns with the
    # GUI on the engine's one cache instead, behind the same job handle.
    def submit_chat(self, messages: list[dict], settings: GenerationSettings | None,
                    emit: Callable[[object], None]) -> Any:
        from .jobs import SingleJob

        return SingleJob.start(lambda: self.stream_chat(messages, settings), emit, self)

    def submit_text(self, prompt: str | list[int], settings: GenerationSettings | None,
                    emit: Callable[[object], None]) -> Any:
        from .jobs import SingleJob

        if isinstance(prompt, str):
            return SingleJob.start(lambda: self.stream_text(prompt, settings), emit, self)
        return SingleJob.start(lambda: self.generator.stream(prompt, settings), emit, self)

    def stream_text(self, prompt: str, settings: GenerationSettings | None = None) -> Iterator[Chunk]:
        return self._locked(lambda e: e.stream_text(prompt, settings))

    @property
    def generator(self) -> _SharedGenerator:
        return _SharedGenerator(self)

    def cancel(self) -> None:
        engine = self._current()
        if self._holding and engine is not None:
            engine.cancel()

    def unload(self) -> None:
        raise ApiError("this model belongs to the Kestrel app; unload it there", status=403,
                       code="owned_by_app")


class _SharedGenerator:
    """`engine.generator.stream(ids, settings)` (token-id prompts) under the same lock."""

    def __init__(self, shared: SharedEngine) -> None:
        self._shared = shared

    def stream(self, ids: list[int], settings: GenerationSettings | None = None) -> Iterator[Chunk]:
        return self._shared._locked(lambda e: e.generator.stream(ids, settings))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._shared.__getattr__("generator"), name)
