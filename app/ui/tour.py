"""Scripted tour of the app for packaging/screenshots.sh: open the window, load a model, chat, and save
PNGs of the main states. Runs the real app on a throwaway database and config folder.

    python -m app.ui.tour --model MODEL_DIR --out FOLDER
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PROMPT = "Write a Python function that reverses a string."
SHOWCASE = """Here is a quick comparison of the two approaches:

| Approach | Time | Memory |
|---|---|---|
| Slicing `s[::-1]` | $O(n)$ | $O(n)$ |
| Loop with a list | $O(n)$ | $O(n)$ |

```python
def reverse(s: str) -> str:
    \"\"\"Return s backwards.\"\"\"
    return s[::-1]

print(reverse("kestrel"))  # lertsek
```

The sum of the first $n$ squares is $$\\sum_{i=1}^{n} i^2 = \\frac{n(n+1)(2n+1)}{6}$$

> Tip: **slicing** is the idiomatic way in Python.
"""


def wait_until(app: object, condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app.processEvents()  # type: ignore[attr-defined]
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kestrel-tour-"))

    from PySide6.QtWidgets import QApplication

    from app.store import Store

    from .main_window import MainWindow
    from .theme import THEMES, apply_theme, ui_font

    app = QApplication.instance() or QApplication(["kestrel"])
    app.setFont(ui_font())
    apply_theme(app, THEMES["light"])
    store = Store(work / "chats.sqlite3")
    window = MainWindow(store, work / "config", "light")
    window.set_theme("light")
    window.resize(1440, 900)
    window.show()

    def shot(name: str) -> None:
        wait_until(app, lambda: False, 0.4)
        window.grab().save(str(out / f"{name}.png"))
        print(f"saved {out / name}.png", flush=True)

    wait_until(app, lambda: window.sampler_panel.ready, 30)
    shot("01-welcome")

    window.load_model(args.model)
    if not wait_until(app, lambda: window.model_info is not None or window.error_box is not None, 120):
        print("model did not load", file=sys.stderr)
        return 1
    if window.model_info is None:
        print(f"model failed to load: {window.error_box.text()}", file=sys.stderr)
        return 1
    window.sampler_panel.set_values({"temperature": 0.0, "repetition_penalty": 1.05}, args.max_new_tokens)
    window.chat.composer.edit.setPlainText(PROMPT)
    window.chat.submit()
    wait_until(app, lambda: window.generation is None, 300)
    window.chat.scroll_to_bottom()
    shot("02-chat-streamed")

    cid = store.create_conversation("Markdown showcase: tables, code, math")
    store.add_message(cid, "user", "Compare ways to reverse a string in Python, with complexity.")
    store.add_message(cid, "assistant", SHOWCASE, model=window.model_info.name)
    window.refresh_list()
    window.open_conversation(cid)
    shot("03-markdown")

    panel_scroll = window.side_panel.findChild(type(window.chat.scroll))
    if panel_scroll is not None:
        panel_scroll.verticalScrollBar().setValue(panel_scroll.verticalScrollBar().maximum())
    shot("04-sampler-panel")

    window.set_theme("dark")
    window.open_conversation(cid)
    shot("05-dark")
    window.new_chat()
    shot("06-dark-welcome")

    window.shutdown()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
