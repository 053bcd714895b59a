"""The OpenAI-compatible server, end to end: a real uvicorn server on 127.0.0.1 in a thread, the real
SmolLM2 model on CPU, driven by the official `openai` package, httpx and curl.

Generations are a few tokens long to keep the file fast on a shared CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from app.engine.session import Engine
from app.engine.types import GenerationSettings
from app.server.app import create_app
from app.server.config import ServerConfig

REPO = Path(__file__).resolve().parent.parent
KEY = "test-key-0123456789"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


class ServerThread:
    """uvicorn serving `app` on a free 127.0.0.1 port in a daemon thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def engine(smollm2_fp16_dir: str) -> Engine:
    return Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=512)


@pytest.fixture(scope="module")
def server(engine: Engine, smollm2_fp16_dir: str) -> Iterator[ServerThread]:
    config = ServerConfig(models_root=str(Path(smollm2_fp16_dir).parent), device="cpu", max_seq_len=512,
                          max_body_bytes=64 * 1024, max_tokens_limit=2000)
    with ServerThread(create_app(config, engine)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def greedy_reply(engine: Engine) -> str:
    """What the engine itself says greedily in 6 tokens: the server must say exactly this."""
    settings = GenerationSettings(max_new_tokens=6, samplers={"temperature": 0})
    return "".join(c.text for c in engine.stream_chat(MESSAGES, settings))


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_models_health_and_tokens(server: ServerThread, client: openai.OpenAI, engine: Engine) -> None:
    assert [m.id for m in client.models.list().data] == ["smollm2-fp16"]
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True
    card = httpx.get(server.url + "/v1/model").json()
    assert card["id"] == "smollm2-fp16" and card["info"]["device"] == "cpu"
    ids = httpx.post(server.url + "/v1/token/encode", json={"text": "Hello world"}).json()
    assert ids["tokens"] == engine.tokenizer.encode("Hello world") and ids["length"] == len(ids["tokens"])
    text = httpx.post(server.url + "/v1/token/decode", json={"tokens": ids["tokens"]}).json()["text"]
    assert text == "Hello world"
    chat_ids = httpx.post(server.url + "/v1/token/encode", json={"messages": MESSAGES}).json()
    assert chat_ids["length"] == engine.count_chat_tokens(MESSAGES)
    assert "/v1/chat/completions" in httpx.get(server.url + "/openapi.json").json()["paths"]
    assert httpx.get(server.url + "/docs").status_code == 200


def test_chat_matches_engine_non_streamed_and_streamed(client: openai.OpenAI, engine: Engine,
                                                        greedy_reply: str) -> None:
    reply = client.chat.completions.create(model="smollm2-fp16", messages=MESSAGES, max_tokens=6, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "smollm2-fp16"
    assert reply.choices[0].message.content == greedy_reply
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == engine.count_chat_tokens(MESSAGES)
    assert reply.usage.completion_tokens == 6 and reply.usage.total_tokens == reply.usage.prompt_tokens + 6

    chunks = list(client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy_reply
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_stop_string_cuts_the_reply(client: openai.OpenAI, greedy_reply: str) -> None:
    cut = next(i for i in range(2, len(greedy_reply)) if not greedy_reply[i].isspace())
    stop = greedy_reply[cut:cut + 2]
    reply = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == greedy_reply[:greedy_reply.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_seed_reproduces_a_sampled_reply(client: openai.OpenAI) -> None:
    def draw(seed: int) -> str:
        return client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, temperature=1.5,
                                         seed=seed, extra_body={"top_k": 50, "min_p": 0.01}).choices[0].text

    first = draw(1234)
    assert first and draw(1234) == first


def stream_chat(client: openai.OpenAI, content: str, max_tokens: int = 6) -> tuple[str, str | None]:
    parts, reason = [], None
    for c in client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                            max_tokens=max_tokens, temperature=0, stream=True):
        parts.append(c.choices[0].delta.content or "")
        reason = c.choices[0].finish_reason or reason
    return "".join(parts), reason


@pytest.mark.parametrize("n", [2, 4])
def test_concurrent_streams_run_together_with_the_text_they_get_alone(server: ServerThread, client: openai.OpenAI,
                                                                      n: int) -> None:
    asks = [f"Count to {i}" for i in range(3, 3 + n)]
    alone = [stream_chat(client, a) for a in asks]
    results: dict[int, tuple[str, str | None]] = {}
    threads = [threading.Thread(target=lambda i=i: results.update({i: stream_chat(client, asks[i])})) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [results.get(i) for i in range(n)] == alone and all(text and r == "length" for text, r in alone)
    jobs = [j for j in server.app.state.kestrel.jobs.finished if j.kind == "chat"][-n:]
    assert max(j.started_at for j in jobs) < min(j.ended_at for j in jobs)  # all were running at once


def test_disconnect_mid_stream_cancels_only_that_job(server: ServerThread, client: openai.OpenAI) -> None:
    jobs = server.app.state.kestrel.jobs
    expected = stream_chat(client, "Count to 9", 8)
    other: dict[str, tuple[str, str | None]] = {}
    body = {"prompt": "The history of the world", "max_tokens": 2000, "stream": True, "ban_eos_token": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # the long job is generating
        worker = threading.Thread(target=lambda: other.update(x=stream_chat(client, "Count to 9", 8)))
        worker.start()
        while not any(j.kind == "chat" for j, _ in list(jobs._live.values())):
            time.sleep(0.01)
    left_at = time.monotonic()  # the long stream's client is gone; the chat is running
    worker.join(300)
    assert other["x"] == expected
    gone = [j for j in jobs.finished if j.kind == "completion"][-1]
    assert gone.finish_reason == "cancelled" and gone.generated_tokens < 2000 and gone.ended_at - left_at < 15


def test_a_slow_reader_does_not_stall_another_stream(server: ServerThread, client: openai.OpenAI) -> None:
    jobs = server.app.state.kestrel.jobs
    expected = stream_chat(client, "Count to 7", 8)
    body = {"messages": [{"role": "user", "content": "Count to 4"}], "max_tokens": 12, "temperature": 0,
            "stream": True}
    with httpx.Client(timeout=120) as http, http.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200  # headers are in; nothing of the body is read yet
        assert stream_chat(client, "Count to 7", 8) == expected  # the other stream is not held up
        deadline = time.monotonic() + 120
        while not any(j.kind == "chat" and j.generated_tokens == 12 for j in list(jobs.finished)[-2:]):
            assert time.monotonic() < deadline, "the unread job did not finish on the server"
            time.sleep(0.05)  # the engine finished the unread job without waiting for its reader
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in r.iter_lines() if line.startswith("data: {"))
    assert text == stream_chat(client, "Count to 4", 12)[0]


def test_client_disconnect_cancels_the_job(server: ServerThread) -> None:
    jobs = server.app.state.kestrel.jobs
    body = {"prompt": "The history of the world", "max_tokens": 2000, "stream": True, "ban_eos_token": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one token arrived; now walk away
    left_at = time.monotonic()
    while time.monotonic() - left_at < 30:
        done = [j for j in jobs.finished if j.kind == "completion"]
        if done and done[-1].ended_at >= left_at - 1 and jobs.running is None:
            break
        time.sleep(0.05)
    job = [j for j in jobs.finished if j.kind == "completion"][-1]
    assert job.finish_reason == "cancelled" and job.generated_tokens < 2000
    assert job.ended_at - left_at < 15


def test_malformed_requests_get_openai_errors(server: ServerThread) -> None:
    url = server.url
    chat = url + "/v1/chat/completions"
    ok = {"messages": MESSAGES, "max_tokens": 1}
    assert_error(httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(httpx.post(chat, json={"max_tokens": 1}), 400, "messages")
    assert_error(httpx.post(chat, json={**ok, "temperature": 99}), 400, "temperature")
    assert_error(httpx.post(chat, json={**ok, "top_kk": 3}), 400, "top_kk")
    assert_error(httpx.post(chat, json={**ok, "messages": []}), 400, "messages")
    assert_error(httpx.post(chat, json={**ok, "messages": [{"role": "robot", "content": "x"}]}), 400)
    assert_error(httpx.post(chat, json={**ok, "max_tokens": 10**6}), 400, "max_tokens")
    assert_error(httpx.post(chat, json={**ok, "n": 2}), 400, "n")
    assert_error(httpx.post(chat, json={**ok, "stop": [""]}), 400, "stop")
    assert_error(httpx.post(chat, json={**ok, "dry_allowed_length": 0}), 400, "dry_allowed_length")
    assert_error(httpx.post(chat, json={**ok, "banned_strings": ["x"] * 1000}), 400, "banned_strings")
    for extra, param in (({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0"),
                         ({"tools": [{"type": "function", "function": {"name": "f"}}],
                           "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
                         ({"response_format": {"type": "yaml"}}, "response_format.type"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strnig"}}}},
                          "response_format.json_schema.schema"),
                         ({"top_logprobs": 2}, "top_logprobs"),
                         ({"logprobs": True, "top_logprobs": 99}, "top_logprobs")):
        assert_error(httpx.post(chat, json={**ok, **extra}), 400, param)
    assert "not supported yet" in assert_error(httpx.post(chat, json={**ok, "functions": [{"name": "f"}]}), 400,
                                               "functions")["message"]
    assert_error(httpx.post(chat, content=b"x" * (65 * 1024)), 413)
    long_prompt = {"prompt": "word " * 600, "max_tokens": 1}
    assert "context" in assert_error(httpx.post(url + "/v1/completions", json=long_prompt), 400)["message"]
    assert_error(httpx.post(url + "/v1/completions", json={"prompt": ["a", "b"]}), 400, "prompt")
    assert_error(httpx.post(url + "/v1/token/decode", json={"tokens": [10**9]}), 400)
    assert_error(httpx.get(url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(chat), 405)
    assert_error(httpx.post(url + "/v1/model/load", json={"model": "../../etc"}), 403, "model")
    assert_error(httpx.post(url + "/v1/model/load", json={"model": "no-such-model"}), 404, "model")


def test_api_key_is_required_when_set(engine: Engine) -> None:
    with ServerThread(create_app(ServerConfig(api_key=KEY), engine)) as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong-key-000000", max_retries=0).models.list()
        assert_error(httpx.get(s.url + "/v1/models"), 401)
        assert_error(httpx.post(s.url + "/v1/chat/completions", json={"messages": MESSAGES}), 401)
        good = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in good.models.list().data] == ["smollm2-fp16"]
        assert httpx.get(s.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200


def test_serve_refuses_a_public_bind_without_a_key(smollm2_fp16_dir: str) -> None:
    run = subprocess.run([sys.executable, str(REPO / "main.py"), "serve", "--model", smollm2_fp16_dir,
                          "--host", "0.0.0.0", "--port", "1"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "KESTREL_API_KEY": ""})
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--api-key" in lines[0] and "0.0.0.0" in lines[0]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_raw_sse_with_curl(server: ServerThread) -> None:
    body = json.dumps({"messages": MESSAGES, "max_tokens": 2, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", "-X", "POST", "-H", "Content-Type: application/json", "-d", body,
                          server.url + "/v1/chat/completions"], capture_output=True, text=True, timeout=60).stdout
    events = [e for e in out.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    frames = [json.loads(e[6:]) for e in events[:-1]]
    assert all(f["object"] == "chat.completion.chunk" for f in frames)
    assert frames[-1]["choices"][0]["finish_reason"] == "length"


def test_unload_then_load_again(server: ServerThread, smollm2_fp16_dir: str) -> None:
    url = server.url
    assert httpx.post(url + "/v1/model/unload", timeout=60).json() == {"unloaded": True}
    assert httpx.get(url + "/v1/models").json()["data"] == []
    assert_error(httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES}), 503)
    card = httpx.post(url + "/v1/model/load", json={"model": Path(smollm2_fp16_dir).name}, timeout=120).json()
    assert card["id"] == "smollm2-fp16"
    reply = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=60).json()
    assert reply["usage"]["completion_tokens"] == 1
