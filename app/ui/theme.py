"""Light and dark themes: two palettes (data) filling one style sheet, plus tinted SVG icons.

One template (resources/themes/app.qss) keeps both themes in step: a colour changes in one place.
Markdown HTML cannot use the style sheet, so the renderer takes the same palette (`Theme.colors`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Template

from PySide6.QtCore import QByteArray, QRectF, Qt
from PySide6.QtGui import QColor, QFont, QGuiApplication, QIcon, QPainter, QPalette, QPixmap
from PySide6.QtSvg import QSvgRenderer
from PySide6.QtWidgets import QApplication

RESOURCES = Path(__file__).resolve().parents[2] / "resources"
ICONS = RESOURCES / "icons"

LIGHT: dict[str, str] = {
    "window": "#f6f6f8", "sidebar": "#f0f0f3", "surface": "#ffffff", "panel": "#f8f8fa",
    "composer": "#ffffff", "text": "#1d1f24", "muted": "#6b6f7a", "border": "#e2e4e9",
    "border_soft": "#eeeff2", "accent": "#4f63f0", "accent_hover": "#3f52db", "accent_soft": "#e8ebfe",
    "accent_text": "#3443b8", "accent_border": "#a9b3f7", "on_accent": "#ffffff", "user_bubble": "#eef0fb",
    "hover": "#e8e9ee", "selected": "#e1e4f5", "selection": "#cdd5fb", "disabled": "#b9bdc9",
    "disabled_text": "#a0a4ae", "track": "#dfe1e7", "scroll": "#cfd2da", "scroll_hover": "#b5b9c4",
    "code_bg": "#f5f6f8", "code_header": "#eceef2", "code_border": "#e2e4e9", "inline_code": "#eef0f3",
    "link": "#3e55e0", "quote": "#d3d6de", "table_border": "#dcdfe5", "table_header": "#f2f3f6",
    "error": "#c93b3b",
}

DARK: dict[str, str] = {
    "window": "#15161a", "sidebar": "#18191d", "surface": "#1f2025", "panel": "#1b1c21",
    "composer": "#26272d", "text": "#e6e7ea", "muted": "#9497a1", "border": "#2f3138",
    "border_soft": "#292a30", "accent": "#6a7cf6", "accent_hover": "#7d8eff", "accent_soft": "#2b3052",
    "accent_text": "#b8c1ff", "accent_border": "#5a68c4", "on_accent": "#ffffff", "user_bubble": "#2b2d38",
    "hover": "#2a2b31", "selected": "#30334a", "selection": "#3b4480", "disabled": "#3c3e47",
    "disabled_text": "#676a74", "track": "#34363e", "scroll": "#3a3c44", "scroll_hover": "#4c4f59",
    "code_bg": "#16171b", "code_header": "#24252b", "code_border": "#2f3138", "inline_code": "#2c2d34",
    "link": "#95a3ff", "quote": "#45474f", "table_border": "#3a3c44", "table_header": "#26272d",
    "error": "#ff7b7b",
}

PYGMENTS_STYLE = {"light": "friendly", "dark": "one-dark"}
FONT_FAMILIES = ["Inter", "Segoe UI", "SF Pro Text", "Helvetica Neue", "Noto Sans", "Cantarell",
                 "Ubuntu", "DejaVu Sans"]
MONO_FAMILIES = ["JetBrains Mono", "Cascadia Code", "SF Mono", "Menlo", "Consolas", "Noto Sans Mono",
                 "DejaVu Sans Mono", "monospace"]


@dataclass(frozen=True)
class Theme:
    name: str                 # "light" | "dark"
    colors: dict[str, str]

    @property
    def dark(self) -> bool:
        return self.name == "dark"

    @property
    def pygments_style(self) -> str:
        return PYGMENTS_STYLE[self.name]


THEMES = {"light": Theme("light", LIGHT), "dark": Theme("dark", DARK)}


def svg_text(name: str, color: str) -> str:
    """An icon's SVG with its stroke colour filled in (the files use currentColor)."""
    return (ICONS / f"{name}.svg").read_text(encoding="utf-8").replace("currentColor", color)


def icon(name: str, color: str, size: int = 20) -> QIcon:
    """Render a tinted icon at 1x and 2x so it stays crisp on high-DPI screens."""
    result = QIcon()
    renderer = QSvgRenderer(QByteArray(svg_text(name, color).encode()))
    for scale in (1, 2):
        pm = QPixmap(size * scale, size * scale)
        pm.fill(Qt.GlobalColor.transparent)
        painter = QPainter(pm)
        renderer.render(painter, QRectF(0, 0, size * scale, size * scale))
        painter.end()
        pm.setDevicePixelRatio(scale)
        result.addPixmap(pm)
    return result


_ICON_DIR: Path | None = None


def _icon_file(name: str, color: str) -> str:
    """Style sheets take images by file name only; write tinted copies into a per-process temp dir."""
    global _ICON_DIR
    if _ICON_DIR is None:
        _ICON_DIR = Path(tempfile.mkdtemp(prefix="kestrel-icons-"))
    path = _ICON_DIR / f"{name}-{color.lstrip('#')}.svg"
    if not path.exists():
        path.write_text(svg_text(name, color), encoding="utf-8")
    return path.as_posix()


def style_sheet(theme: Theme) -> str:
    template = Template((RESOURCES / "themes" / "app.qss").read_text(encoding="utf-8"))
    c = theme.colors
    return template.substitute(c, icon_chevron=_icon_file("chevron-down", c["muted"]),
                               icon_check=_icon_file("check", c["on_accent"]))


def ui_font(point_size: float = 10.0) -> QFont:
    font = QFont()
    font.setFamilies(FONT_FAMILIES)
    font.setPointSizeF(point_size)
    font.setHintingPreference(QFont.HintingPreference.PreferNoHinting)
    return font


def apply_theme(app: QApplication, theme: Theme) -> None:
    """Set palette + style sheet app-wide. The palette matters for native dialogs (QMessageBox, files)."""
    c = theme.colors
    pal = QPalette()
    roles = {
        QPalette.ColorRole.Window: c["window"], QPalette.ColorRole.WindowText: c["text"],
        QPalette.ColorRole.Base: c["surface"], QPalette.ColorRole.AlternateBase: c["panel"],
        QPalette.ColorRole.Text: c["text"], QPalette.ColorRole.Button: c["surface"],
        QPalette.ColorRole.ButtonText: c["text"], QPalette.ColorRole.Highlight: c["selection"],
        QPalette.ColorRole.HighlightedText: c["text"], QPalette.ColorRole.ToolTipBase: c["surface"],
        QPalette.ColorRole.ToolTipText: c["text"], QPalette.ColorRole.Link: c["link"],
        QPalette.ColorRole.PlaceholderText: c["muted"],
    }
    for role, color in roles.items():
        pal.setColor(role, QColor(color))
    pal.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text, QColor(c["disabled_text"]))
    pal.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.ButtonText, QColor(c["disabled_text"]))
    app.setPalette(pal)
    app.setStyleSheet(style_sheet(theme))


def system_prefers_dark() -> bool:
    hints = QGuiApplication.styleHints()
    try:
        return hints.colorScheme() == Qt.ColorScheme.Dark
    except AttributeError:  # Qt < 6.5
        return False


ICON_GREY = "#878b96"
ICON_ACCENT = "#6677f5"


def icon_set() -> dict[str, QIcon]:
    """Icons tinted to read on both themes (so a theme switch need not touch existing widgets)."""
    grey = {name: icon(name, ICON_GREY) for name in (
        "search", "copy", "edit", "refresh", "sidebar", "panel-right", "sun", "moon", "folder", "trash",
        "download", "sliders", "cpu", "x")}
    return grey | {
        "plus": icon("plus", "#ffffff"),
        "send_fill": icon("send", "#ffffff"),
        "stop_fill": icon("stop", "#ffffff"),
        "logo": icon("logo", ICON_ACCENT, 24),
        "logo_accent": icon("logo", ICON_ACCENT, 48),
    }
