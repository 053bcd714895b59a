"""Left sidebar: brand, "New chat", search, and the conversations grouped by date."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import QPoint, Qt, QTimer, Signal
from PySide6.QtGui import QAction
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

ID_ROLE = Qt.ItemDataRole.UserRole
SEARCH_DELAY_MS = 150


def date_group(timestamp: float, now: dt.datetime | None = None) -> str:
    """Sidebar heading for a chat last active at `timestamp`."""
    now = now or dt.datetime.now()
    day = dt.datetime.fromtimestamp(timestamp).date()
    delta = (now.date() - day).days
    if delta <= 0:
        return "Today"
    if delta == 1:
        return "Yesterday"
    if delta < 7:
        return "Previous 7 days"
    if delta < 30:
        return "Previous 30 days"
    return day.strftime("%B %Y")


class ConversationList(QFrame):
    selected = Signal(int)
    new_requested = Signal()
    rename_requested = Signal(int, str)
    delete_requested = Signal(int)
    export_requested = Signal(int, str)     # conversation id, "md" | "json"
    search_changed = Signal(str)

    def __init__(self, icons: dict[str, Any], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("Sidebar")
        self._filling = False
        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 14, 12, 10)
        layout.setSpacing(10)

        brand = QHBoxLayout()
        brand.setSpacing(8)
        self.logo = QLabel()
        self.logo.setPixmap(icons["logo"].pixmap(22, 22))
        name = QLabel("Kestrel")
        name.setObjectName("Brand")
        brand.addWidget(self.logo)
        brand.addWidget(name)
        brand.addStretch(1)
        layout.addLayout(brand)

        self.new_button = QPushButton("  New chat")
        self.new_button.setObjectName("NewChatButton")
        self.new_button.setIcon(icons["plus"])
        self.new_button.setToolTip("New chat (Ctrl+N)")
        self.new_button.clicked.connect(self.new_requested)
        layout.addWidget(self.new_button)

        self.search = QLineEdit()
        self.search.setObjectName("SearchField")
        self.search.setPlaceholderText("Search chats")
        self.search.setClearButtonEnabled(True)
        self.search.addAction(icons["search"], QLineEdit.ActionPosition.LeadingPosition)
        self._search_timer = QTimer(self, singleShot=True, interval=SEARCH_DELAY_MS)
        self._search_timer.timeout.connect(lambda: self.search_changed.emit(self.search.text().strip()))
        self.search.textChanged.connect(lambda _t: self._search_timer.start())
        layout.addWidget(self.search)

        self.list = QListWidget()
        self.list.setObjectName("ConversationList")
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.setEditTriggers(QAbstractItemView.EditTrigger.EditKeyPressed)
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._menu)
        self.list.currentItemChanged.connect(self._current_changed)
        self.list.itemChanged.connect(self._item_edited)
        self.list.itemDoubleClicked.connect(lambda item: self.start_rename(item.data(ID_ROLE)))
        layout.addWidget(self.list, 1)

        self.hint = QLabel("")
        self.hint.setObjectName("SidebarHint")
        self.hint.setWordWrap(True)
        layout.addWidget(self.hint)

    # --- content ------------------------------------------------------------------------------

    def set_conversations(self, conversations: Sequence[Any], current: int | None,
                          snippets: dict[int, str] | None = None) -> None:
        """Show chats (already newest first). With `snippets` (a search), no date headings."""
        self._filling = True
        try:
            self.list.clear()
            heading = None
            for conv in conversations:
                if snippets is None:
                    group = date_group(conv.updated)
                    if group != heading:
                        heading = group
                        head = QListWidgetItem(group)
                        head.setFlags(Qt.ItemFlag.NoItemFlags)
                        font = head.font()
                        font.setPointSizeF(8.5)
                        font.setBold(True)
                        head.setFont(font)
                        head.setForeground(self.palette().placeholderText())
                        self.list.addItem(head)
                item = QListWidgetItem(conv.title or "Untitled")
                item.setData(ID_ROLE, conv.id)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
                tip = snippets.get(conv.id, "") if snippets else ""
                item.setToolTip(f"{conv.title}\n{tip}".strip())
                self.list.addItem(item)
                if conv.id == current:
                    self.list.setCurrentItem(item)
            if snippets is not None:
                self.hint.setText(f"{len(conversations)} chat(s) match" if conversations else "No chat matches")
            else:
                self.hint.setText("" if conversations else "No chats yet")
        finally:
            self._filling = False

    def ids(self) -> list[int]:
        return [self.list.item(i).data(ID_ROLE) for i in range(self.list.count())
                if self.list.item(i).data(ID_ROLE) is not None]

    def item_for(self, conversation_id: int) -> QListWidgetItem | None:
        for i in range(self.list.count()):
            item = self.list.item(i)
            if item.data(ID_ROLE) == conversation_id:
                return item
        return None

    def select(self, conversation_id: int | None) -> None:
        self._filling = True
        try:
            item = self.item_for(conversation_id) if conversation_id is not None else None
            self.list.setCurrentItem(item)
        finally:
            self._filling = False

    def start_rename(self, conversation_id: int) -> None:
        item = self.item_for(conversation_id)
        if item is not None:
            self.list.editItem(item)

    # --- events -------------------------------------------------------------------------------

    def _current_changed(self, item: QListWidgetItem | None, _previous: QListWidgetItem | None) -> None:
        if self._filling or item is None or item.data(ID_ROLE) is None:
            return
        self.selected.emit(int(item.data(ID_ROLE)))

    def _item_edited(self, item: QListWidgetItem) -> None:
        if self._filling or item.data(ID_ROLE) is None:
            return
        title = item.text().strip()
        if title:
            self.rename_requested.emit(int(item.data(ID_ROLE)), title)

    def _menu(self, pos: QPoint) -> None:
        item = self.list.itemAt(pos)
        if item is None or item.data(ID_ROLE) is None:
            return
        cid = int(item.data(ID_ROLE))
        menu = QMenu(self)
        actions = [
            ("Rename", lambda: self.start_rename(cid)),
            ("Export as Markdown…", lambda: self.export_requested.emit(cid, "md")),
            ("Export as JSON…", lambda: self.export_requested.emit(cid, "json")),
            (None, None),
            ("Delete", lambda: self.delete_requested.emit(cid)),
        ]
        for text, slot in actions:
            if text is None:
                menu.addSeparator()
                continue
            action = QAction(text, menu)
            action.triggered.connect(slot)
            menu.addAction(action)
        menu.exec(self.list.viewport().mapToGlobal(pos))
