"""Start the desktop app: `python main.py` -> app.cli.main -> run(argv).

Startup budget: the window must be up within 1.5 s of a cold start, so nothing here imports torch
or the engine; those load on the engine thread when a model is loaded (see worker.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

T_START = time.perf_counter()
EXIT_USER_ERROR = 2


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kestrel", description="Kestrel desktop app")
    ap.add_argument("--gui", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--db", default=None, help="chat database file (default: the per-user data folder)")
    ap.add_argument("--config-dir", default=None, help="folder for presets and UI settings")
    ap.add_argument("--theme", choices=["light", "dark", "system"], default=None)
    ap.add_argument("--model", default=None, help="load this model folder at start")
    ap.add_argument("--self-test", action="store_true",
                    help="open the window, print the time it took, and quit (used by bench/ui_startup.py)")
    return ap.parse_args(list(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """Open the main window and run the event loop; return the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication, QMessageBox

    from app.store import Store, StoreError

    from .about import app_icon, install_help_menu, window_title
    from .crash import install as install_crash_reporter
    from .first_run import maybe_show_first_run, self_test
    from .main_window import MainWindow
    from .prefs import Prefs
    from .presets import default_config_dir
    from .theme import THEMES, apply_theme, system_prefers_dark, ui_font

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "kestrel"])
    app.setApplicationName("Kestrel")
    app.setApplicationDisplayName("Kestrel")
    app.setFont(ui_font())
    app.setWindowIcon(app_icon())
    reporter = install_crash_reporter()     # rotating log file + dialog for unhandled errors
    config_dir = Path(args.config_dir) if args.config_dir else default_config_dir()
    theme = args.theme or Prefs(config_dir).get("theme") or "system"
    if theme == "system" or theme not in THEMES:
        theme = "dark" if system_prefers_dark() else "light"
    apply_theme(app, THEMES[theme])
    try:
        store = Store(args.db)
    except StoreError as e:
        QMessageBox.critical(None, "Kestrel cannot open its chats", str(e))
        return EXIT_USER_ERROR
    window = MainWindow(store, config_dir, theme)
    window.setWindowTitle(window_title())
    install_help_menu(window, reporter.log_file.parent)
    window.set_theme(theme)
    window.show()
    first_run = maybe_show_first_run(window, config_dir)
    if args.model:
        window.load_model(args.model)
    if args.self_test:
        def report() -> None:
            print(f"window shown after {time.perf_counter() - T_START:.3f} s (since app.ui.app import)",
                  flush=True)
            self_test(app, window, first_run)   # prints resources, Qt plugins, backend; then quits
        QTimer.singleShot(0, report)
    try:
        code = app.exec()
    finally:
        window.shutdown()
        store.close()
    return int(code)


if __name__ == "__main__":
    sys.exit(run())
