"""Quantize wizard: fp16 model in, EXL2 at any bpw out, step by step.

Pages: source model -> target (bpw, head bits, live size and VRAM fit) -> calibration -> output ->
run (per-stage progress, ETA, log, pause/cancel/resume) -> result (size, bpw, perplexity before and
after, "Open in chat"). The conversion runs on a QThread (`ConvertThread`) calling the engine's
resumable `convert`; stopping sets its cancel event, the job stops at the next checkpoint, and
Resume starts a new thread with the same settings, which continues from the job folder.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QThread, Signal
from PySide6.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDialog,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from .worker import ErrorReport, describe_error

HEAD_BITS = (8, 6, 5, 4, 3, 2, 16)
EVAL_ROWS, EVAL_TOKENS = 4, 256   # perplexity before/after: a few calibration rows


@dataclass(frozen=True)
class JobSettings:
    """Everything the conversion needs; the same settings resume the same job."""

    source: str
    out: str
    bpw: float
    head_bits: int
    calibration_files: tuple[str, ...]
    rows: int
    length: int
    measurement: str | None = None
    device: str = "auto"

    @property
    def job_dir(self) -> str:
        return self.out.rstrip("/\\") + ".job"


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _d, files in os.walk(path) for f in files)


def size_and_fit(source: str, bpw: float, head_bits: int, context: int = 4096) -> str:
    """One line for the target page: file size and whether it fits the GPU (the planner's estimate)."""
    from app.engine.config import ModelConfig
    from app.planner import estimate, format_bytes, read_gpus, spec_from_params

    spec = spec_from_params(ModelConfig.from_folder(source), bpw, head_bits)
    need = estimate(spec, context, "fp16").total
    gpus = read_gpus()
    text = f"About {format_bytes(spec.weight_bytes)} of weights; needs about {format_bytes(need)} of VRAM " \
           f"at {context:,} tokens of context (FP16 cache)"
    if not gpus:
        return text + "."
    free = max(g.free_bytes for g in gpus)
    return text + (f": fits in {format_bytes(free)} free." if need <= free
                   else f": does not fit in {format_bytes(free)} free; pick a lower bpw or a shorter context.")


class ConvertThread(QThread):
    """Runs `convert` (then the before/after perplexity) off the GUI thread; all results go by signals."""

    progress = Signal(float, str)
    succeeded = Signal(dict)
    failed = Signal(object)      # ErrorReport
    stopped = Signal()

    def __init__(self, settings: JobSettings) -> None:
        super().__init__()
        self.settings = settings
        self.cancel = threading.Event()

    def run(self) -> None:  # noqa: D401 - QThread entry point
        from app.engine.errors import CancelledError

        try:
            self.succeeded.emit(self._work())
        except CancelledError:
            self.stopped.emit()
        except BaseException as e:  # noqa: BLE001 - every failure becomes a dialog, never a crash
            self.failed.emit(describe_error(e, "quantize the model"))

    def _work(self) -> dict:
        from safetensors.torch import load_file

        from app.engine.quantize import CalibrationSettings, convert
        from app.engine.session import Engine

        s = self.settings
        cal = CalibrationSettings(rows=s.rows, length=s.length, files=s.calibration_files)
        res = convert(s.source, s.out, s.bpw, s.head_bits, cal, s.measurement, progress=self.progress.emit,
                      cancel=self.cancel, device=s.device, job_dir=s.job_dir, keep_job=True)
        ids = load_file(os.path.join(s.job_dir, "calibration.safetensors"))["input_ids"]
        rows = ids[:EVAL_ROWS, :EVAL_TOKENS].tolist()
        ppl = {}
        for key, folder in (("before", s.source), ("after", s.out)):
            self.progress.emit(1.0, f"perplexity {key}")
            engine = Engine.load(folder, s.device, max_seq_len=EVAL_TOKENS)
            try:
                ppl[key] = engine.generator.perplexity(rows)
            finally:
                engine.unload()
        shutil.rmtree(s.job_dir, ignore_errors=True)
        return {"out": res.out_folder, "bpw": res.bpw, "target": res.target_bpw, "seconds": res.seconds,
                "size": folder_bytes(res.out_folder), "ppl_before": ppl["before"], "ppl_after": ppl["after"]}


class QuantizeWizard(QDialog):
    """The wizard dialog. `open_in_chat(folder)` asks the main window to load the result."""

    open_in_chat = Signal(str)
    PAGES = ("source", "target", "calibration", "output", "run", "result")

    def __init__(self, library_dirs: list[str] | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Quantize a model")
        self.resize(640, 480)
        self.library_dirs = list(library_dirs or [])
        self.thread: ConvertThread | None = None
        self.result: dict | None = None
        self.last_error: ErrorReport | None = None
        self._t0 = 0.0
        self._f0 = 0.0
        self.stack = QStackedWidget()
        for build in (self._source_page, self._target_page, self._calibration_page, self._output_page,
                      self._run_page, self._result_page):
            self.stack.addWidget(build())
        self.back_button = QPushButton("Back")
        self.next_button = QPushButton("Next")
        self.back_button.clicked.connect(self.back)
        self.next_button.clicked.connect(self.next)
        self.message = QLabel()
        self.message.setObjectName("WizardMessage")
        self.message.setWordWrap(True)
        nav = QHBoxLayout()
        nav.addWidget(self.message, 1)
        nav.addWidget(self.back_button)
        nav.addWidget(self.next_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.stack, 1)
        layout.addLayout(nav)
        self._show(0)

    # --- pages ---------------------------------------------------------------------------------

    def _page(self, title: str, explain: str) -> tuple[QWidget, QVBoxLayout]:
        page = QWidget()
        v = QVBoxLayout(page)
        head = QLabel(f"<h3>{title}</h3>")
        text = QLabel(explain)
        text.setWordWrap(True)
        v.addWidget(head)
        v.addWidget(text)
        return page, v

    def _source_page(self) -> QWidget:
        page, v = self._page("Source model", "An fp16 or bf16 model folder (Hugging Face layout) from your "
                                             "library or anywhere on disk.")
        self.library_combo = QComboBox()
        self.library_combo.addItem("Pick from the library…", "")
        try:
            from app.hub.library import scan_library

            for card in scan_library(self.library_dirs, include_hf_cache=False):
                if not card.quantized and card.supported:
                    self.library_combo.addItem(f"{card.name} ({card.architecture})", card.path)
        except Exception:  # noqa: BLE001 - an unreadable library still leaves "Browse"
            pass
        self.library_combo.currentIndexChanged.connect(
            lambda _i: self.library_combo.currentData() and self.source_edit.setText(self.library_combo.currentData()))
        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("/path/to/model")
        self.source_edit.textChanged.connect(self._source_changed)
        browse = QPushButton("Browse…")
        browse.clicked.connect(lambda: self._pick_dir(self.source_edit))
        row = QHBoxLayout()
        row.addWidget(self.source_edit, 1)
        row.addWidget(browse)
        v.addWidget(self.library_combo)
        v.addLayout(row)
        v.addStretch(1)
        return page

    def _target_page(self) -> QWidget:
        page, v = self._page("Target size", "Average bits per weight of the decoder layers (2.0-8.0) and the "
                                            "bits of the output head. 4.0-5.0 bpw is a good balance.")
        form = QFormLayout()
        self.bpw_spin = QDoubleSpinBox()
        self.bpw_spin.setRange(2.0, 8.0)
        self.bpw_spin.setSingleStep(0.25)
        self.bpw_spin.setDecimals(2)
        self.bpw_spin.setValue(4.0)
        self.head_combo = QComboBox()
        for b in HEAD_BITS:
            self.head_combo.addItem("16 (keep fp16)" if b == 16 else str(b), b)
        self.head_combo.setCurrentIndex(HEAD_BITS.index(6))
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cuda", "cpu"])
        self.measurement_edit = QLineEdit()
        self.measurement_edit.setPlaceholderText("optional: reuse a saved measurement.json (skips measuring)")
        form.addRow("Bits per weight", self.bpw_spin)
        form.addRow("Head bits", self.head_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Measurement", self.measurement_edit)
        self.estimate_label = QLabel()
        self.estimate_label.setWordWrap(True)
        self.bpw_spin.valueChanged.connect(self._update_estimate)
        self.head_combo.currentIndexChanged.connect(self._update_estimate)
        v.addLayout(form)
        v.addWidget(self.estimate_label)
        v.addStretch(1)
        return page

    def _calibration_page(self) -> QWidget:
        page, v = self._page("Calibration", "Text the quantizer runs through the model to see which weights "
                                            "matter. Your own files (.txt, .jsonl, .parquet), or data-free: "
                                            "the model writes its own text from varied prompts.")
        self.data_free_radio = QRadioButton("Data-free (the model writes its own calibration text)")
        self.files_radio = QRadioButton("From files:")
        group = QButtonGroup(page)
        group.addButton(self.data_free_radio)
        group.addButton(self.files_radio)
        self.data_free_radio.setChecked(True)
        self.files_edit = QLineEdit()
        self.files_edit.setPlaceholderText("one or more files, separated by ';'")
        self.files_edit.textChanged.connect(lambda t: t and self.files_radio.setChecked(True))
        pick = QPushButton("Choose…")
        pick.clicked.connect(self._pick_files)
        row = QHBoxLayout()
        row.addWidget(self.files_radio)
        row.addWidget(self.files_edit, 1)
        row.addWidget(pick)
        form = QFormLayout()
        self.rows_spin = QSpinBox()
        self.rows_spin.setRange(1, 4096)
        self.rows_spin.setValue(32)
        self.length_spin = QSpinBox()
        self.length_spin.setRange(16, 32768)
        self.length_spin.setValue(512)
        form.addRow("Rows", self.rows_spin)
        form.addRow("Tokens per row", self.length_spin)
        v.addWidget(self.data_free_radio)
        v.addLayout(row)
        v.addLayout(form)
        v.addStretch(1)
        return page

    def _output_page(self) -> QWidget:
        page, v = self._page("Output folder", "Where the EXL2 model goes. Checkpoints go beside it "
                                              "(<folder>.job) so a stopped job can resume.")
        self.out_edit = QLineEdit()
        browse = QPushButton("Browse…")
        browse.clicked.connect(lambda: self._pick_dir(self.out_edit))
        row = QHBoxLayout()
        row.addWidget(self.out_edit, 1)
        row.addWidget(browse)
        v.addLayout(row)
        v.addStretch(1)
        return page

    def _run_page(self) -> QWidget:
        page, v = self._page("Quantizing", "Measure, optimize, quantize layer by layer, compile. Pause keeps "
                                           "the checkpoints; Resume continues where it stopped.")
        self.stage_label = QLabel("waiting")
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.eta_label = QLabel("")
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(2000)
        self.pause_button = QPushButton("Pause")
        self.resume_button = QPushButton("Resume")
        self.cancel_button = QPushButton("Cancel")
        self.pause_button.clicked.connect(self.pause)
        self.resume_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        for b in (self.pause_button, self.resume_button, self.cancel_button):
            buttons.addWidget(b)
        v.addWidget(self.stage_label)
        v.addWidget(self.progress_bar)
        v.addWidget(self.eta_label)
        v.addWidget(self.log, 1)
        v.addLayout(buttons)
        return page

    def _result_page(self) -> QWidget:
        page, v = self._page("Done", "The EXL2 model is ready.")
        self.result_label = QLabel()
        self.result_label.setWordWrap(True)
        self.open_button = QPushButton("Open in chat")
        self.open_button.clicked.connect(self._open_result)
        v.addWidget(self.result_label)
        v.addWidget(self.open_button)
        v.addStretch(1)
        return page

    # --- navigation ----------------------------------------------------------------------------

    def page_name(self) -> str:
        return self.PAGES[self.stack.currentIndex()]

    def _show(self, index: int) -> None:
        self.stack.setCurrentIndex(index)
        name = self.PAGES[index]
        self.back_button.setEnabled(0 < index < 4 or (name == "run" and not self.running()))
        self.next_button.setVisible(index < 4)
        self.next_button.setText("Start" if name == "output" else "Next")
        if name == "target":
            self._update_estimate()

    def next(self) -> None:
        problem = self._check_page(self.page_name())
        self.message.setText(problem or "")
        if problem:
            return
        if self.page_name() == "output":
            self._show(4)
            self.start()
        else:
            self._show(self.stack.currentIndex() + 1)

    def back(self) -> None:
        if not self.running():
            self._show(min(self.stack.currentIndex(), 4) - 1)

    def _check_page(self, name: str) -> str | None:
        if name == "source":
            src = self.source_edit.text().strip()
            if not os.path.isfile(os.path.join(src, "config.json")):
                return "Pick a model folder (it needs a config.json)."
            try:
                from app.engine.config import ModelConfig

                if ModelConfig.from_folder(src).quant is not None:
                    return "This model is already quantized; pick the original fp16/bf16 folder."
            except Exception as e:  # noqa: BLE001 - shown to the user, the wizard stays usable
                return describe_error(e, "read the model").text
        if name == "calibration" and self.files_radio.isChecked():
            missing = [f for f in self._files() if not os.path.isfile(f)]
            if not self._files() or missing:
                return f"Calibration file not found: {missing[0] if missing else '(none given)'}"
        if name == "output" and not self.out_edit.text().strip():
            return "Choose an output folder."
        return None

    def _source_changed(self, text: str) -> None:
        src = text.strip()
        out = self.out_edit.text()
        if src and (not out.strip() or out == getattr(self, "_auto_out", None)):  # never overwrite a user's choice
            base = self.library_dirs[0] if self.library_dirs else os.path.dirname(os.path.abspath(src))
            self._auto_out = os.path.join(base, f"{os.path.basename(os.path.normpath(src))}-exl2")
            self.out_edit.setText(self._auto_out)

    def _update_estimate(self) -> None:
        src = self.source_edit.text().strip()
        try:
            self.estimate_label.setText(size_and_fit(src, self.bpw_spin.value(), self.head_combo.currentData()))
        except Exception as e:  # noqa: BLE001
            self.estimate_label.setText(describe_error(e, "estimate the size").text)

    def _pick_dir(self, edit: QLineEdit) -> None:
        path = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text())
        if path:
            edit.setText(path)

    def _pick_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Calibration files", "",
                                                "Text (*.txt *.md *.jsonl *.json *.parquet);;All files (*)")
        if files:
            self.files_edit.setText(";".join(files))

    def _files(self) -> tuple[str, ...]:
        return tuple(f.strip() for f in self.files_edit.text().split(";") if f.strip())

    def settings(self) -> JobSettings:
        return JobSettings(source=self.source_edit.text().strip(), out=self.out_edit.text().strip(),
                           bpw=round(self.bpw_spin.value(), 2), head_bits=int(self.head_combo.currentData()),
                           calibration_files=self._files() if self.files_radio.isChecked() else (),
                           rows=self.rows_spin.value(), length=self.length_spin.value(),
                           measurement=self.measurement_edit.text().strip() or None,
                           device=self.device_combo.currentText())

    # --- the job -------------------------------------------------------------------------------

    def running(self) -> bool:
        return self.thread is not None and self.thread.isRunning()

    def start(self) -> None:
        if self.running():
            return
        s = self.settings()
        self.thread = ConvertThread(s)
        self.thread.progress.connect(self._progress)
        self.thread.succeeded.connect(self._succeeded)
        self.thread.failed.connect(self._failed)
        self.thread.stopped.connect(self._stopped)
        self._t0, self._f0 = time.monotonic(), -1.0
        self._log(("Resuming" if os.path.isdir(s.job_dir) else "Starting") + f" {s.bpw} bpw -> {s.out}")
        self.stage_label.setText("starting")
        self._set_running(True)
        self.thread.start()

    def pause(self) -> None:
        if self.running():
            self.thread.cancel.set()
            self.stage_label.setText("pausing at the next checkpoint…")

    def cancel(self) -> None:
        """Stop the job; its checkpoints stay, so Resume (now or in a later wizard) continues it."""
        self.pause()

    def _set_running(self, running: bool) -> None:
        self.pause_button.setEnabled(running)
        self.cancel_button.setEnabled(running)
        self.resume_button.setEnabled(not running)
        self.back_button.setEnabled(not running and self.page_name() == "run")

    def _progress(self, fraction: float, message: str) -> None:
        self.progress_bar.setValue(int(1000 * max(0.0, min(1.0, fraction))))
        self.stage_label.setText(message)
        self._log(message)
        elapsed = time.monotonic() - self._t0
        if self._f0 < 0:
            self._f0 = fraction  # a resumed job starts part-way: time the remaining part only
        done = fraction - self._f0
        if done > 0.02 and fraction < 1.0:
            eta = elapsed / done * (1.0 - fraction)
            self.eta_label.setText(f"about {eta / 60:.0f} min left" if eta > 90 else f"about {eta:.0f} s left")

    def _log(self, text: str) -> None:
        self.log.appendPlainText(f"{time.strftime('%H:%M:%S')}  {text}")

    def _succeeded(self, result: dict) -> None:
        from app.planner import format_bytes

        self._set_running(False)
        self.result = result
        self._log(f"done in {result['seconds']:.0f} s")
        self.result_label.setText(
            f"<b>{result['out']}</b><br>Size: {format_bytes(result['size'])}<br>"
            f"Achieved: {result['bpw']:.3f} bpw (target {result['target']:g})<br>"
            f"Perplexity on calibration rows: {result['ppl_before']:.2f} before, {result['ppl_after']:.2f} after")
        self._show(5)

    def _failed(self, report: ErrorReport) -> None:
        self._set_running(False)
        self.last_error = report
        self._log(f"failed: {report.text} {report.hint}")
        self.stage_label.setText(report.title)
        self.message.setText(f"{report.text} {report.hint}".strip())
        box = QMessageBox(QMessageBox.Icon.Warning, report.title, f"{report.text}\n\n{report.hint}".strip(),
                          QMessageBox.StandardButton.Ok, self)
        box.open()  # window-modal, not blocking: the wizard stays usable (Back, Resume)

    def _stopped(self) -> None:
        self._set_running(False)
        self.stage_label.setText("paused: Resume continues from the last checkpoint")
        self._log("paused")
        self.eta_label.setText("")

    def _open_result(self) -> None:
        if self.result:
            self.open_in_chat.emit(self.result["out"])
            self.accept()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        if self.running():
            self.thread.cancel.set()
            self.thread.wait()
        super().closeEvent(event)
