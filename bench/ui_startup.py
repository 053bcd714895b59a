"""How long until the main window is up on a cold start (budget: 1.5 s), and that torch stays out.

    python bench/ui_startup.py [--runs 5]

Each run is a fresh process (`python main.py --self-test`) on a throwaway database; the time is
from spawning the process until the window reports it has been shown. Exit code 1 if over budget.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 1.5


def one_run(work: Path) -> float:
    env = dict(os.environ, QT_QPA_PLATFORM=os.environ.get("QT_QPA_PLATFORM", "offscreen"))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "main.py", "--self-test", "--db", str(work / "chats.sqlite3"),
                             "--config-dir", str(work / "config")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("window shown"):
            elapsed = time.perf_counter() - t0
            break
    else:
        raise SystemExit(f"the app exited without showing its window (exit code {proc.wait()})")
    proc.wait(timeout=30)
    return elapsed


def torch_imported_at_startup() -> bool:
    code = "import app.ui.app, app.ui.main_window; import sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip() == "True"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = [one_run(Path(tmp)) for _ in range(args.runs)]
    torch_loaded = torch_imported_at_startup()
    print(f"window up: median {statistics.median(times):.3f} s, max {max(times):.3f} s "
          f"over {len(times)} runs (budget {BUDGET_S} s)")
    print(f"torch imported at startup: {'YES (regression)' if torch_loaded else 'no'}")
    return 0 if max(times) <= BUDGET_S and not torch_loaded else 1


if __name__ == "__main__":
    sys.exit(main())
