"""Kestrel's desktop app (PySide6). Entry point: app.ui.app.run(argv). No torch at import time."""
