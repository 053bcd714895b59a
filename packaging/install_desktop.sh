#!/usr/bin/env bash
# Add Kestrel to this user's application menu (no root): the icon in every size into
# ~/.local/share/icons/hicolor and a .desktop entry pointing at the bundle's executable.
#
#   install_desktop.sh [PATH/TO/Kestrel]     default: the Kestrel next to this script
#   install_desktop.sh --uninstall
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DATA="${XDG_DATA_HOME:-$HOME/.local/share}"
APPS="$DATA/applications"
ICONS="$DATA/icons/hicolor"
SIZES="16 24 32 48 64 128 256 512"

refresh() {
    command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database -q "$APPS" || true
    command -v gtk-update-icon-cache >/dev/null 2>&1 && gtk-update-icon-cache -q -t "$ICONS" || true
}

if [ "${1:-}" = "--uninstall" ]; then
    rm -f "$APPS/kestrel.desktop" "$ICONS/scalable/apps/kestrel.svg"
    for size in $SIZES; do rm -f "$ICONS/${size}x${size}/apps/kestrel.png"; done
    refresh
    echo "Kestrel removed from the application menu."
    exit 0
fi

EXE="$(readlink -f "${1:-$HERE/Kestrel}")"
if [ ! -x "$EXE" ]; then
    echo "error: $EXE is not an executable; pass the path of the bundle's Kestrel file" >&2
    exit 2
fi
# Icons: inside a bundle they are under _internal/resources; in the source tree under resources/.
ICON_SRC=""
for dir in "$(dirname "$EXE")/_internal/resources/icons/app" "$HERE/../resources/icons/app"; do
    [ -f "$dir/kestrel-256.png" ] && ICON_SRC="$dir" && break
done
if [ -z "$ICON_SRC" ]; then
    echo "error: Kestrel's icons (kestrel-256.png) were not found next to $EXE" >&2
    exit 2
fi
DESKTOP_SRC="$HERE/kestrel.desktop"

mkdir -p "$APPS" "$ICONS/scalable/apps"
for size in $SIZES; do
    mkdir -p "$ICONS/${size}x${size}/apps"
    cp "$ICON_SRC/kestrel-$size.png" "$ICONS/${size}x${size}/apps/kestrel.png"
done
cp "$ICON_SRC/kestrel.svg" "$ICONS/scalable/apps/kestrel.svg"
# Exec/TryExec take the absolute path (quoted: it may contain spaces).
sed -e "s|^Exec=.*|Exec=\"$EXE\"|" -e "s|^TryExec=.*|TryExec=$EXE|" "$DESKTOP_SRC" > "$APPS/kestrel.desktop"
chmod +x "$APPS/kestrel.desktop"
refresh
echo "Kestrel added to the application menu ($APPS/kestrel.desktop -> $EXE)."
