"""The main window: conversations (left), chat (centre), model + chat settings (right, collapsible),
status bar (tok/s, context used, VRAM). Glues the store, the engine thread and the widgets.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
    QScrollArea,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from app.store import Store, StoreError, Timings

from . import backend, gc_guard
from .chat_source import LOCAL, ChatTarget, RemoteChats, RemoteSource
from .chat_view import ChatView
from .conversation_list import ConversationList
from .endpoints import ChatPicker, EndpointsDialog
from .lora_panel import LoraPanel
from .model_panel import ModelPanel, RecentModels
from .prefs import Prefs
from .presets import PresetStore
from .sampler_panel import DEFAULT_MAX_NEW_TOKENS, SamplerPanel
from .structured_output import StructuredOutputField
from .theme import THEMES, Theme, apply_theme, icon_set
from .worker import EngineClient, ErrorReport, LoadRequest

NEW_TITLE = "New chat"
SAVE_DELAY_MS = 400
VRAM_POLL_MS = 3000


def title_from(text: str, limit: int = 48) -> str:
    """A chat title from its first message: first line, cut at a word boundary."""
    line = " ".join(text.strip().split("\n", 1)[0].split())
    if len(line) <= limit:
        return line or NEW_TITLE
    cut = line[:limit].rsplit(" ", 1)[0]
    return (cut or line[:limit]) + "…"


def chat_messages(system_prompt: str, messages: list[Any]) -> list[dict[str, str]]:
    """What the engine sees: the chat's system prompt, then user/assistant turns with text."""
    out = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    out += [{"role": m.role, "content": m.content} for m in messages
            if m.role in ("user", "assistant") and (m.content or m.role == "user")]
    return out


@dataclass
class Generation:
    job: int
    conversation_id: int
    message_id: int
    text: str = ""
    started: float = field(default_factory=time.perf_counter)
    source: Any = None      # what generates it (chat_source: EngineClient or RemoteSource); None = local


class _Bridge(QObject):
    """Carries results of plain Python threads (spec import, NVML) into the GUI thread."""

    specs = Signal(object)
    vram = Signal(str)


class MainWindow(QMainWindow):
    def __init__(self, store: Store, config_dir: Path, theme: str = "light") -> None:
        super().__init__()
        gc_guard.install()
        self.setWindowTitle("Kestrel")
        self.resize(1360, 860)
        self.setMinimumSize(900, 560)
        self.store = store
        self.config_dir = Path(config_dir)
        self.prefs = Prefs(self.config_dir)
        self.theme: Theme = THEMES[theme]
        self.icons = icon_set()
        self.current_id: int | None = None
        self.model_info: Any = None
        self.generation: Generation | None = None
        self.error_box: QMessageBox | None = None
        self._count_request = 0
        self._closing = False

        self.client = EngineClient(self)
        w = self.client.worker
        w.progress.connect(self._load_progress)
        w.loaded.connect(self._loaded)
        w.load_failed.connect(self._load_failed)
        w.unloaded.connect(self._unloaded)
        w.chunk.connect(self._chunk)
        w.finished.connect(self._finished)
        w.failed.connect(self._failed)
        w.counted.connect(self._counted)
        self.remote = RemoteChats(self)     # remote models: same slots as the local engine
        self.remote.chunk.connect(self._chunk)
        self.remote.finished.connect(self._finished)
        self.remote.failed.connect(self._failed)

        self._build()
        self._build_actions()
        self._save_timer = QTimer(self, singleShot=True, interval=SAVE_DELAY_MS)
        self._save_timer.timeout.connect(self.save_settings)
        self._bridge = _Bridge(self)
        self._bridge.specs.connect(self.sampler_panel.set_specs)
        self._bridge.vram.connect(self._vram_read)
        self._vram_timer = QTimer(self, interval=VRAM_POLL_MS)
        self._vram_timer.timeout.connect(self._poll_vram)
        self.store.recover_interrupted()
        self.refresh_list()
        conversations = self.store.list_conversations(limit=1)
        self.open_conversation(conversations[0].id if conversations else None)
        QTimer.singleShot(0, self._after_show)

    # --- construction -------------------------------------------------------------------------

    def _build(self) -> None:
        central = QWidget()
        central.setObjectName("Central")
        root = QHBoxLayout(central)
        root.setContentsMargins(0, 0, 0, 0)
        root.setSpacing(0)

        self.sidebar = ConversationList(self.icons)
        self.sidebar.setFixedWidth(264)
        self.sidebar.selected.connect(self.open_conversation)
        self.sidebar.new_requested.connect(self.new_chat)
        self.sidebar.rename_requested.connect(self.rename_conversation)
        self.sidebar.delete_requested.connect(self.confirm_delete)
        self.sidebar.export_requested.connect(self._export_dialog)
        self.sidebar.search_changed.connect(self.search)
        root.addWidget(self.sidebar)

        centre = QWidget()
        centre_layout = QVBoxLayout(centre)
        centre_layout.setContentsMargins(0, 0, 0, 0)
        centre_layout.setSpacing(0)
        centre_layout.addWidget(self._build_header())
        self.chat = ChatView(self.theme, self.icons)
        self.chat.send_requested.connect(self.send)
        self.chat.stop_requested.connect(self.stop)
        self.chat.regenerate_requested.connect(lambda _mid: self.regenerate())
        self.chat.edit_submitted.connect(self.edit_and_rerun)
        centre_layout.addWidget(self.chat, 1)
        root.addWidget(centre, 1)

        root.addWidget(self._build_side_panel())
        self.setCentralWidget(central)

        bar = self.statusBar()
        bar.setSizeGripEnabled(False)
        self.speed_label = QLabel("— tok/s")
        self.context_label = QLabel("context —")
        self.vram_label = QLabel("VRAM …")
        for label, tip in ((self.speed_label, "Generation speed of the current or last reply"),
                           (self.context_label, "Tokens of context used by this chat / context size"),
                           (self.vram_label, "GPU memory in use (all programs)")):
            label.setToolTip(tip)
            bar.addPermanentWidget(label)
        bar.showMessage("Ready")

    def _header_button(self, icon: str, tip: str, checkable: bool = False) -> QToolButton:
        button = QToolButton()
        button.setObjectName("HeaderButton")
        button.setIcon(self.icons[icon])
        button.setIconSize(QSize(18, 18))
        button.setToolTip(tip)
        button.setCheckable(checkable)
        button.setCursor(Qt.CursorShape.PointingHandCursor)
        return button

    def _build_header(self) -> QWidget:
        header = QFrame()
        header.setObjectName("ChatHeader")
        header.setFixedHeight(56)
        row = QHBoxLayout(header)
        row.setContentsMargins(12, 0, 12, 0)
        row.setSpacing(6)
        self.sidebar_button = self._header_button("sidebar", "Show/hide chats (Ctrl+B)", True)
        self.sidebar_button.setChecked(True)
        self.sidebar_button.toggled.connect(self.sidebar.setVisible)
        titles = QVBoxLayout()
        titles.setSpacing(0)
        self.title_label = QLabel(NEW_TITLE)
        self.title_label.setObjectName("ChatTitle")
        self.subtitle_label = QLabel("No model loaded")
        self.subtitle_label.setObjectName("ChatSubtitle")
        titles.addWidget(self.title_label)
        titles.addWidget(self.subtitle_label)
        self.theme_button = self._header_button("moon", "Dark theme")
        self.theme_button.clicked.connect(self.toggle_theme)
        self.panel_button = self._header_button("sliders", "Show/hide model and settings (Ctrl+.)", True)
        self.panel_button.toggled.connect(self._panel_toggled)
        self.models_button = self._header_button("download", "Models: browse the Hub, downloads, library, VRAM "
                                                             "planner (Ctrl+Shift+M)")
        self.models_button.clicked.connect(lambda: self.open_models("browse"))
        self.server_button = self._header_button("cpu", "Local server: serve the loaded model over the "
                                                        "OpenAI-compatible API")
        self.server_button.clicked.connect(self.open_local_server)
        self.quantize_button = self._header_button("cpu", "Quantize a model to EXL2 (Ctrl+Shift+Q)")
        self.quantize_button.clicked.connect(self.open_quantize_wizard)
        row.addWidget(self.sidebar_button)
        row.addSpacing(4)
        row.addLayout(titles)
        row.addStretch(1)
        row.addWidget(self.models_button)
        row.addWidget(self.server_button)
        row.addWidget(self.quantize_button)
        row.addWidget(self.theme_button)
        row.addWidget(self.panel_button)
        return header

    def _build_side_panel(self) -> QWidget:
        self.side_panel = QFrame()
        self.side_panel.setObjectName("SidePanel")
        self.side_panel.setFixedWidth(330)
        outer = QVBoxLayout(self.side_panel)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        body = QWidget()
        body.setObjectName("SidePanelBody")
        layout = QVBoxLayout(body)
        layout.setContentsMargins(18, 16, 18, 16)
        layout.setSpacing(10)

        def section(text: str) -> None:
            label = QLabel(text)
            label.setObjectName("PanelTitle")
            layout.addSpacing(6)
            layout.addWidget(label)

        section("Model")
        self.chat_picker = ChatPicker(self.store, self.remote, self.icons["refresh"])
        self.chat_picker.manage_requested.connect(self.manage_endpoints)
        self.chat_picker.changed.connect(lambda _t: self._show_target())
        layout.addWidget(self.chat_picker)
        self.model_panel = ModelPanel(RecentModels(self.config_dir), self.icons["folder"])
        self.model_panel.load_requested.connect(self.load_model)
        self.model_panel.unload_requested.connect(self.unload_model)
        self.model_panel.set_overflow(str(self.prefs.get("context_overflow", "stop")))
        self.model_panel.overflow_combo.currentIndexChanged.connect(
            lambda _i: self.prefs.set("context_overflow", self.model_panel.overflow()))
        layout.addWidget(self.model_panel)
        section("System prompt")
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setObjectName("SystemPrompt")
        self.system_prompt.setPlaceholderText("e.g. You are a concise assistant. (for this chat only)")
        self.system_prompt.setFixedHeight(84)
        self.system_prompt.textChanged.connect(self._settings_edited)
        layout.addWidget(self.system_prompt)
        section("Sampling")
        self.sampler_panel = SamplerPanel(PresetStore(self.config_dir))
        self.sampler_panel.changed.connect(self._settings_edited)
        layout.addWidget(self.sampler_panel)
        section("LoRA adapters")
        self.lora_panel = LoraPanel(self.client)
        self.lora_panel.changed.connect(self._settings_edited)
        self.lora_panel.error.connect(self.show_error)
        layout.addWidget(self.lora_panel)
        self.structured = StructuredOutputField()
        self.structured.changed.connect(self._settings_edited)
        layout.addWidget(self.structured)
        layout.addStretch(1)
        scroll.setWidget(body)
        outer.addWidget(scroll)
        visible = bool(self.prefs.get("side_panel", True))
        self.side_panel.setVisible(visible)
        self.panel_button.setChecked(visible)
        return self.side_panel

    def _build_actions(self) -> None:
        def add(text: str, keys: str | QKeySequence.StandardKey, slot: Any) -> QAction:
            action = QAction(text, self)
            action.setShortcut(QKeySequence(keys))
            action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
            action.triggered.connect(slot)
            self.addAction(action)
            return action

        self.new_action = add("New chat", "Ctrl+N", self.new_chat)
        self.regenerate_action = add("Regenerate", "Ctrl+R", self.regenerate)
        self.stop_action = add("Stop", "Esc", self.stop)
        add("Toggle chats", "Ctrl+B", self.sidebar_button.toggle)
        add("Toggle settings", "Ctrl+.", self.panel_button.toggle)
        add("Search chats", "Ctrl+K", lambda: self.sidebar.search.setFocus())
        add("Toggle theme", "Ctrl+Shift+L", self.toggle_theme)
        add("Models", "Ctrl+Shift+M", lambda: self.open_models("browse"))
        add("Quantize a model", "Ctrl+Shift+Q", self.open_quantize_wizard)

    models_window: Any = None

    def open_models(self, page: str = "browse", **options: Any) -> Any:
        """The Models window (Browse / Downloads / Library / Planner), created on first use;
        its "Load into chat" goes through load_model like the side panel's Load button."""
        if self.models_window is None:
            from .hub_browser import ModelsWindow

            self.models_window = ModelsWindow(self, theme=self.theme, **options)
            self.models_window.load_requested.connect(self.load_model)
        self.models_window.show_page(page)
        return self.models_window

    def open_quantize_wizard(self) -> Any:
        """The quantize wizard (fp16 -> EXL2); its "Open in chat" loads the result like the Load button."""
        from .hub_browser import default_library_dir
        from .quantize_wizard import QuantizeWizard

        wizard = QuantizeWizard([default_library_dir()], self)
        wizard.open_in_chat.connect(self.load_model)
        wizard.show()
        return wizard

    def _after_show(self) -> None:
        """Work that must not delay the first paint: sampler specs (may import torch) and NVML."""
        threading.Thread(target=self._load_specs, name="kestrel-specs", daemon=True).start()
        self._poll_vram()
        self.chat.composer.edit.setFocus()

    def _load_specs(self) -> None:
        from .markdown_render import warm_up
        from .theme import PYGMENTS_STYLE

        warm_up(tuple(PYGMENTS_STYLE.values()))
        self._bridge.specs.emit(backend.sampler_specs())

    # --- status -------------------------------------------------------------------------------

    def flash(self, message: str, ms: int = 3000) -> None:
        self.statusBar().showMessage(message, ms)

    def _poll_vram(self) -> None:
        threading.Thread(target=lambda: self._bridge.vram.emit(backend.vram_text()),
                         name="kestrel-vram", daemon=True).start()

    def _vram_read(self, text: str) -> None:
        self.vram_label.setText(text)
        if text == "no NVIDIA GPU":
            self._vram_timer.stop()
        elif not self._vram_timer.isActive():
            self._vram_timer.start()

    def _set_context(self, used: int | None) -> None:
        limit = self.model_info.max_seq_len if self.model_info else None
        if used is None or limit is None:
            self.context_label.setText("context —")
        else:
            self.context_label.setText(f"context {used:,} / {limit:,}")

    def _counted(self, request: int, tokens: int) -> None:
        if request == self._count_request:
            self._set_context(tokens)

    def _count_context(self) -> None:
        if self.chat_picker.target.remote:
            self._set_context(None)
            return
        if self.model_info is None or self.current_id is None or self.generation is not None:
            self._set_context(None if self.model_info is None else 0)
            return
        conv = self.store.get_conversation(self.current_id)
        self._count_request = self.client.count_tokens(
            chat_messages(conv.system_prompt, self.store.messages(self.current_id)))

    def show_error(self, report: ErrorReport) -> QMessageBox:
        """A window-modal dialog that does not block the event loop (the engine keeps reporting)."""
        if self.error_box is not None:
            self.error_box.close()
        box = QMessageBox(QMessageBox.Icon.Warning, report.title, report.text, QMessageBox.StandardButton.Ok, self)
        if report.hint:
            box.setInformativeText(report.hint)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.finished.connect(lambda _r, b=box: self._error_closed(b))
        self.error_box = box
        box.open()
        return box

    def _error_closed(self, box: QMessageBox) -> None:
        if self.error_box is box:
            self.error_box = None

    # --- theme / panels -----------------------------------------------------------------------

    def set_theme(self, name: str) -> None:
        self.theme = THEMES[name]
        app = QApplication.instance()
        if isinstance(app, QApplication):
            apply_theme(app, self.theme)
        self.theme_button.setIcon(self.icons["sun" if self.theme.dark else "moon"])
        self.theme_button.setToolTip("Light theme" if self.theme.dark else "Dark theme")
        self.chat.theme = self.theme
        self.prefs.set("theme", name)
        if self.generation is None:
            self.chat.set_messages(self.store.messages(self.current_id) if self.current_id else [])

    def toggle_theme(self) -> None:
        self.set_theme("light" if self.theme.dark else "dark")

    def _panel_toggled(self, visible: bool) -> None:
        self.side_panel.setVisible(visible)
        self.prefs.set("side_panel", visible)

    # --- conversations ------------------------------------------------------------------------

    def refresh_list(self) -> None:
        query = self.sidebar.search.text().strip()
        if query:
            self.search(query)
        else:
            self.sidebar.set_conversations(self.store.list_conversations(), self.current_id)

    def search(self, query: str) -> None:
        if not query:
            self.sidebar.set_conversations(self.store.list_conversations(), self.current_id)
            return
        hits = self.store.search(query)
        self.sidebar.set_conversations([h.conversation for h in hits], self.current_id,
                                       {h.conversation.id: h.snippet for h in hits})

    def open_conversation(self, conversation_id: int | None) -> None:
        """Show a chat with its own system prompt and sampler settings (None: a fresh, unsaved chat)."""
        self._flush_settings()
        self.current_id = conversation_id
        self.sidebar.select(conversation_id)
        self._loading_settings = True
        try:
            if conversation_id is None:
                self.title_label.setText(NEW_TITLE)
                self.system_prompt.setPlainText("")
                self.lora_panel.set_selection({})
                self.structured.set_text("")
                self.chat.set_messages([])
            else:
                conv = self.store.get_conversation(conversation_id)
                self.title_label.setText(conv.title)
                self.system_prompt.setPlainText(conv.system_prompt)
                self.sampler_panel.set_values(conv.sampler_settings,
                                              conv.extra.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
                self.lora_panel.set_selection(conv.extra.get("loras", {}))
                self.structured.set_text(str(conv.extra.get("json_schema", "")))
                self.chat.set_messages(self.store.messages(conversation_id))
                self.chat_picker.select(ChatTarget(conv.endpoint_id, conv.model_path or "")
                                        if conv.endpoint_id is not None else LOCAL)
                gen = self.generation
                if gen is not None and gen.conversation_id == conversation_id:
                    self.chat.resume_stream(gen.message_id, gen.text)
            self.chat.set_busy(self.generation is not None)
        finally:
            self._loading_settings = False
        self._count_context()

    def new_chat(self) -> None:
        self.sidebar.search.clear()
        self.open_conversation(None)
        self.chat.composer.edit.setFocus()

    def _ensure_conversation(self, first_text: str) -> int:
        if self.current_id is not None:
            conv = self.store.get_conversation(self.current_id)
            if conv.title == NEW_TITLE and not self.store.messages(self.current_id):
                self.store.rename_conversation(self.current_id, title_from(first_text))
            return self.current_id
        cid = self.store.create_conversation(
            title_from(first_text), system_prompt=self.system_prompt.toPlainText(),
            model_path=self.model_info.path if self.model_info else None,
            sampler_settings=self.sampler_panel.values(),
            extra={"max_new_tokens": self.sampler_panel.max_tokens.value(), "loras": self.lora_panel.selection(),
                   "json_schema": self.structured.text()})
        self.current_id = cid
        self.sidebar.search.clear()
        self.refresh_list()
        self.title_label.setText(self.store.get_conversation(cid).title)
        return cid

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self.store.rename_conversation(conversation_id, title)
        if conversation_id == self.current_id:
            self.title_label.setText(title)
        QTimer.singleShot(0, self.refresh_list)   # not from inside the list's own itemChanged

    def confirm_delete(self, conversation_id: int) -> QMessageBox:
        title = self.store.get_conversation(conversation_id).title
        box = QMessageBox(QMessageBox.Icon.Question, "Delete chat", f"Delete “{title}” and all its messages?",
                          QMessageBox.StandardButton.Cancel, self)
        delete = box.addButton("Delete", QMessageBox.ButtonRole.DestructiveRole)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.buttonClicked.connect(lambda b: self.delete_conversation(conversation_id) if b is delete else None)
        box.open()
        return box

    def delete_conversation(self, conversation_id: int) -> None:
        gen = self.generation
        if gen is not None and gen.conversation_id == conversation_id:
            self._cancel(gen)
        self.store.delete_conversation(conversation_id)
        if conversation_id == self.current_id:
            self.current_id = None
            remaining = self.store.list_conversations(limit=1)
            self.open_conversation(remaining[0].id if remaining else None)
        self.refresh_list()

    def export_conversation(self, conversation_id: int, fmt: str, path: str | Path) -> Path:
        path = Path(path)
        if fmt == "md":
            text = self.store.export_markdown(conversation_id)
        else:
            text = json.dumps(self.store.export_json(conversation_id), indent=2, ensure_ascii=False)
        path.write_text(text, encoding="utf-8")
        self.flash(f"Exported to {path}")
        return path

    def _export_dialog(self, conversation_id: int, fmt: str) -> None:
        title = self.store.get_conversation(conversation_id).title
        suffix, kind = (".md", "Markdown (*.md)") if fmt == "md" else (".json", "JSON (*.json)")
        name = "".join(ch if ch.isalnum() or ch in " -_" else "_" for ch in title).strip() or "chat"
        path, _ = QFileDialog.getSaveFileName(self, "Export chat", str(Path.home() / f"{name}{suffix}"), kind)
        if path:
            try:
                self.export_conversation(conversation_id, fmt, path)
            except OSError as e:
                self.show_error(ErrorReport("error", "Export failed", f"{path}: {e.strerror}.",
                                            "Pick a folder you can write to."))

    # --- per-chat settings --------------------------------------------------------------------

    _loading_settings = False

    def _settings_edited(self) -> None:
        if not self._loading_settings:
            self._save_timer.start()

    def _flush_settings(self) -> None:
        if self._save_timer.isActive():
            self._save_timer.stop()
            self.save_settings()

    def save_settings(self) -> None:
        """Store the panel's system prompt and sampler settings on the current chat."""
        if self.current_id is None:
            return
        try:
            conv = self.store.get_conversation(self.current_id)
            self.store.update_conversation(
                self.current_id, system_prompt=self.system_prompt.toPlainText(),
                sampler_settings=self.sampler_panel.values(),
                extra=conv.extra | {"max_new_tokens": self.sampler_panel.max_tokens.value(),
                                    "loras": self.lora_panel.selection(),
                                    "json_schema": self.structured.text()})
        except StoreError as e:
            self.flash(f"Settings not saved: {e}")

    # --- model --------------------------------------------------------------------------------

    def load_model(self, request: LoadRequest | str) -> None:
        if isinstance(request, str):
            self.model_panel.set_path(request)
            request = self.model_panel.request()
        if self.generation is not None:
            self.flash("Stop the reply before loading another model")
            return
        self.model_info = None
        self.model_panel.set_loading(0.0, "starting")
        self.subtitle_label.setText("Loading model…")
        self.statusBar().showMessage(f"Loading {Path(request.path).name}…")
        self.client.load(request)

    def unload_model(self) -> None:
        if self.generation is not None and self.generation.source is self.client:
            self.client.cancel(self.generation.job)
        self.client.unload()

    def _load_progress(self, fraction: float, message: str) -> None:
        self.model_panel.set_loading(fraction, message)

    def _loaded(self, info: Any) -> None:
        self.model_info = info
        self.model_panel.set_loaded(info)
        self.subtitle_label.setText(f"{info.name} · {info.backend} on {info.device}")
        self.chat.welcome.set_model(info.name)
        self.statusBar().showMessage(f"Loaded {info.name}", 4000)
        self._count_context()

    def _load_failed(self, report: ErrorReport) -> None:
        self.model_info = None
        self.model_panel.set_unloaded("Loading failed. Pick another folder and press Load.")
        self.subtitle_label.setText("No model loaded")
        self.chat.welcome.set_model(None)
        self.statusBar().showMessage("Loading failed", 4000)
        self.show_error(report)

    def _unloaded(self) -> None:
        self.model_info = None
        self.model_panel.set_unloaded()
        self.subtitle_label.setText("No model loaded")
        self.chat.welcome.set_model(None)
        self._set_context(None)
        self.flash("Model unloaded")

    # --- chatting -----------------------------------------------------------------------------

    def _need_model(self) -> bool:
        if self.model_info is not None or self.chat_picker.target.remote:
            return False
        self.show_error(ErrorReport("generation", "No model loaded", "Load a model before chatting.",
                                    "Open the panel on the right (Ctrl+.), pick a model folder and press Load."))
        self.panel_button.setChecked(True)
        return True

    def send(self, text: str) -> None:
        if self.generation is not None:
            return
        if self._need_model():
            self.chat.composer.edit.setPlainText(text)
            return
        cid = self._ensure_conversation(text)
        mid = self.store.add_message(cid, "user", text)
        self.chat.add_message(self.store.get_message(mid))
        self._start_reply(cid)

    def regenerate(self) -> None:
        """Drop the last reply and generate a new one for the same prompt."""
        if self.generation is not None or self.current_id is None:
            return
        messages = self.store.messages(self.current_id)
        last_user = next((m for m in reversed(messages) if m.role == "user"), None)
        if last_user is None or self._need_model():
            return
        self.store.truncate_after(last_user.id)
        self.chat.remove_after(last_user.id)
        self._start_reply(self.current_id)

    def edit_and_rerun(self, message_id: int, text: str) -> None:
        if self.generation is not None or self.current_id is None:
            return
        self.store.update_content(message_id, text)
        self.store.truncate_after(message_id)
        self.chat.update_user_text(message_id, text)
        self.chat.remove_after(message_id)
        if not self._need_model():
            self._start_reply(self.current_id)

    def stop(self) -> None:
        if self.generation is not None:
            self._cancel(self.generation)
            self.statusBar().showMessage("Stopping…")

    def _start_reply(self, cid: int) -> None:
        self._flush_settings()
        conv = self.store.get_conversation(cid)
        messages = chat_messages(conv.system_prompt, self.store.messages(cid))
        samplers = self.sampler_panel.values()
        settings = backend.generation_settings(samplers, self.sampler_panel.max_tokens.value(),
                                               context_overflow=self.model_panel.overflow())
        source, name, path, endpoint_id = self._chat_source()
        if source is self.client:  # adapters live on the local engine; a remote server has its own
            settings.loras = self.lora_panel.request_loras()
        settings.json_schema = self.structured.schema()  # None when the field is empty or invalid
        if (conv.model_path, conv.endpoint_id) != (path, endpoint_id):
            self.store.update_conversation(cid, model_path=path, endpoint_id=endpoint_id)
        reply_id = self.store.begin_reply(cid, model=name, sampler_settings=samplers)
        self.chat.begin_stream(self.store.get_message(reply_id))
        job = source.generate(messages, settings)
        self.generation = Generation(job, cid, reply_id, source=source)
        self.statusBar().showMessage("Generating…")
        self.speed_label.setText("… tok/s")

    def _chat_source(self) -> tuple[Any, str, str, int | None]:
        """The picker's choice as (source, model name, model path or remote id, endpoint id)."""
        target = self.chat_picker.target
        if target.remote:
            endpoint = self.store.get_endpoint(target.endpoint_id)
            return RemoteSource(self.remote, endpoint, target.model), target.model, target.model, endpoint.id
        return self.client, self.model_info.name, self.model_info.path, None

    def _cancel(self, gen: Generation) -> None:
        (gen.source or self.client).cancel(gen.job)

    def _show_target(self) -> None:
        target = self.chat_picker.target
        info = self.model_info
        self.subtitle_label.setText(target.label if target.remote else
                                    f"{info.name} · {info.backend} on {info.device}" if info else "No model loaded")
        self._count_context()

    endpoints_dialog: EndpointsDialog | None = None
    local_server: Any = None
    server_page: Any = None

    def open_local_server(self) -> Any:
        """The Local server page (switch, URL, key, request log), created on first use."""
        if self.server_page is None:
            from .local_server import LocalServer, LocalServerPage

            self.local_server = LocalServer(self.client.worker, self)
            self.server_page = LocalServerPage(self.local_server, self)
        self.server_page.show()
        self.server_page.raise_()
        return self.server_page

    def manage_endpoints(self) -> EndpointsDialog:
        """The add/edit/remove dialog (non-modal); the picker lists models again after each change."""
        if self.endpoints_dialog is None:
            self.endpoints_dialog = EndpointsDialog(self.store, self)
            self.endpoints_dialog.changed.connect(self.chat_picker.refresh)
        self.endpoints_dialog.show()
        self.endpoints_dialog.raise_()
        return self.endpoints_dialog

    def _chunk(self, job: int, chunk: Any) -> None:
        gen = self.generation
        if gen is None or job != gen.job:
            return
        if chunk.text:
            gen.text += chunk.text
            self.store.append_reply(gen.message_id, chunk.text)
            if gen.conversation_id == self.current_id:
                self.chat.stream_text(gen.text)
        if chunk.generated_tokens:
            self.speed_label.setText(f"{chunk.tokens_per_second:.1f} tok/s")
        if chunk.dropped_messages and gen.conversation_id == self.current_id:
            self.chat.show_notice(backend.dropped_notice(len(chunk.dropped_messages)))
        self._set_context(chunk.prompt_tokens + chunk.generated_tokens)

    def _end(self, job: int, timings: Timings, reason: str) -> Generation | None:
        gen = self.generation
        if gen is None or job != gen.job:
            return None
        self.generation = None
        try:
            self.store.finish_reply(gen.message_id, timings, reason)
            message = self.store.get_message(gen.message_id)
        except StoreError:          # the chat was deleted meanwhile
            message = None
        if gen.conversation_id == self.current_id:
            self.chat.end_stream(message)
        else:
            self.chat.set_busy(False)
        self.refresh_list()
        return gen

    def _finished(self, job: int, last: Any) -> None:
        timings = Timings(last.prompt_tokens, last.generated_tokens, last.prefill_seconds, last.decode_seconds)
        if self._end(job, timings, last.finish_reason or "stop") is None:
            return
        if last.generated_tokens:
            self.speed_label.setText(f"{last.tokens_per_second:.1f} tok/s")
        self._set_context(last.prompt_tokens + last.generated_tokens)
        words = {"cancelled": "Stopped", "length": "Reached the token limit"}
        self.statusBar().showMessage(words.get(last.finish_reason, "Ready"), 4000)

    def _failed(self, job: int, report: ErrorReport) -> None:
        if self._end(job, Timings(), "error") is None:
            return
        self.statusBar().showMessage("Generation failed", 4000)
        self.show_error(report)

    # --- lifetime -----------------------------------------------------------------------------

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt override
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop generating, save, end the engine thread. Safe to call twice."""
        if self._closing:
            return
        self._closing = True
        self._flush_settings()
        self._vram_timer.stop()
        if self.models_window is not None:
            self.models_window.shutdown()
        gen = self.generation
        if gen is not None:
            self._cancel(gen)
        self.remote.shutdown()
        if self.local_server is not None:
            self.local_server.stop()
        self.client.shutdown()
        if gen is not None:      # the worker's final signal will not be delivered any more
            self.generation = None
            try:
                self.store.finish_reply(gen.message_id, Timings(), "cancelled")
            except StoreError:
                pass
