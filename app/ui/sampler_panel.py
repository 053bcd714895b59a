"""The sampler panel, generated from app.engine.samplers.SAMPLERS: one slider + spin box per
SamplerSpec (kind/min/max/step/default), tooltip = spec.help, grouped by spec.group. No sampler is
written out by hand here; a new SamplerSpec shows up on its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .presets import Preset, PresetError, PresetStore

CUSTOM = "Custom"
DEFAULT_MAX_NEW_TOKENS = 1024


def decimals_for(step: float) -> int:
    """Digits after the point that a step needs (0.05 -> 2, 1 -> 0)."""
    if step >= 1:
        return 0
    return min(6, max(1, math.ceil(-math.log10(step) - 1e-9)))


def slider_ticks(spec: Any) -> int:
    return max(1, round((spec.maximum - spec.minimum) / spec.step))


class SamplerRow:
    """One spec's widgets, kept in sync: the slider counts steps, the spin box shows the value."""

    def __init__(self, spec: Any, on_change: Any) -> None:
        self.spec = spec
        self.label = QLabel(spec.label)
        self.label.setObjectName("FieldLabel")
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, slider_ticks(spec))
        if spec.kind == "int":
            self.spin: QSpinBox | QDoubleSpinBox = QSpinBox()
        else:
            self.spin = QDoubleSpinBox()
            self.spin.setDecimals(decimals_for(spec.step))
        self.spin.setRange(spec.minimum, spec.maximum)
        self.spin.setSingleStep(spec.step)
        self.spin.setAlignment(Qt.AlignmentFlag.AlignRight)
        self.spin.setFixedWidth(70)
        for w in (self.label, self.slider, self.spin):
            w.setToolTip(f"<b>{spec.label}</b><br>{spec.help}<br><i>default {spec.default}</i>")
        self.slider.valueChanged.connect(self._from_slider)
        self.spin.valueChanged.connect(self._from_spin)
        self._on_change = on_change
        self._syncing = False
        self.set_value(spec.default)

    def value(self) -> int | float:
        v = self.spin.value()
        return int(v) if self.spec.kind == "int" else round(float(v), decimals_for(self.spec.step))

    def set_value(self, value: Any) -> None:
        self._syncing = True
        try:
            self.spin.setValue(value)
            self.slider.setValue(round((float(self.spin.value()) - self.spec.minimum) / self.spec.step))
        finally:
            self._syncing = False

    def _from_slider(self, ticks: int) -> None:
        if self._syncing:
            return
        self._syncing = True
        self.spin.setValue(self.spec.minimum + ticks * self.spec.step)
        self._syncing = False
        self._on_change()

    def _from_spin(self, value: float) -> None:
        if self._syncing:
            return
        self._syncing = True
        self.slider.setValue(round((value - self.spec.minimum) / self.spec.step))
        self._syncing = False
        self._on_change()


class TextRow:
    """List- and dict-valued samplers (banned strings, logit bias, ...): one line of JSON."""

    slider = None

    def __init__(self, spec: Any, on_change: Any) -> None:
        self.spec = spec
        self.label = QLabel(spec.label)
        self.label.setObjectName("FieldLabel")
        self.spin = QLineEdit()
        self.spin.setPlaceholderText(json.dumps(spec.default))
        for w in (self.label, self.spin):
            w.setToolTip(f"<b>{spec.label}</b><br>{spec.help}<br><i>JSON, e.g. {json.dumps(spec.default)}</i>")
        self.spin.editingFinished.connect(on_change)
        self.set_value(spec.default)

    def value(self) -> Any:
        text = self.spin.text().strip()
        if not text:
            return self.spec.default
        try:
            return json.loads(text)
        except ValueError:
            return self.spec.default

    def set_value(self, value: Any) -> None:
        self.spin.setText("" if value == self.spec.default else json.dumps(value))


NUMERIC_KINDS = ("int", "float", "bool")


def same_value(a: Any, b: Any) -> bool:
    """Numbers equal within rounding; lists and dicts equal as data."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) < 1e-9
    return a == b


class SamplerPanel(QWidget):
    """Emits `changed` on every user edit (not on programmatic `set_values`)."""

    changed = Signal()

    def __init__(self, presets: PresetStore, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.presets = presets
        self.rows: dict[str, SamplerRow] = {}
        self._pending: dict[str, Any] = {}
        self._programmatic = False
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(10)

        preset_row = QHBoxLayout()
        self.preset_combo = QComboBox()
        self.preset_combo.setToolTip("Start from a preset, then adjust any value.")
        self.preset_combo.activated.connect(self._preset_chosen)
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the current values as your own preset.")
        self.save_button.clicked.connect(self._save_preset_dialog)
        self.reset_button = QPushButton("Reset")
        self.reset_button.setToolTip("Every sampler back to its default.")
        self.reset_button.clicked.connect(self.reset)
        preset_row.addWidget(self.preset_combo, 1)
        preset_row.addWidget(self.save_button)
        preset_row.addWidget(self.reset_button)
        outer.addLayout(preset_row)

        tokens = QHBoxLayout()
        label = QLabel("Max new tokens")
        label.setObjectName("FieldLabel")
        label.setToolTip("The longest reply, in tokens. The context size also limits it.")
        self.max_tokens = QSpinBox()
        self.max_tokens.setRange(1, 32768)
        self.max_tokens.setValue(DEFAULT_MAX_NEW_TOKENS)
        self.max_tokens.setAlignment(Qt.AlignmentFlag.AlignRight)
        self.max_tokens.setFixedWidth(70)
        self.max_tokens.valueChanged.connect(self._user_changed)
        tokens.addWidget(label)
        tokens.addStretch(1)
        tokens.addWidget(self.max_tokens)
        outer.addLayout(tokens)

        self.body = QVBoxLayout()
        self.body.setSpacing(6)
        self.loading = QLabel("Loading samplers…")
        self.loading.setObjectName("ValueLabel")
        self.body.addWidget(self.loading)
        outer.addLayout(self.body)
        self.refresh_presets()

    @property
    def ready(self) -> bool:
        return bool(self.rows)

    def set_specs(self, specs: Sequence[Any]) -> None:
        """Build one row per spec, grouped by spec.group in order of first appearance."""
        self.loading.hide()
        groups: dict[str, list[Any]] = {}
        for spec in specs:
            groups.setdefault(spec.group, []).append(spec)
        for group, members in groups.items():
            title = QLabel(group.upper())
            title.setObjectName("SectionLabel")
            self.body.addSpacing(4)
            self.body.addWidget(title)
            grid = QGridLayout()
            grid.setHorizontalSpacing(10)
            grid.setVerticalSpacing(4)
            for i, spec in enumerate(members):
                if spec.kind not in NUMERIC_KINDS:
                    text_row = TextRow(spec, self._user_changed)
                    self.rows[spec.name] = text_row  # type: ignore[assignment]
                    grid.addWidget(text_row.label, 2 * i, 0, 1, 2)
                    grid.addWidget(text_row.spin, 2 * i + 1, 0, 1, 2)
                    continue
                row = SamplerRow(spec, self._user_changed)
                self.rows[spec.name] = row
                grid.addWidget(row.label, 2 * i, 0, 1, 2)
                grid.addWidget(row.spin, 2 * i, 1, 2, 1, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                grid.addWidget(row.slider, 2 * i + 1, 0)
            grid.setColumnStretch(0, 1)
            self.body.addLayout(grid)
        self.set_values(self._pending, self.max_tokens.value())
        self._update_preset_label()

    # --- values -------------------------------------------------------------------------------

    def values(self) -> dict[str, Any]:
        """Every sampler's value (defaults included), ready for GenerationSettings.samplers."""
        if not self.rows:
            return dict(self._pending)
        return {name: row.value() for name, row in self.rows.items()}

    def set_values(self, samplers: dict[str, Any], max_new_tokens: int | None = None) -> None:
        """Show a conversation's settings; samplers it does not name get their defaults."""
        self._programmatic = True
        try:
            self._pending = dict(samplers)
            for name, row in self.rows.items():
                row.set_value(samplers.get(name, row.spec.default))
            if max_new_tokens is not None:
                self.max_tokens.setValue(int(max_new_tokens))
        finally:
            self._programmatic = False
        self._update_preset_label()

    def reset(self) -> None:
        self.set_values({})
        self.changed.emit()

    def _user_changed(self) -> None:
        if self._programmatic:
            return
        self._pending = self.values()
        self._update_preset_label()
        self.changed.emit()

    # --- presets ------------------------------------------------------------------------------

    def refresh_presets(self) -> None:
        self.preset_combo.clear()
        self.preset_combo.addItem(CUSTOM)
        for preset in self.presets.all():
            self.preset_combo.addItem(preset.name, preset)
            if preset.description:
                self.preset_combo.setItemData(self.preset_combo.count() - 1, preset.description,
                                              Qt.ItemDataRole.ToolTipRole)
        self._update_preset_label()

    def apply_preset(self, preset: Preset) -> None:
        """Defaults overlaid with the preset's values (unknown names from old files are ignored)."""
        self.set_values({k: v for k, v in preset.samplers.items() if k in self.rows or not self.rows})
        self.changed.emit()

    def _preset_chosen(self, index: int) -> None:
        preset = self.preset_combo.itemData(index)
        if isinstance(preset, Preset):
            self.apply_preset(preset)

    def matching_preset(self) -> str:
        """The preset whose values equal the current ones, else "Custom"."""
        if not self.rows:
            return CUSTOM
        current = self.values()
        for i in range(1, self.preset_combo.count()):
            preset = self.preset_combo.itemData(i)
            want = {name: row.spec.default for name, row in self.rows.items()} | preset.samplers
            if all(same_value(current[k], want.get(k, current[k])) for k in current):
                return preset.name
        return CUSTOM

    def _update_preset_label(self) -> None:
        index = self.preset_combo.findText(self.matching_preset())
        self.preset_combo.setCurrentIndex(max(0, index))

    def save_preset(self, name: str) -> None:
        self.presets.save(name, self.values())
        self.refresh_presets()

    def _save_preset_dialog(self) -> None:
        name, ok = QInputDialog.getText(self, "Save preset", "Name for these sampler settings:")
        if not ok or not name.strip():
            return
        try:
            self.save_preset(name)
        except PresetError as e:
            QMessageBox.warning(self, "Preset not saved", str(e))
