"""Help > About: version, where logs go, and the licenses of everything a packaged Kestrel carries.

`COMPONENTS` is the one list of bundled third-party parts; packaging/THIRD_PARTY_LICENSES.md restates it
with the license texts' locations, and tests/test_packaging.py checks the two agree.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QIcon
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from app import APP_NAME, __version__

from .theme import RESOURCES

APP_ICON_DIR = RESOURCES / "icons" / "app"
APP_ICON_SIZES = (16, 24, 32, 48, 64, 128, 256, 512)


@dataclass(frozen=True)
class Component:
    name: str          # as users know it
    distribution: str  # PyPI distribution name, for the installed version ("" when not a Python package)
    license: str       # SPDX expression
    url: str


COMPONENTS: tuple[Component, ...] = (
    Component("Python", "", "PSF-2.0", "https://docs.python.org/3/license.html"),
    Component("Qt 6", "", "LGPL-3.0-only", "https://www.qt.io/licensing/open-source-lgpl-obligations"),
    Component("PySide6", "PySide6_Essentials", "LGPL-3.0-only", "https://pypi.org/project/PySide6/"),
    Component("Shiboken6", "shiboken6", "LGPL-3.0-only", "https://pypi.org/project/shiboken6/"),
    Component("PyTorch", "torch", "BSD-3-Clause", "https://github.com/pytorch/pytorch/blob/main/LICENSE"),
    Component("NVIDIA CUDA libraries (CUDA builds of PyTorch)", "", "LicenseRef-NVIDIA-CUDA-EULA",
              "https://docs.nvidia.com/cuda/eula/index.html"),
    Component("NumPy", "numpy", "BSD-3-Clause", "https://numpy.org/doc/stable/license.html"),
    Component("SymPy", "sympy", "BSD-3-Clause", "https://github.com/sympy/sympy/blob/master/LICENSE"),
    Component("mpmath", "mpmath", "BSD-3-Clause", "https://github.com/mpmath/mpmath/blob/master/LICENSE"),
    Component("NetworkX", "networkx", "BSD-3-Clause", "https://github.com/networkx/networkx/blob/main/LICENSE.txt"),
    Component("safetensors", "safetensors", "Apache-2.0", "https://github.com/huggingface/safetensors"),
    Component("tokenizers", "tokenizers", "Apache-2.0", "https://github.com/huggingface/tokenizers"),
    Component("huggingface_hub", "huggingface_hub", "Apache-2.0", "https://github.com/huggingface/huggingface_hub"),
    Component("HTTPX", "httpx", "BSD-3-Clause", "https://github.com/encode/httpx"),
    Component("Jinja2", "jinja2", "BSD-3-Clause", "https://github.com/pallets/jinja"),
    Component("MarkupSafe", "MarkupSafe", "BSD-3-Clause", "https://github.com/pallets/markupsafe"),
    Component("Python-Markdown", "markdown", "BSD-3-Clause", "https://github.com/Python-Markdown/markdown"),
    Component("Pygments", "pygments", "BSD-2-Clause", "https://github.com/pygments/pygments"),
    Component("qasync", "qasync", "BSD-2-Clause", "https://github.com/CabbageDevelopment/qasync"),
    Component("nvidia-ml-py", "nvidia-ml-py", "BSD-3-Clause", "https://pypi.org/project/nvidia-ml-py/"),
    Component("platformdirs", "platformdirs", "MIT", "https://github.com/tox-dev/platformdirs"),
    Component("keyring", "keyring", "MIT", "https://github.com/jaraco/keyring"),
    Component("filelock", "filelock", "MIT", "https://github.com/tox-dev/filelock"),
    Component("fsspec", "fsspec", "BSD-3-Clause", "https://github.com/fsspec/filesystem_spec"),
    Component("tqdm", "tqdm", "MPL-2.0 AND MIT", "https://github.com/tqdm/tqdm"),
    Component("PyYAML", "PyYAML", "MIT", "https://github.com/yaml/pyyaml"),
    Component("typing_extensions", "typing_extensions", "PSF-2.0", "https://github.com/python/typing_extensions"),
    Component("Feather icons (shapes)", "", "MIT", "https://feathericons.com"),
    Component("PyInstaller bootloader", "", "GPL-2.0-or-later WITH Bootloader-exception",
              "https://pyinstaller.org/en/stable/license.html"),
)


def installed_version(component: Component) -> str:
    """The version this process would bundle/use; "" when it is not an installed Python package."""
    if component.name == "Python":
        return platform.python_version()
    if component.name == "Qt 6":
        from PySide6.QtCore import qVersion

        return qVersion()
    if not component.distribution:
        return ""
    try:
        return metadata.version(component.distribution)
    except metadata.PackageNotFoundError:
        return ""


def app_icon() -> QIcon:
    """The application icon in every rendered size (window, taskbar, alt-tab pick the best)."""
    icon = QIcon()
    for size in APP_ICON_SIZES:
        path = APP_ICON_DIR / f"kestrel-{size}.png"
        if path.exists():
            icon.addFile(str(path))
    return icon


def window_title() -> str:
    return f"{APP_NAME} {__version__}"


def is_frozen() -> bool:
    """True inside a PyInstaller bundle."""
    return bool(getattr(sys, "frozen", False))


def components_html() -> str:
    rows = "".join(
        f"<tr><td>{c.name}</td><td>{installed_version(c)}</td><td>{c.license}</td>"
        f"<td><a href='{c.url}'>{c.url.split('//', 1)[-1].split('/', 1)[0]}</a></td></tr>"
        for c in COMPONENTS)
    return ("<table cellspacing='0' cellpadding='3'>"
            "<tr><th align='left'>Component</th><th align='left'>Version</th>"
            "<th align='left'>License</th><th align='left'>Source</th></tr>" + rows + "</table>")


class AboutDialog(QDialog):
    """Version, build facts and the bundled components' licenses."""

    def __init__(self, parent: QWidget | None = None, log_dir: Path | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("AboutDialog")
        self.setWindowTitle(f"About {APP_NAME}")
        self.resize(640, 560)
        layout = QVBoxLayout(self)
        head = QHBoxLayout()
        logo = QLabel()
        logo.setPixmap(app_icon().pixmap(64, 64))
        head.addWidget(logo)
        title = QLabel(f"<h2 style='margin:0'>{APP_NAME} {__version__}</h2>"
                       "<p>Find, download, plan, quantize and chat with EXL2 language models on one "
                       "NVIDIA GPU. MIT License.</p>")
        title.setWordWrap(True)
        head.addWidget(title, 1)
        layout.addLayout(head)
        from PySide6 import __version__ as pyside_version
        from PySide6.QtCore import qVersion

        facts = [f"Python {platform.python_version()}, Qt {qVersion()}, PySide6 {pyside_version}",
                 f"{'Packaged build' if is_frozen() else 'Running from source'} on {platform.platform()}"]
        if log_dir is not None:
            facts.append(f"Logs: {log_dir}")
        info = QLabel("<br>".join(facts))
        info.setObjectName("AboutFacts")
        info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        info.setWordWrap(True)
        layout.addWidget(info)
        layout.addWidget(QLabel("<b>Bundled components and their licenses</b> "
                                "(full texts: THIRD_PARTY_LICENSES.md next to the program)"))
        self.components = QTextBrowser()
        self.components.setObjectName("AboutComponents")
        self.components.setOpenExternalLinks(True)
        self.components.setHtml(components_html())
        layout.addWidget(self.components, 1)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        layout.addWidget(buttons)


def install_help_menu(window: QMainWindow, log_dir: Path | None = None) -> QAction:
    """Add Help > About Kestrel to a main window; returns the action (tests trigger it)."""
    menu = window.menuBar().addMenu("&Help")
    action = QAction(f"&About {APP_NAME}", window)
    action.setMenuRole(QAction.MenuRole.AboutRole)

    def show() -> None:
        dialog = AboutDialog(window, log_dir)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        window.about_dialog = dialog  # type: ignore[attr-defined] - lets tests find the open dialog
        dialog.open()

    action.triggered.connect(show)
    menu.addAction(action)
    return action
