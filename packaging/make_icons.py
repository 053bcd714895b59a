"""Render the application icon (resources/icons/app/kestrel.svg) to the PNG sizes desktops want and
to a multi-size kestrel.ico for Windows. Uses Qt's own SVG renderer offscreen: no extra tools.

    QT_QPA_PLATFORM=offscreen python packaging/make_icons.py

The outputs are committed; run this again after editing the SVG.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

ICON_DIR = Path(__file__).resolve().parent.parent / "resources" / "icons" / "app"
PNG_SIZES = (16, 24, 32, 48, 64, 128, 256, 512)
ICO_SIZES = (16, 24, 32, 48, 64, 128, 256)   # .ico entries stop at 256 (the format's limit)


def ico_bytes(pngs: dict[int, bytes]) -> bytes:
    """An .ico file holding PNG-compressed images (supported since Windows Vista), smallest first."""
    sizes = sorted(pngs)
    header = struct.pack("<HHH", 0, 1, len(sizes))
    offset = len(header) + 16 * len(sizes)
    entries, blobs = b"", b""
    for size in sizes:
        data = pngs[size]
        dim = 0 if size >= 256 else size          # 0 means 256 in an ICONDIRENTRY
        entries += struct.pack("<BBBBHHII", dim, dim, 0, 0, 1, 32, len(data), offset)
        blobs += data
        offset += len(data)
    return header + entries + blobs


def render_png(svg: Path, size: int) -> bytes:
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, QRectF, Qt
    from PySide6.QtGui import QImage, QPainter
    from PySide6.QtSvg import QSvgRenderer

    renderer = QSvgRenderer(str(svg))
    if not renderer.isValid():
        raise SystemExit(f"error: {svg} is not a valid SVG; fix the file and run again")
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    renderer.render(painter, QRectF(0, 0, size, size))
    painter.end()
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG")
    return bytes(data.data())


def main() -> int:
    from PySide6.QtGui import QGuiApplication

    app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])  # noqa: F841 - Qt needs one
    svg = ICON_DIR / "kestrel.svg"
    pngs = {size: render_png(svg, size) for size in PNG_SIZES}
    for size, data in pngs.items():
        (ICON_DIR / f"kestrel-{size}.png").write_bytes(data)
    (ICON_DIR / "kestrel.ico").write_bytes(ico_bytes({s: pngs[s] for s in ICO_SIZES}))
    print(f"wrote {len(pngs)} PNGs and kestrel.ico to {ICON_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
