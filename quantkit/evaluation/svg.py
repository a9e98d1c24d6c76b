"""Small inline-SVG plots for the HTML report: scatter, grouped or stacked bars, and lines.

Each plot is a self-contained ``<svg>`` string (plus an HTML legend where it has series); the page's
CSS styles the classes used here (``title``, ``label``, ``xtick``, ``ytick``, ``grid``, ...).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterator
from typing import Any

# Colour-blind-safe palette (Okabe-Ito); float baselines are drawn in grey.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
FLOAT_COLOR = "#8c8c8c"
W, H = 560, 340  # plot size in SVG user units
M_LEFT, M_RIGHT, M_TOP, M_BOTTOM = 64, 16, 36, 56


def esc(s: Any) -> str:
    """``s`` as text safe in HTML and SVG, attribute values included."""
    return html.escape(str(s), quote=True)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]``."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        lo, hi = lo - 0.5 if lo else -1.0, hi + 0.5 if hi else 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 10))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 10))
    return ticks


def _fmt(v: float, step: float | None = None) -> str:
    """A tick or value label: as many decimals as ``step`` needs, else 3 significant digits."""
    if step is not None and step > 0:
        decimals = next(d for d in range(12) if abs(round(step, d) - step) <= step * 1e-6)
        return f"{v:.{decimals}f}"
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


class _Frame:
    """Maps data coordinates to the plot area and draws axes, grid and titles."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xr: tuple[float, float], yr: tuple[float, float]):
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.xt = nice_ticks(*xr)
        self.yt = nice_ticks(*yr)
        self.x0, self.x1 = self.xt[0], self.xt[-1]
        self.y0, self.y1 = self.yt[0], self.yt[-1]
        self.xstep = self.xt[1] - self.xt[0] if len(self.xt) > 1 else None
        self.ystep = self.yt[1] - self.yt[0] if len(self.yt) > 1 else None

    def px(self, x: float) -> float:
        return M_LEFT + (x - self.x0) / (self.x1 - self.x0) * (W - M_LEFT - M_RIGHT)

    def py(self, y: float) -> float:
        return H - M_BOTTOM - (y - self.y0) / (self.y1 - self.y0) * (H - M_TOP - M_BOTTOM)

    def open(self, x_ticks: bool = True) -> list[str]:
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
            f'aria-label="{esc(self.title)}" class="plot">',
            f'<text x="{W / 2}" y="20" class="title">{esc(self.title)}</text>',
        ]
        for y in self.yt:
            py = self.py(y)
            out.append(f'<line x1="{M_LEFT}" x2="{W - M_RIGHT}" y1="{py:.1f}" y2="{py:.1f}" class="grid"/>')
            out.append(f'<text x="{M_LEFT - 6}" y="{py + 4:.1f}" class="ytick">{_fmt(y, self.ystep)}</text>')
        if x_ticks:
            for x in self.xt:
                out += _x_tick(self.px(x), _fmt(x, self.xstep))
        out += [
            f'<line x1="{M_LEFT}" x2="{W - M_RIGHT}" y1="{H - M_BOTTOM}" y2="{H - M_BOTTOM}" class="axis"/>',
            f'<line x1="{M_LEFT}" x2="{M_LEFT}" y1="{M_TOP}" y2="{H - M_BOTTOM}" class="axis"/>',
            f'<text x="{(M_LEFT + W - M_RIGHT) / 2}" y="{H - 10}" class="label">{esc(self.xlabel)}</text>',
            f'<text x="16" y="{(M_TOP + H - M_BOTTOM) / 2}" class="label" '
            f'transform="rotate(-90 16 {(M_TOP + H - M_BOTTOM) / 2})">{esc(self.ylabel)}</text>',
        ]
        return out


def _x_label(px: float, label: str) -> str:
    """A label under the x axis at ``px``."""
    return f'<text x="{px:.1f}" y="{H - M_BOTTOM + 16}" class="xtick">{esc(label)}</text>'


def _x_tick(px: float, label: str) -> list[str]:
    """A vertical grid line at ``px`` and its label."""
    return [f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{M_TOP}" y2="{H - M_BOTTOM}" class="grid"/>', _x_label(px, label)]


def _pad(lo: float, hi: float, frac: float = 0.08) -> tuple[float, float]:
    span = (hi - lo) or abs(hi) or 1.0
    return lo - span * frac, hi + span * frac


# Point labels: 11 px text (the page's ``svg .pt``), their width estimated from their length. DejaVu Sans,
# a wide system-ui fallback, takes 0.47-0.64 em per character on the labels these plots carry.
PT_PX = 11
EM_PER_CHAR = 0.65
GAP = 9  # from a point's centre to its label; the dot's radius is 5
LINE = 14  # between the rows a label may move to, above or below its point
Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _text_box(x: float, baseline: float, text: str, anchor: str) -> Box:
    """The estimated box of a point label: ascenders 0.9 em above the baseline, descenders 0.25 em below."""
    w = len(text) * PT_PX * EM_PER_CHAR
    x0 = x - w if anchor == "end" else x
    return x0, baseline - 0.9 * PT_PX, x0 + w, baseline + 0.25 * PT_PX


def _overlap(a: Box, b: Box) -> float:
    w, h = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def _spots(px: float, py: float) -> Iterator[tuple[float, float, str, bool]]:
    """Where the label of the point at ``(px, py)`` may go, best first: ``(x, baseline, anchor, moved)``.

    Beside the point on its preferred side (the left for points in the right 30% of the plot, where a
    label would run off it), then on the other; then in rows ``LINE`` px above and below, nearest first,
    a little further out, with a leader line back to the point."""
    sides = ("end", "start") if px > W * 0.7 else ("start", "end")
    for k in range(int((H - M_TOP - M_BOTTOM) // LINE) + 1):
        for dy in (0,) if k == 0 else (-k * LINE, k * LINE):
            for anchor in sides:
                gap = GAP if dy == 0 else GAP + 6
                yield px + gap if anchor == "start" else px - gap, py + dy + 4, anchor, dy != 0


def _place_labels(points: list[tuple[str, float, float]]) -> list[tuple[float, float, str, bool]]:
    """A spot from :func:`_spots` for each ``(label, px, py)``, greedily in the points' order (deterministic):
    the first whose estimated box stays inside the plot area and overlaps neither a label placed before
    nor a dot; in a plot too crowded for that, the one that overlaps least."""
    area = (M_LEFT + 2, M_TOP, W - 2, H - M_BOTTOM)
    taken = [(px - 6, py - 6, px + 6, py + 6) for _, px, py in points]  # the dots, then each label placed
    out = []
    for label, px, py in points:
        best, best_cost = None, math.inf
        for spot in _spots(px, py):
            box = _text_box(spot[0], spot[1], label, spot[2])
            if box[0] < area[0] or box[1] < area[1] or box[2] > area[2] or box[3] > area[3]:
                continue
            cost = sum(_overlap(box, t) for t in taken)
            if cost < best_cost:
                best, best_cost = spot, cost
            if cost == 0:
                break
        best = best or next(_spots(px, py))  # no spot inside the plot: a label longer than it
        taken.append(_text_box(best[0], best[1], label, best[2]))
        out.append(best)
    return out


def scatter_plot(points: list[tuple[str, float, float, str]], title: str, xlabel: str, ylabel: str) -> str:
    """Labelled points ``(label, x, y, colour)``; labels of points close together do not overlap (see
    :func:`_place_labels`). Each point is one ``<g class="point">``: leader line (if any), dot, label."""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    f = _Frame(title, xlabel, ylabel, _pad(min(xs), max(xs)), _pad(min(ys), max(ys)))
    out = f.open()
    at = [(label, f.px(x), f.py(y)) for label, x, y, _ in points]
    for (label, x, y, color), (_, px, py), (tx, ty, anchor, leader) in zip(points, at, _place_labels(at), strict=True):
        out.append('<g class="point">')
        if leader:  # drawn first: the dot covers its start
            end = tx - 2 if anchor == "start" else tx + 2
            out.append(f'<line x1="{px:.1f}" y1="{py:.1f}" x2="{end:.1f}" y2="{ty - 4:.1f}" class="leader"/>')
        out.append(
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{color}"><title>{esc(label)}: '
            f"{_fmt(x)}, {y:.3f}</title></circle>"
        )
        out.append(f'<text x="{tx:.1f}" y="{ty:.1f}" class="pt" text-anchor="{anchor}">{esc(label)}</text>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)


def bar_plot(
    categories: list[str],
    series: list[tuple[str, list[float | None], str]],
    title: str,
    ylabel: str,
    *,
    reference: float | None = None,
    stacked: bool = False,
) -> str:
    """Grouped (or stacked) bars: one group per category, one bar per series ``(name, values, colour)``."""
    vals = [v for _, vs, _ in series for v in vs if v is not None]
    if stacked:
        vals = [sum(vs[i] or 0 for _, vs, _ in series) for i in range(len(categories))]
    top = max([*vals, reference or 0, 1e-9])
    f = _Frame(title, "", ylabel, (0.0, 0.0), (0.0, top * 1.1))
    out = f.open(x_ticks=False)
    group_w = (W - M_LEFT - M_RIGHT) / len(categories)
    n = 1 if stacked else len(series)
    bar_w = min(40.0, group_w * 0.8 / n)
    for ci, cat in enumerate(categories):
        gx = M_LEFT + group_w * ci + (group_w - bar_w * n) / 2
        base = 0.0
        for si, (name, values, color) in enumerate(series):
            v = values[ci]
            if v is None:
                continue
            x = gx + (0 if stacked else bar_w * si)
            y_top, y_bot = f.py(base + v), f.py(base)
            out.append(
                f'<rect x="{x:.1f}" y="{y_top:.1f}" width="{bar_w - 2:.1f}" height="{max(y_bot - y_top, 0):.1f}" '
                f'fill="{color}"><title>{esc(name)} / {esc(cat)}: {_fmt(v)}</title></rect>'
            )
            if not stacked:
                out.append(f'<text x="{x + bar_w / 2 - 1:.1f}" y="{y_top - 3:.1f}" class="val">{_fmt(v)}</text>')
            if stacked:
                base += v
        out.append(_x_label(M_LEFT + group_w * (ci + 0.5), cat))
    if reference is not None:
        py = f.py(reference)
        out.append(f'<line x1="{M_LEFT}" x2="{W - M_RIGHT}" y1="{py:.1f}" y2="{py:.1f}" class="ref"/>')
    out.append("</svg>")
    return "\n".join(out) + _legend([(name, color) for name, _, color in series])


def line_plot(
    series: list[tuple[str, list[float], str]],
    title: str,
    xlabel: str,
    ylabel: str,
    *,
    x_marks: list[tuple[int, str]] = (),
) -> str:
    """One line per series ``(name, y values at x = 0, 1, ...)``; ``x_marks`` label some x positions."""
    n = max(len(ys) for _, ys, _ in series)
    finite = [y for _, ys, _ in series for y in ys if math.isfinite(y)]
    f = _Frame(title, xlabel, ylabel, (0.0, max(n - 1, 1)), _pad(min(finite), max(finite), 0.05))
    out = f.open(x_ticks=not x_marks)
    for x, label in x_marks:
        out += _x_tick(f.px(x), label)
    for name, ys, color in series:
        pts = " ".join(f"{f.px(i):.1f},{f.py(y):.1f}" for i, y in enumerate(ys) if math.isfinite(y))
        out.append(
            f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5">'
            f"<title>{esc(name)}</title></polyline>"
        )
    out.append("</svg>")
    return "\n".join(out) + _legend([(name, color) for name, _, color in series])


def _legend(items: list[tuple[str, str]]) -> str:
    spans = "".join(f'<span><i style="background:{c}"></i>{esc(n)}</span>' for n, c in items)
    return f'<div class="legend">{spans}</div>'
