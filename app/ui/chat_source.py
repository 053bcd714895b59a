"""Where a chat reply comes from: the local Engine, or a model on a remote endpoint.

The seam is small on purpose. A *source* has `generate(messages, settings) -> job` and
`cancel(job)`, and reports through three signals with the EngineWorker's signatures:
`chunk(job, Chunk)`, `finished(job, last Chunk)`, `failed(job, ErrorReport)`. The main window
connects both sources to the same slots, so streaming, stop, regenerate and the history store work
the same for either. Local job ids count up from 1; remote ones count down from -1, so a late
signal of one can never be taken for the other's.

Remote work runs on plain Python threads (one per reply or model listing: network waits, no GIL
held); signals emitted there are queued into the GUI thread.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

from PySide6.QtCore import QObject, Signal

from app.engine.types import Chunk, GenerationSettings

from .worker import ErrorReport, describe_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatTarget:
    """What the model picker selected: a local model (endpoint_id None) or `model` on an endpoint."""

    endpoint_id: int | None = None
    model: str = ""
    endpoint_name: str = ""

    @property
    def remote(self) -> bool:
        return self.endpoint_id is not None

    @property
    def label(self) -> str:
        return f"{self.model} · {self.endpoint_name}" if self.remote else "Local model"


LOCAL = ChatTarget()


def describe_remote(exc: BaseException, action: str) -> ErrorReport:
    """Words for a dialog; remote errors carry their own title."""
    from app.remote.errors import RemoteError

    report = describe_error(exc, action)
    if isinstance(exc, RemoteError):
        return replace(report, kind="remote", title=exc.title)
    return report


def make_client(endpoint: Any) -> Any:
    """A RemoteClient for a store Endpoint, with its key from the keyring."""
    from app.remote import RemoteClient, get_endpoint_key

    return RemoteClient(endpoint.base_url, get_endpoint_key(endpoint.id), name=endpoint.name)


class RemoteChats(QObject):
    """Remote replies and model listings, off the GUI thread (see module docstring)."""

    chunk = Signal(int, object)          # job id, Chunk
    finished = Signal(int, object)       # job id, last Chunk
    failed = Signal(int, object)         # job id, ErrorReport
    models_listed = Signal(int, object, object)   # endpoint id, [model ids] | None, ErrorReport | None

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._jobs = itertools.count(-1, -1)
        self._streams: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name="kestrel-remote", daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    # --- model lists ---------------------------------------------------------------------------

    def list_models(self, endpoint: Any) -> None:
        self._spawn(self._list, endpoint)

    def _list(self, endpoint: Any) -> None:
        try:
            with make_client(endpoint) as client:
                models = [m.id for m in client.list_models()]
        except Exception as e:  # noqa: BLE001 - every failure becomes words beside the endpoint
            self.models_listed.emit(endpoint.id, None, describe_remote(e, f"list the models of {endpoint.name}"))
            return
        self.models_listed.emit(endpoint.id, models, None)

    # --- replies -------------------------------------------------------------------------------

    def generate(self, endpoint: Any, model: str, messages: list[dict], settings: GenerationSettings) -> int:
        job = next(self._jobs)
        with self._lock:
            self._streams[job] = None
        self._spawn(self._run, job, endpoint, model, messages, settings)
        return job

    def cancel(self, job: int) -> None:
        with self._lock:
            stream = self._streams.get(job)
            if job in self._streams and stream is None:
                self._streams[job] = "cancelled"   # before the request went out: never send it
                return
        if stream is not None and stream != "cancelled":
            stream.cancel()

    def _run(self, job: int, endpoint: Any, model: str, messages: list[dict], settings: GenerationSettings) -> None:
        t0 = time.perf_counter()
        last: Chunk | None = None
        try:
            with make_client(endpoint) as client:
                stream = client.chat(model, messages, settings)
                with self._lock:
                    if self._streams.get(job) == "cancelled":
                        stream.cancel()
                    self._streams[job] = stream
                for chunk in stream:
                    last = chunk
                    self.chunk.emit(job, chunk)
        except Exception as e:  # noqa: BLE001 - unreachable, 401, model gone...: words; the chat goes on
            self.failed.emit(job, describe_remote(e, f"get a reply from {endpoint.name}"))
            return
        finally:
            with self._lock:
                self._streams.pop(job, None)
        if last is None or last.finish_reason is None:
            last = Chunk("", [], 0, 0, 0.0, time.perf_counter() - t0, "cancelled")
        self.finished.emit(job, last)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop every remote reply and wait briefly for their threads (they are daemons anyway)."""
        with self._lock:
            streams = list(self._streams.items())
        for job, _ in streams:
            self.cancel(job)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class RemoteSource:
    """RemoteChats bound to one endpoint and model: the `generate`/`cancel` half of the seam."""

    def __init__(self, chats: RemoteChats, endpoint: Any, model: str) -> None:
        self.chats = chats
        self.endpoint = endpoint
        self.model = model

    def generate(self, messages: list[dict], settings: GenerationSettings) -> int:
        return self.chats.generate(self.endpoint, self.model, messages, settings)

    def cancel(self, job: int) -> None:
        self.chats.cancel(job)
