"""The chat's "structured output" field: a JSON schema the reply must follow, checked as you type.

Stored per conversation (Conversation.extra["json_schema"]); an empty field means free text.
Validation uses the engine's grammar compiler (llguidance, no torch), so what is accepted here is
what the engine can enforce.
"""

from __future__ import annotations

import json
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QLabel, QPlainTextEdit, QVBoxLayout, QWidget


def check_schema_text(text: str) -> tuple[dict[str, Any] | None, str]:
    """(schema or None, error message or ""): empty text is no schema and no error."""
    if not text.strip():
        return None, ""
    try:
        schema = json.loads(text)
    except ValueError as exc:
        return None, f"Not valid JSON: {exc}"
    from app.engine.constrained import ConstraintError, validate_schema

    try:
        validate_schema(schema)
    except ConstraintError as exc:
        return None, str(exc)
    return schema, ""


class StructuredOutputField(QWidget):
    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        title = QLabel("Structured output (JSON schema)")
        title.setToolTip("Replies are constrained to JSON that follows this schema. Leave empty for free text.")
        self.edit = QPlainTextEdit()
        self.edit.setPlaceholderText('{"type": "object", "properties": {...}}')
        self.edit.setFixedHeight(90)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(title)
        layout.addWidget(self.edit)
        layout.addWidget(self.status)
        self._schema: dict[str, Any] | None = None
        self.error = ""
        self.edit.textChanged.connect(self._validate)

    def text(self) -> str:
        return self.edit.toPlainText()

    def set_text(self, text: str) -> None:
        if text != self.text():
            self.edit.setPlainText(text)
        self._validate(emit=False)

    def schema(self) -> dict[str, Any] | None:
        """The schema to constrain replies with, or None (empty or invalid field)."""
        return self._schema

    def _validate(self, emit: bool = True) -> None:
        self._schema, self.error = check_schema_text(self.text())
        if self.error:
            self.status.setText(self.error)
            self.status.setStyleSheet("color: #c0392b;")
        else:
            self.status.setText("Replies follow this schema." if self._schema is not None else "")
            self.status.setStyleSheet("")
        if emit:
            self.changed.emit()
