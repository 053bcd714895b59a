"""First-run welcome page, machine detection wording, settings persistence, and the crash dialog +
rotating logs, on the real widgets offscreen (settings in a real INI file, logs in a real folder)."""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
from pathlib import Path

import pytest
from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QApplication, QMainWindow, QMessageBox

from app.ui import crash
from app.ui.first_run import (
    KEY_FIRST_RUN_DONE,
    KEY_MODELS_FOLDER,
    FirstRunPage,
    Gpu,
    MachineReport,
    default_models_folder,
    describe,
    detect_machine,
    first_run_done,
    maybe_show_first_run,
    models_folder,
    open_model_browser,
    settings_for,
)

pytestmark = pytest.mark.timeout(120)
DETECT_TIMEOUT_MS = 60_000
RTX_4090 = Gpu("NVIDIA GeForce RTX 4090", 24.0, "550.54", "12.4")


# --- plain-words summary -------------------------------------------------------------------------

def test_no_gpu_means_cpu_for_tiny_models() -> None:
    cap = describe(MachineReport(gpu_reason="no NVIDIA driver found", torch_version="2.5.0"))
    assert cap.headline == "No NVIDIA GPU found"
    assert cap.body.startswith("Kestrel will run models on the CPU, slowly: fine for tiny models")
    assert "no NVIDIA driver found" in cap.body
    assert cap.backend == "CPU (PyTorch)"


def test_gpu_with_cpu_only_torch_says_how_to_fix() -> None:
    cap = describe(MachineReport(gpus=(RTX_4090,), torch_version="2.5.0+cpu", torch_cuda=None))
    assert "RTX 4090" in cap.headline and "cannot use it" in cap.headline
    assert "CPU-only build" in cap.body and "CUDA download of Kestrel" in cap.body
    assert cap.backend == "CPU (PyTorch)"


def test_gpu_with_old_driver_names_both_cuda_versions() -> None:
    cap = describe(MachineReport(gpus=(RTX_4090,), torch_version="2.5.0", torch_cuda="12.6"))
    assert "CUDA 12.6" in cap.body and "supports CUDA 12.4" in cap.body and "Update the driver" in cap.body


def test_usable_gpu_with_and_without_fast_kernels() -> None:
    slow = describe(MachineReport(gpus=(RTX_4090,), torch_version="2.5.0", torch_cuda="12.4", cuda_usable=True,
                                  fast_backend_note="not available: nvcc was not found"))
    assert slow.backend == "GPU (PyTorch)" and "nvcc was not found" in slow.body
    assert "up to about 47B parameters" in slow.body        # (24 - 2) GiB / 0.5 byte per parameter
    fast = describe(MachineReport(gpus=(RTX_4090,), torch_version="2.5.0", torch_cuda="12.4", cuda_usable=True,
                                  fast_backend=True, fast_backend_note="built and loaded"))
    assert fast.backend == "GPU (Kestrel CUDA kernels)" and fast.headline.startswith("Ready")


def test_missing_torch_is_reported() -> None:
    assert describe(MachineReport()).headline == "PyTorch is missing"


def test_detect_machine_matches_torch_on_this_machine() -> None:
    import torch

    report = detect_machine()
    facts = dict(report.rows)
    assert facts["torch"] == torch.__version__ == report.torch_version
    assert report.cuda_usable == torch.cuda.is_available()
    assert describe(report).backend.startswith("GPU" if report.cuda_usable else "CPU")


# --- the page ------------------------------------------------------------------------------------

@pytest.fixture()
def settings(tmp_path: Path) -> QSettings:
    return settings_for(tmp_path / "config")


def test_page_detects_in_background_and_persists_choices(qtbot, tmp_path: Path, settings: QSettings) -> None:
    page = FirstRunPage(settings)
    qtbot.addWidget(page)
    page.show()
    assert page.headline.text() == "Checking this computer…"    # the window is up before detection ends
    with qtbot.waitSignal(page.probe.done, timeout=DETECT_TIMEOUT_MS):
        pass
    assert page.report is not None
    assert page.headline.text() == describe(page.report).headline
    assert page.details.isVisible() and "torch" in page.details.text()

    assert page.folder_edit.text() == str(default_models_folder())
    chosen = tmp_path / "my models"
    page.set_folder(chosen)
    with qtbot.waitSignal(page.browse_models_requested, timeout=2000):
        page.browse_button.click()
    assert not page.isVisible()

    reread = QSettings(settings.fileName(), QSettings.Format.IniFormat)   # what the next launch reads
    assert models_folder(reread) == chosen
    assert first_run_done(reread)
    assert "first_run" in Path(settings.fileName()).read_text()


def test_typed_folder_is_saved_when_the_page_closes(qtbot, tmp_path: Path, settings: QSettings) -> None:
    page = FirstRunPage(settings, detect=False)
    qtbot.addWidget(page)
    page.show()
    page.folder_edit.setText(str(tmp_path / "typed"))
    page.start_button.click()
    reread = QSettings(settings.fileName(), QSettings.Format.IniFormat)
    assert reread.value(KEY_MODELS_FOLDER) == str(tmp_path / "typed")
    assert str(reread.value(KEY_FIRST_RUN_DONE)).lower() == "true"


def test_page_shows_only_on_first_launch(qtbot, tmp_path: Path) -> None:
    window = QMainWindow()
    qtbot.addWidget(window)
    window.show()
    config = tmp_path / "config"
    page = maybe_show_first_run(window, config)
    assert page is not None and page.isVisible()
    with qtbot.waitSignal(page.probe.done, timeout=DETECT_TIMEOUT_MS):
        page.reject()                   # closing with the window's X counts as seen
    assert maybe_show_first_run(window, config) is None
    forced = maybe_show_first_run(window, config, force=True)
    assert forced is not None
    with qtbot.waitSignal(forced.probe.done, timeout=DETECT_TIMEOUT_MS):
        forced.close()


def test_browse_models_goes_to_the_browser_or_explains(qtbot) -> None:
    class WithBrowser(QMainWindow):
        opened = 0

        def open_model_browser(self) -> None:
            self.opened += 1

    window = WithBrowser()
    qtbot.addWidget(window)
    open_model_browser(window)
    assert window.opened == 1

    plain = QMainWindow()
    qtbot.addWidget(plain)
    plain.show()
    seen: list[str] = []

    def close_box() -> None:
        box = QApplication.activeModalWidget()
        assert isinstance(box, QMessageBox)
        seen.append(box.text())
        box.accept()

    QTimer.singleShot(100, close_box)
    open_model_browser(plain)           # a modal box: returns once close_box accepted it
    assert seen and "Model panel" in seen[0]


# --- crash dialog and logs -----------------------------------------------------------------------

@pytest.fixture()
def log_dir(tmp_path: Path):
    """A log folder whose handler is removed again, so other tests' logging is untouched."""
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    yield tmp_path / "logs"
    for handler in root.handlers[:]:
        if handler not in before:
            handler.close()
            root.removeHandler(handler)
    root.setLevel(level)


def raised(exc: BaseException):
    try:
        raise exc
    except BaseException:  # noqa: BLE001 - the test wants the real exc_info triple
        return sys.exc_info()


def test_crash_dialog_logs_and_shows_where(qtbot, log_dir: Path) -> None:
    log_file = crash.setup_logging(log_dir)
    assert crash.setup_logging(log_dir) == log_file                      # no second handler
    reporter = crash.CrashReporter(log_file)
    shown: list[crash.CrashDialog] = []

    def auto_close(dialog: crash.CrashDialog) -> None:
        shown.append(dialog)
        QTimer.singleShot(50, dialog.reject)

    reporter.dialog_shown.connect(auto_close)
    reporter.handle(*raised(ValueError("the tokenizer exploded")))       # no event loop: exec() until closed
    assert len(shown) == 1
    dialog = shown[0]
    assert dialog.message.text() == "ValueError: the tokenizer exploded"
    assert str(log_file) in dialog.log_label.text()
    assert "raise exc" in dialog.details.toPlainText()
    dialog.copy_details()
    assert "the tokenizer exploded" in QApplication.clipboard().text()
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = log_file.read_text(encoding="utf-8")
    assert "unhandled exception" in text and "ValueError: the tokenizer exploded" in text


def test_our_errors_read_as_they_are(qtbot, log_dir: Path) -> None:
    from app.engine.errors import KestrelError

    assert crash.summary(KestrelError("model.safetensors: truncated; download it again")) == \
        "model.safetensors: truncated; download it again"
    assert crash.summary(RuntimeError()) == "RuntimeError"


def test_thread_errors_reach_the_gui_thread(qtbot, log_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)                # restored after the test
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    reporter = crash.install(log_dir)
    assert sys.excepthook == reporter.handle
    shown: list[crash.CrashDialog] = []
    reporter.dialog_shown.connect(shown.append)

    def fail() -> None:
        raise OSError("disk full while saving the chat")

    worker = threading.Thread(target=fail)
    worker.start()
    worker.join()
    qtbot.waitUntil(lambda: bool(shown), timeout=5000)
    dialog = shown[0]
    assert dialog.isVisible() and "disk full" in dialog.message.text()
    dialog.reject()
    reporter.dialog_shown.disconnect()


def test_logs_rotate(log_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(crash, "MAX_LOG_BYTES", 64 * 1024)
    log_file = crash.setup_logging(log_dir)
    logger = logging.getLogger("kestrel.test")
    for i in range(2000):
        logger.warning("line %d %s", i, "x" * 80)
    names = sorted(p.name for p in log_dir.iterdir())
    assert names[0] == "kestrel.log" and "kestrel.log.1" in names
    assert len(names) <= 1 + crash.LOG_BACKUPS
    assert log_file.stat().st_size <= 64 * 1024
