"""The real window (offscreen) with a small context: load options (KV cache mode, RoPE), and the
context overflow policy — a visible notice when old turns are dropped, a dialog when set to stop."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from app.store import Store
from app.ui.main_window import MainWindow
from app.ui.model_panel import describe_model

pytestmark = pytest.mark.timeout(900)
LOAD_TIMEOUT_MS = 90_000
REPLY_TIMEOUT_MS = 240_000
LONG = "Tell me more about the migration of birds across the sea in autumn. " * 5


def send(qtbot, window: MainWindow, text: str) -> None:
    window.chat.composer.edit.setPlainText(text)
    qtbot.keyClick(window.chat.composer.edit, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: window.generation is None, timeout=REPLY_TIMEOUT_MS)


def test_load_options_and_context_overflow_policies(qtbot, tmp_path: Path, smollm2_fp16_dir: str) -> None:
    store = Store(tmp_path / "chats.sqlite3", flush_interval=0.1)
    window = MainWindow(store, tmp_path / "config", "light")
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.sampler_panel.ready, timeout=30_000)
    try:
        panel = window.model_panel
        panel.context_spin.setValue(192)
        panel.cache_combo.setCurrentIndex(panel.cache_combo.findData("q8"))
        panel.rope_alpha_spin.setValue(1.5)
        panel.set_overflow("drop_oldest")
        request = panel.request()
        assert (request.cache_mode, request.rope_alpha, request.rope_scale) == ("q8", 1.5, None)
        window.load_model(smollm2_fp16_dir)
        qtbot.waitUntil(lambda: window.model_info is not None, timeout=LOAD_TIMEOUT_MS)
        assert window.model_info.cache_mode == "q8" and window.model_info.max_seq_len == 192
        engine = window.client.worker.engine
        assert engine.model.rope_alpha == 1.5
        assert any("Q8 cache" in value for _, value in describe_model(window.model_info))

        window.sampler_panel.set_values({"temperature": 0.0}, 4)
        for _ in range(3):  # each turn ~70 tokens: the third outgrows 192 tokens
            send(qtbot, window, LONG)
            assert window.error_box is None, window.error_box and window.error_box.text()
        cid = window.current_id
        replies = [m for m in store.messages(cid) if m.role == "assistant"]
        assert len(replies) == 3 and all(r.finish_reason in ("stop", "length") for r in replies)
        notice = window.chat.notice
        assert notice.isVisible() and "oldest" in notice.text() and "system prompt" in notice.text()
        assert window.model_panel.overflow() == "drop_oldest"
        assert window.prefs.get("context_overflow") == "drop_oldest"  # remembered for the next start

        window.new_chat()  # switching chats clears the notice
        assert not window.chat.notice.isVisible()

        window.model_panel.set_overflow("stop")  # a new chat grown past the context: a dialog, no reply
        for _ in range(3):
            send(qtbot, window, LONG)
            if window.error_box is not None:
                break
        box = window.error_box
        assert box is not None and box.isVisible()
        assert "full" in box.text().lower() and "drop oldest turns" in (box.informativeText() + box.text())
        box.close()
        qtbot.waitUntil(lambda: window.error_box is None)
    finally:
        window.close()
        store.close()
