"""Cyclic garbage collection on the GUI thread only.

Python's cycle collector runs in whichever thread happens to allocate when a threshold is crossed.
If that is the engine thread and the garbage holds Qt objects (a closed dialog, an old page), Qt
deletes them from the wrong thread and the process crashes. So automatic collection is switched
off and a timer on the GUI thread collects instead, by the same generation thresholds.
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QCoreApplication, QObject, QTimer

_guard: MainThreadGC | None = None


class MainThreadGC(QObject):
    def __init__(self, interval_ms: int = 200) -> None:
        super().__init__(QCoreApplication.instance())
        self.thresholds = gc.get_threshold()
        gc.disable()
        self.timer = QTimer(self)
        self.timer.timeout.connect(self.check)
        self.timer.start(interval_ms)

    def check(self) -> None:
        counts = gc.get_count()
        for generation in (2, 1, 0):
            if counts[generation] > self.thresholds[generation]:
                gc.collect(generation)
                return


def install() -> MainThreadGC:
    """Idempotent: the first window installs the guard for the whole application."""
    global _guard
    if _guard is None:
        _guard = MainThreadGC()
    return _guard
