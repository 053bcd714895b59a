"""The chat column: messages (Markdown, highlighted code, copy buttons), the welcome page, the composer.

Why one small QTextBrowser per message (and per stable slice of a streaming reply) rather than one
big document: a streaming reply only re-renders its unfinished tail (see markdown_render.stable_split),
so work per refresh stays small however long the chat or the reply is; bubbles, inline editing and
per-message buttons are plain widgets. Long chats show their last PAGE messages; "Show earlier
messages" adds more, so opening a 1,000-message chat stays fast.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from PySide6.QtCore import QEvent, QObject, QSize, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication, QKeyEvent, QTextOption
from PySide6.QtWidgets import (
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QStackedLayout,
    QTextBrowser,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from .markdown_render import COPY_SCHEME, document_css, render_markdown, stable_split
from .theme import Theme

PAGE = 50                  # messages rendered at a time
COLUMN_WIDTH = 820         # max width of the message column, like a page of text
MIN_REFRESH_MS = 40        # streaming re-render at most ~25 times a second ...
MAX_REFRESH_MS = 250       # ... and back off when rendering gets slow (very long tails)
STICK_PX = 48              # "at the bottom" tolerance for auto-scroll

SUGGESTIONS = [
    ("Explain a concept", "Explain how a transformer language model works, in simple terms."),
    ("Write some code", "Write a Python function that checks whether a string is a palindrome."),
    ("Summarise", "Summarise the main ideas of the scientific method in five bullet points."),
    ("Brainstorm", "Give me ten names for a small bakery that also sells coffee."),
]


def format_meta(message: Any) -> str:
    """'42 tokens · 18.3 tok/s · stopped' from a stored Message's timings."""
    t = message.timings
    parts = []
    if t.generated_tokens:
        parts.append(f"{t.generated_tokens} tokens")
    if t.tokens_per_second:
        parts.append(f"{t.tokens_per_second:.1f} tok/s")
    reason = {"length": "hit the token limit", "cancelled": "stopped", "interrupted": "interrupted",
              "error": "failed"}.get(message.finish_reason or "")
    if reason:
        parts.append(reason)
    return " · ".join(parts)


class MessageText(QTextBrowser):
    """Read-only rich text that is exactly as tall as its content (the chat column scrolls, not it)."""

    def __init__(self, theme: Theme, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("MessageText")
        self.theme = theme
        self.codes: tuple[str, ...] = ()
        self.setOpenLinks(False)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setWordWrapMode(QTextOption.WrapMode.WrapAtWordBoundaryOrAnywhere)
        self.setContextMenuPolicy(Qt.ContextMenuPolicy.DefaultContextMenu)
        doc = self.document()
        doc.setDocumentMargin(0)
        doc.setDefaultStyleSheet(document_css(theme.colors))
        doc.documentLayout().documentSizeChanged.connect(self._fit)
        self.anchorClicked.connect(self._anchor)
        self.setFixedHeight(8)

    def set_rendered(self, html_text: str, codes: Sequence[str]) -> None:
        self.codes = tuple(codes)
        self.setHtml(html_text)

    def _fit(self, size: Any) -> None:
        height = math.ceil(size.height()) + 2
        if height != self.height():
            self.setFixedHeight(height)

    def wheelEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        event.ignore()   # let the chat column scroll

    def _anchor(self, url: QUrl) -> None:
        if url.scheme() == COPY_SCHEME:
            index = int(url.path() or 0)
            if 0 <= index < len(self.codes):
                QGuiApplication.clipboard().setText(self.codes[index])
                window = self.window()
                if hasattr(window, "flash"):
                    window.flash("Code copied to the clipboard")
        elif url.scheme() in ("http", "https", "mailto"):
            QDesktopServices.openUrl(url)


class MarkdownStack(QWidget):
    """A message's Markdown as a stack of MessageTexts: frozen stable slices + one live tail."""

    def __init__(self, theme: Theme, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.theme = theme
        self.text = ""
        self._stable = 0
        self.layout_ = QVBoxLayout(self)
        self.layout_.setContentsMargins(0, 0, 0, 0)
        self.layout_.setSpacing(0)
        self.tail = MessageText(theme)
        self.layout_.addWidget(self.tail)
        self.last_render_ms = 0.0

    def parts(self) -> list[MessageText]:
        return [self.layout_.itemAt(i).widget() for i in range(self.layout_.count())]

    def code_blocks(self) -> list[str]:
        return [code for part in self.parts() for code in part.codes]

    def _clear_frozen(self) -> None:
        for part in self.parts()[:-1]:
            self.layout_.removeWidget(part)
            part.hide()
            part.deleteLater()
        self._stable = 0

    def set_markdown(self, text: str, streaming: bool = False) -> None:
        t0 = time.perf_counter()
        c, style = self.theme.colors, self.theme.pygments_style
        if not streaming:
            self._clear_frozen()
            r = render_markdown(text, c, style)
            self.tail.set_rendered(r.html, r.code_blocks)
        else:
            if not text.startswith(self.text[: self._stable]):
                self._clear_frozen()
            boundary = stable_split(text)
            if boundary > self._stable:
                r = render_markdown(text[self._stable: boundary], c, style)
                frozen = MessageText(self.theme)
                frozen.set_rendered(r.html, r.code_blocks)
                self.layout_.insertWidget(self.layout_.count() - 1, frozen)
                self._stable = boundary
            r = render_markdown(text[self._stable:], c, style)
            self.tail.set_rendered(r.html, r.code_blocks)
            self.tail.setVisible(bool(text[self._stable:].strip()) or self._stable == 0)
        self.text = text
        self.last_render_ms = (time.perf_counter() - t0) * 1000


def _action(icon: Any, tip: str, slot: Callable[[], None]) -> QToolButton:
    button = QToolButton()
    button.setObjectName("ActionButton")
    button.setIcon(icon)
    button.setIconSize(QSize(15, 15))
    button.setToolTip(tip)
    button.setCursor(Qt.CursorShape.PointingHandCursor)
    button.clicked.connect(slot)
    return button


class MessageWidget(QFrame):
    """One message. User: a right-aligned bubble (editable). Assistant: avatar, Markdown, meta line."""

    def __init__(self, message: Any, theme: Theme, icons: dict[str, Any], view: ChatView) -> None:
        super().__init__()
        self.message = message
        self.message_id: int = message.id
        self.role: str = message.role
        self.theme = theme
        self.view = view
        self.text = message.content
        self.editor: QPlainTextEdit | None = None
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 6, 0, 6)
        outer.setSpacing(4)
        self.actions = QHBoxLayout()
        self.actions.setSpacing(2)
        self.copy_button = _action(icons["copy"], "Copy message", self.copy)
        if self.role == "user":
            self._build_user(outer, icons)
        else:
            self._build_assistant(outer, icons)

    # --- construction -------------------------------------------------------------------------

    def _build_user(self, outer: QVBoxLayout, icons: dict[str, Any]) -> None:
        row = QHBoxLayout()
        row.addStretch(1)
        self.bubble = QFrame()
        self.bubble.setObjectName("UserBubble")
        self.bubble.setMaximumWidth(int(COLUMN_WIDTH * 0.8))
        inner = QVBoxLayout(self.bubble)
        inner.setContentsMargins(16, 10, 16, 10)
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextFormat(Qt.TextFormat.RichText)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.label.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Preferred)
        self._show_user_text()
        inner.addWidget(self.label)
        row.addWidget(self.bubble)
        outer.addLayout(row)
        self.edit_button = _action(icons["edit"], "Edit and re-run from here", self.begin_edit)
        self.actions.addStretch(1)
        self.actions.addWidget(self.edit_button)
        self.actions.addWidget(self.copy_button)
        outer.addLayout(self.actions)
        self.meta = None

    def _show_user_text(self) -> None:
        body = html.escape(self.text).replace("\n", "<br>")
        self.label.setText(f'<div style="line-height:140%">{body}</div>')

    def _build_assistant(self, outer: QVBoxLayout, icons: dict[str, Any]) -> None:
        head = QHBoxLayout()
        head.setSpacing(8)
        avatar = QLabel()
        avatar.setObjectName("Avatar")
        avatar.setFixedSize(28, 28)
        avatar.setAlignment(Qt.AlignmentFlag.AlignCenter)
        avatar.setPixmap(icons["logo_accent"].pixmap(16, 16))
        name = QLabel(self.message.model or "Assistant")
        name.setObjectName("RoleLabel")
        head.addWidget(avatar)
        head.addWidget(name)
        head.addStretch(1)
        outer.addLayout(head)
        body = QHBoxLayout()
        body.setContentsMargins(36, 0, 0, 0)
        self.markdown = MarkdownStack(self.theme)
        body.addWidget(self.markdown)
        outer.addLayout(body)
        self.markdown.set_markdown(self.text, streaming=bool(getattr(self.message, "streaming", False)))
        self.meta = QLabel(format_meta(self.message))
        self.meta.setObjectName("MetaLabel")
        self.regen_button = _action(icons["refresh"], "Regenerate (Ctrl+R)",
                                    lambda: self.view.regenerate_requested.emit(self.message_id))
        self.actions.setContentsMargins(36, 0, 0, 0)
        self.actions.addWidget(self.copy_button)
        self.actions.addWidget(self.regen_button)
        self.actions.addSpacing(6)
        self.actions.addWidget(self.meta)
        self.actions.addStretch(1)
        outer.addLayout(self.actions)

    # --- behaviour ----------------------------------------------------------------------------

    def copy(self) -> None:
        QGuiApplication.clipboard().setText(self.text)
        window = self.window()
        if hasattr(window, "flash"):
            window.flash("Message copied to the clipboard")

    def set_stream_text(self, text: str, streaming: bool = True) -> None:
        self.text = text
        self.markdown.set_markdown(text, streaming=streaming)

    def finish(self, message: Any) -> None:
        self.message = message
        self.text = message.content
        if self.markdown.text != message.content:
            self.markdown.set_markdown(message.content, streaming=True)
        self.meta.setText(format_meta(message))

    def set_busy(self, busy: bool) -> None:
        if self.role == "user":
            self.edit_button.setEnabled(not busy)
        else:
            self.regen_button.setEnabled(not busy)

    def begin_edit(self) -> None:
        if self.editor is not None or self.view.busy:
            return
        self.bubble.hide()
        self.editor = QPlainTextEdit(self.text)
        self.editor.setObjectName("EditBox")
        self.editor.setMinimumHeight(90)
        self.editor.setMaximumHeight(240)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        cancel = QPushButton("Cancel")
        save = QPushButton("Save && re-run")
        save.setObjectName("PrimaryButton")
        cancel.clicked.connect(self.cancel_edit)
        save.clicked.connect(self.submit_edit)
        buttons.addWidget(cancel)
        buttons.addWidget(save)
        self._edit_box = QWidget()
        box = QVBoxLayout(self._edit_box)
        box.setContentsMargins(0, 0, 0, 0)
        box.addWidget(self.editor)
        box.addLayout(buttons)
        self.layout().insertWidget(0, self._edit_box)
        self.editor.setFocus()

    def cancel_edit(self) -> None:
        if self.editor is None:
            return
        self._edit_box.hide()
        self._edit_box.deleteLater()
        self.editor = None
        self.bubble.show()

    def submit_edit(self) -> None:
        if self.editor is None:
            return
        text = self.editor.toPlainText().strip()
        self.cancel_edit()
        if text:
            self.view.edit_submitted.emit(self.message_id, text)


class ComposerEdit(QPlainTextEdit):
    """Enter sends, Shift+Enter inserts a newline; grows with its text up to MAX_LINES."""

    submitted = Signal()
    MAX_LINES = 8

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ComposerEdit")
        self.setPlaceholderText("Message Kestrel…")
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.document().setDocumentMargin(2)
        self.textChanged.connect(self._grow)
        self._grow()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802 - Qt override
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not (
                event.modifiers() & Qt.KeyboardModifier.ShiftModifier):
            self.submitted.emit()
            return
        super().keyPressEvent(event)

    def _grow(self) -> None:
        line = self.fontMetrics().lineSpacing()
        lines = max(1, min(self.MAX_LINES, int(self.document().size().height())))
        self.setFixedHeight(lines * line + 12)


class Composer(QFrame):
    def __init__(self, icons: dict[str, Any], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("ComposerFrame")
        self.icons = icons
        layout = QHBoxLayout(self)
        layout.setContentsMargins(14, 8, 8, 8)
        layout.setSpacing(8)
        self.edit = ComposerEdit()
        self.button = QToolButton()
        self.button.setObjectName("SendButton")
        self.button.setIconSize(QSize(16, 16))
        self.button.setCursor(Qt.CursorShape.PointingHandCursor)
        layout.addWidget(self.edit, 1)
        layout.addWidget(self.button, 0, Qt.AlignmentFlag.AlignBottom)
        self.edit.installEventFilter(self)
        self.set_mode("send")

    def set_mode(self, mode: str) -> None:
        self.button.setProperty("mode", mode)
        self.button.setIcon(self.icons["stop_fill"] if mode == "stop" else self.icons["send_fill"])
        self.button.setToolTip("Stop (Esc)" if mode == "stop" else "Send (Enter)")
        self.button.style().unpolish(self.button)
        self.button.style().polish(self.button)

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 - Qt override
        if obj is self.edit and event.type() in (QEvent.Type.FocusIn, QEvent.Type.FocusOut):
            self.setProperty("focused", event.type() == QEvent.Type.FocusIn)
            self.style().unpolish(self)
            self.style().polish(self)
        return False


class WelcomePage(QWidget):
    suggestion = Signal(str)

    def __init__(self, icons: dict[str, Any], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("Welcome")
        outer = QVBoxLayout(self)
        outer.addStretch(3)
        logo = QLabel()
        logo.setPixmap(icons["logo_accent"].pixmap(44, 44))
        logo.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.title = QLabel("What can I help with?")
        self.title.setObjectName("WelcomeTitle")
        self.title.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.text = QLabel("")
        self.text.setObjectName("WelcomeText")
        self.text.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.text.setWordWrap(True)
        outer.addWidget(logo)
        outer.addSpacing(6)
        outer.addWidget(self.title)
        outer.addWidget(self.text)
        outer.addSpacing(18)
        grid = QGridLayout()
        grid.setSpacing(10)
        for i, (title, prompt) in enumerate(SUGGESTIONS):
            button = QPushButton(f"{title}\n{prompt[:46]}…")
            button.setObjectName("SuggestionButton")
            button.setCursor(Qt.CursorShape.PointingHandCursor)
            button.setToolTip(prompt)
            button.setMinimumWidth(250)
            button.clicked.connect(lambda _c=False, p=prompt: self.suggestion.emit(p))
            grid.addWidget(button, i // 2, i % 2)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addLayout(grid)
        row.addStretch(1)
        outer.addLayout(row)
        outer.addStretch(4)

    def set_model(self, name: str | None) -> None:
        self.text.setText(f"Chatting with {name}. Everything stays on this computer." if name else
                          "Load a model in the panel on the right to start. Everything stays on this computer.")


class ChatView(QWidget):
    """Messages + composer. Emits requests; the main window decides what they do."""

    send_requested = Signal(str)
    stop_requested = Signal()
    regenerate_requested = Signal(int)      # assistant message id
    edit_submitted = Signal(int, str)       # user message id, new text

    def __init__(self, theme: Theme, icons: dict[str, Any], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.theme = theme
        self.icons = icons
        self.busy = False
        self.widgets: list[MessageWidget] = []
        self._all: list[Any] = []
        self._shown_from = 0
        self._stick = True
        self._stream: MessageWidget | None = None
        self._pending: str | None = None
        self.max_render_ms = 0.0           # slowest streaming refresh so far (bench/ui_stall.py)
        self._refresh = QTimer(self, singleShot=True, interval=MIN_REFRESH_MS)
        self._refresh.timeout.connect(self._render_pending)

        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(0)
        self.stack = QStackedLayout()
        self.welcome = WelcomePage(icons)
        self.welcome.suggestion.connect(self._suggested)
        self.scroll = QScrollArea()
        self.scroll.setObjectName("ChatArea")
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        holder = QWidget()
        holder.setObjectName("MessageColumn")
        row = QHBoxLayout(holder)
        row.setContentsMargins(24, 16, 24, 16)
        self.column = QWidget()
        self.column.setObjectName("MessageColumn")
        self.column.setMaximumWidth(COLUMN_WIDTH)
        self.column_layout = QVBoxLayout(self.column)
        self.column_layout.setContentsMargins(0, 0, 0, 0)
        self.column_layout.setSpacing(8)
        self.earlier = QPushButton("Show earlier messages")
        self.earlier.setObjectName("ShowEarlier")
        self.earlier.setCursor(Qt.CursorShape.PointingHandCursor)
        self.earlier.clicked.connect(self.show_earlier)
        self.column_layout.addWidget(self.earlier, 0, Qt.AlignmentFlag.AlignHCenter)
        self.column_layout.addStretch(1)
        row.addStretch(1)
        row.addWidget(self.column, 100)
        row.addStretch(1)
        self.scroll.setWidget(holder)
        bar = self.scroll.verticalScrollBar()
        bar.valueChanged.connect(self._scrolled)
        bar.rangeChanged.connect(self._range_changed)
        self.stack.addWidget(self.welcome)
        self.stack.addWidget(self.scroll)
        outer.addLayout(self.stack, 1)

        bottom = QWidget()
        bottom.setObjectName("MessageColumn")
        bottom_layout = QVBoxLayout(bottom)
        bottom_layout.setContentsMargins(24, 6, 24, 10)
        bottom_layout.setSpacing(4)
        self.composer = Composer(icons)
        self.composer.setMaximumWidth(COLUMN_WIDTH)
        self.composer.edit.submitted.connect(self.submit)
        self.composer.button.clicked.connect(self._button_clicked)
        self.notice = QLabel("")
        self.notice.setObjectName("ChatNotice")
        self.notice.setWordWrap(True)
        self.notice.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.notice.setMaximumWidth(COLUMN_WIDTH)
        self.notice.hide()
        bottom_layout.addWidget(self.notice, 0, Qt.AlignmentFlag.AlignHCenter)
        hint = QLabel("Enter to send · Shift+Enter for a new line · Esc to stop")
        hint.setObjectName("ComposerHint")
        hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        bottom_layout.addWidget(self.composer, 0, Qt.AlignmentFlag.AlignHCenter)
        bottom_layout.addWidget(hint)
        outer.addWidget(bottom)
        self.composer.setMinimumWidth(320)
        self.set_messages([])

    def resizeEvent(self, event: Any) -> None:  # noqa: N802 - Qt override
        super().resizeEvent(event)
        self.composer.setFixedWidth(max(320, min(COLUMN_WIDTH, self.width() - 48)))

    # --- messages -----------------------------------------------------------------------------

    def show_notice(self, text: str) -> None:
        """A line above the composer about this chat (e.g. turns left out to fit the context)."""
        self.notice.setText(text)
        self.notice.setVisible(bool(text))

    def set_messages(self, messages: Sequence[Any]) -> None:
        """Show a conversation (system messages are not shown: they live in the side panel)."""
        self._stop_refresh()
        self.show_notice("")
        for w in self.widgets:
            self.column_layout.removeWidget(w)
            w.hide()
            w.deleteLater()
        self.widgets = []
        self._all = [m for m in messages if m.role != "system"]
        self._shown_from = max(0, len(self._all) - PAGE)
        for m in self._all[self._shown_from:]:
            self._append_widget(m)
        self.earlier.setVisible(self._shown_from > 0)
        self.stack.setCurrentWidget(self.scroll if self._all else self.welcome)
        self._stick = True
        self._update_actions()
        QTimer.singleShot(0, self.scroll_to_bottom)

    def show_earlier(self) -> None:
        start = max(0, self._shown_from - PAGE)
        for offset, m in enumerate(self._all[start: self._shown_from]):
            w = MessageWidget(m, self.theme, self.icons, self)
            self.column_layout.insertWidget(1 + offset, w)
            self.widgets.insert(offset, w)
        self._shown_from = start
        self.earlier.setVisible(start > 0)
        self._update_actions()

    def _append_widget(self, message: Any) -> MessageWidget:
        w = MessageWidget(message, self.theme, self.icons, self)
        self.column_layout.insertWidget(self.column_layout.count() - 1, w)
        self.widgets.append(w)
        return w

    def add_message(self, message: Any) -> MessageWidget:
        self._all.append(message)
        self.stack.setCurrentWidget(self.scroll)
        self._stick = True
        w = self._append_widget(message)
        self._update_actions()
        return w

    def remove_after(self, message_id: int) -> None:
        """Drop widgets after the given message (edit / regenerate re-run from there)."""
        index = next((i for i, w in enumerate(self.widgets) if w.message_id == message_id), None)
        if index is None:
            return
        for w in self.widgets[index + 1:]:
            self.column_layout.removeWidget(w)
            w.hide()
            w.deleteLater()
        self.widgets = self.widgets[: index + 1]
        keep = next(i for i, m in enumerate(self._all) if m.id == message_id)
        self._all = self._all[: keep + 1]
        self._update_actions()

    def widget_for(self, message_id: int) -> MessageWidget | None:
        return next((w for w in self.widgets if w.message_id == message_id), None)

    def update_user_text(self, message_id: int, text: str) -> None:
        w = self.widget_for(message_id)
        if w is not None and w.role == "user":
            w.text = text
            w._show_user_text()

    def _update_actions(self) -> None:
        """Regenerate only on the last reply; nothing editable while a reply streams."""
        last_assistant = next((w for w in reversed(self.widgets) if w.role == "assistant"), None)
        for w in self.widgets:
            w.set_busy(self.busy)
            if w.role == "assistant":
                w.regen_button.setVisible(w is last_assistant and w is self.widgets[-1])

    # --- streaming ----------------------------------------------------------------------------

    def begin_stream(self, message: Any) -> MessageWidget:
        w = self.add_message(message)
        self._stream = w
        self.set_busy(True)
        return w

    def resume_stream(self, message_id: int, text: str) -> None:
        """Re-attach to a reply still streaming after switching back to its chat."""
        w = self.widget_for(message_id)
        if w is not None:
            self._stream = w
            w.set_stream_text(text)
        self.set_busy(True)

    def stream_text(self, text: str) -> None:
        """Called per engine chunk with the whole reply so far; rendering is throttled."""
        self._pending = text
        if not self._refresh.isActive():
            self._refresh.start()

    def _render_pending(self) -> None:
        if self._stream is None or self._pending is None:
            return
        text, self._pending = self._pending, None
        self._stream.set_stream_text(text)
        spent = self._stream.markdown.last_render_ms
        self.max_render_ms = max(self.max_render_ms, spent)
        self._refresh.setInterval(int(max(MIN_REFRESH_MS, min(MAX_REFRESH_MS, 4 * spent))))

    def end_stream(self, message: Any) -> None:
        self._stop_refresh()
        w = self._stream
        self._stream = None
        if w is not None and message is not None:
            w.finish(message)
            for i, m in enumerate(self._all):
                if m.id == message.id:
                    self._all[i] = message
        self.set_busy(False)

    def _stop_refresh(self) -> None:
        self._refresh.stop()
        if self._stream is not None and self._pending is not None:
            self._stream.set_stream_text(self._pending)
        self._pending = None

    def set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.composer.set_mode("stop" if busy else "send")
        self._update_actions()

    # --- input --------------------------------------------------------------------------------

    def submit(self) -> None:
        if self.busy:
            return
        text = self.composer.edit.toPlainText().strip()
        if not text:
            return
        self.composer.edit.clear()
        self.send_requested.emit(text)

    def _button_clicked(self) -> None:
        if self.busy:
            self.stop_requested.emit()
        else:
            self.submit()

    def _suggested(self, prompt: str) -> None:
        self.composer.edit.setPlainText(prompt)
        self.composer.edit.setFocus()

    # --- scrolling ----------------------------------------------------------------------------

    def _scrolled(self, value: int) -> None:
        bar = self.scroll.verticalScrollBar()
        self._stick = value >= bar.maximum() - STICK_PX

    def _range_changed(self, _low: int, high: int) -> None:
        if self._stick:
            self.scroll.verticalScrollBar().setValue(high)

    def scroll_to_bottom(self) -> None:
        bar = self.scroll.verticalScrollBar()
        bar.setValue(bar.maximum())
        self._stick = True
