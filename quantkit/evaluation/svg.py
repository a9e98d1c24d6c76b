"""Small inline-SVG plots for the HTML report: scatter, grouped or stacked bars, and lines.

Each plot is a self-contained ``<svg>`` string (plus an HTML legend where it has series); the page's
CSS styles the classes used here (``title``, ``label``, ``xtick``, ``ytick``, ``grid``, ...).
"""

from __future__ import annotations

import html
import math
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


def scatter_plot(points: list[tuple[str, float, float, str]], title: str, xlabel: str, ylabel: str) -> str:
    """Labelled points ``(label, x, y, colour)``."""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    f = _Frame(title, xlabel, ylabel, _pad(min(xs), max(xs)), _pad(min(ys), max(ys)))
    out = f.open()
    for i, (label, x, y, color) in enumerate(points):
        px, py = f.px(x), f.py(y)
        anchor = "end" if px > W * 0.7 else "start"
        dx = -8 if anchor == "end" else 8
        dy = -6 if i % 2 == 0 else 14  # alternate so that points close together stay readable
        out.append(
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{color}"><title>{esc(label)}: '
            f"{_fmt(x)}, {y:.3f}</title></circle>"
        )
        out.append(f'<text x="{px + dx:.1f}" y="{py + dy:.1f}" class="pt" text-anchor="{anchor}">{esc(label)}</text>')
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
