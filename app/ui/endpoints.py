"""Remote endpoints in the GUI: the "Chat with" picker (local model beside remote models) and the
dialog to add, edit and remove endpoints. Endpoints are rows of the chat database; their API keys
go to the OS keyring only (app.remote.keys).
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.store import Store, StoreError

from .chat_source import LOCAL, ChatTarget, RemoteChats


class EndpointsDialog(QDialog):
    """Add / edit / remove endpoints. Problems show inline; the dialog stays open and usable."""

    changed = Signal()

    def __init__(self, store: Store, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Remote endpoints")
        self.setMinimumWidth(560)
        self.store = store
        self.editing: int | None = None
        layout = QHBoxLayout(self)
        left = QVBoxLayout()
        self.list = QListWidget()
        self.list.currentItemChanged.connect(self._picked)
        self.new_button = QPushButton("New endpoint")
        self.new_button.clicked.connect(self.start_new)
        left.addWidget(self.list, 1)
        left.addWidget(self.new_button)
        layout.addLayout(left, 1)

        right = QVBoxLayout()
        form = QFormLayout()
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("e.g. GPU box")
        self.url_edit = QLineEdit()
        self.url_edit.setPlaceholderText("http://192.168.1.20:5000/v1")
        self.key_edit = QLineEdit()
        self.key_edit.setEchoMode(QLineEdit.EchoMode.Password)
        self.key_edit.setPlaceholderText("API key (kept in the system keyring)")
        form.addRow("Name", self.name_edit)
        form.addRow("Base URL", self.url_edit)
        form.addRow("API key", self.key_edit)
        right.addLayout(form)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.message.setObjectName("ValueLabel")
        right.addWidget(self.message)
        row = QHBoxLayout()
        self.save_button = QPushButton("Save")
        self.save_button.setObjectName("PrimaryButton")
        self.save_button.clicked.connect(self.save)
        self.remove_button = QPushButton("Remove")
        self.remove_button.clicked.connect(self.remove)
        row.addWidget(self.save_button)
        row.addWidget(self.remove_button)
        row.addStretch(1)
        right.addLayout(row)
        right.addStretch(1)
        close = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        close.rejected.connect(self.reject)
        right.addWidget(close)
        layout.addLayout(right, 2)
        self.refresh()
        self.start_new()

    def refresh(self, select: int | None = None) -> None:
        self.list.blockSignals(True)
        self.list.clear()
        for e in self.store.list_endpoints():
            item = QListWidgetItem(f"{e.name}\n{e.base_url}")
            item.setData(Qt.ItemDataRole.UserRole, e.id)
            self.list.addItem(item)
            if e.id == select:
                self.list.setCurrentItem(item)
        self.list.blockSignals(False)

    def start_new(self) -> None:
        self.editing = None
        self.list.clearSelection()
        for edit in (self.name_edit, self.url_edit, self.key_edit):
            edit.clear()
        self.remove_button.setEnabled(False)
        self.message.setText("")
        self.name_edit.setFocus()

    def _picked(self, item: QListWidgetItem | None, _previous: Any = None) -> None:
        if item is None:
            return
        from app.remote import get_endpoint_key

        endpoint = self.store.get_endpoint(int(item.data(Qt.ItemDataRole.UserRole)))
        self.editing = endpoint.id
        self.name_edit.setText(endpoint.name)
        self.url_edit.setText(endpoint.base_url)
        self.key_edit.setText(get_endpoint_key(endpoint.id) or "")
        self.remove_button.setEnabled(True)
        self.message.setText("")

    def save(self) -> bool:
        from app.remote import RemoteError, api_base, set_endpoint_key

        name, url, key = self.name_edit.text(), self.url_edit.text(), self.key_edit.text()
        try:
            api_base(url)
            if self.editing is None:
                endpoint_id = self.store.add_endpoint(name, url)
            else:
                endpoint_id = self.store.update_endpoint(self.editing, name=name, base_url=url).id
            self.editing = endpoint_id
            set_endpoint_key(endpoint_id, key)
        except (StoreError, RemoteError) as e:
            self.message.setText(str(e))
            return False
        self.refresh(select=endpoint_id)
        self.remove_button.setEnabled(True)
        self.message.setText("Saved." + (" The key is in the system keyring." if key.strip() else ""))
        self.changed.emit()
        return True

    def remove(self) -> None:
        if self.editing is None:
            return
        from app.remote import RemoteError, set_endpoint_key

        try:
            set_endpoint_key(self.editing, None)
        except RemoteError as e:
            self.message.setText(str(e))
        self.store.delete_endpoint(self.editing)
        self.refresh()
        self.start_new()
        self.changed.emit()


class ChatPicker(QWidget):
    """"Chat with": the local model, then every model of every endpoint (listed in the background)."""

    changed = Signal(object)          # ChatTarget
    manage_requested = Signal()

    def __init__(self, store: Store, chats: RemoteChats, refresh_icon: Any = None,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.store = store
        self.chats = chats
        self.models: dict[int, list[str]] = {}
        self.problems: dict[int, str] = {}
        self._wanted: ChatTarget = LOCAL
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.combo = QComboBox()
        self.combo.setToolTip("Chat with the model loaded here, or with a model on a remote endpoint.")
        self.combo.currentIndexChanged.connect(self._index_changed)
        self.refresh_button = QToolButton()
        self.refresh_button.setObjectName("HeaderButton")
        self.refresh_button.setToolTip("List the endpoints' models again")
        if refresh_icon is not None:
            self.refresh_button.setIcon(refresh_icon)
        self.refresh_button.clicked.connect(self.refresh)
        self.manage_button = QPushButton("Endpoints…")
        self.manage_button.setToolTip("Add, edit or remove remote OpenAI-compatible servers")
        self.manage_button.clicked.connect(self.manage_requested)
        row.addWidget(self.combo, 1)
        row.addWidget(self.refresh_button)
        row.addWidget(self.manage_button)
        layout.addLayout(row)
        self.status = QLabel("")
        self.status.setObjectName("ValueLabel")
        self.status.setWordWrap(True)
        self.status.hide()
        layout.addWidget(self.status)
        chats.models_listed.connect(self._listed)
        self._rebuild()
        self.refresh()

    @property
    def target(self) -> ChatTarget:
        data = self.combo.currentData()
        return data if isinstance(data, ChatTarget) else LOCAL

    def refresh(self) -> None:
        """Ask every endpoint for its models (answers arrive through `models_listed`)."""
        endpoints = self.store.list_endpoints()
        known = {e.id for e in endpoints}
        self.models = {k: v for k, v in self.models.items() if k in known}
        self.problems = {k: v for k, v in self.problems.items() if k in known}
        for endpoint in endpoints:
            self.chats.list_models(endpoint)
        self._rebuild()

    def select(self, target: ChatTarget) -> None:
        """Pick `target` now if it is listed, else as soon as its endpoint's models arrive."""
        self._wanted = target
        self._rebuild()

    def _pick(self, target: ChatTarget) -> None:
        for i in range(self.combo.count()):
            data = self.combo.itemData(i)
            if isinstance(data, ChatTarget) and (data.endpoint_id, data.model) == (target.endpoint_id, target.model):
                self.combo.setCurrentIndex(i)
                return

    def _listed(self, endpoint_id: int, models: list[str] | None, problem: Any) -> None:
        if models is None:
            self.models.pop(endpoint_id, None)
            self.problems[endpoint_id] = f"{problem.title}: {problem.text}"
        else:
            self.models[endpoint_id] = models
            self.problems.pop(endpoint_id, None)
        self._rebuild()

    def _rebuild(self) -> None:
        before = self.target
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItem("Local model (loaded here)", LOCAL)
        for endpoint in self.store.list_endpoints():
            for model in self.models.get(endpoint.id, []):
                self.combo.addItem(f"{model} · {endpoint.name}", ChatTarget(endpoint.id, model, endpoint.name))
        self._pick(self._wanted)   # the user's choice comes back when its endpoint answers again
        self.combo.blockSignals(False)
        problems = [f"{self._name(i)} — {p}" for i, p in self.problems.items()]
        self.status.setText("\n".join(problems))
        self.status.setVisible(bool(problems))
        if self.target != before:
            self.changed.emit(self.target)

    def _name(self, endpoint_id: int) -> str:
        try:
            return self.store.get_endpoint(endpoint_id).name
        except StoreError:
            return f"endpoint {endpoint_id}"

    def _index_changed(self, _index: int) -> None:
        self._wanted = self.target
        self.changed.emit(self.target)
