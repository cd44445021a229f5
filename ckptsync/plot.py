"""Terminal charts as plain text: data in, lines out. Pure, no I/O.

A chart has one "line" series, drawn with braille dots (2x4 dots per cell,
so a few hundred logged steps still read as a curve) or with ``*`` in ASCII
mode, and any number of "marker" series drawn as one glyph per point on top
(eval loss is logged rarely, so markers show exactly where it was measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BRAILLE = 0x2800
# Bit of each dot in a braille cell, indexed [row][column].
DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
MARKERS = ("●", "◆", "▲")
ASCII_MARKERS = ("o", "x", "+")
SPARKS = "▁▂▃▄▅▆▇█"
ASCII_SPARKS = "_.-:=+*#"


@dataclass(frozen=True)
class Series:
    label: str
    points: tuple[tuple[float, float], ...]   # (x, y), x ascending
    style: str = "line"                        # "line" or "marker"


@dataclass(frozen=True)
class Box:
    """Data coordinates of the plot area."""

    x0: float
    x1: float
    y0: float
    y1: float

    def col(self, x: float, cells: int) -> float:
        return 0.0 if self.x1 == self.x0 else (x - self.x0) / (self.x1 - self.x0) * (cells - 1)

    def row(self, y: float, cells: int) -> float:
        """0 at the top (largest y)."""
        return 0.0 if self.y1 == self.y0 else (self.y1 - y) / (self.y1 - self.y0) * (cells - 1)


def glyph_of(series: list[Series], index: int, ascii_only: bool) -> str:
    if series[index].style == "line":
        return "*" if ascii_only else "⠤"
    rank = sum(1 for s in series[:index] if s.style == "marker") % len(MARKERS)
    return ASCII_MARKERS[rank] if ascii_only else MARKERS[rank]


def line_chart(series: list[Series], width: int = 72, height: int = 10, ascii_only: bool = False,
               x_label: str = "step") -> list[str]:
    """The chart as text lines of at most `width` characters, legend last. [] when there is no data."""
    series = [Series(s.label, tuple(p for p in s.points if _finite(p)), s.style) for s in series]
    series = [s for s in series if s.points]
    if not series:
        return []
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    low, high = min(ys), max(ys)
    if low == high:   # a flat series sits in the middle of the chart
        pad = abs(low) * 0.05 or 1.0
        low, high = low - pad, high + pad
    box = Box(min(xs), max(xs), low, high)
    height = max(height, 3)
    labels = _y_labels(box, height)
    margin = max(len(t) for t in labels.values())
    cols = max(width - margin - 2, 10)
    grid = [[" "] * cols for _ in range(height)]
    for s in series:
        if s.style == "line":
            (_draw_ascii if ascii_only else _draw_braille)(grid, s.points, box)
    for i, s in enumerate(series):
        if s.style == "marker":
            mark = glyph_of(series, i, ascii_only)
            for x, y in s.points:
                grid[round(box.row(y, height))][round(box.col(x, cols))] = mark
    tick, bar, corner = ("+", "|", "+") if ascii_only else ("┤", "│", "└")
    lines = []
    for r in range(height):
        label = labels.get(r, "")
        lines.append(f"{label:>{margin}} {tick if label else bar}" + "".join(grid[r]).rstrip())
    lines.extend(_x_axis(box, cols, margin, corner, ascii_only, x_label))
    lines.append(" " * (margin + 2) + "   ".join(
        f"{glyph_of(series, i, ascii_only) * (2 if s.style == 'line' else 1)} {s.label}"
        for i, s in enumerate(series)))
    return lines


def sparkline(values: list[float], width: int, ascii_only: bool = False) -> str:
    """One character per column: the values resampled to at most `width` columns."""
    values = [v for v in values if math.isfinite(v)]
    if not values or width <= 0:
        return ""
    ramp = ASCII_SPARKS if ascii_only else SPARKS
    n = min(width, len(values))
    picked = [values[round(i * (len(values) - 1) / (n - 1))] if n > 1 else values[-1] for i in range(n)]
    lo, hi = min(picked), max(picked)
    if hi == lo:
        return ramp[len(ramp) // 2] * n
    return "".join(ramp[round((v - lo) / (hi - lo) * (len(ramp) - 1))] for v in picked)


def number(value: float, digits: int = 6) -> str:
    """A number as people read it in a training log: 6.03766, 0.0005, 2.44717e-05."""
    return f"{value:.{digits}g}"


# ---------------------------------------------------------------- drawing


def _finite(point: tuple[float, float]) -> bool:
    return math.isfinite(point[0]) and math.isfinite(point[1])   # a diverged run logs NaN losses


def _draw_braille(grid: list[list[str]], points, box: Box) -> None:
    rows, cols = len(grid), len(grid[0])
    dots: dict[tuple[int, int], int] = {}
    pixels = [(round(box.col(x, cols * 2)), round(box.row(y, rows * 4))) for x, y in points]
    for (xa, ya), (xb, yb) in zip(pixels, pixels[1:] or pixels):
        for px, py in _segment(xa, ya, xb, yb):
            cell = (py // 4, px // 2)
            dots[cell] = dots.get(cell, 0) | DOTS[py % 4][px % 2]
    for (r, c), bits in dots.items():
        grid[r][c] = chr(BRAILLE + bits)


def _draw_ascii(grid: list[list[str]], points, box: Box) -> None:
    rows, cols = len(grid), len(grid[0])
    cells = [(round(box.col(x, cols)), round(box.row(y, rows))) for x, y in points]
    for (xa, ya), (xb, yb) in zip(cells, cells[1:] or cells):
        for c, r in _segment(xa, ya, xb, yb):
            grid[r][c] = "*"


def _segment(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """Integer points from (x0, y0) to (x1, y1), both ends included (Bresenham)."""
    out = []
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        out.append((x0, y0))
        if (x0, y0) == (x1, y1):
            return out
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


# ---------------------------------------------------------------- axes


def _y_labels(box: Box, height: int) -> dict[int, str]:
    """Row -> label: the largest value on the top row, the smallest on the bottom one."""
    rows = [0, height - 1]
    if height >= 7:
        rows[1:1] = [round((height - 1) / 3), round(2 * (height - 1) / 3)]
    elif height >= 5:
        rows.insert(1, (height - 1) // 2)
    step = (box.y1 - box.y0) / (height - 1)
    fmt = _tick_format(box, step)
    return {r: fmt(box.y1 - r * step) for r in rows}


def _tick_format(box: Box, step: float):
    biggest = max(abs(box.y0), abs(box.y1))
    if biggest and (biggest >= 1e6 or biggest < 1e-3):
        return lambda v: f"{v:.3e}"
    if step <= 0:
        return lambda v: number(v)
    decimals = min(max(math.ceil(-math.log10(step)) + 1, 0), 8)
    return lambda v: f"{v:.{decimals}f}"


def _x_axis(box: Box, cols: int, margin: int, corner: str, ascii_only: bool, x_label: str) -> list[str]:
    rule, tick = ("-", "+") if ascii_only else ("─", "┬")
    axis = [rule] * cols
    under = [" "] * cols
    taken: list[tuple[int, int]] = []
    for value in _x_ticks(box, cols):
        text = f"{value:.0f}" if value == round(value) else number(value, 3)
        col = round(box.col(value, cols))
        start = min(max(col - len(text) // 2, 0), cols - len(text))
        if any(start <= b + 1 and start + len(text) >= a - 1 for a, b in taken):
            continue
        if col or not ascii_only:  # the ASCII corner is already a '+'
            axis[col] = tick
        under[start:start + len(text)] = text
        taken.append((start, start + len(text) - 1))
    pad = " " * (margin + 1)
    under_text = "".join(under).rstrip()
    if len(under_text) + len(x_label) + 2 <= cols:
        under_text = under_text.ljust(cols - len(x_label)) + x_label
    return [pad + corner + "".join(axis), pad + " " + under_text]


def _x_ticks(box: Box, cols: int) -> list[float]:
    """The first and last x, then round values in between (1, 2 or 5 times a power of ten apart)."""
    if box.x1 == box.x0:
        return [box.x0]
    raw = (box.x1 - box.x0) / max(cols // 12, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    inner = []
    value = math.ceil(box.x0 / step) * step
    while value < box.x1:
        if value > box.x0:
            inner.append(value)
        value += step
    return [box.x0, box.x1] + inner
