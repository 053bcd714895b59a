"""A pure-ASGI wrapper that reports every HTTP request once it has been answered (method, path,
status, duration), for the app's live request log. Streams are timed to their last byte."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Message, Receive, Scope, Send


@dataclass(frozen=True)
class LogEntry:
    method: str
    path: str
    status: int            # 0: the client left before any answer
    duration_ms: float
    at: float = field(default_factory=time.time)


class RequestLog:
    def __init__(self, app: Any, on_entry: Callable[[LogEntry], None]) -> None:
        self.app = app
        self.on_entry = on_entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.on_entry(LogEntry(scope.get("method", "?"), scope.get("path", "?"), status,
                                   (time.perf_counter() - started) * 1000))
