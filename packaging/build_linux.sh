#!/usr/bin/env bash
# Build Kestrel for Linux: a one-folder PyInstaller bundle, a tarball of it, and an AppImage when
# appimagetool is on PATH. Then start the built app once (--self-test, offscreen) to prove it runs.
#
#   packaging/build_linux.sh [--system-site-packages] [--torch-index URL] [--reuse-venv] [--no-appimage]
#                            [--skip-self-test] [--install]
#
#   --system-site-packages  build in a venv that sees this Python's packages (no torch download)
#   --torch-index URL       where pip gets torch, e.g. https://download.pytorch.org/whl/cu124
#                           (default: PyPI, whose Linux torch is the CUDA build, ~2.5 GB of libraries)
#   --reuse-venv            take packaging/build/venv as it is (no pip step), e.g. after a first run
#   --install               add the menu entry + icon for this user (packaging/install_desktop.sh)
#
# With a CUDA torch and nvcc, `pip install -e` compiles the CUDA extension (setup.py; minutes) and the
# spec bundles it; without nvcc the bundle runs the PyTorch path on the GPU (Help > About says why).
# Outputs in packaging/dist/: Kestrel/ (run Kestrel/Kestrel), Kestrel-<version>-linux-<arch>.tar.gz,
# and Kestrel-<version>-<arch>.AppImage. Environment: PYTHON (default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PKG="$REPO/packaging"
BUILD="$PKG/build"
DIST="$PKG/dist"
PYTHON="${PYTHON:-python3}"
SYSTEM_SITE=""; TORCH_INDEX=""; APPIMAGE=1; SELF_TEST=1; INSTALL=0; PIP=1
while [ $# -gt 0 ]; do
    case "$1" in
        --system-site-packages) SYSTEM_SITE="--system-site-packages" ;;
        --torch-index) TORCH_INDEX="$2"; shift ;;
        --reuse-venv) PIP=0 ;;
        --no-appimage) APPIMAGE=0 ;;
        --skip-self-test) SELF_TEST=0 ;;
        --install) INSTALL=1 ;;
        -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/app/__init__.py")"
ARCH="$(uname -m)"
echo "== Kestrel $VERSION for linux-$ARCH"

# 1. A build venv, so the bundle holds exactly the project's dependencies.
VENV="$BUILD/venv"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv $SYSTEM_SITE "$VENV"
fi
PY="$VENV/bin/python"
if [ "$PIP" = 1 ]; then
    "$PY" -m pip install --quiet --upgrade pip
    if [ -n "$TORCH_INDEX" ]; then
        "$PY" -m pip install --quiet torch --index-url "$TORCH_INDEX"
    fi
    "$PY" -m pip install --quiet -e "$REPO" "pyinstaller>=6.6"
fi
"$PY" -c "import torch; print('== torch', torch.__version__, 'CUDA', torch.version.cuda)"
# Every dependency in pyproject.toml installed (--reuse-venv installs nothing), the extension's state.
"$PY" "$PKG/check_venv.py"
ls "$REPO"/app/engine/kestrel_cuda*.so >/dev/null 2>&1 && echo "== the spec bundles $(ls "$REPO"/app/engine/kestrel_cuda*.so)" \
    || echo "== no CUDA extension built (app/engine/kestrel_cuda*.so): the bundle will use the PyTorch path"

# 2. The bundle.
T0=$(date +%s)
"$PY" -m PyInstaller --noconfirm --clean --log-level WARN \
    --distpath "$DIST" --workpath "$BUILD/pyinstaller" "$PKG/kestrel.spec"
echo "== bundle built in $(( $(date +%s) - T0 )) s: $DIST/Kestrel ($(du -sh "$DIST/Kestrel" | cut -f1))"

# Desktop integration travels with the bundle, so a user can add the menu entry after unpacking.
cp "$PKG/kestrel.desktop" "$PKG/install_desktop.sh" "$DIST/Kestrel/"
chmod +x "$DIST/Kestrel/install_desktop.sh"

# 3. Prove it starts: resources found, Qt platform plugin loads, backend detected, exit 0.
if [ "$SELF_TEST" = 1 ]; then
    TMP="$(mktemp -d)"
    T0=$(date +%s.%N)
    QT_QPA_PLATFORM=offscreen "$DIST/Kestrel/Kestrel" --self-test --db "$TMP/chats.sqlite3" \
        --config-dir "$TMP/config"
    echo "== self-test passed in $(echo "$(date +%s.%N) - $T0" | bc) s"
    rm -rf "$TMP"
fi

# 4. Tarball.
TARBALL="$DIST/Kestrel-$VERSION-linux-$ARCH.tar.gz"
tar -C "$DIST" -czf "$TARBALL" Kestrel
echo "== $TARBALL ($(du -h "$TARBALL" | cut -f1))"

# 5. AppImage (optional).
if [ "$APPIMAGE" = 1 ] && command -v appimagetool >/dev/null 2>&1; then
    APPDIR="$BUILD/Kestrel.AppDir"
    rm -rf "$APPDIR"
    mkdir -p "$APPDIR/usr/lib" "$APPDIR/usr/share/applications"
    cp -a "$DIST/Kestrel" "$APPDIR/usr/lib/kestrel"
    cp "$PKG/kestrel.desktop" "$APPDIR/kestrel.desktop"
    cp "$PKG/kestrel.desktop" "$APPDIR/usr/share/applications/kestrel.desktop"
    cp "$REPO/resources/icons/app/kestrel-256.png" "$APPDIR/kestrel.png"
    for size in 16 24 32 48 64 128 256 512; do
        mkdir -p "$APPDIR/usr/share/icons/hicolor/${size}x${size}/apps"
        cp "$REPO/resources/icons/app/kestrel-$size.png" "$APPDIR/usr/share/icons/hicolor/${size}x${size}/apps/kestrel.png"
    done
    cat > "$APPDIR/AppRun" <<'APPRUN'
#!/bin/sh
HERE="$(dirname "$(readlink -f "$0")")"
exec "$HERE/usr/lib/kestrel/Kestrel" "$@"
APPRUN
    chmod +x "$APPDIR/AppRun"
    APPIMAGE_FILE="$DIST/Kestrel-$VERSION-$ARCH.AppImage"
    ARCH="$ARCH" appimagetool --no-appstream "$APPDIR" "$APPIMAGE_FILE"
    echo "== $APPIMAGE_FILE ($(du -h "$APPIMAGE_FILE" | cut -f1))"
elif [ "$APPIMAGE" = 1 ]; then
    echo "== no AppImage: appimagetool is not on PATH (https://github.com/AppImage/appimagetool/releases)"
fi

# 6. Menu entry + icon for this user (optional).
if [ "$INSTALL" = 1 ]; then
    "$PKG/install_desktop.sh" "$DIST/Kestrel/Kestrel"
fi
