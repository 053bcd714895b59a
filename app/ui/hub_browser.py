"""Hub browser: search EXL2 repos, list a repo's bpw branches with a fit badge each, read the model
card, and start downloads; plus `ModelsWindow`, the one window holding Browse / Downloads /
Library / Planner that the main window opens.

Every network call (search, branch listing, model card) runs on the thread pool (run_task); the
results come back to the GUI thread through queued signals. A request id per list guards against
a slow old answer overwriting a newer one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from app.hub.access import HubAccess
from app.hub.browse import (
    BranchInfo,
    RepoSummary,
    fit_input,
    list_branches,
    search_models,
    strip_front_matter,
)

from .downloads import DownloadsView, human_bytes
from .library_view import LibraryView
from .planner_view import (
    DEFAULT_CACHE,
    DEFAULT_CONTEXT,
    Badge,
    BadgeLabel,
    GpuPicker,
    PlannerView,
    error_words,
    fit_badge,
    run_task,
    unknown_badge,
)
from .theme import THEMES, Theme

SEARCH_DELAY_MS = 350
ARCHITECTURES = ("", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi", "yi")
SIZES: tuple[tuple[str, float | None, float | None], ...] = (
    ("Any size", None, None), ("Up to 4B", None, 4.0), ("4B – 10B", 4.0, 10.0), ("10B – 20B", 10.0, 20.0),
    ("20B – 40B", 20.0, 40.0), ("40B and up", 40.0, None))
SORTS = (("Most downloaded", "downloads"), ("Most liked", "likes"), ("Recently updated", "last_modified"))
BRANCH_COLUMNS = ("Branch", "bpw", "Head bits", "Download", "Fits", "")


def branch_spec(branch: BranchInfo) -> Any:
    """The planner's spec for a branch (config.json + file sizes), or the words why there is none."""
    from app.planner import spec_from_files

    if not branch.supported:
        return branch.problem or "The engine does not run this architecture."
    try:
        config, sizes = fit_input(branch)
        return spec_from_files(config, sizes, name=f"{branch.repo_id}@{branch.name}")
    except Exception as e:  # noqa: BLE001 - a badge must never break the list
        return error_words(e)


def branch_badge(spec: Any, gpu: Any, context: int = DEFAULT_CONTEXT, cache_mode: str = DEFAULT_CACHE) -> Badge:
    if isinstance(spec, str):
        return unknown_badge(spec)
    try:
        return fit_badge(spec, gpu, context, cache_mode)
    except Exception as e:  # noqa: BLE001
        return unknown_badge(error_words(e))


def visible_branches(branches: Iterable[BranchInfo], exl2_only: bool) -> list[BranchInfo]:
    """Branches worth a row: they hold weights; with exl2_only, they also carry a bpw."""
    return [b for b in branches if b.has_weights and (b.bpw is not None or not exl2_only)]


def _load_branches(repo_id: str, access: HubAccess) -> list[tuple[BranchInfo, Any]]:
    """Worker-thread half of selecting a repo: branches with their specs (the estimate's torch import
    happens here too, not on the GUI thread)."""
    from app.planner import cache_modes

    cache_modes()
    return [(b, branch_spec(b)) for b in list_branches(repo_id, access=access)]


def _load_card(repo_id: str, access: HubAccess) -> str:
    from app.hub.browse import fetch_model_card

    return fetch_model_card(repo_id, "main", access=access)


class HubBrowser(QWidget):
    download_requested = Signal(str, str)     # repo_id, branch
    plan_requested = Signal(object)           # BranchInfo
    searched = Signal()                       # results shown (or an error)
    branches_shown = Signal()
    card_shown = Signal()

    def __init__(self, access: HubAccess | None = None, theme: Theme | None = None, parent: QWidget | None = None,
                 gpu_picker: GpuPicker | None = None) -> None:
        super().__init__(parent)
        self.access = access or HubAccess()
        self.theme = theme or THEMES["light"]
        self.results: list[RepoSummary] = []
        self.branches: list[tuple[BranchInfo, Any]] = []
        self.repo_id: str | None = None
        self._search_id = 0
        self._branch_id = 0
        outer = QVBoxLayout(self)
        outer.setContentsMargins(16, 16, 16, 16)
        outer.setSpacing(8)

        bar = QHBoxLayout()
        self.search_edit = QLineEdit()
        self.search_edit.setPlaceholderText("Search EXL2 models on Hugging Face (e.g. llama 3 8b)")
        self.search_edit.setClearButtonEnabled(True)
        self.search_edit.returnPressed.connect(self.search)
        self._delay = QTimer(self, singleShot=True, interval=SEARCH_DELAY_MS)
        self._delay.timeout.connect(self.search)
        self.search_edit.textEdited.connect(lambda _t: self._delay.start())
        self.search_button = QPushButton("Search")
        self.search_button.setObjectName("PrimaryButton")
        self.search_button.clicked.connect(self.search)
        bar.addWidget(self.search_edit, 1)
        bar.addWidget(self.search_button)
        outer.addLayout(bar)

        filters = QHBoxLayout()
        self.exl2_only = QCheckBox("EXL2 branches only")
        self.exl2_only.setChecked(True)
        self.exl2_only.setToolTip("Hide branches without a bits-per-weight (e.g. unquantized copies).")
        self.exl2_only.toggled.connect(self._show_branches)
        self.arch_combo = QComboBox()
        for arch in ARCHITECTURES:
            self.arch_combo.addItem(arch.capitalize() if arch else "Any architecture", arch)
        self.size_combo = QComboBox()
        for label, lo, hi in SIZES:
            self.size_combo.addItem(label, (lo, hi))
        self.sort_combo = QComboBox()
        for label, key in SORTS:
            self.sort_combo.addItem(label, key)
        for combo in (self.arch_combo, self.size_combo, self.sort_combo):
            combo.currentIndexChanged.connect(self.search)
        self.gpu = gpu_picker or GpuPicker()
        self.gpu.currentIndexChanged.connect(self._show_branches)
        filters.addWidget(self.exl2_only)
        filters.addWidget(self.arch_combo)
        filters.addWidget(self.size_combo)
        filters.addWidget(self.sort_combo)
        filters.addStretch(1)
        filters.addWidget(QLabel("Fit on"))
        filters.addWidget(self.gpu)
        outer.addLayout(filters)

        self.status = QLabel("Type a name and press Enter.")
        self.status.setObjectName("ValueLabel")
        self.status.setWordWrap(True)
        outer.addWidget(self.status)

        split = QSplitter(Qt.Orientation.Horizontal)
        self.results_list = QListWidget()
        self.results_list.currentItemChanged.connect(self._repo_selected)
        split.addWidget(self.results_list)
        right = QSplitter(Qt.Orientation.Vertical)
        self.branch_table = QTableWidget(0, len(BRANCH_COLUMNS))
        self.branch_table.setHorizontalHeaderLabels(list(BRANCH_COLUMNS))
        self.branch_table.verticalHeader().setVisible(False)
        self.branch_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.branch_table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.branch_table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.branch_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.branch_table.itemDoubleClicked.connect(self._plan_row)
        right.addWidget(self.branch_table)
        self.card_view = QTextBrowser()
        self.card_view.setOpenExternalLinks(True)
        right.addWidget(self.card_view)
        split.addWidget(right)
        split.setStretchFactor(1, 2)
        outer.addWidget(split, 1)

    # --- search -------------------------------------------------------------------------------

    def search(self) -> None:
        self._delay.stop()
        self._search_id += 1
        request = self._search_id
        query = self.search_edit.text()
        arch = self.arch_combo.currentData() or None
        lo, hi = self.size_combo.currentData()
        sort = self.sort_combo.currentData()
        access = self.access
        self.status.setText("Searching…")
        run_task(lambda: search_models(query, architecture=arch, min_params_b=lo, max_params_b=hi, sort=sort,
                                       access=access),
                 lambda found: self._search_done(request, found),
                 lambda e: self._search_failed(request, e))

    def _search_done(self, request: int, found: list[RepoSummary]) -> None:
        if request != self._search_id:
            return
        self.results = found
        self.results_list.blockSignals(True)
        self.results_list.clear()
        for s in found:
            extra = " · ".join(x for x in (
                f"{s.params_b:g}B" if s.params_b else "", s.architecture or "",
                f"↓ {s.downloads:,}", f"♥ {s.likes:,}", "gated" if s.gated else "") if x)
            item = QListWidgetItem(f"{s.repo_id}\n{extra}")
            item.setData(Qt.ItemDataRole.UserRole, s.repo_id)
            self.results_list.addItem(item)
        self.results_list.blockSignals(False)
        self.status.setText(f"{len(found)} repositor{'y' if len(found) == 1 else 'ies'} found."
                            if found else "No EXL2 repositories match. Try fewer words or other filters.")
        self.searched.emit()

    def _search_failed(self, request: int, error: BaseException) -> None:
        if request == self._search_id:
            self.status.setText(error_words(error))
            self.searched.emit()

    # --- one repo -----------------------------------------------------------------------------

    def _repo_selected(self, item: QListWidgetItem | None, _previous: Any = None) -> None:
        if item is not None:
            self.open_repo(item.data(Qt.ItemDataRole.UserRole))

    def select_repo(self, repo_id: str) -> None:
        for i in range(self.results_list.count()):
            if self.results_list.item(i).data(Qt.ItemDataRole.UserRole) == repo_id:
                self.results_list.setCurrentRow(i)
                return
        raise KeyError(repo_id)

    def open_repo(self, repo_id: str) -> None:
        """List the repo's branches (with badges) and show its model card."""
        self._branch_id += 1
        request = self._branch_id
        self.repo_id = repo_id
        self.branches = []
        self.branch_table.setRowCount(0)
        self.card_view.setHtml("<p>Loading the model card…</p>")
        self.status.setText(f"Listing the branches of {repo_id}…")
        access = self.access
        run_task(lambda: _load_branches(repo_id, access),
                 lambda found: self._branches_done(request, found),
                 lambda e: self._branches_failed(request, e))
        run_task(lambda: _load_card(repo_id, access),
                 lambda text: self._card_done(request, text),
                 lambda e: self._card_done(request, f"*The model card could not be loaded:* {error_words(e)}"))

    def _branches_done(self, request: int, found: list[tuple[BranchInfo, Any]]) -> None:
        if request != self._branch_id:
            return
        self.branches = found
        self._show_branches()
        self.branches_shown.emit()

    def _branches_failed(self, request: int, error: BaseException) -> None:
        if request == self._branch_id:
            self.status.setText(error_words(error))
            self.branches_shown.emit()

    def _card_done(self, request: int, text: str) -> None:
        if request != self._branch_id:
            return
        from .markdown_render import document_css, render_markdown

        body = strip_front_matter(text).strip() or "*This repository has no model card.*"
        self.card_view.document().setDefaultStyleSheet(document_css(self.theme.colors))
        self.card_view.setHtml(render_markdown(body, self.theme.colors, self.theme.pygments_style).html)
        self.card_shown.emit()

    def shown_branches(self) -> list[tuple[BranchInfo, Any]]:
        keep = {id(b) for b in visible_branches([b for b, _s in self.branches], self.exl2_only.isChecked())}
        return [(b, s) for b, s in self.branches if id(b) in keep]

    def _show_branches(self) -> None:
        rows = self.shown_branches()
        self.branch_table.setRowCount(len(rows))
        gpu = self.gpu.option
        for r, (b, spec) in enumerate(rows):
            cells = (b.name, f"{b.bpw:g}" if b.bpw else "—", str(b.head_bits) if b.head_bits else "—",
                     human_bytes(b.total_bytes))
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setData(Qt.ItemDataRole.UserRole, b.name)
                self.branch_table.setItem(r, c, item)
            self.branch_table.setCellWidget(r, 4, BadgeLabel(branch_badge(spec, gpu)))
            button = QPushButton("Download")
            button.setToolTip(f"Download {b.repo_id} @ {b.name} ({human_bytes(b.total_bytes)}) into the library")
            button.clicked.connect(lambda _c=False, name=b.name: self.download_requested.emit(self.repo_id, name))
            self.branch_table.setCellWidget(r, 5, button)
        self.branch_table.resizeColumnsToContents()
        self.branch_table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        hidden = len(self.branches) - len(rows)
        self.status.setText(f"{self.repo_id}: {len(rows)} branch{'es' if len(rows) != 1 else ''} "
                            f"to download" + (f" ({hidden} hidden by the filter or holding no weights)"
                                              if hidden else "") + ". Double-click a branch to plan it.")

    def row_of(self, branch: str) -> int:
        for r in range(self.branch_table.rowCount()):
            if self.branch_table.item(r, 0).text() == branch:
                return r
        raise KeyError(branch)

    def badge_of(self, branch: str) -> BadgeLabel:
        return self.branch_table.cellWidget(self.row_of(branch), 4)  # type: ignore[return-value]

    def download_button(self, branch: str) -> QPushButton:
        return self.branch_table.cellWidget(self.row_of(branch), 5)  # type: ignore[return-value]

    def _plan_row(self, item: QTableWidgetItem) -> None:
        name = item.data(Qt.ItemDataRole.UserRole)
        branch = next((b for b, _s in self.branches if b.name == name), None)
        if branch is not None:
            self.plan_requested.emit(branch)


def default_library_dir() -> str:
    import platformdirs

    return os.path.join(platformdirs.user_data_dir("Kestrel", appauthor=False), "models")


class ModelsWindow(QDialog):
    """Browse / Downloads / Library / Planner in one non-modal window. `load_requested(path)` is
    connected by the main window to its existing load path."""

    load_requested = Signal(str)
    PAGES = ("browse", "downloads", "library", "planner")

    def __init__(self, parent: QWidget | None = None, *, library_dir: str | None = None,
                 access: HubAccess | None = None, theme: Theme | None = None, include_hf_cache: bool = True,
                 hf_cache_dir: str | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Models")
        self.resize(1100, 760)
        self.library_dir = library_dir or default_library_dir()
        os.makedirs(self.library_dir, exist_ok=True)
        self.access = access or HubAccess()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.tabs = QTabWidget()
        self.browser = HubBrowser(self.access, theme)
        self.downloads = DownloadsView(self.library_dir, self.access)
        self.library = LibraryView([self.library_dir], include_hf_cache=include_hf_cache, hf_cache_dir=hf_cache_dir)
        self.planner = PlannerView()
        for widget, label in ((self.browser, "Browse"), (self.downloads, "Downloads"), (self.library, "Library"),
                              (self.planner, "Planner")):
            self.tabs.addTab(widget, label)
        layout.addWidget(self.tabs)
        self.browser.download_requested.connect(self.download)
        self.browser.plan_requested.connect(self.plan_branch)
        self.downloads.completed.connect(lambda _path: self.library.refresh())
        self.library.load_requested.connect(self.load_requested)
        self.library.plan_requested.connect(self.plan_folder)
        self.downloads.find_pending()
        self.library.refresh()

    def show_page(self, page: str) -> None:
        self.tabs.setCurrentIndex(self.PAGES.index(page))
        self.show()
        self.raise_()
        self.activateWindow()

    def download(self, repo_id: str, branch: str) -> None:
        self.downloads.start(repo_id, branch)
        self.tabs.setCurrentWidget(self.downloads)

    def plan_branch(self, branch: BranchInfo) -> None:
        self.planner.set_branch(branch)
        self.tabs.setCurrentWidget(self.planner)

    def plan_folder(self, path: str) -> None:
        self.planner.set_model_folder(path)
        self.tabs.setCurrentWidget(self.planner)

    def shutdown(self) -> None:
        """Pause running downloads so their bytes stay resumable after the app exits."""
        self.downloads.pause_all()
