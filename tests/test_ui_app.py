"""The real window (offscreen) driving the real engine with SmolLM2 on CPU, over a real SQLite file.

One scenario test walks a user's session end to end (a corrupt model first, then the real one),
because loading the model is the slow part (~5 s); replies are kept to a few tokens.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

from app.store import Store
from app.ui.main_window import MainWindow

pytestmark = pytest.mark.timeout(240)
LOAD_TIMEOUT_MS = 90_000
REPLY_TIMEOUT_MS = 60_000


def make_window(qtbot, db: Path, config: Path, flush_interval: float = 1.0) -> MainWindow:
    store = Store(db, flush_interval=flush_interval)
    window = MainWindow(store, config, "light")
    qtbot.addWidget(window)
    window.show()
    qtbot.waitExposed(window)
    return window


def close_window(window: MainWindow) -> None:
    window.close()
    window.store.close()


def wait_reply(qtbot, window: MainWindow) -> None:
    qtbot.waitUntil(lambda: window.generation is None, timeout=REPLY_TIMEOUT_MS)


def press(window: MainWindow, key: Qt.Key, modifier: Qt.KeyboardModifier = Qt.KeyboardModifier.NoModifier) -> None:
    """A key press as the window system delivers it, so window shortcuts (QActions) fire.

    Shortcuts need the window to be active (a closed dialog may have left no active window)."""
    window.activateWindow()
    for _ in range(200):
        if QApplication.activeWindow() is window:
            break
        QTest.qWait(10)
    assert QApplication.activeWindow() is window
    QTest.keyClick(window.windowHandle(), key, modifier)


def corrupt_copy(src: str, dst: Path) -> Path:
    """The model folder with its safetensors file cut in half (a broken download)."""
    dst.mkdir()
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    weights = next(Path(src).glob("*.safetensors"))
    with open(weights, "rb") as fin, open(dst / weights.name, "wb") as fout:
        fout.write(fin.read(weights.stat().st_size // 2))
    return dst


def assistant_messages(window: MainWindow, cid: int) -> list:
    return [m for m in window.store.messages(cid) if m.role == "assistant"]


def test_session_end_to_end(qtbot, tmp_path: Path, smollm2_fp16_dir: str) -> None:
    db, config = tmp_path / "chats.sqlite3", tmp_path / "config"
    window = make_window(qtbot, db, config, flush_interval=0.1)
    qtbot.waitUntil(lambda: window.sampler_panel.ready, timeout=30_000)

    # 1. A corrupt model: a dialog says what happened and what to do; the app stays usable.
    window.load_model(str(corrupt_copy(smollm2_fp16_dir, tmp_path / "broken")))
    qtbot.waitUntil(lambda: window.error_box is not None, timeout=LOAD_TIMEOUT_MS)
    box = window.error_box
    assert box.isVisible()
    assert "model.safetensors" in box.text() and box.informativeText()
    box.close()
    qtbot.waitUntil(lambda: window.error_box is None)
    assert window.model_info is None and window.model_panel.load_button.isEnabled()

    # 2. The real model loads with progress; the panel shows what is loaded.
    progress: list[float] = []
    window.client.worker.progress.connect(lambda f, _m: progress.append(f))
    window.load_model(smollm2_fp16_dir)
    qtbot.waitUntil(lambda: window.model_info is not None, timeout=LOAD_TIMEOUT_MS)
    assert progress and max(progress) <= 1.0
    assert window.model_panel.name_label.text() == window.model_info.name
    assert "4,096" in window.context_label.text() or "/" in window.context_label.text()

    # 3. Type a message, press Enter: the reply streams in token by token and is persisted as it grows.
    window.sampler_panel.set_values({"temperature": 0.0}, 16)
    chunks: list[str] = []
    window.client.worker.chunk.connect(lambda _job, c: chunks.append(c.text))
    seen_on_disk: list[str] = []

    def peek_disk() -> bool:   # another connection sees only what the store flushed
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT content FROM messages WHERE role='assistant' AND streaming=1").fetchone()
        if row and row[0]:
            seen_on_disk.append(row[0])
        return window.generation is None

    qtbot.keyClicks(window.chat.composer.edit, "What is the capital of France?")
    qtbot.keyClick(window.chat.composer.edit, Qt.Key.Key_Return)
    assert window.generation is not None and window.chat.busy
    qtbot.waitUntil(peek_disk, timeout=REPLY_TIMEOUT_MS)
    cid = window.current_id
    replies = assistant_messages(window, cid)
    assert len(replies) == 1 and replies[0].content.strip()
    assert len([c for c in chunks if c]) > 1, "the reply should arrive in several chunks"
    assert replies[0].content == "".join(chunks)
    assert seen_on_disk and replies[0].content.startswith(seen_on_disk[0])
    assert replies[0].timings.generated_tokens and replies[0].finish_reason in ("stop", "length")
    assert window.chat.widgets[-1].markdown.text == replies[0].content
    assert "tok/s" in window.speed_label.text() and window.speed_label.text()[0].isdigit()
    assert window.chat.composer.edit.toPlainText() == ""
    first_title = window.store.get_conversation(cid).title
    assert first_title.startswith("What is the capital")

    # 4. Stop (Esc) a long reply shortly after it starts.
    window.sampler_panel.set_values({"temperature": 0.0}, 400)
    chunks.clear()
    window.chat.composer.edit.setPlainText("Write a long story about a fox.")
    qtbot.keyClick(window.chat.composer.edit, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: len(chunks) >= 2, timeout=REPLY_TIMEOUT_MS)
    press(window, Qt.Key.Key_Escape)
    wait_reply(qtbot, window)
    stopped = assistant_messages(window, cid)[-1]
    assert stopped.finish_reason == "cancelled"
    assert 0 < stopped.timings.generated_tokens < 400

    # 5. Regenerate (Ctrl+R) replaces the last reply.
    window.sampler_panel.set_values({"temperature": 0.0}, 8)
    press(window, Qt.Key.Key_R, Qt.KeyboardModifier.ControlModifier)
    assert window.generation is not None
    wait_reply(qtbot, window)
    messages = window.store.messages(cid)
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[-1].finish_reason in ("stop", "length")   # (SQLite may reuse the deleted row's id)
    assert messages[-1].content != stopped.content and messages[-1].timings.generated_tokens > 2

    # 6. Edit the first user message and re-run from there.
    first_user = window.chat.widgets[0]
    first_user.begin_edit()
    first_user.editor.setPlainText("What is the capital of Italy?")
    first_user.submit_edit()
    wait_reply(qtbot, window)
    messages = window.store.messages(cid)
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[0].content == "What is the capital of Italy?"
    assert messages[1].content.strip()
    assert len(window.chat.widgets) == 2

    # 7. Per-chat settings: a new chat (Ctrl+N) with its own system prompt and samplers.
    window.sampler_panel.set_values({"temperature": 0.0, "top_k": 7}, 8)
    window.save_settings()
    press(window, Qt.Key.Key_N, Qt.KeyboardModifier.ControlModifier)
    assert window.current_id is None and window.chat.stack.currentWidget() is window.chat.welcome
    window.system_prompt.setPlainText("You are a pirate.")
    window.sampler_panel.set_values({"temperature": 0.0, "top_k": 3}, 8)
    window.chat.composer.edit.setPlainText("Say hello.")
    window.chat.submit()
    wait_reply(qtbot, window)
    second = window.current_id
    assert second != cid
    conv2 = window.store.get_conversation(second)
    assert conv2.system_prompt == "You are a pirate." and conv2.sampler_settings["top_k"] == 3

    # 8. Switch back through the sidebar: history, system prompt and samplers follow the chat.
    item = window.sidebar.item_for(cid)
    window.sidebar.list.setCurrentItem(item)
    assert window.current_id == cid
    assert window.chat.widgets[0].text == "What is the capital of Italy?"
    assert window.sampler_panel.values()["top_k"] == 7
    assert window.system_prompt.toPlainText() == ""
    assert window.sidebar.ids() == [second, cid]

    # 9. Search, rename, export.
    window.search("Italy")
    assert window.sidebar.ids() == [cid]
    window.sidebar.search.clear()
    window.rename_conversation(cid, "Capitals")
    qtbot.waitUntil(lambda: window.sidebar.item_for(cid).text() == "Capitals")
    md = window.export_conversation(cid, "md", tmp_path / "chat.md").read_text()
    assert "Capitals" in md and "capital of Italy" in md
    data = json.loads(window.export_conversation(cid, "json", tmp_path / "chat.json").read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]

    close_window(window)

    # 10. Restart over the same database: the history is there.
    again = make_window(qtbot, db, config)
    assert set(again.sidebar.ids()) == {cid, second}
    again.open_conversation(cid)
    texts = [w.text for w in again.chat.widgets]
    assert texts[0] == "What is the capital of Italy?" and texts[1] == messages[1].content
    assert again.title_label.text() == "Capitals"
    close_window(again)


def test_delete_and_no_model_dialog(qtbot, tmp_path: Path) -> None:
    window = make_window(qtbot, tmp_path / "c.sqlite3", tmp_path / "cfg")
    window.chat.composer.edit.setPlainText("hello")
    window.chat.submit()
    assert window.error_box is not None and "No model" in window.error_box.windowTitle()
    assert window.chat.composer.edit.toPlainText() == "hello"   # the text is not lost
    window.error_box.close()
    cid = window.store.create_conversation("To delete")
    window.refresh_list()
    box = window.confirm_delete(cid)
    delete = next(b for b in box.buttons() if b.text() == "Delete")
    delete.click()
    assert window.store.list_conversations() == []
    assert window.sidebar.ids() == []
    close_window(window)


def test_ui_imports_do_not_pull_torch() -> None:
    code = "import app.ui.app, app.ui.main_window, app.ui.chat_view; import sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, check=True)
    assert out.stdout.strip() == "False"
    assert not [line for line in out.stderr.splitlines() if line.rstrip().endswith("| torch")]
