"""The LoRA panel in the real window (offscreen), with real adapter folders and SmolLM2 on CPU:
lists the library, loads/unloads through the engine thread, stores the choice per chat, sends it
with each request, and shows a dialog for an adapter made for another model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from tests.lora_fixtures import write_adapter
from tests.test_ui_app import LOAD_TIMEOUT_MS, assistant_messages, close_window, make_window

pytestmark = pytest.mark.timeout(900)
REPLY_TIMEOUT_MS = 240_000  # a shared, loaded CPU; a reply is 6 tokens


def wait_reply(qtbot, window) -> None:
    qtbot.waitUntil(lambda: window.generation is None, timeout=REPLY_TIMEOUT_MS)


def ask(qtbot, window, text: str) -> str:
    qtbot.keyClicks(window.chat.composer.edit, text)
    qtbot.keyClick(window.chat.composer.edit, Qt.Key.Key_Return)
    wait_reply(qtbot, window)
    return assistant_messages(window, window.current_id)[-1].content


def regenerate(qtbot, window) -> str:
    window.regenerate()
    wait_reply(qtbot, window)
    return assistant_messages(window, window.current_id)[-1].content


def test_lora_panel_end_to_end(qtbot, tmp_path: Path, smollm2_fp16_dir: str) -> None:
    library = tmp_path / "models"
    write_adapter(library / "tone", smollm2_fp16_dir, seed=7, strength=4.0)
    write_adapter(library / "org" / "wrongbase", smollm2_fp16_dir, targets=("q_proj",), layers=range(1),
                  in_override=512)
    (library / "not-an-adapter").mkdir()
    tone, wrong = os.path.realpath(library / "tone"), os.path.realpath(library / "org" / "wrongbase")

    window = make_window(qtbot, tmp_path / "chats.sqlite3", tmp_path / "config", flush_interval=0.1)
    panel = window.lora_panel
    panel.set_folders([str(library)])
    assert sorted(panel.rows) == sorted([tone, wrong])
    assert [r.active.text() for r in panel.rows.values()] == ["tone", "wrongbase"]
    assert not panel.rows[tone].button.isEnabled()  # no model yet
    qtbot.waitUntil(lambda: window.sampler_panel.ready, timeout=30_000)

    window.load_model(smollm2_fp16_dir)
    qtbot.waitUntil(lambda: window.model_info is not None, timeout=LOAD_TIMEOUT_MS)
    engine = window.client.worker.engine
    assert panel.rows[tone].button.isEnabled() and panel.rows[tone].button.text() == "Load"

    # Load / Unload buttons go through the engine thread.
    qtbot.mouseClick(panel.rows[tone].button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: tone in panel.loaded, timeout=LOAD_TIMEOUT_MS)
    assert [i.name for i in engine.loras()] == [tone] and panel.rows[tone].button.text() == "Unload"
    qtbot.mouseClick(panel.rows[tone].button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: tone not in panel.loaded, timeout=LOAD_TIMEOUT_MS)
    assert engine.loras() == []

    # An adapter for another base model: a dialog naming it and the mismatch; the app goes on.
    qtbot.mouseClick(panel.rows[wrong].button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.error_box is not None, timeout=LOAD_TIMEOUT_MS)
    box = window.error_box
    assert "wrongbase" in box.text() and "576" in box.text() and box.windowTitle().startswith("This LoRA adapter")
    box.close()
    qtbot.waitUntil(lambda: window.error_box is None)
    assert wrong not in panel.loaded and panel.rows[wrong].button.text() == "Load"

    # Chat A without adapters, chat B with "tone" ticked (ticking loads it): different replies.
    window.sampler_panel.set_values({"temperature": 0.0}, 6)
    base = ask(qtbot, window, "What is the capital of France?")
    chat_a = window.current_id
    window.new_chat()
    window.sampler_panel.set_values({"temperature": 0.0}, 6)
    panel.rows[tone].active.click()
    qtbot.waitUntil(lambda: tone in panel.loaded, timeout=LOAD_TIMEOUT_MS)
    panel.rows[tone].scale.setValue(1.0)
    tuned = ask(qtbot, window, "What is the capital of France?")
    chat_b = window.current_id
    assert tuned != base
    window.save_settings()
    assert window.store.get_conversation(chat_b).extra["loras"] == {tone: 1.0}
    assert window.store.get_conversation(chat_a).extra.get("loras", {}) == {}

    # The choice follows the chat: opening A shows nothing ticked and replies as the base model.
    window.open_conversation(chat_a)
    assert panel.selection() == {}
    assert not panel.rows[tone].active.isChecked()
    assert regenerate(qtbot, window) == base  # KV cached under "tone" is not reused for chat A
    window.open_conversation(chat_b)
    assert panel.selection() == {tone: 1.0} and panel.rows[tone].active.isChecked()

    # After a model reload the engine holds no adapters; the next reply loads the chat's ones first.
    window.load_model(smollm2_fp16_dir)
    qtbot.waitUntil(lambda: window.model_info is not None and not panel.loaded and window.client.worker.engine
                    is not engine, timeout=LOAD_TIMEOUT_MS)
    qtbot.waitUntil(lambda: window.model_info is not None, timeout=LOAD_TIMEOUT_MS)
    assert regenerate(qtbot, window) == tuned
    assert tone in panel.loaded
    close_window(window)
