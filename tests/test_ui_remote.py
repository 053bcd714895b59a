"""The real window (offscreen) chatting with a remote endpoint: our own server on 127.0.0.1 with the
real SmolLM2 model on CPU, added through the Endpoints dialog, over a real SQLite file and an
in-memory keyring. No local model is loaded: every reply comes over HTTP.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PySide6.QtCore import Qt

from app.engine.session import Engine
from app.remote import set_endpoint_key
from app.server.app import create_app
from app.server.config import ServerConfig
from tests.test_server import ServerThread
from tests.test_ui_app import assistant_messages, close_window, make_window, press, wait_reply

pytestmark = pytest.mark.timeout(300)
KEY = "ui-remote-key-0123456789"
MODEL = "smollm2-fp16"


@pytest.fixture(scope="module")
def server(smollm2_fp16_dir: str) -> Iterator[ServerThread]:
    engine = Engine.load(smollm2_fp16_dir, "cpu", max_seq_len=512)
    config = ServerConfig(api_key=KEY, models_root=str(Path(smollm2_fp16_dir).parent), device="cpu",
                          max_seq_len=512)
    with ServerThread(create_app(config, engine)) as s:
        yield s


def send(qtbot, window, text: str) -> None:
    qtbot.keyClicks(window.chat.composer.edit, text)
    qtbot.keyClick(window.chat.composer.edit, Qt.Key.Key_Return)


def expect_error(qtbot, window, *words: str) -> None:
    """A dialog says what happened in words; after closing it the chat is idle and usable."""
    qtbot.waitUntil(lambda: window.error_box is not None and window.generation is None, timeout=60_000)
    box = window.error_box
    said = f"{box.windowTitle()} {box.text()} {box.informativeText()}"
    assert all(w in said for w in words), said
    assert "Traceback" not in said and box.informativeText()
    box.close()
    qtbot.waitUntil(lambda: window.error_box is None)
    assert not window.chat.busy and window.chat.composer.edit.isEnabled()


def test_chat_with_a_remote_endpoint(qtbot, tmp_path: Path, server: ServerThread, memory_keyring,
                                     smollm2_fp16_dir: str) -> None:
    db = tmp_path / "chats.sqlite3"
    window = make_window(qtbot, db, tmp_path / "config", flush_interval=0.1)
    qtbot.waitUntil(lambda: window.sampler_panel.ready, timeout=30_000)
    assert window.chat_picker.combo.count() == 1   # only the local model so far

    # 1. Add the endpoint in the dialog; the key goes to the keyring, never to the database.
    dialog = window.manage_endpoints()
    dialog.name_edit.setText("Lab box")
    dialog.url_edit.setText(server.url + "/v1")
    dialog.key_edit.setText(KEY)
    qtbot.mouseClick(dialog.save_button, Qt.MouseButton.LeftButton)
    (endpoint,) = window.store.list_endpoints()
    assert dialog.list.count() == 1 and "keyring" in dialog.message.text()
    assert memory_keyring.store == {("Kestrel", f"endpoint:{endpoint.id}"): KEY}
    assert all(KEY.encode() not in p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    dialog.close()

    # 2. The picker lists the remote model beside the local one.
    qtbot.waitUntil(lambda: window.chat_picker.combo.count() == 2, timeout=30_000)
    assert MODEL in window.chat_picker.combo.itemText(1) and "Lab box" in window.chat_picker.combo.itemText(1)
    window.chat_picker.combo.setCurrentIndex(1)
    assert window.chat_picker.target.model == MODEL and "Lab box" in window.subtitle_label.text()

    # 3. A reply streams in from the remote and lands in the same history store.
    window.sampler_panel.set_values({"temperature": 0.0}, 8)
    chunks: list[str] = []
    window.remote.chunk.connect(lambda _job, c: chunks.append(c.text))
    send(qtbot, window, "Name three colours.")
    assert window.generation is not None and window.generation.job < 0 and window.chat.busy
    wait_reply(qtbot, window)
    cid = window.current_id
    conv = window.store.get_conversation(cid)
    assert (conv.endpoint_id, conv.model_path) == (endpoint.id, MODEL)
    (reply,) = assistant_messages(window, cid)
    assert reply.content.strip() and reply.model == MODEL and reply.finish_reason == "length"
    assert reply.timings.generated_tokens == 8 and reply.timings.prompt_tokens
    assert len([c for c in chunks if c]) > 1, "the reply should arrive in several chunks"

    # 4. Regenerate: the old reply is replaced by a new one (greedy, so the same text).
    window.regenerate()
    wait_reply(qtbot, window)
    (again,) = assistant_messages(window, cid)
    assert again.id != reply.id and again.content == reply.content

    # 5. Stop mid-stream (Esc): the server's job is cancelled, the partial reply is kept.
    jobs = server.app.state.kestrel.jobs
    window.sampler_panel.set_values({"temperature": 0.0}, 3000)
    send(qtbot, window, "Tell me a very long story about a kestrel.")
    qtbot.waitUntil(lambda: window.generation is not None and len(window.generation.text) > 3, timeout=60_000)
    press(window, Qt.Key.Key_Escape)
    stopped = time.monotonic()
    wait_reply(qtbot, window)
    last = assistant_messages(window, cid)[-1]
    assert last.finish_reason == "cancelled" and last.content
    qtbot.waitUntil(lambda: jobs.running is None, timeout=30_000)
    job = [j for j in jobs.finished if j.kind == "chat"][-1]
    assert job.finish_reason == "cancelled" and job.generated_tokens < 3000 and job.ended_at - stopped < 15
    window.sampler_panel.set_values({"temperature": 0.0}, 4)

    # 6. A wrong key is said in words; the chat stays usable.
    set_endpoint_key(endpoint.id, "wrong-key-0000000000")
    send(qtbot, window, "Hello?")
    expect_error(qtbot, window, "The API key was refused", "Lab box")
    assert assistant_messages(window, cid)[-1].finish_reason == "error"

    # 7. An unreachable endpoint too.
    set_endpoint_key(endpoint.id, KEY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    window.store.update_endpoint(endpoint.id, base_url=f"http://127.0.0.1:{dead}/v1")
    window.regenerate()
    expect_error(qtbot, window, "Cannot reach the server", f"127.0.0.1:{dead}")

    # 8. The model is gone (unloaded on the server): words again, and the chat still works after.
    window.store.update_endpoint(endpoint.id, base_url=server.url + "/v1")
    auth = {"Authorization": f"Bearer {KEY}"}
    httpx.post(server.url + "/v1/model/unload", headers=auth, timeout=60).raise_for_status()
    window.regenerate()
    expect_error(qtbot, window, "The model is not available", MODEL)
    httpx.post(server.url + "/v1/model/load", headers=auth, json={"model": Path(smollm2_fp16_dir).name},
               timeout=120).raise_for_status()
    window.regenerate()
    wait_reply(qtbot, window)
    assert assistant_messages(window, cid)[-1].finish_reason == "length"
    assert window.error_box is None
    close_window(window)
