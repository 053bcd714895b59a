"""The LoRA panel: adapters in the library (folders with adapter_config.json), loaded into and
unloaded from the engine, a scale each, and a tick for the ones active in the current chat.

The chat's choice ({adapter folder: scale}) is stored with the conversation's settings and sent with
every request as GenerationSettings.loras; the engine knows each adapter by its folder path.
Engine calls run on the engine thread (LoraWorker lives there beside EngineWorker), so a load queued
just before a reply is done before the reply starts.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from PySide6.QtCore import QObject, Qt, QTimer, Signal, Slot
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.hub.adapters import AdapterCard, read_adapter_card, scan_adapters

from .worker import EngineClient, ErrorReport, describe_error

SCALE_RANGE = (-4.0, 4.0)


class LoraWorker(QObject):
    """Engine-thread slots for adapters; results come back as signals (queued to the GUI)."""

    loaded = Signal(str)            # adapter path
    unloaded = Signal(str)
    failed = Signal(str, object)    # adapter path, ErrorReport

    def __init__(self, client: EngineClient) -> None:
        super().__init__()
        self.client = client

    @Slot(str)
    def load(self, path: str) -> None:
        engine = self.client.worker.engine
        if engine is None:
            self.failed.emit(path, ErrorReport("generation", "No model loaded", "Load a model before its adapters.",
                                               "LoRA adapters apply to the loaded model."))
            return
        try:
            if path not in {i.name for i in engine.loras()}:
                engine.load_lora(path, name=path)
        except Exception as e:  # noqa: BLE001 - every failure becomes a dialog; the app goes on
            report = describe_error(e, "load the LoRA adapter")
            if report.kind == "format":
                report = replace(report, title="This LoRA adapter cannot be loaded",
                                 hint=report.hint or "Pick an adapter made for the loaded model.")
            self.failed.emit(path, report)
            return
        self.loaded.emit(path)

    @Slot(str)
    def unload(self, path: str) -> None:
        engine = self.client.worker.engine
        if engine is not None:
            engine.unload_lora(path)
        self.unloaded.emit(path)


class AdapterRow:
    """One adapter: [active tick] name  [scale]  [Load/Unload]."""

    def __init__(self, card: AdapterCard, panel: LoraPanel) -> None:
        self.card = card
        self.active = QCheckBox(card.name)
        self.active.setToolTip(_describe(card))
        self.scale = QDoubleSpinBox()
        self.scale.setRange(*SCALE_RANGE)
        self.scale.setSingleStep(0.05)
        self.scale.setDecimals(2)
        self.scale.setValue(1.0)
        self.scale.setFixedWidth(64)
        self.scale.setAlignment(Qt.AlignmentFlag.AlignRight)
        self.scale.setToolTip("How strongly this adapter applies (1 = as trained, 0 = off).")
        self.button = QPushButton("Load")
        self.button.setFixedWidth(70)
        self.active.toggled.connect(lambda on: panel._ticked(self, on))
        self.scale.valueChanged.connect(lambda _v: panel._user_changed())
        self.button.clicked.connect(lambda: panel._button(self))


def _describe(card: AdapterCard) -> str:
    parts = [card.path]
    if card.rank is not None:
        parts.append(f"rank {card.rank}, alpha {card.alpha:g}{' (rsLoRA)' if card.rslora else ''}")
    if card.targets:
        parts.append("targets: " + ", ".join(card.targets))
    if card.base_model:
        parts.append(f"made for: {card.base_model}")
    if card.problem:
        parts.append(f"problem: {card.problem}")
    return "\n".join(parts)


class LoraPanel(QWidget):
    """Emits `changed` on user edits of the chat's choice (not on `set_selection`), `error` on a
    failed load (the window shows it)."""

    changed = Signal()
    error = Signal(object)          # ErrorReport
    _load = Signal(str)
    _unload = Signal(str)

    def __init__(self, client: EngineClient, folders: list[str] | None = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.client = client
        self._folders = folders
        self.rows: dict[str, AdapterRow] = {}
        self.loaded: set[str] = set()
        self.model_loaded = False
        self._programmatic = False
        self.worker = LoraWorker(client)
        self.worker.moveToThread(client.thread)
        self._load.connect(self.worker.load)
        self._unload.connect(self.worker.unload)
        self.worker.loaded.connect(self._loaded)
        self.worker.unloaded.connect(self._unloaded)
        self.worker.failed.connect(self._failed)
        # bound methods, not lambdas: the slots must run on the GUI thread (queued), not the engine's
        client.worker.loaded.connect(self._model_loaded)
        client.worker.unloaded.connect(self._model_gone)
        client.worker.load_failed.connect(self._model_gone)

        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(6)
        self.grid = QGridLayout()
        self.grid.setHorizontalSpacing(8)
        self.grid.setVerticalSpacing(4)
        self.grid.setColumnStretch(0, 1)
        outer.addLayout(self.grid)
        self.empty = QLabel("No LoRA adapters in the library.")
        self.empty.setObjectName("ValueLabel")
        self.empty.setWordWrap(True)
        outer.addWidget(self.empty)
        buttons = QHBoxLayout()
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setToolTip("Look for adapter folders (adapter_config.json) in the library again.")
        self.refresh_button.clicked.connect(self.refresh)
        self.open_button = QPushButton("Add folder…")
        self.open_button.setToolTip("List an adapter folder from anywhere on disk.")
        self.open_button.clicked.connect(self._open_dialog)
        buttons.addWidget(self.refresh_button)
        buttons.addWidget(self.open_button)
        buttons.addStretch(1)
        outer.addLayout(buttons)
        QTimer.singleShot(0, self._first_scan)  # after the window's first paint

    def _first_scan(self) -> None:
        if not self.rows:
            self.refresh()

    # --- library ------------------------------------------------------------------------------

    def folders(self) -> list[str]:
        if self._folders is None:
            from .hub_browser import default_library_dir

            self._folders = [default_library_dir()]
        return self._folders

    def set_folders(self, folders: list[str]) -> None:
        self._folders = list(folders)
        self.refresh()

    def refresh(self) -> None:
        """Rescan the library; keeps ticks, scales and added folders."""
        keep = self.selection()
        scales = {p: r.scale.value() for p, r in self.rows.items()}
        cards = {os.path.realpath(c.path): c for c in scan_adapters(self.folders())}
        for path in list(self.rows):
            if path not in cards and path not in keep:
                cards[path] = self.rows[path].card
        self._rebuild(sorted(cards.values(), key=lambda c: (c.name.lower(), c.path)))
        self._programmatic = True
        try:
            for path, value in scales.items():
                if path in self.rows:
                    self.rows[path].scale.setValue(value)
        finally:
            self._programmatic = False
        self.set_selection(keep)

    def add_folder(self, path: str) -> None:
        path = os.path.realpath(path)
        if path not in self.rows:
            cards = [r.card for r in self.rows.values()] + [read_adapter_card(path)]
            self._rebuild(sorted(cards, key=lambda c: (c.name.lower(), c.path)))

    def _rebuild(self, cards: list[AdapterCard]) -> None:
        for row in self.rows.values():
            for w in (row.active, row.scale, row.button):
                self.grid.removeWidget(w)
                w.deleteLater()
        self.rows = {}
        for i, card in enumerate(cards):
            row = AdapterRow(card, self)
            path = os.path.realpath(card.path)
            self.rows[path] = row
            self.grid.addWidget(row.active, i, 0)
            self.grid.addWidget(row.scale, i, 1)
            self.grid.addWidget(row.button, i, 2)
            self._show_state(path)
        self.empty.setVisible(not cards)

    def _open_dialog(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "LoRA adapter folder (holds adapter_config.json)")
        if path:
            self.add_folder(path)

    # --- the chat's choice --------------------------------------------------------------------

    def selection(self) -> dict[str, float]:
        """{adapter folder: scale} of the ticked adapters: stored with the chat, sent with requests."""
        return {p: round(r.scale.value(), 4) for p, r in self.rows.items() if r.active.isChecked()}

    def set_selection(self, selection: dict[str, Any]) -> None:
        """Show a conversation's choice; adapters it names that the library lacks get a row too."""
        self._programmatic = True
        try:
            missing = [p for p in selection if os.path.realpath(p) not in self.rows]
            if missing:
                cards = [r.card for r in self.rows.values()] + [read_adapter_card(p) for p in missing]
                self._rebuild(sorted(cards, key=lambda c: (c.name.lower(), c.path)))
            chosen = {os.path.realpath(p): float(v) for p, v in selection.items()}
            for path, row in self.rows.items():
                row.active.setChecked(path in chosen)
                if path in chosen:
                    row.scale.setValue(chosen[path])
        finally:
            self._programmatic = False

    def request_loras(self) -> dict[str, float]:
        """The selection for the next request, loading (on the engine thread, before the reply)
        any ticked adapter the engine does not hold yet."""
        chosen = self.selection()
        for path in chosen:
            if path not in self.loaded:
                self._load.emit(path)
        return chosen

    # --- engine -------------------------------------------------------------------------------

    def load(self, path: str) -> None:
        self.rows[path].button.setEnabled(False)
        self.rows[path].button.setText("Loading…")
        self._load.emit(path)

    def unload(self, path: str) -> None:
        self._unload.emit(path)

    def _ticked(self, row: AdapterRow, on: bool) -> None:
        if self._programmatic:
            return
        path = os.path.realpath(row.card.path)
        if on and self.model_loaded and path not in self.loaded:
            self.load(path)
        self._user_changed()

    def _button(self, row: AdapterRow) -> None:
        path = os.path.realpath(row.card.path)
        if path in self.loaded:
            self.unload(path)
        else:
            self.load(path)

    def _user_changed(self) -> None:
        if not self._programmatic:
            self.changed.emit()

    def _loaded(self, path: str) -> None:
        self.loaded.add(path)
        self._show_state(path)

    def _unloaded(self, path: str) -> None:
        self.loaded.discard(path)
        self._show_state(path)

    def _failed(self, path: str, report: ErrorReport) -> None:
        self.loaded.discard(path)
        self._show_state(path)
        self.error.emit(report)

    def _model_loaded(self, _info: Any = None) -> None:
        self._model_changed(True)

    def _model_gone(self, _report: Any = None) -> None:
        self._model_changed(False)

    def _model_changed(self, loaded: bool) -> None:
        self.model_loaded = loaded
        self.loaded.clear()  # a new engine holds no adapters
        for path in self.rows:
            self._show_state(path)

    def _show_state(self, path: str) -> None:
        row = self.rows.get(path)
        if row is None:
            return
        held = path in self.loaded
        row.button.setText("Unload" if held else "Load")
        row.button.setEnabled(held or (self.model_loaded and row.card.problem is None))
        state = "loaded" if held else "not loaded"
        row.button.setToolTip(f"{row.card.name}: {state}." + ("" if self.model_loaded or held else
                                                              " Load a model first."))
        font = row.active.font()
        font.setBold(held)
        row.active.setFont(font)
