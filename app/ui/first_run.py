"""First launch: a welcome page that says, in plain words, what this computer can do with Kestrel, asks
where models should live, and offers the model browser.

Detection imports torch (app.engine.doctor), which takes seconds, so it runs on a plain thread and the
page fills in when it is done; the window is never blocked. Settings live in a QSettings INI file in
the config folder (so `--config-dir` isolates test runs and portable installs).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QSettings, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app import APP_NAME

log = logging.getLogger(__name__)
GIB = 1024 ** 3
SETTINGS_FILE = "settings.ini"
KEY_FIRST_RUN_DONE = "first_run/done"
KEY_MODELS_FOLDER = "models/folder"
# Rough rule for the welcome text only (the planner gives exact answers): EXL2 at 4 bits per weight is
# half a byte per parameter; keep ~2 GiB for the cache, activations and the desktop.
BYTES_PER_PARAM_4BPW = 0.5
RESERVED_GIB = 2.0
DETECT_DELAY_MS = 200


# --- settings ------------------------------------------------------------------------------------

def settings_for(config_dir: Path) -> QSettings:
    """Kestrel's QSettings, stored as `<config dir>/settings.ini`."""
    Path(config_dir).mkdir(parents=True, exist_ok=True)
    return QSettings(str(Path(config_dir) / SETTINGS_FILE), QSettings.Format.IniFormat)


def default_models_folder() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME, appauthor=False)) / "models"


def models_folder(settings: QSettings) -> Path:
    """Where downloaded models go (the user's choice on the welcome page, else the default)."""
    value = settings.value(KEY_MODELS_FOLDER, "")
    return Path(str(value)) if value else default_models_folder()


def set_models_folder(settings: QSettings, folder: Path) -> None:
    settings.setValue(KEY_MODELS_FOLDER, str(folder))
    settings.sync()


def first_run_done(settings: QSettings) -> bool:
    return str(settings.value(KEY_FIRST_RUN_DONE, "false")).lower() == "true"


# --- detection -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    name: str
    total_gib: float
    driver: str
    cuda: str          # newest CUDA the driver supports


@dataclass(frozen=True)
class MachineReport:
    gpus: tuple[Gpu, ...] = ()
    gpu_reason: str | None = None         # why no GPU was read (None when some were)
    torch_version: str | None = None      # None: torch could not be imported
    torch_cuda: str | None = None         # CUDA version torch was built for; None: CPU-only build
    cuda_usable: bool = False             # torch.cuda.is_available()
    fast_backend: bool = False            # our CUDA kernels built and loaded
    fast_backend_note: str = ""
    rows: tuple[tuple[str, str], ...] = field(default_factory=tuple)   # app.engine.doctor's report


def detect_machine() -> MachineReport:
    """Read GPUs (NVML) and what torch/our kernels can use. Slow (imports torch): call off the GUI thread."""
    from app.engine import doctor
    from app.planner.gpu import read_gpus, unavailable_reason

    gpus = tuple(Gpu(g.name, g.total_bytes / GIB, g.driver_version, g.cuda_version) for g in read_gpus())
    reason = unavailable_reason()
    rows = tuple(doctor.report())
    facts = dict(rows)
    try:
        import torch
    except ImportError:
        return MachineReport(gpus, reason, rows=rows)
    kernels = facts.get("Kestrel kernels", "not available")
    return MachineReport(gpus=gpus, gpu_reason=reason, torch_version=torch.__version__,
                         torch_cuda=torch.version.cuda, cuda_usable=bool(torch.cuda.is_available()),
                         fast_backend=kernels.startswith("built"), fast_backend_note=kernels, rows=rows)


@dataclass(frozen=True)
class Capability:
    headline: str
    body: str
    backend: str       # what Kestrel would run models on, e.g. "CPU (PyTorch)"


def describe(report: MachineReport) -> Capability:
    """Plain-words summary of a MachineReport (pure: the tests feed it every case)."""
    tiny = ("Kestrel will run models on the CPU, slowly: fine for tiny models (around 1B parameters "
            "or less, such as SmolLM2) and for trying the app.")
    if report.torch_version is None:
        return Capability("PyTorch is missing", "Kestrel needs PyTorch to run models and could not import "
                          "it. Reinstall Kestrel (or run: pip install torch).", "none")
    if not report.gpus and not report.cuda_usable:
        why = f" ({report.gpu_reason})" if report.gpu_reason else ""
        return Capability("No NVIDIA GPU found", f"{tiny} Larger models need an NVIDIA GPU with a recent "
                          f"driver{why}.", "CPU (PyTorch)")
    gpu = report.gpus[0] if report.gpus else None
    name = f"{gpu.name} ({gpu.total_gib:.0f} GB)" if gpu else "your NVIDIA GPU"
    if not report.cuda_usable:
        if report.torch_cuda is None:
            fix = ("this copy of PyTorch is a CPU-only build. Use the CUDA download of Kestrel, or install "
                   "a CUDA build of PyTorch (https://pytorch.org/get-started/locally/).")
        else:
            driver = f" (it supports CUDA {gpu.cuda})" if gpu else ""
            fix = (f"PyTorch (built for CUDA {report.torch_cuda}) cannot use it: the NVIDIA driver is "
                   f"probably too old{driver}. Update the driver and restart Kestrel.")
        return Capability(f"Found {name}, but cannot use it yet", f"{tiny} The GPU is there, but {fix}",
                          "CPU (PyTorch)")
    fits = ""
    if gpu:
        billions = max(0.0, gpu.total_gib - RESERVED_GIB) * GIB / BYTES_PER_PARAM_4BPW / 1e9
        fits = (f" With {gpu.total_gib:.0f} GB it can hold models up to about {billions:.0f}B parameters "
                "at 4 bits per weight (the planner gives the exact answer for each model).")
    if report.fast_backend:
        return Capability(f"Ready: {name}", f"Kestrel will run models on your GPU with its fast CUDA "
                          f"kernels.{fits}", "GPU (Kestrel CUDA kernels)")
    note = report.fast_backend_note.removeprefix("not available: ") or "not built"
    return Capability(f"Ready: {name}", f"Kestrel will run models on your GPU with plain PyTorch; its faster "
                      f"kernels are not available here ({note}), so generation is slower than it could "
                      f"be.{fits}", "GPU (PyTorch)")


class MachineProbe(QObject):
    """Runs `detect_machine` on a plain thread; `done` delivers a MachineReport or the exception."""

    done = Signal(object)

    def __init__(self, parent: QObject | None = None,
                 detect: Callable[[], MachineReport] = detect_machine) -> None:
        super().__init__(parent)
        self._detect = detect
        self.result: MachineReport | BaseException | None = None
        self.done.connect(self._store)

    def start(self) -> None:
        threading.Thread(target=self._run, name="kestrel-detect", daemon=True).start()

    def _run(self) -> None:
        try:
            result: Any = self._detect()
        except Exception as e:  # noqa: BLE001 - shown on the page, logged here
            log.exception("detecting the GPU failed")
            result = e
        try:
            self.done.emit(result)
        except RuntimeError:    # the page was closed and deleted while detection ran: nobody to tell
            pass

    def _store(self, result: Any) -> None:
        self.result = result


# --- the page ------------------------------------------------------------------------------------

class FirstRunPage(QDialog):
    """Welcome page. Emits `browse_models_requested` when the user asks for the model browser."""

    browse_models_requested = Signal()

    def __init__(self, settings: QSettings, parent: QWidget | None = None, *, detect: bool = True) -> None:
        super().__init__(parent)
        self.settings = settings
        self.setObjectName("FirstRunPage")
        self.setWindowTitle(f"Welcome to {APP_NAME}")
        self.setMinimumWidth(560)
        self.report: MachineReport | None = None
        layout = QVBoxLayout(self)
        layout.setContentsMargins(28, 24, 28, 20)
        layout.setSpacing(12)

        head = QHBoxLayout()
        from .about import app_icon

        logo = QLabel()
        logo.setPixmap(app_icon().pixmap(56, 56))
        head.addWidget(logo)
        title = QLabel(f"<h2 style='margin:0'>Welcome to {APP_NAME}</h2>"
                       "Chat with language models on your own computer. Nothing you type leaves it.")
        title.setWordWrap(True)
        head.addWidget(title, 1)
        layout.addLayout(head)

        self.headline = QLabel("Checking this computer…")
        self.headline.setObjectName("FirstRunHeadline")
        self.headline.setStyleSheet("font-weight: 600; font-size: 12pt;")
        layout.addWidget(self.headline)
        self.explanation = QLabel("Looking for an NVIDIA GPU, its driver and CUDA. This takes a few seconds.")
        self.explanation.setObjectName("FirstRunExplanation")
        self.explanation.setWordWrap(True)
        layout.addWidget(self.explanation)
        self.details = QLabel()
        self.details.setObjectName("FirstRunDetails")
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.details.setWordWrap(True)
        self.details.setVisible(False)
        layout.addWidget(self.details)

        form = QFormLayout()
        row = QHBoxLayout()
        self.folder_edit = QLineEdit(str(models_folder(settings)))
        self.folder_edit.setObjectName("ModelsFolder")
        self.folder_edit.editingFinished.connect(self._folder_edited)
        choose = QPushButton("Choose…")
        choose.clicked.connect(self.choose_folder)
        row.addWidget(self.folder_edit, 1)
        row.addWidget(choose)
        form.addRow("Models folder:", row)
        layout.addLayout(form)
        hint = QLabel("Downloaded models are stored here. They are large (1-40 GB each): pick a disk with room.")
        hint.setObjectName("FirstRunHint")
        hint.setWordWrap(True)
        layout.addWidget(hint)

        buttons = QHBoxLayout()
        buttons.addStretch(1)
        self.browse_button = QPushButton("Browse models…")
        self.browse_button.setObjectName("BrowseModels")
        self.browse_button.clicked.connect(self._browse)
        self.start_button = QPushButton("Start")
        self.start_button.setObjectName("StartButton")
        self.start_button.setDefault(True)
        self.start_button.clicked.connect(self.accept)
        buttons.addWidget(self.browse_button)
        buttons.addWidget(self.start_button)
        layout.addLayout(buttons)

        self.finished.connect(self._finish)
        self.probe = MachineProbe(self)
        self.probe.done.connect(self.show_report)
        if detect:   # after the first paint: detection imports torch, which competes for the GIL
            QTimer.singleShot(DETECT_DELAY_MS, self.probe.start)

    def show_report(self, result: MachineReport | BaseException) -> None:
        if isinstance(result, BaseException):
            self.headline.setText("Could not check this computer")
            self.explanation.setText(f"Detection failed ({type(result).__name__}: {result}). Kestrel still "
                                     "works; run `kestrel doctor` in a terminal for details.")
            return
        self.report = result
        cap = describe(result)
        self.headline.setText(cap.headline)
        self.explanation.setText(cap.body)
        self.details.setText("<br>".join(f"<b>{k}</b>: {v}" for k, v in result.rows))
        self.details.setVisible(True)

    def choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for models", self.folder_edit.text())
        if folder:
            self.set_folder(Path(folder))

    def set_folder(self, folder: Path) -> None:
        self.folder_edit.setText(str(folder))
        set_models_folder(self.settings, folder)

    def _folder_edited(self) -> None:
        text = self.folder_edit.text().strip()
        if text:
            set_models_folder(self.settings, Path(text).expanduser())

    def _browse(self) -> None:
        self.browse_models_requested.emit()
        self.accept()

    def _finish(self, _result: int) -> None:
        """Closing the page in any way counts: it is not shown again (Help menu has About for facts)."""
        self._folder_edited()
        self.settings.setValue(KEY_FIRST_RUN_DONE, True)
        self.settings.sync()


def open_model_browser(window: Any) -> None:
    """Open the model browser if this build has one; otherwise say where models can be loaded from."""
    opener = getattr(window, "open_model_browser", None)
    if callable(opener):
        opener()
        return
    QMessageBox.information(window, "Model browser", "The model browser is not in this version yet. Load a "
                            "model folder from the Model panel on the right (the sliders button).")


def maybe_show_first_run(window: Any, config_dir: Path, force: bool = False) -> FirstRunPage | None:
    """Show the welcome page over `window` on the first launch (or when forced); returns it, or None."""
    settings = settings_for(config_dir)
    if first_run_done(settings) and not force:
        return None
    page = FirstRunPage(settings, window)
    page.browse_models_requested.connect(lambda: open_model_browser(window))
    page.open()
    return page


def self_test(app: Any, window: Any, page: FirstRunPage | None) -> None:
    """For `--self-test`: print build facts, the backend this machine would use and the state of the
    compiled CUDA extension (present, imports, has every function), then quit (exit 0, or 1 when
    detection failed). Reuses the welcome page's detection when it is running."""
    from PySide6.QtCore import QLibraryInfo

    from app.engine._ext_build import import_state

    from .crash import default_log_dir
    from .theme import RESOURCES

    needed = [RESOURCES / "themes" / "app.qss", RESOURCES / "presets.json",
              RESOURCES / "icons" / "app" / "kestrel-256.png"]
    missing = [str(p) for p in needed if not p.exists()]
    print(f"frozen: {bool(getattr(sys, 'frozen', False))}", flush=True)
    print(f"resources: {RESOURCES} ({'ok' if not missing else 'MISSING ' + ', '.join(missing)})", flush=True)
    print(f"qt: platform {app.platformName()}, plugins "
          f"{QLibraryInfo.path(QLibraryInfo.LibraryPath.PluginsPath)}", flush=True)
    print(f"window title: {window.windowTitle()}", flush=True)
    print(f"logs: {default_log_dir()}", flush=True)
    probe = page.probe if page is not None else MachineProbe(window)

    def finish(result: MachineReport | BaseException) -> None:
        try:
            if isinstance(result, BaseException):
                print(f"backend: detection failed: {type(result).__name__}: {result}", flush=True)
            else:
                cap = describe(result)
                print(f"backend: {cap.backend} ({cap.headline})", flush=True)
                for key, value in result.rows:
                    print(f"  {key}: {value}", flush=True)
            print(f"extension: {import_state()}", flush=True)   # bundled? imports? current?
        finally:    # quit even when stdout is gone (a closed pipe): a self-test must never hang
            window.close()
            app.exit(1 if missing or isinstance(result, BaseException) else 0)

    if probe.result is not None:
        finish(probe.result)
        return
    probe.done.connect(finish)
    if page is None:
        probe.start()
    # else: the page starts its probe DETECT_DELAY_MS after it opened
