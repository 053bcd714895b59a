"""Model panel: pick a model folder, load/unload it with progress, show what is loaded."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .worker import LoadRequest

log = logging.getLogger(__name__)
MAX_RECENT = 8
CACHE_MODES = (("fp16", "FP16 (exact)"), ("q8", "Q8 (half the memory)"), ("q6", "Q6"),
               ("q4", "Q4 (a quarter of the memory)"))
OVERFLOW = (("stop", "Stop and tell me"), ("drop_oldest", "Drop the oldest turns"))


def human_count(n: int | None) -> str:
    if not n:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)


def describe_model(info: Any) -> list[tuple[str, str]]:
    """Label/value rows for a ModelInfo."""
    quant = f"EXL2 {info.bits_per_weight:.2f} bpw" if info.bits_per_weight else "fp16/bf16 (not quantized)"
    if info.head_bits:
        quant += f", head {info.head_bits}-bit"
    return [("Architecture", info.architecture.replace("ForCausalLM", "")),
            ("Parameters", human_count(info.parameters)),
            ("Weights", quant),
            ("Backend", f"{info.backend} on {info.device}"),
            ("Context", f"{info.max_seq_len:,} tokens"
                        + (f", {info.cache_mode.upper()} cache" if getattr(info, "cache_mode", "fp16") != "fp16" else ""))] + (
        [("Draft", Path(info.draft_model).name)] if getattr(info, "draft_model", None) else [])


class RecentModels:
    """Recently loaded model folders, newest first, in `<config>/recent_models.json`."""

    def __init__(self, config_dir: Path) -> None:
        self.path = Path(config_dir) / "recent_models.json"

    def load(self) -> list[str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return [p for p in data if isinstance(p, str)][:MAX_RECENT]
        except (OSError, ValueError, TypeError):
            return []

    def add(self, folder: str) -> list[str]:
        items = [folder] + [p for p in self.load() if p != folder]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(items[:MAX_RECENT], indent=1), encoding="utf-8")
        except OSError as e:
            log.warning("cannot remember recent models: %s", e)
        return items[:MAX_RECENT]


class ModelPanel(QWidget):
    load_requested = Signal(object)    # LoadRequest
    unload_requested = Signal()

    def __init__(self, recent: RecentModels, folder_icon: Any = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.recent = recent
        self.info: Any = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(10)

        card = QFrame()
        card.setObjectName("Card")
        card_layout = QVBoxLayout(card)
        card_layout.setContentsMargins(14, 12, 14, 12)
        card_layout.setSpacing(6)
        self.name_label = QLabel("No model loaded")
        self.name_label.setObjectName("ModelName")
        self.name_label.setWordWrap(True)
        self.state_label = QLabel("Pick a model folder below and press Load.")
        self.state_label.setObjectName("ValueLabel")
        self.state_label.setWordWrap(True)
        self.details = QGridLayout()
        self.details.setHorizontalSpacing(12)
        self.details.setVerticalSpacing(3)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.progress.hide()
        card_layout.addWidget(self.name_label)
        card_layout.addWidget(self.state_label)
        card_layout.addLayout(self.details)
        card_layout.addWidget(self.progress)
        layout.addWidget(card)

        path_row = QHBoxLayout()
        self.path_combo = QComboBox()
        self.path_combo.setEditable(True)
        self.path_combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.path_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.path_combo.setMinimumContentsLength(12)
        self.path_combo.lineEdit().setPlaceholderText("Model folder…")
        self.path_combo.setToolTip("A folder with config.json and *.safetensors (EXL2 or fp16/bf16).")
        self.path_combo.addItems(self.recent.load())
        self.browse_button = QToolButton()
        self.browse_button.setObjectName("HeaderButton")
        self.browse_button.setToolTip("Browse for a model folder")
        if folder_icon is not None:
            self.browse_button.setIcon(folder_icon)
        self.browse_button.clicked.connect(self._browse)
        path_row.addWidget(self.path_combo, 1)
        path_row.addWidget(self.browse_button)
        layout.addLayout(path_row)

        options = QGridLayout()
        options.setHorizontalSpacing(10)
        options.setVerticalSpacing(6)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cuda", "cpu"])
        self.device_combo.setToolTip("auto uses the NVIDIA GPU when there is one.")
        self.context_spin = QSpinBox()
        self.context_spin.setRange(0, 1 << 20)
        self.context_spin.setSingleStep(1024)
        self.context_spin.setSpecialValueText("Auto")
        self.context_spin.setAlignment(Qt.AlignmentFlag.AlignRight)
        self.context_spin.setToolTip("Tokens of context to allocate (Auto: the model's limit, capped to fit).")
        self.cache_combo = QComboBox()
        for key, label in CACHE_MODES:
            self.cache_combo.addItem(label, key)
        self.cache_combo.setToolTip("KV cache precision. Quantized caches hold 2-4x longer chats in the same "
                                    "memory at a small cost in quality.")
        self.rope_scale_spin = self._rope_spin("Linear RoPE scale (positions / scale) on top of the model's "
                                               "config. Auto: as the model was trained.")
        self.rope_alpha_spin = self._rope_spin("NTK RoPE alpha: stretches the context without fine-tuning "
                                               "(about 2.5 for twice the trained length). Auto: none.")
        self.overflow_combo = QComboBox()
        for key, label in OVERFLOW:
            self.overflow_combo.addItem(label, key)
        self.overflow_combo.setToolTip("What happens when a chat no longer fits the context: stop with a "
                                       "message, or leave out the oldest turns (the system prompt is kept).")
        self.draft_edit, self.ngram_check = self._speculative_fields(folder_icon)
        draft_row = QHBoxLayout()
        draft_row.addWidget(self.draft_edit, 1)
        draft_row.addWidget(self.draft_button)
        for row, (text, widget) in enumerate((("Device", self.device_combo), ("Context size", self.context_spin),
                                               ("KV cache", self.cache_combo), ("RoPE scale", self.rope_scale_spin),
                                               ("RoPE alpha", self.rope_alpha_spin),
                                               ("When the chat is full", self.overflow_combo),
                                               ("Draft model", draft_row), ("", self.ngram_check))):
            label = QLabel(text)
            label.setObjectName("FieldLabel")
            options.addWidget(label, row, 0)
            if isinstance(widget, QHBoxLayout):
                options.addLayout(widget, row, 1)
            else:
                options.addWidget(widget, row, 1)
        options.setColumnStretch(1, 1)
        layout.addLayout(options)

        buttons = QHBoxLayout()
        self.load_button = QPushButton("Load model")
        self.load_button.setObjectName("PrimaryButton")
        self.load_button.clicked.connect(self._load_clicked)
        self.unload_button = QPushButton("Unload")
        self.unload_button.setEnabled(False)
        self.unload_button.clicked.connect(self.unload_requested)
        buttons.addWidget(self.load_button, 1)
        buttons.addWidget(self.unload_button)
        layout.addLayout(buttons)

    def _speculative_fields(self, folder_icon: Any) -> tuple[QLineEdit, QCheckBox]:
        """Speculative decoding at load: an optional draft model, or n-gram lookup (no second model)."""
        edit = QLineEdit()
        edit.setPlaceholderText("None (optional)")
        edit.setToolTip("A smaller model with the same tokenizer drafts tokens that this model checks "
                        "in one pass: faster replies, same output.")
        self.draft_button = QToolButton()
        self.draft_button.setObjectName("HeaderButton")
        self.draft_button.setToolTip("Browse for a draft model folder")
        if folder_icon is not None:
            self.draft_button.setIcon(folder_icon)
        self.draft_button.clicked.connect(self._browse_draft)
        check = QCheckBox("N-gram drafting (no draft model)")
        check.setToolTip("Drafts tokens by looking up the last few tokens earlier in the conversation; "
                         "helps most when the reply repeats text (editing code or documents).")
        check.toggled.connect(lambda on: (edit.setEnabled(not on), self.draft_button.setEnabled(not on)))
        return edit, check

    def _browse_draft(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a draft model folder", self.draft_edit.text())
        if folder:
            self.draft_edit.setText(folder)

    # --- requests -----------------------------------------------------------------------------

    def request(self) -> LoadRequest:
        context = self.context_spin.value()
        ngram = self.ngram_check.isChecked()
        return LoadRequest(self.path_combo.currentText().strip(), self.device_combo.currentText(),
                           context or None, self.cache_combo.currentData(),
                           self.rope_scale_spin.value() or None, self.rope_alpha_spin.value() or None,
                           draft=None if ngram else self.draft_edit.text().strip() or None,
                           speculative="ngram" if ngram else None)


    @staticmethod
    def _rope_spin(tip: str) -> QDoubleSpinBox:
        spin = QDoubleSpinBox()
        spin.setRange(0.0, 64.0)
        spin.setDecimals(2)
        spin.setSingleStep(0.25)
        spin.setSpecialValueText("Auto")  # 0 = no override
        spin.setAlignment(Qt.AlignmentFlag.AlignRight)
        spin.setToolTip(tip)
        return spin

    def overflow(self) -> str:
        return self.overflow_combo.currentData()

    def set_overflow(self, policy: str) -> None:
        index = self.overflow_combo.findData(policy)
        if index >= 0:
            self.overflow_combo.setCurrentIndex(index)

    def set_path(self, folder: str) -> None:
        self.path_combo.setCurrentText(folder)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a model folder", self.path_combo.currentText())
        if folder:
            self.set_path(folder)

    def _load_clicked(self) -> None:
        request = self.request()
        if not request.path:
            self.state_label.setText("Type or browse for a model folder first.")
            return
        self.load_requested.emit(request)

    # --- state --------------------------------------------------------------------------------

    def set_loading(self, fraction: float, message: str) -> None:
        self.load_button.setEnabled(False)
        self.unload_button.setEnabled(False)
        self.progress.show()
        self.progress.setValue(int(max(0.0, min(1.0, fraction)) * 1000))
        self.state_label.setText(f"Loading… {message}" if message else "Loading…")

    def set_loaded(self, info: Any) -> None:
        self.info = info
        self.progress.hide()
        self.name_label.setText(info.name)
        self.state_label.setText("Ready")
        self._show_details(describe_model(info))
        self.load_button.setEnabled(True)
        self.load_button.setText("Load another")
        self.unload_button.setEnabled(True)
        items = self.recent.add(info.path)
        self.path_combo.clear()
        self.path_combo.addItems(items)
        self.set_path(info.path)

    def set_unloaded(self, message: str = "Pick a model folder below and press Load.") -> None:
        self.info = None
        self.progress.hide()
        self.name_label.setText("No model loaded")
        self.state_label.setText(message)
        self._show_details([])
        self.load_button.setEnabled(True)
        self.load_button.setText("Load model")
        self.unload_button.setEnabled(False)

    def _show_details(self, rows: list[tuple[str, str]]) -> None:
        while self.details.count():
            item = self.details.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        for i, (label, value) in enumerate(rows):
            key = QLabel(label)
            key.setObjectName("ValueLabel")
            val = QLabel(value)
            val.setObjectName("FieldLabel")
            val.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.details.addWidget(key, i, 0)
            self.details.addWidget(val, i, 1)
        self.details.setColumnStretch(1, 1)
