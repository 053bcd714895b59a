"""The "Local server" switch: serve the model loaded in the app over the OpenAI-compatible API
(app.server) on 127.0.0.1, with its URL, its API key (generated once, kept in the OS keyring) and
a live request log.

The server shares the app's Engine through app.server.shared.SharedEngine and the engine worker's
generation lock, so a GUI reply and a server request never generate on the one cache at once.
uvicorn runs on its own thread; its log entries reach the GUI thread as queued signals.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .worker import EngineWorker

log = logging.getLogger(__name__)
HOST = "127.0.0.1"
DEFAULT_PORT = 5000
MAX_LOG_ROWS = 500


class LocalServer(QObject):
    """Start/stop app.server in-process over the app's engine."""

    entry = Signal(object)          # app.server.request_log.LogEntry
    running_changed = Signal(bool)

    def __init__(self, worker: EngineWorker, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.worker = worker
        self.url: str | None = None
        self.key: str | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, port: int = DEFAULT_PORT) -> str:
        """Serve on 127.0.0.1:port (a free port if that one is taken); return the base URL."""
        if self.running:
            return self.url or ""
        import uvicorn

        from app.remote.keys import local_server_key
        from app.server.app import create_app
        from app.server.config import ServerConfig
        from app.server.request_log import RequestLog
        from app.server.shared import SharedEngine

        self.key = local_server_key()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            sock.bind((HOST, 0))        # taken: any free port (the page shows which)
        port = sock.getsockname()[1]
        shared = SharedEngine(lambda: self.worker.engine, self.worker.generation_lock)
        app = create_app(ServerConfig(host=HOST, port=port, api_key=self.key), shared)
        server = uvicorn.Server(uvicorn.Config(RequestLog(app, self.entry.emit), log_level="warning",
                                               lifespan="on", access_log=False))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="kestrel-server",
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + 15
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            server.should_exit = True
            sock.close()
            from app.server.config import ServerConfigError

            raise ServerConfigError(f"the local server did not start on {HOST}:{port}",
                                    hint="See the log; try another port.")
        self._server, self._thread, self._sock = server, thread, sock
        self.url = f"http://{HOST}:{port}/v1"
        self.running_changed.emit(True)
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, end open requests (their jobs are cancelled) and close the socket."""
        if not self.running:
            return
        server, thread, sock = self._server, self._thread, self._sock
        self._server = self._thread = self._sock = None
        server.should_exit = True
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                server.force_exit = True
                thread.join(timeout_s)
        if sock is not None:
            sock.close()
        self.url = None
        self.running_changed.emit(False)


class LocalServerPage(QDialog):
    """The switch, the URL and key (copyable), and the request log."""

    def __init__(self, server: LocalServer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Local server")
        self.setMinimumSize(620, 460)
        self.server = server
        layout = QVBoxLayout(self)
        intro = QLabel("Serve the model loaded in Kestrel to other programs on this computer through the "
                       "OpenAI-compatible API (chat clients, editors, scripts using the openai package).")
        intro.setWordWrap(True)
        layout.addWidget(intro)
        top = QHBoxLayout()
        self.switch = QCheckBox("Local server on")
        self.switch.toggled.connect(self._toggled)
        self.port_spin = QSpinBox()
        self.port_spin.setRange(1, 65535)
        self.port_spin.setValue(DEFAULT_PORT)
        self.port_spin.setToolTip(f"Port on {HOST} (a free one is used if it is taken)")
        top.addWidget(self.switch)
        top.addStretch(1)
        top.addWidget(QLabel("Port"))
        top.addWidget(self.port_spin)
        layout.addLayout(top)

        grid = QGridLayout()
        self.url_edit = QLineEdit()
        self.url_edit.setReadOnly(True)
        self.url_edit.setPlaceholderText("off")
        self.key_edit = QLineEdit()
        self.key_edit.setReadOnly(True)
        self.key_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.copy_url = QPushButton("Copy")
        self.copy_url.clicked.connect(lambda: self._copy(self.url_edit.text()))
        self.copy_key = QPushButton("Copy")
        self.copy_key.clicked.connect(lambda: self._copy(self.server.key or ""))
        self.show_key = QPushButton("Show")
        self.show_key.setCheckable(True)
        self.show_key.toggled.connect(lambda on: self.key_edit.setEchoMode(
            QLineEdit.EchoMode.Normal if on else QLineEdit.EchoMode.Password))
        grid.addWidget(QLabel("Base URL"), 0, 0)
        grid.addWidget(self.url_edit, 0, 1, 1, 2)
        grid.addWidget(self.copy_url, 0, 3)
        grid.addWidget(QLabel("API key"), 1, 0)
        grid.addWidget(self.key_edit, 1, 1)
        grid.addWidget(self.show_key, 1, 2)
        grid.addWidget(self.copy_key, 1, 3)
        layout.addLayout(grid)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.message.setObjectName("ValueLabel")
        layout.addWidget(self.message)

        self.log = QTableWidget(0, 5)
        self.log.setHorizontalHeaderLabels(["Time", "Method", "Path", "Status", "ms"])
        self.log.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.log.verticalHeader().hide()
        self.log.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        layout.addWidget(self.log, 1)
        server.entry.connect(self.add_entry)
        server.running_changed.connect(self._show_state)
        self._show_state(server.running)

    def _copy(self, text: str) -> None:
        QGuiApplication.clipboard().setText(text)
        self.message.setText("Copied.")

    def _toggled(self, on: bool) -> None:
        if on == self.server.running:
            return
        if not on:
            self.server.stop()
            return
        try:
            self.server.start(self.port_spin.value())
        except Exception as e:  # noqa: BLE001 - words inline; the switch goes back off
            self.message.setText(f"Could not start the server: {e}")
            self.switch.blockSignals(True)
            self.switch.setChecked(False)
            self.switch.blockSignals(False)

    def _show_state(self, running: bool) -> None:
        self.switch.blockSignals(True)
        self.switch.setChecked(running)
        self.switch.blockSignals(False)
        self.port_spin.setEnabled(not running)
        self.url_edit.setText(self.server.url or "")
        self.key_edit.setText(self.server.key or "" if running else "")
        for button in (self.copy_url, self.copy_key, self.show_key):
            button.setEnabled(running)
        if running:
            loaded = self.server.worker.engine is not None
            self.message.setText(f"Serving on {self.server.url}. Clients send the key as "
                                 "'Authorization: Bearer KEY'." + ("" if loaded else
                                 " No model is loaded yet: load one in the app and the server serves it."))
        else:
            self.message.setText("Off.")

    def add_entry(self, entry: Any) -> None:
        if self.log.rowCount() >= MAX_LOG_ROWS:
            self.log.removeRow(0)
        row = self.log.rowCount()
        self.log.insertRow(row)
        values = (time.strftime("%H:%M:%S", time.localtime(entry.at)), entry.method, entry.path,
                  str(entry.status or "—"), f"{entry.duration_ms:.0f}")
        for col, value in enumerate(values):
            item = QTableWidgetItem(value)
            if col in (3, 4):
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.log.setItem(row, col, item)
        self.log.scrollToBottom()

    def rows(self) -> list[tuple[str, ...]]:
        """The log as text (method, path, status), for tests and copy-out."""
        return [tuple(self.log.item(r, c).text() for c in (1, 2, 3)) for r in range(self.log.rowCount())]
