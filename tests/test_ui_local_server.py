"""The "Local server" switch in the real window (offscreen): the app's loaded SmolLM2 (CPU) served on
127.0.0.1, real HTTP requests with httpx, the live request log, the key in the (in-memory) keyring,
a server request and a GUI reply at the same time on the one engine, and switching off.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import httpx
import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication

from tests.test_ui_app import LOAD_TIMEOUT_MS, assistant_messages, close_window, make_window, wait_reply

pytestmark = pytest.mark.timeout(300)
CHAT = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 6, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_local_server_switch(qtbot, tmp_path: Path, smollm2_fp16_dir: str, memory_keyring) -> None:
    window = make_window(qtbot, tmp_path / "chats.sqlite3", tmp_path / "config", flush_interval=0.1)
    qtbot.waitUntil(lambda: window.sampler_panel.ready, timeout=30_000)
    window.load_model(smollm2_fp16_dir)
    qtbot.waitUntil(lambda: window.model_info is not None, timeout=LOAD_TIMEOUT_MS)

    # 1. Switch on: the page shows the URL and a generated key, which the keyring keeps.
    page = window.open_local_server()
    port = free_port()
    page.port_spin.setValue(port)
    page.switch.click()
    assert window.local_server.running and page.switch.isChecked()
    url, key = page.url_edit.text(), window.local_server.key
    assert url == f"http://127.0.0.1:{port}/v1" and len(key) >= 24
    assert memory_keyring.store == {("Kestrel", "local-server"): key}
    page.show_key.click()
    assert page.key_edit.text() == key
    page.copy_key.click()
    assert QGuiApplication.clipboard().text() == key
    auth = {"Authorization": f"Bearer {key}"}

    # 2. Real HTTP requests: the app's model answers; no key, no answer.
    with httpx.Client(timeout=120) as http:
        models = http.get(url + "/models", headers=auth).json()["data"]
        assert [m["id"] for m in models] == [window.model_info.name]
        assert http.get(url + "/models").status_code == 401
        assert http.post(url + "/model/unload", headers=auth).status_code == 403  # the app owns the model
        alone = http.post(url + "/chat/completions", json=CHAT, headers=auth).json()["choices"][0]["message"]

        # 3. A server request and a GUI reply at once take turns on the one engine: both come out
        # exactly as they do alone (interleaving on one KV cache would garble them).
        together: dict[str, str] = {}
        thread = threading.Thread(target=lambda: together.update(http.post(
            url + "/chat/completions", json=CHAT, headers=auth).json()["choices"][0]["message"]))
        window.sampler_panel.set_values({"temperature": 0.0}, 6)
        thread.start()
        qtbot.keyClicks(window.chat.composer.edit, "Say hello to a kestrel.")
        qtbot.keyClick(window.chat.composer.edit, Qt.Key.Key_Return)
        wait_reply(qtbot, window)
        thread.join(120)
        assert together["content"] == alone["content"]
        cid = window.current_id
        gui_reply = assistant_messages(window, cid)[-1].content
        window.regenerate()
        wait_reply(qtbot, window)
        assert assistant_messages(window, cid)[-1].content == gui_reply

    # 4. The live log lists every request with method, path and status.
    qtbot.waitUntil(lambda: page.rows().count(("POST", "/v1/chat/completions", "200")) == 2, timeout=10_000)
    rows = page.rows()
    assert ("GET", "/v1/models", "200") in rows and ("GET", "/v1/models", "401") in rows
    assert ("POST", "/v1/model/unload", "403") in rows
    assert all(float(page.log.item(r, 4).text()) >= 0 for r in range(page.log.rowCount()))

    # 5. Switch off: the port closes; the GUI chat still works.
    page.switch.click()
    assert not window.local_server.running and page.url_edit.text() == ""
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/models", headers=auth, timeout=5)
    window.regenerate()
    wait_reply(qtbot, window)
    assert assistant_messages(window, cid)[-1].content == gui_reply
    close_window(window)
