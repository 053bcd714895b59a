"""Downloads page: one row per DownloadJob with overall and per-file progress, speed, ETA and
pause / resume / cancel; interrupted downloads found on disk at startup are offered for resume.

Each job runs in its own Python thread (DownloadJob.run blocks); its progress callback fires on
that thread, so it only emits a signal of a QObject living on the GUI thread (queued delivery).
A job stopped by a gated repo asks for a Hugging Face token (a non-modal QInputDialog), stores
it in the OS keyring through app.hub.access.set_token, and starts again with it.
"""

from __future__ import annotations

import dataclasses
import threading

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (
    QFrame,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QToolButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.hub.access import HubAccess
from app.hub.download import DownloadJob, DownloadProgress, JobState, pending_downloads
from app.hub.errors import HubAuthError, TokenStoreError

from .planner_view import error_words, scrolling_list

PROGRESS_STEPS = 1000


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def human_eta(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def status_line(p: DownloadProgress) -> str:
    """"1.2 MB of 3.4 MB · 5.6 MB/s · 1 min left" for the row's caption."""
    text = f"{human_bytes(p.done)} of {human_bytes(p.total)}"
    if p.state is JobState.RUNNING:
        text += f" · {human_bytes(p.speed_bps)}/s · {human_eta(p.eta_s)} left"
    return text


class _JobBridge(QObject):
    progress = Signal(object)          # DownloadProgress
    ended = Signal(object, object)     # JobState | None, exception | None


class DownloadRow(QFrame):
    """One download: title, state, overall bar, per-file tree, buttons."""

    STATE_WORDS = {JobState.PENDING: "Waiting", JobState.RUNNING: "Downloading", JobState.PAUSED: "Paused",
                   JobState.CANCELLED: "Cancelled", JobState.COMPLETE: "Finished", JobState.FAILED: "Failed"}

    def __init__(self, view: DownloadsView, job: DownloadJob) -> None:
        super().__init__()
        self.view = view
        self.job = job
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.token_dialog: QInputDialog | None = None
        self.bridge = _JobBridge(self)
        self.bridge.progress.connect(self._progress)
        self.bridge.ended.connect(self._ended)
        self.setObjectName("Card")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(14, 10, 14, 10)
        top = QHBoxLayout()
        self.title = QLabel(f"<b>{job.repo_id}</b> · {job.branch}")
        self.state_label = QLabel("Waiting")
        self.state_label.setObjectName("ValueLabel")
        top.addWidget(self.title, 1)
        top.addWidget(self.state_label)
        self.pause_button = QPushButton("Pause")
        self.resume_button = QPushButton("Resume")
        self.cancel_button = QPushButton("Cancel")
        self.pause_button.clicked.connect(self.pause)
        self.resume_button.clicked.connect(self.resume)
        self.cancel_button.clicked.connect(self.cancel)
        for b in (self.pause_button, self.resume_button, self.cancel_button):
            top.addWidget(b)
        self.details_button = QToolButton()
        self.details_button.setText("Files")
        self.details_button.setCheckable(True)
        top.addWidget(self.details_button)
        layout.addLayout(top)
        self.bar = QProgressBar()
        self.bar.setRange(0, PROGRESS_STEPS)
        self.bar.setTextVisible(False)
        layout.addWidget(self.bar)
        self.caption = QLabel("")
        self.caption.setObjectName("ValueLabel")
        self.caption.setWordWrap(True)
        layout.addWidget(self.caption)
        self.files = QTreeWidget()
        self.files.setHeaderLabels(["File", "Progress", "Speed", "State"])
        self.files.setRootIsDecorated(False)
        self.files.setVisible(False)
        self.files.setMinimumHeight(120)
        self.details_button.toggled.connect(self.files.setVisible)
        layout.addWidget(self.files)
        self._file_items: dict[str, QTreeWidgetItem] = {}
        self.last: DownloadProgress | None = None
        self._set_buttons(JobState.PENDING)

    # --- control ------------------------------------------------------------------------------

    @property
    def state(self) -> JobState:
        return self.job.state

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        """Run (or continue) the job on its own thread."""
        if self.running:
            return
        self.error = None
        self.job.on_progress = self.bridge.progress.emit
        self.state_label.setText("Starting…")
        self._set_buttons(JobState.RUNNING)

        def work() -> None:
            try:
                state = self.job.run()
            except BaseException as e:  # noqa: BLE001 - shown in words on the GUI thread
                self.bridge.ended.emit(None, e)
            else:
                self.bridge.ended.emit(state, None)

        self.thread = threading.Thread(target=work, name=f"download {self.job.what}", daemon=True)
        self.thread.start()

    def pause(self) -> None:
        self.job.pause()
        self.state_label.setText("Pausing…")

    def resume(self) -> None:
        self.start()

    def cancel(self) -> None:
        self.job.cancel()
        if not self.running:
            self._ended(JobState.CANCELLED, None)
        else:
            self.state_label.setText("Cancelling…")

    def _set_buttons(self, state: JobState) -> None:
        active = state in (JobState.RUNNING, JobState.PENDING) and self.running
        self.pause_button.setVisible(active)
        self.resume_button.setVisible(state in (JobState.PAUSED, JobState.FAILED) or
                                      (state is JobState.PENDING and not self.running))
        self.resume_button.setText("Retry" if state is JobState.FAILED else "Resume")
        self.cancel_button.setVisible(state not in (JobState.COMPLETE, JobState.CANCELLED))

    # --- reports (GUI thread) -----------------------------------------------------------------

    def _progress(self, p: DownloadProgress) -> None:
        self.last = p
        self.bar.setValue(int(p.fraction * PROGRESS_STEPS))
        self.caption.setText(status_line(p))
        if p.state is JobState.RUNNING:
            self.state_label.setText(f"Downloading · {p.fraction:.0%}")
        for f in p.files:
            item = self._file_items.get(f.path)
            if item is None:
                item = QTreeWidgetItem([f.path, "", "", ""])
                self._file_items[f.path] = item
                self.files.addTopLevelItem(item)
            pct = f.done / f.total if f.total else 1.0
            item.setText(1, f"{pct:.0%} of {human_bytes(f.total)}")
            item.setText(2, f"{human_bytes(f.speed_bps)}/s" if f.state == "downloading" else "")
            item.setText(3, f.state)

    def _ended(self, state: JobState | None, error: BaseException | None) -> None:
        if error is not None:
            self.error = error
            self.state_label.setText("Failed")
            self.caption.setText(error_words(error))
            self._set_buttons(JobState.FAILED)
            if isinstance(error, HubAuthError):
                self.ask_token(error)
            self.view.job_ended.emit(self)
            return
        assert state is not None
        self.state_label.setText(self.STATE_WORDS[state])
        if state is JobState.COMPLETE:
            self.bar.setValue(PROGRESS_STEPS)
            self.caption.setText(f"Saved to {self.job.final_dir}")
            self.view.completed.emit(self.job.final_dir)
        elif state is JobState.PAUSED and self.last is not None:
            self.caption.setText(status_line(self.last) + " · paused; press Resume to continue")
        elif state is JobState.CANCELLED:
            self.bar.setValue(0)
            self.caption.setText("Cancelled; the partial files were deleted.")
        self._set_buttons(state)
        self.view.job_ended.emit(self)

    # --- token prompt -------------------------------------------------------------------------

    def ask_token(self, error: BaseException) -> QInputDialog:
        """Non-modal token prompt; on OK the token goes to the keyring and the job starts again."""
        dialog = QInputDialog(self.window())
        dialog.setWindowTitle("Hugging Face token needed")
        hint = getattr(error, "hint", "") or ""
        dialog.setLabelText(f"{self.job.repo_id} needs a Hugging Face read token.\n{hint}\n\n"
                            "Paste a token from huggingface.co/settings/tokens:")
        dialog.setTextEchoMode(QLineEdit.EchoMode.Password)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.textValueSelected.connect(self.use_token)
        dialog.finished.connect(lambda _r: setattr(self, "token_dialog", None))
        self.token_dialog = dialog
        dialog.open()
        return dialog

    def use_token(self, token: str) -> None:
        token = token.strip()
        if not token:
            return
        try:
            from app.hub.access import set_token

            set_token(token)
            stored = "The token was saved in your system keyring."
        except TokenStoreError as e:
            stored = f"The token is used for this session only: {e}"
        # Explicit token on the access: works even where no keyring backend exists.
        self.job.access = dataclasses.replace(self.job.access, token=token)
        self.view.access = dataclasses.replace(self.view.access, token=token)
        self.caption.setText(stored)
        self.start()


class DownloadsView(QWidget):
    """All downloads of this session plus the interrupted ones found in the library folder."""

    completed = Signal(str)          # final folder of a finished download
    job_ended = Signal(object)       # DownloadRow (finished, paused, cancelled or failed)

    def __init__(self, library_dir: str, access: HubAccess | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.library_dir = library_dir
        self.access = access or HubAccess()
        self.rows: list[DownloadRow] = []
        outer = QVBoxLayout(self)
        outer.setContentsMargins(16, 16, 16, 16)
        title = QLabel("Downloads")
        title.setObjectName("PanelTitle")
        outer.addWidget(title)
        self.empty_label = QLabel("Nothing downloading. Pick a branch in Browse and press Download.")
        self.empty_label.setObjectName("ValueLabel")
        outer.addWidget(self.empty_label)
        self.list_layout = scrolling_list(outer)

    def row_for(self, repo_id: str, branch: str) -> DownloadRow | None:
        return next((r for r in self.rows if r.job.repo_id == repo_id and r.job.branch == branch), None)

    def _add_row(self, job: DownloadJob) -> DownloadRow:
        row = DownloadRow(self, job)
        self.rows.append(row)
        self.list_layout.insertWidget(0, row)
        self.empty_label.hide()
        return row

    def start(self, repo_id: str, branch: str) -> DownloadRow:
        """Download (repo, branch) into the library, or continue the row that already exists."""
        row = self.row_for(repo_id, branch)
        if row is None or row.state in (JobState.CANCELLED, JobState.COMPLETE):
            if row is not None:
                self.rows.remove(row)
                row.deleteLater()
            row = self._add_row(DownloadJob(repo_id, branch, self.library_dir, access=self.access))
        row.start()
        return row

    def find_pending(self) -> list[DownloadRow]:
        """Rows (paused, not started) for the interrupted downloads in the library's .partial folder."""
        found = []
        for manifest in pending_downloads(self.library_dir):
            repo_id, branch = manifest.get("repo_id"), manifest.get("branch")
            if not isinstance(repo_id, str) or not isinstance(branch, str) or self.row_for(repo_id, branch):
                continue
            row = self._add_row(DownloadJob(repo_id, branch, self.library_dir, access=self.access,
                                            name=manifest.get("name") or None))
            files = manifest.get("files") or []
            total = sum(int(f.get("size") or 0) for f in files if isinstance(f, dict))
            row.state_label.setText("Interrupted")
            row.caption.setText(f"{human_bytes(total)} download interrupted; press Resume to continue "
                                "where it stopped.")
            found.append(row)
        return found

    def active_rows(self) -> list[DownloadRow]:
        return [r for r in self.rows if r.running]

    def pause_all(self, wait_s: float = 2.0) -> None:
        """Pause every running job (on exit), so the bytes on disk stay resumable."""
        for row in self.active_rows():
            row.job.pause()
        for row in self.active_rows():
            if row.thread is not None:
                row.thread.join(wait_s)
