"""Longest GUI event-loop stall while a reply streams at full engine speed (budget: 50 ms).

    python bench/ui_stall.py --model MODEL_DIR [--tokens 96] [--runs 2]

Opens the real window (offscreen unless QT_QPA_PLATFORM says otherwise), loads the model, sends a
prompt that makes the model write Markdown with code, and runs a 5 ms QTimer on the GUI thread while
the reply streams; the largest gap between its ticks minus 5 ms is the stall. Exit code 1 if over.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

BUDGET_MS = 50.0
TICK_MS = 5
PROMPT = "Write a Python function that sorts a list with quicksort, then explain it step by step."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from PySide6.QtCore import QEventLoop, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    from app.store import Store
    from app.ui.main_window import MainWindow
    from app.ui.worker import LoadRequest

    app = QApplication.instance() or QApplication(["kestrel-bench"])
    work = Path(tempfile.mkdtemp(prefix="kestrel-stall-"))
    store = Store(work / "chats.sqlite3")
    window = MainWindow(store, work / "config", "light")
    window.show()

    def spin_until(cond, timeout: float) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise SystemExit("timed out")
            app.processEvents()
            time.sleep(0.002)

    window.load_model(LoadRequest(args.model, args.device))
    spin_until(lambda: window.model_info is not None or window.error_box is not None, 300)
    if window.model_info is None:
        raise SystemExit(f"model did not load: {window.error_box.text()}")
    spin_until(lambda: window.sampler_panel.ready, 60)

    gaps: list[float] = []
    state = {"last": 0.0, "on": False}

    def tick() -> None:
        now = time.perf_counter()
        if state["on"] and state["last"]:
            gaps.append((now - state["last"]) * 1000 - TICK_MS)
        state["last"] = now

    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.setInterval(TICK_MS)
    timer.timeout.connect(tick)
    timer.start()
    results = []
    first = {"seen": False}
    loop = QEventLoop()
    worker = window.client.worker
    worker.chunk.connect(lambda _j, _c: first.update(seen=True))
    # connected after the window's own slots, so the window has handled the end when the loop quits
    worker.finished.connect(lambda _j, _c: loop.quit())
    worker.failed.connect(lambda _j, _r: loop.quit())
    for run in range(args.runs):
        window.sampler_panel.set_values({"temperature": 0.0}, args.tokens)
        window.new_chat()
        first["seen"] = False
        gaps.clear()
        window.chat.max_render_ms = 0.0
        window.chat.composer.edit.setPlainText(PROMPT)
        window.chat.submit()
        spin_until(lambda: first["seen"], 300)      # measure the streaming, not the prompt
        state.update(on=True, last=0.0)
        if window.generation is not None:
            loop.exec()                             # the real event loop, as in the app
        state["on"] = False
        reply = store.messages(window.current_id)[-1]
        tps = reply.timings.tokens_per_second or 0.0
        worst = max(gaps) if gaps else 0.0
        p99 = statistics.quantiles(gaps, n=100)[98] if len(gaps) > 100 else worst
        results.append(worst)
        print(f"run {run + 1}: {reply.timings.generated_tokens} tokens at {tps:.1f} tok/s, "
              f"{len(reply.content)} chars; stall max {worst:.1f} ms, p99 {p99:.1f} ms; "
              f"slowest re-render {window.chat.max_render_ms:.1f} ms")
    window.shutdown()
    store.close()
    worst = max(results)
    print(f"longest event-loop stall while streaming: {worst:.1f} ms (budget {BUDGET_MS:.0f} ms)")
    return 0 if worst <= BUDGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
