"""VRAM planner page, plus the planner pieces the Hub browser and the Library share: the GPU picker,
the fit badge and a helper that runs blocking calls off the GUI thread.

Everything numeric comes from app.planner (estimate / verdict / max_context); this module only
groups the estimate's terms for drawing and puts words and colours on the verdict.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QObject, QRectF, QRunnable, QSize, Qt, QThreadPool, Signal
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.engine.errors import KestrelError
from app.planner.gpu import GPU_PRESETS, read_gpus, unavailable_reason
from app.planner.verdict import CACHE_LABELS, DOES_NOT_FIT, FITS, FITS_WITH_CHANGES, format_bytes
from app.planner.verdict import verdict as plan_verdict

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096
DEFAULT_CACHE = "fp16"
CACHE_MODES = ("fp16", "q8", "q6", "q4")   # app.engine.cache.CACHE_MODES, without importing torch here
CONTEXT_RANGE = (512, 131072)
CONTEXT_STEP = 512
DEFAULT_PRESET = 3                          # 24 GB: the most common card people run local models on

# ---------------------------------------------------------------------------------------------
# Running blocking work (network, disk scans) off the GUI thread


class _TaskSignals(QObject):
    done = Signal(object)
    failed = Signal(object)


class _Task(QRunnable):
    def __init__(self, fn: Callable[[], Any], signals: _TaskSignals) -> None:
        super().__init__()
        self.fn = fn
        self.signals = signals

    def run(self) -> None:
        try:
            result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the GUI thread to show in words
            self.signals.failed.emit(e)
        else:
            self.signals.done.emit(result)


_live: set[_TaskSignals] = set()


def run_task(fn: Callable[[], Any], on_done: Callable[[Any], None],
             on_error: Callable[[BaseException], None]) -> None:
    """Run `fn` on the global thread pool; the callbacks run on the GUI thread (queued signals).

    The signal object is created here, on the GUI thread, so its queued deliveries land there.
    """
    signals = _TaskSignals()
    _live.add(signals)

    def finish(callback: Callable[[Any], None], value: Any) -> None:
        _live.discard(signals)
        callback(value)

    signals.done.connect(lambda r: finish(on_done, r))
    signals.failed.connect(lambda e: finish(on_error, e))
    QThreadPool.globalInstance().start(_Task(fn, signals))


def scrolling_list(outer: QVBoxLayout) -> QVBoxLayout:
    """A frameless scroll area filling `outer`; returns the column to add cards/rows to (above a stretch)."""
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    body = QWidget()
    column = QVBoxLayout(body)
    column.setContentsMargins(0, 0, 0, 0)
    column.addStretch(1)
    scroll.setWidget(body)
    outer.addWidget(scroll, 1)
    return column


def error_words(exc: BaseException) -> str:
    """One paragraph for a label or dialog: our errors already say what and what to do."""
    if isinstance(exc, KestrelError):
        return str(exc)
    log.error("unexpected error", exc_info=exc)
    return f"Unexpected error ({type(exc).__name__}: {exc}). This is a bug in Kestrel; details are in the log."


# ---------------------------------------------------------------------------------------------
# GPU choice


@dataclass(frozen=True)
class GpuOption:
    label: str
    total_bytes: int
    free_bytes: int
    real: bool


def gpu_options(readings: list[Any] | None = None) -> list[GpuOption]:
    """Real GPUs first (their free memory now), then the preset cards for planning without one."""
    gpus = read_gpus() if readings is None else readings
    out = [GpuOption(f"GPU {g.index}: {g.name} ({format_bytes(g.free_bytes)} free)", g.total_bytes,
                     g.free_bytes, True) for g in gpus]
    out += [GpuOption(p.name, p.total_bytes, p.free_bytes, False) for p in GPU_PRESETS]
    return out


class GpuPicker(QComboBox):
    """Which GPU to plan for: the machine's own (NVML) or a preset card."""

    def __init__(self, parent: QWidget | None = None, options: list[GpuOption] | None = None) -> None:
        super().__init__(parent)
        self.options = options if options is not None else gpu_options()
        for opt in self.options:
            self.addItem(opt.label)
        has_real = any(o.real for o in self.options)
        self.setCurrentIndex(0 if has_real else min(DEFAULT_PRESET, self.count() - 1))
        reason = None if has_real else unavailable_reason()
        self.setToolTip("GPU to plan for." + (f" No GPU could be read: {reason}." if reason else ""))

    @property
    def option(self) -> GpuOption:
        return self.options[max(0, self.currentIndex())]

    def select_label(self, text: str) -> None:
        """Pick the first option whose label contains `text` (e.g. "8 GB")."""
        for i, opt in enumerate(self.options):
            if text in opt.label:
                self.setCurrentIndex(i)
                return
        raise KeyError(text)


# ---------------------------------------------------------------------------------------------
# Fit badge

BADGE_COLORS = {FITS: ("#1f7a3d", "#e3f4e8"), FITS_WITH_CHANGES: ("#8a5a00", "#fdf1d8"),
                DOES_NOT_FIT: ("#a12c2c", "#fbe4e4"), "unknown": ("#5d6170", "#ececf0")}
BADGE_TEXT = {FITS: "Fits", FITS_WITH_CHANGES: "Fits with changes", DOES_NOT_FIT: "Too big", "unknown": "?"}


@dataclass(frozen=True)
class Badge:
    level: str        # FITS | FITS_WITH_CHANGES | DOES_NOT_FIT | "unknown"
    text: str
    tooltip: str


def fit_badge(spec: Any, gpu: GpuOption, context: int = DEFAULT_CONTEXT, cache_mode: str = DEFAULT_CACHE) -> Badge:
    """Badge for one model spec on one GPU; the tooltip carries the numbers behind it."""
    from app.planner import estimate

    est = estimate(spec, context, cache_mode)
    v = plan_verdict(est, gpu.free_bytes)
    parts = ", ".join(f"{label} {format_bytes(n)}" for label, n, _c in bar_segments(est))
    tip = (f"At {context:,} tokens of context with an {cache_mode.upper()} cache on {gpu.label}: "
           f"{v.text}\n{parts}.")
    if v.suggestions:
        tip += "\n" + "\n".join(s.text for s in v.suggestions)
    return Badge(v.level, BADGE_TEXT[v.level], tip)


def unknown_badge(why: str) -> Badge:
    return Badge("unknown", BADGE_TEXT["unknown"], why)


class BadgeLabel(QLabel):
    """A coloured pill for a Badge."""

    def __init__(self, badge: Badge | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.badge: Badge | None = None
        self.setObjectName("FitBadge")
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        if badge is not None:
            self.set_badge(badge)

    def set_badge(self, badge: Badge) -> None:
        self.badge = badge
        fg, bg = BADGE_COLORS.get(badge.level, BADGE_COLORS["unknown"])
        self.setText(badge.text)
        self.setToolTip(badge.tooltip)
        self.setStyleSheet(f"QLabel {{ color: {fg}; background: {bg}; border-radius: 8px; padding: 2px 8px;"
                           " font-weight: 600; }")


# ---------------------------------------------------------------------------------------------
# Memory bar

SEGMENT_COLORS = {"Weights": "#4f63f0", "KV cache": "#17a2b8", "Activations": "#f0a03c", "Overhead": "#9a9eab"}


def bar_segments(est: Any) -> list[tuple[str, int, str]]:
    """The estimate's terms in four groups people can read: weights (with the kernels' layout), KV
    cache, activations (cache read-back scratch, prefill scratch, logits) and overhead (CUDA context,
    decode graph, allocator slack)."""
    return [("Weights", est.weights + est.kernel_layout, SEGMENT_COLORS["Weights"]),
            ("KV cache", est.kv_cache, SEGMENT_COLORS["KV cache"]),
            ("Activations", est.kv_scratch + est.activations + est.logits, SEGMENT_COLORS["Activations"]),
            ("Overhead", est.cuda_context + est.decode_graph + est.allocator, SEGMENT_COLORS["Overhead"])]


class MemoryBar(QWidget):
    """Stacked horizontal bar of the estimate against the GPU's capacity, with free memory marked."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.segments: list[tuple[str, int, str]] = []
        self.capacity = 0
        self.free = 0
        self.setMinimumHeight(54)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def sizeHint(self) -> QSize:  # noqa: N802 - Qt override
        return QSize(480, 54)

    def set_data(self, segments: list[tuple[str, int, str]], capacity: int, free: int) -> None:
        self.segments = list(segments)
        self.capacity = capacity
        self.free = free
        total = sum(n for _l, n, _c in self.segments)
        self.setToolTip("\n".join(f"{label}: {format_bytes(n)}" for label, n, _c in self.segments)
                        + f"\nTotal: {format_bytes(total)}\nFree on the GPU: {format_bytes(free)} "
                          f"of {format_bytes(capacity)}")
        self.update()

    @property
    def total(self) -> int:
        return sum(n for _l, n, _c in self.segments)

    def segment_widths(self, width: float) -> list[float]:
        """Pixel width of each segment; the scale is the larger of the capacity and the total."""
        scale = max(self.capacity, self.total, 1)
        return [width * n / scale for _l, n, _c in self.segments]

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802 - Qt override
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        pal = self.palette()
        bar = QRectF(1, 8, self.width() - 2, self.height() - 26)
        scale = max(self.capacity, self.total, 1)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(pal.alternateBase())
        p.drawRoundedRect(bar, 6, 6)
        x = bar.left()
        for (_label, _n, color), w in zip(self.segments, self.segment_widths(bar.width()), strict=True):
            p.setBrush(QColor(color))
            p.drawRect(QRectF(x, bar.top(), w, bar.height()))
            x += w
        # capacity outline, and the free-memory mark (what is already used by others lies right of it)
        cap_w = bar.width() * self.capacity / scale
        p.setBrush(Qt.BrushStyle.NoBrush)
        p.setPen(QPen(pal.text().color(), 1))
        p.drawRoundedRect(QRectF(bar.left(), bar.top(), cap_w, bar.height()), 6, 6)
        free_x = bar.left() + bar.width() * self.free / scale
        p.setPen(QPen(QColor("#c93b3b"), 2, Qt.PenStyle.DashLine))
        p.drawLine(int(free_x), int(bar.top() - 6), int(free_x), int(bar.bottom() + 2))
        p.setPen(pal.text().color())
        p.drawText(QRectF(bar.left(), bar.bottom() + 2, self.width(), 16),
                   Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                   f"needs {format_bytes(self.total)} · free {format_bytes(self.free)} · "
                   f"GPU {format_bytes(self.capacity)}")
        p.end()


def _legend() -> QWidget:
    w = QWidget()
    row = QHBoxLayout(w)
    row.setContentsMargins(0, 0, 0, 0)
    for label, color in SEGMENT_COLORS.items():
        swatch = QLabel()
        swatch.setFixedSize(12, 12)
        swatch.setStyleSheet(f"background: {color}; border-radius: 3px;")
        row.addWidget(swatch)
        row.addWidget(QLabel(label))
        row.addSpacing(8)
    mark = QLabel("┆ free memory")
    mark.setStyleSheet("color: #c93b3b;")
    row.addWidget(mark)
    row.addStretch(1)
    return w


# ---------------------------------------------------------------------------------------------
# The planner page


class PlannerView(QWidget):
    """Pick a GPU, a model, a context and a cache mode; see the memory bar and a verdict, live."""

    def __init__(self, parent: QWidget | None = None, gpu_picker: GpuPicker | None = None) -> None:
        super().__init__(parent)
        self.base_spec: Any = None       # the model as it is (folder / branch)
        self.model_label_text = ""
        layout = QVBoxLayout(self)
        layout.setContentsMargins(16, 16, 16, 16)
        layout.setSpacing(10)
        title = QLabel("VRAM planner")
        title.setObjectName("PanelTitle")
        layout.addWidget(title)

        form = QFormLayout()
        self.gpu = gpu_picker or GpuPicker()
        self.gpu.currentIndexChanged.connect(self.update_plan)
        form.addRow("GPU", self.gpu)

        model_row = QHBoxLayout()
        self.model_label = QLabel("No model chosen")
        self.model_label.setWordWrap(True)
        self.folder_button = QPushButton("Choose folder…")
        self.folder_button.clicked.connect(self._choose_folder)
        model_row.addWidget(self.model_label, 1)
        model_row.addWidget(self.folder_button)
        form.addRow("Model", model_row)

        ctx_row = QHBoxLayout()
        self.context_slider = QSlider(Qt.Orientation.Horizontal)
        self.context_slider.setRange(*CONTEXT_RANGE)
        self.context_slider.setSingleStep(CONTEXT_STEP)
        self.context_slider.setPageStep(4096)
        self.context_slider.setValue(DEFAULT_CONTEXT)
        self.context_spin = QSpinBox()
        self.context_spin.setRange(*CONTEXT_RANGE)
        self.context_spin.setSingleStep(CONTEXT_STEP)
        self.context_spin.setValue(DEFAULT_CONTEXT)
        self.context_spin.setSuffix(" tokens")
        self.context_slider.valueChanged.connect(self._slider_moved)
        self.context_spin.valueChanged.connect(self.context_slider.setValue)
        ctx_row.addWidget(self.context_slider, 1)
        ctx_row.addWidget(self.context_spin)
        form.addRow("Context", ctx_row)

        self.cache_combo = QComboBox()
        for mode in CACHE_MODES:
            self.cache_combo.addItem(CACHE_LABELS.get(mode, mode), mode)
        self.cache_combo.currentIndexChanged.connect(self.update_plan)
        form.addRow("Cache", self.cache_combo)

        bpw_row = QHBoxLayout()
        self.bpw_check = QCheckBox("Plan a quantization at")
        self.bpw_check.setToolTip("Estimate this model quantized to another bits-per-weight (EXL2).")
        self.bpw_spin = QDoubleSpinBox()
        self.bpw_spin.setRange(2.0, 8.0)
        self.bpw_spin.setSingleStep(0.25)
        self.bpw_spin.setDecimals(2)
        self.bpw_spin.setValue(4.0)
        self.bpw_spin.setSuffix(" bpw")
        self.bpw_check.toggled.connect(self.update_plan)
        self.bpw_spin.valueChanged.connect(self.update_plan)
        bpw_row.addWidget(self.bpw_check)
        bpw_row.addWidget(self.bpw_spin)
        bpw_row.addStretch(1)
        form.addRow("Weights", bpw_row)
        layout.addLayout(form)

        self.bar = MemoryBar()
        layout.addWidget(self.bar)
        layout.addWidget(_legend())
        self.verdict_label = QLabel("Choose a model to see whether it fits.")
        self.verdict_label.setWordWrap(True)
        self.verdict_label.setObjectName("VerdictLabel")
        self.verdict_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.verdict_label)
        self.suggestions_label = QLabel("")
        self.suggestions_label.setWordWrap(True)
        layout.addWidget(self.suggestions_label)
        self.max_context_label = QLabel("")
        self.max_context_label.setWordWrap(True)
        self.max_context_label.setTextFormat(Qt.TextFormat.RichText)
        layout.addWidget(self.max_context_label)
        layout.addStretch(1)
        self.verdict: Any = None
        self.estimate: Any = None

    # --- model sources ------------------------------------------------------------------------

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a model folder")
        if folder:
            self.set_model_folder(folder)

    def set_model_folder(self, path: str) -> None:
        """A local model folder (file dialog or a Library card): weights exactly from the headers."""
        from app.planner import spec_from_folder

        try:
            spec = spec_from_folder(path)
        except KestrelError as e:
            self._show_problem(error_words(e))
            return
        self.set_spec(spec, os.path.basename(os.path.normpath(path)))

    def set_branch(self, branch: Any) -> None:
        """A Hub branch before download: config.json + the branch's file sizes."""
        from app.hub.browse import fit_input
        from app.planner import spec_from_files

        try:
            config, sizes = fit_input(branch)
            spec = spec_from_files(config, sizes, name=f"{branch.repo_id}@{branch.name}")
        except KestrelError as e:
            self._show_problem(error_words(e))
            return
        self.set_spec(spec, f"{branch.repo_id} ({branch.name})")

    def set_spec(self, spec: Any, label: str = "") -> None:
        self.base_spec = spec
        self.model_label_text = label or spec.name
        bits = f"{spec.bpw:g} bpw" if spec.bpw else f"{spec.bits_per_weight:.1f} bits/param"
        self.model_label.setText(f"{self.model_label_text} · {format_bytes(spec.weight_bytes)} of weights · {bits}")
        limit = spec.config.max_position_embeddings
        if limit and limit < self.context_slider.value():
            self.context_slider.setValue(max(CONTEXT_RANGE[0], limit))
        self.update_plan()

    def _show_problem(self, text: str) -> None:
        self.base_spec = None
        self.verdict = self.estimate = None
        self.model_label.setText("No model chosen")
        self.verdict_label.setText(text)
        self.suggestions_label.setText("")
        self.max_context_label.setText("")
        self.bar.set_data([], self.gpu.option.total_bytes, self.gpu.option.free_bytes)

    # --- live plan ----------------------------------------------------------------------------

    def _slider_moved(self, value: int) -> None:
        snapped = max(CONTEXT_RANGE[0], value - value % CONTEXT_STEP)
        if snapped != value:
            self.context_slider.setValue(snapped)
            return
        if self.context_spin.value() != value:
            self.context_spin.blockSignals(True)
            self.context_spin.setValue(value)
            self.context_spin.blockSignals(False)
        self.update_plan()

    def spec(self) -> Any:
        """The model as planned: the base spec, or it re-quantized at the chosen bpw."""
        from app.planner import with_bpw

        if self.base_spec is None:
            return None
        if self.bpw_check.isChecked():
            return with_bpw(self.base_spec, round(self.bpw_spin.value(), 2))
        return self.base_spec

    @property
    def cache_mode(self) -> str:
        return str(self.cache_combo.currentData())

    def update_plan(self) -> None:
        """Recompute the estimate, bar, verdict and max contexts (pure arithmetic: fast enough per tick)."""
        from app.planner import estimate, max_context

        spec = self.spec()
        gpu = self.gpu.option
        if spec is None:
            self.bar.set_data([], gpu.total_bytes, gpu.free_bytes)
            return
        context = self.context_slider.value()
        try:
            est = estimate(spec, context, self.cache_mode)
            v = plan_verdict(est, gpu.free_bytes)
        except KestrelError as e:
            self.verdict_label.setText(error_words(e))
            return
        self.estimate, self.verdict = est, v
        self.bar.set_data(bar_segments(est), gpu.total_bytes, gpu.free_bytes)
        fg, _bg = BADGE_COLORS[v.level]
        self.verdict_label.setStyleSheet(f"color: {fg}; font-weight: 600;")
        self.verdict_label.setText(v.text)
        self.suggestions_label.setText("\n".join(f"• {s.text}" for s in v.suggestions))
        limit = spec.config.max_position_embeddings or None
        rows = []
        for mode in CACHE_MODES:
            n = max_context(spec, gpu.free_bytes, mode, limit=limit)
            capped = " (the model's limit)" if limit and n >= limit else ""
            rows.append(f"<b>{CACHE_LABELS[mode]}</b>: {n:,} tokens{capped}" if n
                        else f"<b>{CACHE_LABELS[mode]}</b>: does not fit")
        self.max_context_label.setText("Longest context that fits — " + " · ".join(rows))
