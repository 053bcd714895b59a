#!/usr/bin/env bash
# Screenshots of Kestrel's main states, taken from the real app under a virtual X server.
#
#   packaging/screenshots.sh [MODEL_DIR] [OUT_DIR]
#
# MODEL_DIR defaults to the SmolLM2 test fixture ($KESTREL_TEST_CACHE or ~/.cache/kestrel-test);
# OUT_DIR defaults to packaging/screenshots. Installs xvfb with apt-get when it is missing.
# Saves: 01-welcome, 02-chat-streamed (a streamed reply with a code block), 03-markdown,
# 04-sampler-panel, 05-dark, 06-dark-welcome (.png).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${KESTREL_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kestrel-test}"
MODEL="${1:-$CACHE/smollm2-fp16}"
OUT="${2:-$REPO/packaging/screenshots}"
PYTHON="${PYTHON:-python3}"

if [ ! -f "$MODEL/config.json" ]; then
    echo "error: $MODEL is not a model folder (no config.json). Build the fixture with" \
         "'python -m pytest tests/test_ui_app.py' or pass a model folder." >&2
    exit 2
fi
# Qt's xcb plugin needs libxcb-cursor0 & co. (Qt >= 6.5); xvfb-run comes with xvfb.
XCB_LIBS="xvfb libxcb-cursor0 libxkbcommon-x11-0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-shape0 libxcb-xkb1"
if ! command -v xvfb-run >/dev/null 2>&1 || ! ldconfig -p | grep -q libxcb-cursor.so.0; then
    echo "installing X libraries for the screenshots: $XCB_LIBS" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    # shellcheck disable=SC2086
    $SUDO apt-get install -y $XCB_LIBS >/dev/null
fi

mkdir -p "$OUT"
cd "$REPO"
# xcb, not offscreen: the screenshots come from a real X server, fonts and all.
QT_QPA_PLATFORM=xcb xvfb-run --auto-servernum --server-args="-screen 0 1600x1000x24 -dpi 96" \
    "$PYTHON" -m app.ui.tour --model "$MODEL" --out "$OUT"
echo "screenshots in $OUT:"
ls -1 "$OUT"/*.png
