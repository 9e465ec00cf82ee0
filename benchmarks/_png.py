"""A tiny PNG bar-chart renderer (zlib + struct, no third-party packages).

Why not matplotlib: the chart is a handful of labelled horizontal bars, and
matplotlib (with numpy, fonts and a backend) would be the heaviest dependency
of the whole project for it; a benchmark that must run on a fresh machine after
``install-peers.sh`` should not need it. This module draws filled rectangles and
text in a built-in 5x7 pixel font, and writes an 8-bit RGB PNG (RFC 2083:
signature, IHDR, one zlib-compressed IDAT of filter-0 scanlines, IEND).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

Color = tuple[int, int, int]

# 5x7 glyphs, one byte per row (bit 4 is the leftmost pixel), HD44780-style shapes.
# fmt: off
_FONT_HEX = {
    " ": "00000000000000", "0": "0e11131519110e", "1": "040c040404040e", "2": "0e11010204081f",
    "3": "1f02040201110e", "4": "02060a121f0202", "5": "1f101e0101110e",
    "6": "0608101e11110e", "7": "1f010204080808", "8": "0e11110e11110e", "9": "0e11110f01020c",
    "A": "0e11111f111111", "B": "1e11111e11111e", "C": "0e11101010110e", "D": "1c12111111121c",
    "E": "1f10101e10101f", "F": "1f10101e101010", "G": "0e11101711110f",
    "H": "1111111f111111", "I": "0e04040404040e", "J": "0702020202120c", "K": "11121418141211",
    "L": "1010101010101f", "M": "111b1515111111", "N": "11111915131111", "O": "0e11111111110e",
    "P": "1e11111e101010", "Q": "0e11111115120d", "R": "1e11111e141211", "S": "0f10100e01011e",
    "T": "1f040404040404", "U": "1111111111110e", "V": "11111111110a04", "W": "1111111515150a",
    "X": "11110a040a1111", "Y": "1111110a040404", "Z": "1f01020408101f",
    "a": "00000e010f110f", "b": "1010161911111e", "c": "00000e1010110e",
    "d": "01010d1311110f", "e": "00000e111f100e", "f": "0609081c080808", "g": "000f11110f010e",
    "h": "10101619111111", "i": "04000c0404040e", "j": "0200060202120c", "k": "10101214181412",
    "l": "0c04040404040e", "m": "00001a15151111", "n": "00001619111111", "o": "00000e1111110e",
    "p": "00001e111e1010", "q": "00000d130f0101", "r": "00001619101010", "s": "00000e100e011e",
    "t": "08081c08080906", "u": "0000111111130d", "v": "00001111110a04",
    "w": "0000111115150a", "x": "0000110a040a11", "y": "000011110f010e",
    "z": "00001f0204081f", ".": "00000000000c0c", ",": "000000000c0408",
    ":": "000c0c000c0c00", ";": "000c0c000c0408", "-": "0000001f000000", "/": "00010204081000",
    "(": "02040808080402", ")": "08040202020408", "%": "18190204081303", "_": "0000000000001f",
    "+": "0004041f040400", "=": "00001f001f0000", "<": "02040810080402", ">": "08040201020408",
    "[": "0e08080808080e", "]": "0e02020202020e", "*": "0004150e150400", "?": "0e110102040004",
    "!": "04040404040004", "#": "0a0a1f0a1f0a0a", "'": "04040800000000", '"': "0a0a0000000000",
    "|": "04040404040404",
}
# fmt: on
FONT: dict[str, bytes] = {ch: bytes.fromhex(h) for ch, h in _FONT_HEX.items()}
GLYPH_W, GLYPH_H = 6, 9  # 5x7 glyph plus one column and two rows of spacing


class Canvas:
    """An RGB raster with rectangles and text; ``save`` writes a PNG."""

    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def rect(self, x: int, y: int, w: int, h: int, color: Color) -> None:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return
        row = bytes(color) * (x1 - x0)
        for yy in range(y0, y1):
            start = (yy * self.width + x0) * 3
            self.pixels[start : start + len(row)] = row

    def text(self, x: int, y: int, s: str, color: Color = (0, 0, 0), scale: int = 2) -> int:
        """Draw ``s`` with its top-left corner at (x, y); return the x after the last glyph."""
        for ch in s:
            glyph = FONT.get(ch) or FONT.get(ch.upper()) or FONT["?"]
            for r, bits in enumerate(glyph):
                for c in range(5):
                    if bits & (0x10 >> c):
                        self.rect(x + c * scale, y + r * scale, scale, scale, color)
            x += GLYPH_W * scale
        return x

    def png(self) -> bytes:
        stride = self.width * 3
        raw = b"".join(b"\0" + bytes(self.pixels[y * stride : (y + 1) * stride]) for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

        ihdr = struct.pack("!IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )

    def save(self, path: Path) -> None:
        path.write_bytes(self.png())


def text_width(s: str, scale: int = 2) -> int:
    return len(s) * GLYPH_W * scale


@dataclass
class Bar:
    label: str
    value: float | None
    color: Color
    note: str = ""
    """Shown instead of a value when ``value`` is None (e.g. "skipped")."""


@dataclass
class Panel:
    title: str
    unit: str
    bars: list[Bar] = field(default_factory=list)
    target: float | None = None
    """Drawn as a red vertical line labelled "target"."""


def render_chart(title: str, subtitle: str, panels: list[Panel], path: Path, width: int = 1100) -> None:
    """Horizontal bar panels, one under the other, written to ``path`` as PNG."""
    scale, bar_h, gap = 2, 22, 6
    label_w = 20 + max((text_width(b.label) for p in panels for b in p.bars), default=100)
    value_w = 200
    heights = [52 + len(p.bars) * (bar_h + gap) + 18 for p in panels]
    per_line = (width - 32) // (GLYPH_W * scale)
    sub_lines = _wrap(subtitle, per_line)
    top = 56 + 20 * len(sub_lines)
    height = top + sum(heights)
    cv = Canvas(width, height)
    cv.text(16, 14, title, (0, 0, 0), 3)
    for i, line in enumerate(sub_lines):
        cv.text(16, 48 + 20 * i, line, (90, 90, 90), scale)
    y = top
    for panel, h in zip(panels, heights, strict=True):
        cv.rect(10, y, width - 20, 1, (200, 200, 200))
        cv.text(16, y + 10, f"{panel.title} ({panel.unit})", (20, 20, 20), scale)
        y0 = y + 46
        x0 = 16 + label_w
        span = width - x0 - value_w
        vmax = max([b.value for b in panel.bars if b.value is not None] + [panel.target or 0.0, 1e-9])
        if panel.target is not None:
            # The target line goes under the bars and their values, so it never hides a number.
            tx = x0 + round(span * panel.target / vmax)
            bottom = y0 + len(panel.bars) * (bar_h + gap)
            for yy in range(y0 - 6, bottom, 6):
                cv.rect(tx, yy, 2, 4, (220, 30, 30))
            cv.text(tx + 4, y0 - 16, f"target {_fmt(panel.target)}", (220, 30, 30), scale)
        for i, b in enumerate(panel.bars):
            by = y0 + i * (bar_h + gap)
            cv.text(16, by + 4, b.label, (40, 40, 40), scale)
            if b.value is None:
                cv.text(x0 + 4, by + 4, b.note or "n/a", (150, 150, 150), scale)
                continue
            w = max(1, round(span * b.value / vmax))
            cv.rect(x0, by, w, bar_h, b.color)
            cv.text(x0 + w + 8, by + 4, _fmt(b.value) + (f" {b.note}" if b.note else ""), (0, 0, 0), scale)
        y += h
    cv.save(path)


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"
