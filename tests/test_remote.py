"""app.remote against OUR OWN server started as the remote: uvicorn on 127.0.0.1 in a thread with the
real SmolLM2 model on CPU (tests/test_server.py's ServerThread), plus a tiny broken server for the
malformed-stream case. Replies are a few tokens long.
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.engine.session import Engine
from app.engine.types import GenerationSettings
from app.remote import (
    AuthFailed,
    BadStream,
    EndpointUnreachable,
    ModelGone,
    RemoteClient,
    RequestRefused,
    api_base,
    get_endpoint_key,
    set_endpoint_key,
)
from app.server.app import create_app
from app.server.config import ServerConfig
from app.store import Store
from tests.test_server import ServerThread

KEY = "remote-test-key-0123456789"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
GREEDY = GenerationSettings(max_new_tokens=6, samplers={"temperature": 0.0})


@pytest.fixture(scope="module")
def engine(smollm2_fp16_dir: str) -> Engine:
    return Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=512)


@pytest.fixture(scope="module")
def server(engine: Engine, smollm2_fp16_dir: str) -> Iterator[ServerThread]:
    config = ServerConfig(api_key=KEY, models_root=str(Path(smollm2_fp16_dir).parent), device="cpu",
                          max_seq_len=512, max_tokens_limit=2000)
    with ServerThread(create_app(config, engine)) as s:
        yield s


@pytest.fixture(scope="module")
def remote(server: ServerThread) -> Iterator[RemoteClient]:
    with RemoteClient(server.url + "/v1", KEY, name="test box") as client:
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_base_accepts_the_usual_spellings() -> None:
    assert api_base("http://h:5000") == "http://h:5000/v1"
    assert api_base("http://h:5000/v1/") == "http://h:5000/v1"
    assert api_base(" https://x.org/openai/v1 ") == "https://x.org/openai/v1"
    with pytest.raises(EndpointUnreachable, match="not an http"):
        api_base("localhost:5000")


def test_list_models_with_and_without_v1(server: ServerThread, remote: RemoteClient) -> None:
    assert [m.id for m in remote.list_models()] == ["smollm2-fp16"]
    with RemoteClient(server.url, KEY) as bare:  # base URL without /v1
        assert [m.id for m in bare.list_models()] == ["smollm2-fp16"]


def test_stream_matches_the_engine(remote: RemoteClient, engine: Engine) -> None:
    expected = "".join(c.text for c in engine.stream_chat(MESSAGES, GREEDY))
    chunks = list(remote.chat("smollm2-fp16", MESSAGES, GREEDY))
    assert "".join(c.text for c in chunks) == expected
    assert len([c for c in chunks if c.text]) > 1, "the reply should arrive in several chunks"
    last = chunks[-1]
    assert last.finish_reason == "length" and last.generated_tokens == 6
    assert last.prompt_tokens == engine.count_chat_tokens(MESSAGES)
    assert all(c.finish_reason is None for c in chunks[:-1])
    # regenerate: the same request again gives the same greedy reply
    assert "".join(c.text for c in remote.chat("smollm2-fp16", MESSAGES, GREEDY)) == expected


def test_stop_mid_stream_cancels_the_server_job(server: ServerThread, remote: RemoteClient) -> None:
    jobs = server.app.state.kestrel.jobs
    long = GenerationSettings(max_new_tokens=2000, samplers={"temperature": 0.0}, stop_on_eos=True)
    stream = remote.chat("smollm2-fp16", [{"role": "user", "content": "Tell me a very long story."}], long)
    seen = []
    for chunk in stream:
        seen.append(chunk)
        if chunk.text and len(seen) == 2:
            stream.cancel()
    stopped_at = time.monotonic()
    assert seen[-1].finish_reason == "cancelled" and len(seen) < 40
    deadline = time.monotonic() + 30
    while jobs.running is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    job = [j for j in jobs.finished if j.kind == "chat"][-1]
    assert job.finish_reason == "cancelled" and job.generated_tokens < 2000
    assert job.ended_at - stopped_at < 15


def test_cancel_before_the_first_token(remote: RemoteClient) -> None:
    stream = remote.chat("smollm2-fp16", MESSAGES, GREEDY)
    stream.cancel()
    assert [c.finish_reason for c in stream] == ["cancelled"]


def test_key_lives_in_the_keyring_not_the_database(memory_keyring, tmp_path: Path) -> None:
    db = tmp_path / "chats.sqlite3"
    with Store(db) as store:
        eid = store.add_endpoint("lab", "http://127.0.0.1:1/v1")
        set_endpoint_key(eid, KEY)
    assert get_endpoint_key(eid) == KEY and memory_keyring.store == {("Kestrel", f"endpoint:{eid}"): KEY}
    assert all(KEY.encode() not in p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    set_endpoint_key(eid, "")
    assert get_endpoint_key(eid) is None and memory_keyring.store == {}


def test_wrong_key_is_said_in_words(server: ServerThread) -> None:
    for key in ("wrong-key-0000000000", None):
        with RemoteClient(server.url, key, name="test box") as bad:
            with pytest.raises(AuthFailed, match="test box refused the API key") as e:
                bad.list_models()
            assert e.value.hint and "API key" in e.value.hint
            with pytest.raises(AuthFailed):
                list(bad.chat("smollm2-fp16", MESSAGES, GREEDY))


def test_unreachable_endpoint_is_said_in_words() -> None:
    with RemoteClient(f"http://127.0.0.1:{free_port()}/v1", name="nowhere") as gone:
        with pytest.raises(EndpointUnreachable, match="cannot reach nowhere at http://127.0.0.1"):
            gone.list_models()
        with pytest.raises(EndpointUnreachable, match="cannot reach nowhere"):
            list(gone.chat("m", MESSAGES, GREEDY))


def test_refused_setting_names_the_field(remote: RemoteClient) -> None:
    bad = GenerationSettings(max_new_tokens=5000, samplers={"temperature": 0.0})
    with pytest.raises(RequestRefused, match="max_tokens"):
        list(remote.chat("smollm2-fp16", MESSAGES, bad))


class _Broken(http.server.BaseHTTPRequestHandler):
    """Answers every chat with a stream whose second event is not JSON."""

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\ndata: {oops\n\n')

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"models": "not a list"}')

    def log_message(self, *args: object) -> None:
        pass


def test_malformed_stream_is_said_in_words() -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with RemoteClient(f"http://127.0.0.1:{httpd.server_address[1]}/v1", name="odd") as odd:
            with pytest.raises(BadStream, match="other than an OpenAI model list"):
                odd.list_models()
            got = []
            with pytest.raises(BadStream, match="odd sent a stream event that is not JSON"):
                for chunk in odd.chat("m", MESSAGES, GREEDY):
                    got.append(chunk.text)
            assert got == ["Hi"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_model_gone_after_unload(server: ServerThread, remote: RemoteClient, smollm2_fp16_dir: str) -> None:
    """Last in the file: it unloads the server's model (and loads it again for whoever comes next)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(server.url + "/v1/model/unload", headers=auth, timeout=60).json() == {"unloaded": True}
    with pytest.raises(ModelGone, match="'smollm2-fp16' is not available on test box any more") as e:
        list(remote.chat("smollm2-fp16", MESSAGES, GREEDY))
    assert "Refresh the model list" in (e.value.hint or "")
    assert remote.list_models() == []
    httpx.post(server.url + "/v1/model/load", headers=auth, json={"model": Path(smollm2_fp16_dir).name},
               timeout=120).raise_for_status()
    assert [c.finish_reason for c in remote.chat("smollm2-fp16", MESSAGES, GREEDY)][-1] == "length"
