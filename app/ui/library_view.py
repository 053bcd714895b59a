"""Library page: one card per local model (app.hub.library.scan_library) with what it is, its size
on disk and whether it fits the chosen GPU; open its folder, delete it (after asking), or load it
into the chat through the main window's existing load path (the `load_requested` signal).

The scan reads only config.json and safetensors headers, but it walks folders and the HF cache,
so it runs off the GUI thread.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from PySide6.QtCore import QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.hub.library import ModelCard, delete_model, scan_library

from .downloads import human_bytes
from .planner_view import (
    BadgeLabel,
    GpuPicker,
    error_words,
    fit_badge,
    run_task,
    scrolling_list,
    unknown_badge,
)


def card_facts(card: ModelCard) -> list[tuple[str, str]]:
    """Label/value rows of a card, "?" where the folder does not say."""
    if card.params:
        n = card.params
        params = f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"
    else:
        params = "?"
    weights = f"EXL2 {card.bpw:g} bpw" if card.bpw else "fp16/bf16"
    if card.head_bits:
        weights += f", head {card.head_bits}-bit"
    return [("Architecture", (card.architecture or "?").replace("ForCausalLM", "")),
            ("Parameters", params),
            ("Weights", weights),
            ("Context", f"{card.context_length:,}" if card.context_length else "?"),
            ("On disk", human_bytes(card.size_bytes))]


def card_spec(card: ModelCard) -> Any:
    """The planner's spec of a local model (exact weight bytes from its headers), or the words why not."""
    from app.planner import spec_from_folder

    if card.problem and not card.supported:
        return card.problem
    try:
        return spec_from_folder(card.path)
    except Exception as e:  # noqa: BLE001 - a badge must never break the page; the words say why
        return error_words(e)


def scan_with_specs(folders: list[str], include_hf_cache: bool, hf_cache_dir: str | None
                    ) -> list[tuple[ModelCard, Any]]:
    """Worker-thread half of a refresh: cards plus their specs (this also imports torch off the GUI
    thread, which the estimate needs for the engine's cache formula)."""
    from app.planner import cache_modes

    cache_modes()
    cards = scan_library(folders, include_hf_cache=include_hf_cache, hf_cache_dir=hf_cache_dir)
    return [(card, card_spec(card)) for card in cards]


def card_badge(spec: Any, gpu: Any) -> Any:
    """Fit badge from a spec, or an unknown badge carrying the reason there is none."""
    if isinstance(spec, str):
        return unknown_badge(spec)
    try:
        return fit_badge(spec, gpu)
    except Exception as e:  # noqa: BLE001
        return unknown_badge(error_words(e))


class ModelCardWidget(QFrame):
    load_clicked = Signal(str)

    def __init__(self, view: LibraryView, card: ModelCard, spec: Any = None) -> None:
        super().__init__()
        self.view = view
        self.card = card
        self.spec = spec if spec is not None else card_spec(card)
        self.setObjectName("Card")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(14, 10, 14, 10)
        top = QHBoxLayout()
        name = QLabel(f"<b>{card.name}</b>")
        name.setToolTip(card.path)
        top.addWidget(name, 1)
        self.badge = BadgeLabel(unknown_badge("Checking…"))
        top.addWidget(self.badge)
        layout.addLayout(top)
        grid = QGridLayout()
        for i, (label, value) in enumerate(card_facts(card)):
            key = QLabel(label)
            key.setObjectName("ValueLabel")
            grid.addWidget(key, i // 3, (i % 3) * 2)
            grid.addWidget(QLabel(value), i // 3, (i % 3) * 2 + 1)
        layout.addLayout(grid)
        if card.problem:
            problem = QLabel(card.problem)
            problem.setWordWrap(True)
            problem.setStyleSheet("color: #c93b3b;")
            layout.addWidget(problem)
        buttons = QHBoxLayout()
        self.load_button = QPushButton("Load into chat")
        self.load_button.setObjectName("PrimaryButton")
        self.load_button.setEnabled(card.supported)
        self.load_button.clicked.connect(lambda: view.load_requested.emit(card.path))
        self.plan_button = QPushButton("Plan…")
        self.plan_button.clicked.connect(lambda: view.plan_requested.emit(card.path))
        self.open_button = QPushButton("Open folder")
        self.open_button.clicked.connect(lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(card.path)))
        self.delete_button = QPushButton("Delete…")
        self.delete_button.clicked.connect(lambda: view.confirm_delete(card))
        buttons.addWidget(self.load_button)
        buttons.addWidget(self.plan_button)
        buttons.addStretch(1)
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.delete_button)
        layout.addLayout(buttons)
        self.update_badge()

    def update_badge(self) -> None:
        self.badge.set_badge(card_badge(self.spec, self.view.gpu.option))


class LibraryView(QWidget):
    load_requested = Signal(str)     # model folder, for MainWindow.load_model
    plan_requested = Signal(str)     # model folder, for the planner page
    scanned = Signal()

    def __init__(self, folders: Iterable[str], parent: QWidget | None = None, *, include_hf_cache: bool = True,
                 hf_cache_dir: str | None = None, gpu_picker: GpuPicker | None = None) -> None:
        super().__init__(parent)
        self.folders = list(folders)
        self.include_hf_cache = include_hf_cache
        self.hf_cache_dir = hf_cache_dir
        self.cards: list[ModelCard] = []
        self.widgets: list[ModelCardWidget] = []
        self.scanning = False
        self.confirm_box: QMessageBox | None = None
        outer = QVBoxLayout(self)
        outer.setContentsMargins(16, 16, 16, 16)
        top = QHBoxLayout()
        title = QLabel("Library")
        title.setObjectName("PanelTitle")
        top.addWidget(title)
        top.addStretch(1)
        top.addWidget(QLabel("Fit on"))
        self.gpu = gpu_picker or GpuPicker()
        self.gpu.currentIndexChanged.connect(self._update_badges)
        top.addWidget(self.gpu)
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.clicked.connect(self.refresh)
        top.addWidget(self.refresh_button)
        outer.addLayout(top)
        self.status = QLabel("")
        self.status.setObjectName("ValueLabel")
        self.status.setWordWrap(True)
        outer.addWidget(self.status)
        self.list_layout = scrolling_list(outer)

    def refresh(self) -> None:
        if self.scanning:
            return
        self.scanning = True
        self.status.setText("Looking for models…")
        folders, cache, cache_dir = list(self.folders), self.include_hf_cache, self.hf_cache_dir
        run_task(lambda: scan_with_specs(folders, cache, cache_dir), self._scanned, self._scan_failed)

    def _scanned(self, found: list[tuple[ModelCard, Any]]) -> None:
        self.scanning = False
        self.set_cards([c for c, _s in found], [s for _c, s in found])
        self.scanned.emit()

    def _scan_failed(self, error: BaseException) -> None:
        self.scanning = False
        self.status.setText(error_words(error))
        self.scanned.emit()

    def set_cards(self, cards: list[ModelCard], specs: list[Any] | None = None) -> None:
        for w in self.widgets:
            w.setParent(None)
            w.deleteLater()
        self.cards = list(cards)
        self.widgets = []
        for card, spec in zip(self.cards, specs or [None] * len(self.cards), strict=True):
            w = ModelCardWidget(self, card, spec)
            self.widgets.append(w)
            self.list_layout.insertWidget(self.list_layout.count() - 1, w)
        total = sum(c.size_bytes for c in self.cards)
        self.status.setText(f"{len(self.cards)} model{'s' if len(self.cards) != 1 else ''}, "
                            f"{human_bytes(total)} on disk" if self.cards else
                            "No models yet. Download one from Browse, or add a folder that holds models.")

    def widget_for(self, path: str) -> ModelCardWidget | None:
        import os

        real = os.path.realpath(path)
        return next((w for w in self.widgets if os.path.realpath(w.card.path) == real), None)

    def _update_badges(self) -> None:
        for w in self.widgets:
            w.update_badge()

    def confirm_delete(self, card: ModelCard) -> QMessageBox:
        """Ask first (window-modal, not blocking the event loop); delete only on the Delete button."""
        box = QMessageBox(QMessageBox.Icon.Question, "Delete model",
                          f"Delete “{card.name}” from disk? This frees {human_bytes(card.size_bytes)}.\n"
                          f"{card.path}", QMessageBox.StandardButton.Cancel, self)
        delete = box.addButton("Delete", QMessageBox.ButtonRole.DestructiveRole)
        box.buttonClicked.connect(lambda b: self.delete(card) if b is delete else None)
        box.finished.connect(lambda _r: setattr(self, "confirm_box", None))
        self.confirm_box = box
        box.open()
        return box

    def delete(self, card: ModelCard) -> None:
        try:
            freed = delete_model(card, hf_cache_dir=self.hf_cache_dir)
        except Exception as e:  # noqa: BLE001 - shown in words
            self.status.setText(error_words(e))
            return
        keep = [w for w in self.widgets if w.card.path != card.path]
        self.set_cards([w.card for w in keep], [w.spec for w in keep])
        self.status.setText(f"Deleted {card.name}; freed {human_bytes(freed)}.")
