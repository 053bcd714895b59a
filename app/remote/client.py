"""A small OpenAI-compatible client: list models, stream chat completions over SSE, stop.

Why our own and not the `openai` package: we need a stop that takes effect at once even while the
server is still thinking (shutting the socket down wakes the blocked read, and the server sees the
client leave and cancels the job), every failure turned into one of app.remote.errors' types with
words, and no extra runtime dependency. The stream yields the engine's own `Chunk`, so the GUI
handles local and remote replies with the same code.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from app.engine.types import Chunk, GenerationSettings

from .errors import (
    AuthFailed,
    BadStream,
    EndpointUnreachable,
    ModelGone,
    RemoteError,
    RemoteServerError,
    RequestRefused,
)

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 300.0      # a queued request or a long prefill may take minutes to its first token
OPENAI_SAMPLERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_HINT_KEY = "Edit the endpoint (Manage endpoints) and enter the right API key."
_HINT_URL = "Check the address and port, and that the server is running and reachable from here."


def api_base(url: str) -> str:
    """The URL requests are made under: `http://host:port` becomes `http://host:port/v1`; a URL with
    a path (`.../v1`, `.../openai/v1`) is used as given."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EndpointUnreachable(f"{url!r} is not an http(s) address",
                                  hint="Enter a base URL such as http://127.0.0.1:5000/v1.")
    return url if parts.path not in ("", "/") else url + "/v1"


def request_body(model: str, messages: list[dict], settings: GenerationSettings) -> dict[str, Any]:
    """The /chat/completions body. OpenAI's samplers always go; Kestrel/TabbyAPI extension samplers
    only when set away from their neutral default, so strict servers accept a default chat."""
    from app.engine.samplers import SAMPLERS
    from app.server.schemas import api_name

    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True,
                            "stream_options": {"include_usage": True}, "max_tokens": settings.max_new_tokens}
    if settings.seed is not None:
        body["seed"] = settings.seed
    if settings.stop_strings:
        body["stop"] = list(settings.stop_strings)
    for name, value in settings.samplers.items():
        spec = SAMPLERS.get(name)
        if name in OPENAI_SAMPLERS or (spec is not None and value != spec.default):
            body[api_name(name)] = value
    return body


def _server_words(response: httpx.Response) -> tuple[str, str | None]:
    """The error message and code a server put in its reply (OpenAI shape, FastAPI's, or text)."""
    try:
        data = response.json()
    except ValueError:
        return (response.text.strip()[:200] or response.reason_phrase), None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or response.reason_phrase), err.get("code")
    if isinstance(err, str):
        return err, None
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])[:200], None
    return response.reason_phrase, None


def status_error(name: str, status: int, message: str, code: str | None, model: str | None) -> RemoteError:
    """One of our errors for an HTTP error status (model None: while listing models)."""
    said = f"HTTP {status}: {message}"
    if status in (401, 403):
        return AuthFailed(f"{name} refused the API key ({said})", hint=_HINT_KEY)
    if code in ("model_not_found", "model_not_loaded") or (status == 404 and model is not None):
        what = f"the model {model!r}" if model else "no model"
        return ModelGone(f"{what} is not available on {name} any more ({said})",
                         hint="Refresh the model list and pick another model, or load it on the server.")
    if status == 404:
        return RequestRefused(f"{name} has no OpenAI API at this address ({said})",
                              hint="Check the base URL; it usually ends in /v1.")
    if status >= 500:
        return RemoteServerError(f"{name} failed while answering ({said})",
                                 hint="Try again; if it persists, the server's log says more.")
    return RequestRefused(f"{name} refused the request ({said})",
                          hint="Change the setting it names, or start a new chat if the chat is too long.")


def transport_error(name: str, url: str, exc: Exception) -> RemoteError:
    if isinstance(exc, httpx.ConnectTimeout):
        return EndpointUnreachable(f"cannot reach {name} at {url} (no answer within {CONNECT_TIMEOUT_S:g} s)",
                                   hint=_HINT_URL)
    if isinstance(exc, httpx.ConnectError):
        reason = str(exc).split("]")[-1].strip() or "connection failed"
        return EndpointUnreachable(f"cannot reach {name} at {url} ({reason})", hint=_HINT_URL)
    if isinstance(exc, httpx.TimeoutException):
        return EndpointUnreachable(f"{name} did not answer within {READ_TIMEOUT_S:g} s",
                                   hint="The server may be overloaded; try again or stop it.")
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return EndpointUnreachable(f"{url!r} is not a usable address ({exc})",
                                   hint="Enter a base URL such as http://127.0.0.1:5000/v1.")
    return EndpointUnreachable(f"the connection to {name} was lost ({type(exc).__name__}: {exc})",
                               hint="Check the network and that the server is still running, then regenerate.")


@dataclass(frozen=True)
class RemoteModel:
    id: str
    owned_by: str | None = None


class RemoteClient:
    """One endpoint. Thread-safe: the GUI lists models and streams from worker threads."""

    def __init__(self, base_url: str, api_key: str | None = None, name: str | None = None) -> None:
        self.base = api_base(base_url)
        self.name = name or self.base
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_models(self) -> list[RemoteModel]:
        url = self.base + "/models"
        try:
            response = self._http.get(url, timeout=httpx.Timeout(30.0, connect=CONNECT_TIMEOUT_S))
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise transport_error(self.name, url, e) from None
        if response.status_code >= 400:
            raise status_error(self.name, response.status_code, *_server_words(response), None)
        try:
            data = response.json()["data"]
            return [RemoteModel(str(m["id"]), m.get("owned_by")) for m in data]
        except (ValueError, KeyError, TypeError):
            raise BadStream(f"{self.name} answered /models with something other than an OpenAI model list",
                            hint="Check the base URL; it usually ends in /v1.") from None

    def chat(self, model: str, messages: list[dict], settings: GenerationSettings) -> ChatStream:
        """Start a streamed chat completion; iterate the result for Chunks, `cancel()` it to stop."""
        return ChatStream(self, model, request_body(model, messages, settings))


class ChatStream:
    """One streamed reply. Iterating yields Chunks; the last has finish_reason set ("cancelled" after
    `cancel()`, which any thread may call)."""

    def __init__(self, client: RemoteClient, model: str, body: dict[str, Any]) -> None:
        self.client = client
        self.model = model
        self.body = body
        self._cancelled = threading.Event()
        self._response: httpx.Response | None = None

    def cancel(self) -> None:
        """Stop now: shutting the socket down wakes the reading thread, and the server sees the
        client leave (that is how OpenAI-compatible servers cancel a job)."""
        self._cancelled.set()
        response = self._response
        stream = response.extensions.get("network_stream") if response is not None else None
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[Chunk]:
        name, url = self.client.name, self.client.base + "/chat/completions"
        state = _Progress(time.perf_counter())
        if self.cancelled:
            yield state.chunk("", "cancelled")
            return
        try:
            with self.client._http.stream("POST", url, json=self.body) as response:
                self._response = response
                if self.cancelled:
                    yield state.chunk("", "cancelled")
                    return
                if response.status_code >= 400:
                    response.read()
                    raise status_error(name, response.status_code, *_server_words(response), self.model)
                kind = response.headers.get("content-type", "")
                if kind.startswith("application/json"):  # a server that ignored "stream": true
                    response.read()
                    yield from state.whole(name, response)
                    return
                yield from state.events(name, response.iter_lines(), self._cancelled)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            if self.cancelled:
                yield state.chunk("", "cancelled")
                return
            raise transport_error(name, url, e) from None
        finally:
            self._response = None


@dataclass
class _Progress:
    """Running counts and timings of one reply, turned into Chunks."""

    started: float
    first_token_at: float | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    usage_seen: bool = False
    finish_reason: str | None = None

    def chunk(self, text: str, finish_reason: str | None = None) -> Chunk:
        now = time.perf_counter()
        first = self.first_token_at or now
        return Chunk(text, [], self.prompt_tokens, self.generated_tokens, first - self.started, now - first,
                     finish_reason)

    def text(self, text: str) -> Chunk:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if not self.usage_seen:
            self.generated_tokens += 1  # one delta is about one token until the server's usage says
        return self.chunk(text)

    def usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.usage_seen = True
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.generated_tokens = int(usage.get("completion_tokens") or self.generated_tokens)

    def whole(self, name: str, response: httpx.Response) -> Iterator[Chunk]:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise BadStream(f"{name} sent a reply that is not an OpenAI chat completion",
                            hint="Check that the endpoint is an OpenAI-compatible server.") from None
        self.usage(data.get("usage"))
        if text:
            yield self.text(text)
        yield self.chunk("", choice.get("finish_reason") or "stop")

    def events(self, name: str, lines: Iterator[str], cancelled: threading.Event) -> Iterator[Chunk]:
        done = False
        for line in lines:
            if cancelled.is_set():
                break
            if not line.startswith("data:"):
                continue  # blank separators, comments, event:/id: lines
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                break
            try:
                frame = json.loads(payload)
                if not isinstance(frame, dict):
                    raise ValueError(payload)
            except ValueError:
                raise BadStream(f"{name} sent a stream event that is not JSON: {payload[:80]!r}",
                                hint="Check that the endpoint is an OpenAI-compatible server.") from None
            if "error" in frame:
                err = frame["error"] if isinstance(frame["error"], dict) else {"message": str(frame["error"])}
                status = 400 if err.get("type") == "invalid_request_error" else 500
                raise status_error(name, status, str(err.get("message") or "error"), err.get("code"), None)
            self.usage(frame.get("usage"))
            choices = frame.get("choices")
            if not isinstance(choices, list):
                raise BadStream(f"{name} sent a stream event without choices: {payload[:80]!r}",
                                hint="Check that the endpoint is an OpenAI-compatible server.")
            for choice in choices[:1]:
                delta = choice.get("delta") or {}
                text = delta.get("content") if isinstance(delta, dict) else None
                if text:
                    yield self.text(str(text))
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if cancelled.is_set():
            yield self.chunk("", "cancelled")
        elif done or self.finish_reason:
            yield self.chunk("", self.finish_reason or "stop")
        else:
            raise EndpointUnreachable(f"{name} closed the stream before the reply was complete",
                                      hint="The server may have stopped or restarted; regenerate the reply.")
