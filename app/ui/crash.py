"""Unhandled errors: write them to a rotating log file and show a dialog that says where that file is.

A double-clicked app has no terminal, so a traceback on stderr is lost; the log file is what a user can
attach to a bug report. Logs rotate (1 MiB x 5 files) under platformdirs' per-user log folder.
Errors from any thread are logged at once; the dialog is always shown on the GUI thread.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from PySide6.QtCore import QObject, Qt, QThread, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication
from PySide6.QtWidgets import (
    QApplication,
    QDialog,
    QDialogButtonBox,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app import APP_NAME

log = logging.getLogger("kestrel")
LOG_FILE_NAME = "kestrel.log"
MAX_LOG_BYTES = 1 << 20
LOG_BACKUPS = 5
LOG_FORMAT = "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def default_log_dir() -> Path:
    from platformdirs import user_log_dir

    return Path(user_log_dir(APP_NAME, appauthor=False))


def setup_logging(log_dir: Path | None = None, level: int = logging.INFO) -> Path:
    """Send the root logger to a rotating file in `log_dir`; returns the file. Calling it again with
    the same folder adds no second handler. An unwritable folder falls back to the temp folder."""
    folder = Path(log_dir) if log_dir is not None else default_log_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOG_FILE_NAME
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError:
        import tempfile

        folder = Path(tempfile.gettempdir()) / "kestrel-logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOG_FILE_NAME
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, logging.handlers.RotatingFileHandler) and Path(handler.baseFilename) == path:
            return path
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=MAX_LOG_BYTES, backupCount=LOG_BACKUPS,
                                                   encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(level)
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > level:
        # Lower the root level for the file only: handlers already there (stderr) keep what they showed.
        for other in root.handlers:
            if other is not handler and other.level == logging.NOTSET:
                other.setLevel(root.level)
        root.setLevel(level)
    return path


def summary(exc: BaseException) -> str:
    """One line a user can read: our own errors already say what to do; others get their type."""
    try:
        from app.engine.errors import KestrelError
    except ImportError:  # the engine is optional for the dialog
        KestrelError = ()  # type: ignore[assignment]  # noqa: N806
    text = str(exc).strip()
    if isinstance(exc, KestrelError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class CrashDialog(QDialog):
    """Says what went wrong in one line, where the log is, and offers the details to copy."""

    def __init__(self, exc_info: ExcInfo, log_file: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("CrashDialog")
        self.setWindowTitle(f"{APP_NAME} hit an unexpected error")
        self.setMinimumWidth(580)
        self.log_file = Path(log_file)
        layout = QVBoxLayout(self)
        headline = QLabel(f"<b>{APP_NAME} hit an error it did not expect.</b> You can keep working; "
                          "if something looks wrong, restart the app.")
        headline.setWordWrap(True)
        layout.addWidget(headline)
        self.message = QLabel(summary(exc_info[1]))
        self.message.setObjectName("CrashMessage")
        self.message.setWordWrap(True)
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.message)
        self.log_label = QLabel(f"The full report was written to <code>{self.log_file}</code>. Please attach "
                                "that file when you report the problem.")
        self.log_label.setObjectName("CrashLogLocation")
        self.log_label.setWordWrap(True)
        layout.addWidget(self.log_label)
        self.details = QPlainTextEdit("".join(traceback.format_exception(*exc_info)))
        self.details.setObjectName("CrashDetails")
        self.details.setReadOnly(True)
        self.details.setVisible(False)
        layout.addWidget(self.details, 1)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        self.details_button = QPushButton("Show details")
        self.details_button.setCheckable(True)
        self.details_button.toggled.connect(self._toggle_details)
        self.copy_button = QPushButton("Copy details")
        self.copy_button.clicked.connect(self.copy_details)
        self.folder_button = QPushButton("Open log folder")
        self.folder_button.clicked.connect(self.open_log_folder)
        for button in (self.details_button, self.copy_button, self.folder_button):
            buttons.addButton(button, QDialogButtonBox.ButtonRole.ActionRole)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)

    def _toggle_details(self, shown: bool) -> None:
        self.details.setVisible(shown)
        self.details_button.setText("Hide details" if shown else "Show details")
        self.resize(self.width(), self.sizeHint().height() + (240 if shown else 0))

    def copy_details(self) -> None:
        QGuiApplication.clipboard().setText(f"{self.message.text()}\nLog: {self.log_file}\n\n"
                                            f"{self.details.toPlainText()}")

    def open_log_folder(self) -> None:
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.log_file.parent)))


class CrashReporter(QObject):
    """Logs unhandled exceptions and shows `CrashDialog` for them on the GUI thread."""

    report = Signal(object)        # ExcInfo, queued to the GUI thread
    dialog_shown = Signal(object)  # CrashDialog (tests close it; nothing else needs it)

    def __init__(self, log_file: Path, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.log_file = Path(log_file)
        self.dialogs: list[CrashDialog] = []
        self.max_dialogs = 3   # an error in a timer must not bury the screen in dialogs
        self.report.connect(self._show)

    def handle(self, exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        """sys.excepthook-compatible; safe from any thread."""
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        log.critical("unhandled exception", exc_info=(exc_type, exc, tb))
        traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
        app = QApplication.instance()
        if app is None:
            return
        if QThread.currentThread() is app.thread():
            self._show((exc_type, exc, tb))
        else:
            self.report.emit((exc_type, exc, tb))

    def _show(self, exc_info: ExcInfo) -> None:
        self.dialogs = [d for d in self.dialogs if d.isVisible()]
        if len(self.dialogs) >= self.max_dialogs:
            return
        parent = QApplication.activeWindow()
        dialog = CrashDialog(exc_info, self.log_file, parent)
        self.dialogs.append(dialog)
        self.dialog_shown.emit(dialog)
        if QThread.currentThread().loopLevel() == 0:
            dialog.exec()       # no event loop yet (error during start-up): wait for the user
        else:
            dialog.open()       # inside the event loop: do not nest another one


_installed: CrashReporter | None = None


def install(log_dir: Path | None = None) -> CrashReporter:
    """Log to a rotating file and route unhandled exceptions (main and other threads) to the dialog.
    Call after the QApplication exists."""
    global _installed
    log_file = setup_logging(log_dir)
    reporter = CrashReporter(log_file)
    app = QApplication.instance()
    if app is not None:
        reporter.setParent(app)
    sys.excepthook = reporter.handle
    previous: Callable[[threading.ExceptHookArgs], object] = threading.excepthook

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or issubclass(args.exc_type, SystemExit):
            previous(args)
            return
        reporter.handle(args.exc_type, args.exc_value, args.exc_traceback)

    threading.excepthook = thread_hook
    _installed = reporter
    log.info("%s started; logging to %s", APP_NAME, log_file)
    return reporter
