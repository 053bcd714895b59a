"""The chat's structured-output field: validated as you type, stored per conversation (real window,
real SQLite, offscreen)."""

from __future__ import annotations

from pathlib import Path

from tests.test_ui_app import close_window, make_window

SCHEMA = '{"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}'


def test_structured_output_field_is_validated_and_kept_per_chat(qtbot, tmp_path: Path) -> None:
    window = make_window(qtbot, tmp_path / "c.sqlite3", tmp_path / "cfg")
    field = window.structured
    first = window.store.create_conversation("First")
    second = window.store.create_conversation("Second")
    window.refresh_list()

    window.open_conversation(first)
    field.edit.setPlainText('{"type": "strnig"}')
    assert field.schema() is None and "strnig" in field.status.text()
    field.edit.setPlainText("{not json")
    assert field.schema() is None and "Not valid JSON" in field.status.text()
    field.edit.setPlainText(SCHEMA)
    assert field.schema()["required"] == ["answer"] and field.error == ""
    window.save_settings()
    assert window.store.get_conversation(first).extra["json_schema"] == SCHEMA

    window.open_conversation(second)
    assert field.text() == "" and field.schema() is None
    window.open_conversation(first)
    assert field.text() == SCHEMA and field.schema() is not None
    close_window(window)
