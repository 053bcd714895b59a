"""The FastAPI app: OpenAI-compatible routes over one Engine, plus TabbyAPI-style model/token routes.

`create_app(config, engine=None)` builds it; the engine is loaded from `config.model_dir` on first
start-up when none is passed. Every refusal is a 4xx in OpenAI's error shape
({"error": {"message", "type", "param", "code"}}); no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from app.engine.errors import KestrelError, OutOfMemoryError
from app.engine.samplers import validate_settings
from app.engine.session import Engine
from app.engine.types import Chunk, GenerationSettings

from .auth import check_key
from .config import ApiError, ServerConfig
from .jobs import BatchQueue, JobStream, SingleJob, batchable
from .schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DecodeRequest,
    EncodeRequest,
    LoadRequest,
    LoraLoadRequest,
    LoraUnloadRequest,
    api_name,
    sampler_values,
)
from .structured import (
    call_schema,
    chat_logprobs,
    chosen_tools,
    completion_logprobs,
    functions_of,
    logprob_count,
    messages_with_tools,
    parse_tool_calls,
    response_format_fields,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_STOP_STRINGS = 16


# --- errors -------------------------------------------------------------------------------------

def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def kestrel_error_status(e: KestrelError) -> tuple[int, str, str | None, str | None]:
    """HTTP status, OpenAI error type, param and code for one of our exceptions."""
    if isinstance(e, ApiError):
        return e.status, e.type, e.param, e.code
    if isinstance(e, OutOfMemoryError):
        return 503, "server_error", None, "out_of_memory"
    return 400, "invalid_request_error", None, type(e).__name__


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "is invalid")
    if first.get("type") == "extra_forbidden":
        msg = "is not a field this server knows (check the spelling; see /docs)"
    elif first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}", None
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return f"{param or 'body'}: {msg}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(KestrelError)
    async def _kestrel(_: Request, exc: KestrelError) -> JSONResponse:
        status, type_, param, code = kestrel_error_status(exc)
        return error_response(status, str(exc), type_, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:  # last line of defence
        log.exception("unexpected error in a request")
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log",
                              "server_error")


class BodyLimit:
    """Refuse request bodies over `limit` bytes with a 413 before any parsing (pure ASGI)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = error_response(413, f"the request body is over {self.limit} bytes",
                                 code="request_too_large")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await too_big(scope, receive, send)
            return
        parts, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            parts.append(message.get("body", b""))
            total += len(parts[-1])
            if total > self.limit:
                await too_big(scope, receive, send)
                return
            if not message.get("more_body"):
                break
        body = b"".join(parts)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# --- client disconnects -------------------------------------------------------------------------

class ClientGone(Exception):
    """The HTTP client closed its connection."""


class DisconnectWatch:
    """Notices an HTTP client going away while we wait on the engine (the body is already read, so
    the next ASGI message can only be http.disconnect)."""

    def __init__(self, receive: Receive) -> None:
        self.gone = asyncio.Event()
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                return

    async def race(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, or raise ClientGone if the client leaves first."""
        if self.gone.is_set():
            raise ClientGone
        work = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            work.cancel()
            raise
        finally:
            gone.cancel()
        if work in done:
            return work.result()
        work.cancel()
        raise ClientGone

    def close(self) -> None:
        self._task.cancel()


class EventStream(StreamingResponse):
    """Server-sent events that end the job as soon as the client leaves, mid-token or not."""

    def __init__(self, events: AsyncIterator[bytes], watch: DisconnectWatch, on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._watch = watch
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            while True:
                try:
                    data = await self._watch.race(self._events.__anext__())
                except StopAsyncIteration:
                    break
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGone, OSError):
            pass
        finally:
            self._on_close()
            self._watch.close()


# --- server state -------------------------------------------------------------------------------

class ServerState:
    """The one engine and the jobs that run on it together (continuous batching)."""

    def __init__(self, config: ServerConfig, engine: Engine | None) -> None:
        self.config = config
        self.engine = engine
        self.loaded_at = int(time.time())
        self.jobs = BatchQueue()
        self.lora_scales: dict[str, float] = {}  # loaded adapters -> scale for requests that pick none

    def require_engine(self) -> Engine:
        if self.engine is None or self.engine.model is None:
            raise ApiError("no model is loaded; POST /v1/model/load first", status=503,
                           type="server_error", code="model_not_loaded")
        if self.config.cache_tokens:
            self.engine.pool_tokens = self.config.cache_tokens  # read when its scheduler is made
        return self.engine

    def model_card(self) -> dict[str, Any]:
        engine = self.require_engine()
        info = engine.info
        return {"id": info.name, "object": "model", "created": self.loaded_at, "owned_by": "kestrel",
                "info": asdict(info)}

    def resolve_model_folder(self, name: str) -> str:
        """A folder inside the models root: load requests must not reach the rest of the disk."""
        return str(folder_inside(self.config.models_root, name, "config.json", "model"))

    def resolve_lora_folder(self, name: str) -> str:
        root = self.config.loras_root or self.config.models_root
        return str(folder_inside(root, name, "adapter_config.json", "LoRA adapter"))

    def request_loras(self, requested: dict[str, float] | None) -> dict[str, float]:
        """A request's adapters: its own pick, checked here so a bad name is a 400 before queuing,
        or (field omitted) every loaded adapter at its load-time scaling."""
        if requested is None:
            return dict(self.lora_scales)
        loaded = {i.name for i in self.require_engine().loras()}
        for name, scale in requested.items():
            if name not in loaded:
                raise ApiError(f"no LoRA adapter named {name!r} is loaded (loaded: "
                               f"{', '.join(sorted(loaded)) or 'none'}); POST /v1/lora/load first",
                               param="loras", code="lora_not_found")
            if not math.isfinite(scale):
                raise ApiError(f"the scale for LoRA {name!r} must be a finite number", param="loras")
        return dict(requested)


def folder_inside(root: str | None, name: str, marker: str, what: str) -> Path:
    """`name` resolved inside `root`, holding `marker`: API load requests must not reach the rest of the disk."""
    param = "model" if what == "model" else "loras"
    if not root:
        raise ApiError(f"this server was started without a folder to load {what}s from", status=403,
                       code="load_disabled", param=param)
    root_path = Path(root).resolve()
    folder = (root_path / name).resolve()
    if folder != root_path and root_path not in folder.parents:
        raise ApiError(f"{name!r} is outside the {what}s folder", status=403, param=param,
                       code="outside_models_folder")
    if not (folder / marker).is_file():
        raise ApiError(f"no {what} folder named {name!r} (no {marker})", status=404, param=param,
                       code=f"{what.split()[-1].lower()}_not_found")
    return folder


def load_loras(engine: Engine, loras: tuple[tuple[str, float], ...]) -> dict[str, float]:
    """Load `serve --lora DIR[:SCALE]` adapters (skipping ones already loaded); name -> default scale."""
    by_path = {os.path.realpath(i.path): i.name for i in engine.loras()}
    scales = {}
    for path, scale in loras:
        name = by_path.get(os.path.realpath(path)) or engine.load_lora(path).name
        scales[name] = scale
    return scales


def _state(request: Request) -> ServerState:
    return request.app.state.kestrel


async def require_key(request: Request, authorization: str | None = Header(None, include_in_schema=False),
                      x_api_key: str | None = Header(None, include_in_schema=False)) -> None:
    check_key(_state(request).config.api_key, authorization, x_api_key)


# --- request -> engine settings -----------------------------------------------------------------

def _unsupported(what: str, param: str) -> ApiError:
    return ApiError(f"{what} is not supported yet", param=param, code="unsupported")


def settings_for(req: ChatCompletionRequest | CompletionRequest, limit: int, max_new: int | None,
                 loras: dict[str, float] | None = None) -> GenerationSettings:
    """Translate an API request into GenerationSettings, checking what the engine would refuse."""
    if req.n != 1:
        raise _unsupported("n other than 1", "n")
    max_new = max_new or limit
    if max_new > limit:
        raise ApiError(f"max_tokens {max_new} is over this server's limit of {limit}", param="max_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise ApiError(f"stop takes 1 to {MAX_STOP_STRINGS} non-empty strings", param="stop")
    samplers = sampler_values(req)
    for name, value in samplers.items():  # one at a time, so the error names the field at fault
        try:
            validate_settings({name: value})
        except KestrelError as e:
            raise ApiError(str(e), param=api_name(name)) from None
    return GenerationSettings(max_new_tokens=max_new, samplers=samplers, seed=req.seed,
                              stop_strings=stops, stop_on_eos=not req.ban_eos_token, loras=dict(loras or {}))


def chat_messages(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages -> the engine's {"role", "content": str} list."""
    out = []
    for i, m in enumerate(messages):
        if m.role == "function":
            raise _unsupported("function messages (use tool messages)", f"messages.{i}")
        if isinstance(m.content, list):
            parts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise _unsupported(f"content of type {part.type!r}", f"messages.{i}.content")
                parts.append(part.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        item: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        extra = m.model_extra or {}
        if m.role == "assistant" and extra.get("tool_calls"):
            item["tool_calls"] = extra["tool_calls"]
        if m.role == "tool" and extra.get("tool_call_id"):
            item["tool_call_id"] = extra["tool_call_id"]
        out.append(item)
    return out


def check_chat_extras(req: ChatCompletionRequest) -> None:
    if req.functions or req.function_call is not None:
        raise _unsupported("functions / function_call (use tools / tool_choice)", "functions")


def check_completion_extras(req: CompletionRequest) -> None:
    if req.echo:
        raise _unsupported("echo", "echo")
    if req.suffix:
        raise _unsupported("suffix (fill-in-the-middle)", "suffix")
    if req.best_of not in (None, 1):
        raise _unsupported("best_of other than 1", "best_of")


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    p = req.prompt
    if isinstance(p, str):
        return p
    if p and all(isinstance(x, int) for x in p):
        return list(p)  # type: ignore[arg-type]
    if len(p) == 1 and isinstance(p[0], str):
        return p[0]
    raise _unsupported("more than one prompt per request", "prompt")


# --- generation plumbing ------------------------------------------------------------------------

def usage(chunk: Chunk | None) -> dict[str, int]:
    p = chunk.prompt_tokens if chunk else 0
    g = chunk.generated_tokens if chunk else 0
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def first_chunk(stream: JobStream, watch: DisconnectWatch) -> Chunk | None:
    """Wait for the job's turn and first chunk, so request errors still come back as a 4xx."""
    try:
        return await watch.race(stream.next())
    except BaseException:
        stream.cancel()
        raise


async def collect(stream: JobStream, first: Chunk | None) -> tuple[str, Chunk | None]:
    parts, last, chunk = [], first, first
    while chunk is not None:
        parts.append(chunk.text)
        last = chunk
        chunk = await stream.next()
    return "".join(parts), last


async def serve_generation(request: Request, state: ServerState, kind: str,
                           start: Callable[[Callable[[object], None]], Any], streamed: bool,
                           whole: Callable[[str, Chunk | None], dict],
                           events: Callable[[JobStream, Chunk | None], AsyncIterator[bytes]]) -> Response:
    """Submit one generation (`start(emit)` hands it to the engine's scheduler) and answer it as JSON
    or as SSE; a client that leaves cancels it."""
    stream = state.jobs.stream(kind, start)
    watch = DisconnectWatch(request.receive)
    try:
        first = await first_chunk(stream, watch)
        if streamed:
            response = EventStream(events(stream, first), watch, stream.cancel)
            watch = None  # type: ignore[assignment]  # the response owns it now
            return response
        text, last = await watch.race(collect(stream, first))
        return JSONResponse(whole(text, last))
    except ClientGone:
        stream.cancel()
        return Response(status_code=499)
    finally:
        if watch is not None:
            watch.close()


def finish_reason(chunk: Chunk | None) -> str:
    return (chunk.finish_reason if chunk else None) or "stop"


async def stream_errors(gen: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """An engine error after the first token becomes a final SSE error event, then [DONE]."""
    try:
        async for item in gen:
            yield item
    except KestrelError as e:
        status, type_, param, code = kestrel_error_status(e)
        yield sse(error_body(str(e), type_, param, code))
    except Exception as e:  # noqa: BLE001 - the stream has begun: report in-band, never a traceback
        log.exception("unexpected error while streaming")
        yield sse(error_body(f"internal error ({type(e).__name__}); see the server log", "server_error"))
    yield sse("[DONE]")


# --- the app ------------------------------------------------------------------------------------

def create_app(config: ServerConfig, engine: Engine | None = None) -> FastAPI:
    """Build the app; if no engine is given and config.model_dir is set, load it on start-up."""
    state = ServerState(config, engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state.engine is None and config.model_dir:
            state.engine = await state.jobs.run("load", lambda: Engine.load(
                config.model_dir, config.device, max_seq_len=config.max_seq_len, **config.load_options()))
            state.loaded_at = int(time.time())
        if state.engine is not None and config.loras:
            engine = state.engine
            state.lora_scales = await state.jobs.run("lora", lambda: load_loras(engine, config.loras))
        yield
        state.jobs.shutdown()
        if state.engine is not None:
            state.engine.stop_serving()  # ends the scheduler's thread and frees its KV pool

    app = FastAPI(title="Kestrel", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API over the loaded Kestrel model. Sampler extension "
                              "fields are generated from the engine's sampler registry.")
    app.state.kestrel = state
    install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)

    @app.get("/health", tags=["server"])
    async def health() -> dict:
        s = state
        return {"status": "ok", "model_loaded": s.engine is not None and s.engine.model is not None,
                "jobs_waiting": s.jobs.waiting, "job_running": s.jobs.running is not None,
                "jobs_running": s.jobs.live}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.get("/models", tags=["openai"])
    async def list_models() -> dict:
        data = [state.model_card()] if state.engine is not None and state.engine.model is not None else []
        return {"object": "list", "data": data}

    @v1.get("/model", tags=["model"])
    async def current_model() -> dict:
        return state.model_card()

    @v1.post("/model/load", tags=["model"])
    async def load_model(body: LoadRequest) -> dict:
        folder = state.resolve_model_folder(body.model)

        def swap() -> Engine:
            if state.engine is not None:
                state.engine.unload()
                state.engine = None
            state.lora_scales = {}
            return Engine.load(folder, body.device or config.device,
                               max_seq_len=body.max_seq_len or config.max_seq_len,
                               **{**config.load_options(), **({"cache_mode": body.cache_mode} if body.cache_mode else {})})

        state.engine = await state.jobs.run("load", swap)
        state.loaded_at = int(time.time())
        return state.model_card()

    @v1.post("/model/unload", tags=["model"])
    async def unload_model() -> dict:
        def drop() -> bool:
            if state.engine is None:
                return False
            state.engine.unload()
            state.engine = None
            state.lora_scales = {}
            return True

        return {"unloaded": await state.jobs.run("unload", drop)}

    @v1.get("/loras", tags=["lora"])
    async def list_loras() -> dict:
        engine = state.require_engine()
        return {"object": "list", "data": [
            {"id": i.name, "object": "lora", "owned_by": "kestrel", "scaling": state.lora_scales.get(i.name, 0.0),
             "path": i.path, "rank": i.rank, "alpha": i.alpha, "rslora": i.rslora, "targets": list(i.targets)}
            for i in engine.loras()]}

    @v1.post("/lora/load", tags=["lora"])
    async def load_lora(body: LoraLoadRequest) -> dict:
        engine = state.require_engine()
        folders = [(choice, state.resolve_lora_folder(choice.name)) for choice in body.loras]

        def load() -> dict:
            success, failure = [], []
            for choice, folder in folders:
                try:
                    name = engine.load_lora(folder, choice.name).name
                except KestrelError as e:
                    failure.append({"name": choice.name, "error": str(e)})
                    continue
                state.lora_scales[name] = choice.scaling
                success.append(name)
            if not success:
                raise ApiError(failure[0]["error"], param="loras", code="lora_load_failed")
            return {"success": success, "failure": failure}

        return await state.jobs.run("lora", load)

    @v1.post("/lora/unload", tags=["lora"])
    async def unload_lora(body: LoraUnloadRequest | None = None) -> dict:
        engine = state.require_engine()
        names = body.loras if body is not None and body.loras is not None else [i.name for i in engine.loras()]

        def drop() -> dict:
            gone = [n for n in names if engine.unload_lora(n)]
            for n in gone:
                state.lora_scales.pop(n, None)
            return {"unloaded": gone}

        return await state.jobs.run("lora", drop)

    @v1.post("/token/encode", tags=["tokens"])
    async def encode(body: EncodeRequest) -> dict:
        engine = state.require_engine()
        if (body.text is None) == (body.messages is None):
            raise ApiError("give exactly one of text or messages", param="text")
        if body.messages is not None:
            text = engine.template.render(chat_messages(body.messages), add_generation_prompt=True)
            ids = engine.tokenizer.encode(text, special=True)
        else:
            ids = engine.tokenizer.encode(body.text or "", add_bos=body.add_bos_token and engine.tokenizer.add_bos_token,
                                          special=body.encode_special_tokens)
        return {"tokens": ids, "length": len(ids)}

    @v1.post("/token/decode", tags=["tokens"])
    async def decode(body: DecodeRequest) -> dict:
        engine = state.require_engine()
        return {"text": engine.tokenizer.decode(body.tokens, skip_special=not body.decode_special_tokens)}

    @v1.post("/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_chat_extras(body)
        engine = state.require_engine()
        settings = settings_for(body, config.max_tokens_limit, body.max_completion_tokens or body.max_tokens,
                                state.request_loras(body.loras))
        mode, functions = chosen_tools(functions_of(body.tools), body.tool_choice)
        fields = response_format_fields(body.response_format)
        if mode == "required":
            fields = {"json_schema": call_schema(functions)}  # the reply is the call: it always parses
        settings = dataclasses.replace(settings, logprobs=logprob_count(body.logprobs, body.top_logprobs),
                                       **fields)
        messages = chat_messages(body.messages)
        tools = None
        if engine.template.supports_tools and functions:
            tools = [{"type": "function", "function": f} for f in functions]
        else:
            messages = messages_with_tools(messages, functions)
        name = engine.info.name
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        seen_logprobs: list = []

        def start(emit: Callable[[object], None]) -> Any:
            eng = state.require_engine()
            if not tools and batchable(settings):
                return eng.submit_chat(messages, settings, emit)

            def chunks() -> Iterator[Chunk]:  # constraints, logprobs, tools, adapters: one at a time
                for c in eng.stream_chat(messages, settings, tools=tools):
                    seen_logprobs.extend(c.logprobs or [])
                    yield c

            return SingleJob.start(chunks, emit, eng)

        def reply(text: str, last: Chunk | None) -> tuple[dict, str]:
            if mode != "none":
                content, calls = parse_tool_calls(text, forced=mode == "required")
                if calls:
                    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
            return {"role": "assistant", "content": text}, finish_reason(last)

        def whole(text: str, last: Chunk | None) -> dict:
            message, reason = reply(text, last)
            lps = chat_logprobs(seen_logprobs if settings.logprobs is not None else None)
            return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [{"index": 0, "message": message, "logprobs": lps, "finish_reason": reason}],
                    "usage": usage(last)}

        def frame(delta: dict, reason: str | None, lps: dict | None = None) -> bytes:
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": reason}]})

        async def events(stream: JobStream, chunk: Chunk | None) -> AsyncIterator[bytes]:
            yield frame({"role": "assistant", "content": ""}, None)
            last, held = chunk, []
            while chunk is not None:
                last = chunk
                if mode != "none":
                    held.append(chunk.text)  # tool calls are parsed from the whole reply
                elif chunk.text or chunk.logprobs:
                    yield frame({"content": chunk.text}, None, chat_logprobs(chunk.logprobs))
                chunk = await stream.next()
            if mode != "none":
                message, reason = reply("".join(held), last)
                if message.get("tool_calls"):
                    calls = [dict(c, index=i) for i, c in enumerate(message["tool_calls"])]
                    yield frame({"content": message["content"], "tool_calls": calls}, None)
                else:
                    yield frame({"content": message["content"]}, None)
                yield frame({}, reason)
            else:
                yield frame({}, finish_reason(last))
            if include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                           "choices": [], "usage": usage(last)})

        return await serve_generation(request, state, "chat", start, body.stream, whole,
                                      lambda s, c: stream_errors(events(s, c)))

    @v1.post("/completions", tags=["openai"])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_completion_extras(body)
        engine = state.require_engine()
        settings = settings_for(body, config.max_tokens_limit, body.max_tokens, state.request_loras(body.loras))
        settings = dataclasses.replace(settings, logprobs=logprob_count(body.logprobs is not None, body.logprobs,
                                                                        "logprobs"))
        prompt = completion_prompt(body)
        seen_logprobs: list = []
        name = engine.info.name
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def start(emit: Callable[[object], None]) -> Any:
            eng = state.require_engine()
            if batchable(settings):
                return eng.submit_text(prompt, settings, emit)

            def chunks() -> Iterator[Chunk]:  # constraints, logprobs, adapters: one at a time
                it = (eng.stream_text(prompt, settings) if isinstance(prompt, str)
                      else eng.generator.stream(prompt, settings))
                for c in it:
                    seen_logprobs.extend(c.logprobs or [])
                    yield c

            return SingleJob.start(chunks, emit, eng)

        def choice(text: str, reason: str | None, lps: dict | None = None) -> dict:
            return {"text": text, "index": 0, "logprobs": lps, "finish_reason": reason}

        def whole(text: str, last: Chunk | None) -> dict:
            lps = completion_logprobs(seen_logprobs if settings.logprobs is not None else None)
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [choice(text, finish_reason(last), lps)], "usage": usage(last)}

        def frame(choices: list[dict], extra: dict | None = None) -> bytes:
            return sse({"id": rid, "object": "text_completion", "created": created, "model": name,
                        "choices": choices, **(extra or {})})

        async def events(stream: JobStream, chunk: Chunk | None) -> AsyncIterator[bytes]:
            last = chunk
            while chunk is not None:
                last = chunk
                if chunk.text or chunk.logprobs:
                    yield frame([choice(chunk.text, None, completion_logprobs(chunk.logprobs))])
                chunk = await stream.next()
            yield frame([choice("", finish_reason(last))])
            if include_usage:
                yield frame([], {"usage": usage(last)})

        return await serve_generation(request, state, "completion", start, body.stream, whole,
                                      lambda s, c: stream_errors(events(s, c)))

    app.include_router(v1)
    return app


def run_server(config: ServerConfig) -> None:
    """Load the model, then serve until Ctrl+C (used by `python main.py serve`). The model loads
    before uvicorn starts so a bad folder is one error line, not a failed-startup traceback."""
    import uvicorn

    engine = None
    if config.model_dir:
        if not os.path.isdir(config.model_dir):
            raise KestrelError("is not a folder", path=config.model_dir, hint="Give a model folder to --model.")
        engine = Engine.load(config.model_dir, config.device, max_seq_len=config.max_seq_len,
                             **config.load_options())
        load_loras(engine, config.loras)  # a bad adapter is one error line, before the server starts
    app = create_app(config, engine)
    where = f"http://{config.host}:{config.port}"
    log.warning("Kestrel API at %s/v1 (docs at %s/docs)%s", where, where,
                "" if config.api_key else " - no API key")
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", access_log=False)
