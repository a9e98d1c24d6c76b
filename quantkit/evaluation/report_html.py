"""Self-contained HTML report: the comparison table and plots as inline SVG (no JavaScript, no CDN).

One section per results file: where the numbers come from (machine, versions, command, protocol),
the comparison table (one row per variant), and plots drawn by the small SVG helpers below:

* perplexity against checkpoint size (the trade-off quantization makes);
* speed relative to bf16 by tokens per forward pass (decode: 1 token, prefill: the prompt);
* bytes by kind (quantized linear layers, float linear layers, everything else);
* per-layer output error (SQNR in dB, layer by layer), when the results carry it
  (see :mod:`quantkit.evaluation.layer_error`).
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from .report_md import table_rows

# Colour-blind-safe palette (Okabe-Ito); float baselines are drawn in grey.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
FLOAT_COLOR = "#8c8c8c"
W, H = 560, 340  # plot size in SVG user units
M_LEFT, M_RIGHT, M_TOP, M_BOTTOM = 64, 16, 36, 56


def _e(s: Any) -> str:
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
            f'aria-label="{_e(self.title)}" class="plot">',
            f'<text x="{W / 2}" y="20" class="title">{_e(self.title)}</text>',
        ]
        for y in self.yt:
            py = self.py(y)
            out.append(f'<line x1="{M_LEFT}" x2="{W - M_RIGHT}" y1="{py:.1f}" y2="{py:.1f}" class="grid"/>')
            out.append(f'<text x="{M_LEFT - 6}" y="{py + 4:.1f}" class="ytick">{_fmt(y, self.ystep)}</text>')
        if x_ticks:
            for x in self.xt:
                px = self.px(x)
                out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{M_TOP}" y2="{H - M_BOTTOM}" class="grid"/>')
                out.append(f'<text x="{px:.1f}" y="{H - M_BOTTOM + 16}" class="xtick">{_fmt(x, self.xstep)}</text>')
        out += [
            f'<line x1="{M_LEFT}" x2="{W - M_RIGHT}" y1="{H - M_BOTTOM}" y2="{H - M_BOTTOM}" class="axis"/>',
            f'<line x1="{M_LEFT}" x2="{M_LEFT}" y1="{M_TOP}" y2="{H - M_BOTTOM}" class="axis"/>',
            f'<text x="{(M_LEFT + W - M_RIGHT) / 2}" y="{H - 10}" class="label">{_e(self.xlabel)}</text>',
            f'<text x="16" y="{(M_TOP + H - M_BOTTOM) / 2}" class="label" '
            f'transform="rotate(-90 16 {(M_TOP + H - M_BOTTOM) / 2})">{_e(self.ylabel)}</text>',
        ]
        return out


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
            f'<circle cx="{px:.1f}" cy="{py:.1f}" r="5" fill="{color}"><title>{_e(label)}: '
            f"{_fmt(x)}, {y:.3f}</title></circle>"
        )
        out.append(f'<text x="{px + dx:.1f}" y="{py + dy:.1f}" class="pt" text-anchor="{anchor}">{_e(label)}</text>')
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
                f'fill="{color}"><title>{_e(name)} / {_e(cat)}: {_fmt(v)}</title></rect>'
            )
            if not stacked:
                out.append(f'<text x="{x + bar_w / 2 - 1:.1f}" y="{y_top - 3:.1f}" class="val">{_fmt(v)}</text>')
            if stacked:
                base += v
        out.append(
            f'<text x="{M_LEFT + group_w * (ci + 0.5):.1f}" y="{H - M_BOTTOM + 16}" class="xtick">{_e(cat)}</text>'
        )
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
        px = f.px(x)
        out.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{M_TOP}" y2="{H - M_BOTTOM}" class="grid"/>')
        out.append(f'<text x="{px:.1f}" y="{H - M_BOTTOM + 16}" class="xtick">{_e(label)}</text>')
    for name, ys, color in series:
        pts = " ".join(f"{f.px(i):.1f},{f.py(y):.1f}" for i, y in enumerate(ys) if math.isfinite(y))
        out.append(
            f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5">'
            f"<title>{_e(name)}</title></polyline>"
        )
    out.append("</svg>")
    return "\n".join(out) + _legend([(name, color) for name, _, color in series])


def _legend(items: list[tuple[str, str]]) -> str:
    spans = "".join(f'<span><i style="background:{c}"></i>{_e(n)}</span>' for n, c in items)
    return f'<div class="legend">{spans}</div>'


def _mib(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def _colors(rows: list[dict[str, Any]]) -> dict[str, str]:
    quantized = [r["name"] for r in rows if r.get("kind") != "float"]
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(quantized)}
    return {r["name"]: colors.get(r["name"], FLOAT_COLOR) for r in rows}


def _plots(results: dict[str, Any]) -> list[str]:
    rows = table_rows(results)
    colors = _colors(rows)
    figures = []

    pts = [
        (r["name"], _mib(r.get("checkpoint_bytes") or r["weight_bytes"]["total"]), r["perplexity"], colors[r["name"]])
        for r in rows
        if r.get("perplexity") is not None
    ]
    if pts:
        figures.append(
            _figure(
                scatter_plot(pts, "Perplexity vs checkpoint size", "checkpoint size (MiB)", "perplexity"),
                "Lower left is better. Size is the safetensors bytes on disk; perplexity per the protocol above.",
            )
        )

    timed = [r for r in rows if "prefill_tok_s_vs_bf16" in r]
    if timed:
        first = timed[0]["speed"]
        cats = [
            f"decode (1 token, {first.get('decode_tokens', '?')} steps)",
            f"prefill ({first['prefill_tokens']} tokens)",
        ]
        series = [
            (r["name"], [r.get("decode_tok_s_vs_bf16"), r.get("prefill_tok_s_vs_bf16")], colors[r["name"]])
            for r in timed
            if r["name"] != "float (bfloat16)"
        ]
        if series:
            figures.append(
                _figure(
                    bar_plot(
                        cats,
                        series,
                        "Speed relative to bf16, by tokens per forward pass",
                        "x bf16 tokens/s",
                        reference=1.0,
                    ),
                    "Tokens/s divided by the bf16 float model's, same machine and run; the line marks 1.0 "
                    "(above: faster than bf16).",
                )
            )

    names = [r["name"] for r in rows]
    quant = [r["weight_bytes"].get("quantized_linear", 0) for r in rows]
    linear = [r["weight_bytes"]["linear"] for r in rows]
    total = [r["weight_bytes"]["total"] for r in rows]
    figures.append(
        _figure(
            bar_plot(
                names,
                [
                    ("quantized linear layers", [_mib(q) for q in quant], PALETTE[0]),
                    ("float linear layers", [_mib(li - q) for li, q in zip(linear, quant, strict=True)], PALETTE[1]),
                    (
                        "embeddings, lm_head, norms (int8 or float)",
                        [_mib(t - li) for t, li in zip(total, linear, strict=True)],
                        FLOAT_COLOR,
                    ),
                ],
                "Model bytes in memory by kind",
                "MiB",
                stacked=True,
            ),
            "Parameters and buffers held in memory. Quantized linear layers: int8 weights and their scales; "
            "the embedding/lm_head bar holds int8 tables where the variant stores them so (see the table).",
        )
    )

    layered = [r for r in rows if r.get("layer_sqnr_db")]
    if layered:
        names0 = list(layered[0]["layer_sqnr_db"])
        marks = _block_marks(names0)
        series = [
            (r["name"], [r["layer_sqnr_db"].get(n, math.nan) for n in names0], colors[r["name"]]) for r in layered
        ]
        le = results.get("layer_error", {})
        figures.append(
            _figure(
                line_plot(
                    series,
                    "Per-layer output error",
                    "linear layers in model order (decoder block)",
                    "output SQNR (dB)",
                    x_marks=marks,
                ),
                f"{_e(le.get('metric', 'output SQNR (dB) per quantized layer'))}, on {_e(le.get('tokens', '?'))} "
                f"tokens of {_e(le.get('text', '?'))}. Higher is better; 20 dB is 1% error power.",
            )
        )
    else:
        figures.append(
            '<figure class="empty"><p>No per-layer data in this results file: <code>quantkit run</code> and '
            "<code>quantkit eval</code> record it.</p></figure>"
        )
    return figures


def _block_marks(names: list[str], max_marks: int = 8) -> list[tuple[int, str]]:
    """x positions where a new decoder block starts, labelled with its index (at most ``max_marks``)."""
    starts = []
    prev = None
    for i, n in enumerate(names):
        block = next((p for p in n.split(".") if p.isdigit()), None)
        if block != prev:
            starts.append((i, block or "-"))
            prev = block
    step = max(1, math.ceil(len(starts) / max_marks))
    return starts[::step]


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


def _table(results: dict[str, Any]) -> str:
    head = [
        "variant", "perplexity", "drift", "linear weights", "vs bf16", "all weights", "vs bf16", "checkpoint",
        "prefill tok/s", "x bf16", "x fp32", "decode tok/s", "x bf16", "x fp32",
    ]  # fmt: skip
    rows = table_rows(results)
    with_mem = any("peak_memory_bytes" in r.get("speed", {}) for r in rows)
    if with_mem:
        head += ["peak memory", "vs bf16"]
    out = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in rows:
        sp = r.get("speed", {})

        def ratio(key: str, row=r) -> str:
            return f"{row[key]:.2f}x" if key in row else "—"

        drift = f"{r['drift_pct']:+.2f}%" if "drift_pct" in r else "baseline" if r.get("kind") == "float" else "—"
        cells = [
            f"{r['perplexity']:.3f}" if r.get("perplexity") is not None else "—",
            drift,
            f"{r['weight_bytes']['linear'] / 2**20:.1f} MiB",
            f"{r['linear_bytes_vs_bf16'] * 100:.1f}%" if "linear_bytes_vs_bf16" in r else "—",
            f"{r['weight_bytes']['total'] / 2**20:.1f} MiB",
            f"{r['total_bytes_vs_bf16'] * 100:.1f}%" if "total_bytes_vs_bf16" in r else "—",
            f"{r['checkpoint_bytes'] / 2**20:.1f} MiB" if r.get("checkpoint_bytes") is not None else "—",
            f"{sp['prefill_tok_s']:.0f}" if "prefill_tok_s" in sp else "—",
            ratio("prefill_tok_s_vs_bf16"),
            ratio("prefill_tok_s_vs_fp32"),
            f"{sp['decode_tok_s']:.1f}" if "decode_tok_s" in sp else "—",
            ratio("decode_tok_s_vs_bf16"),
            ratio("decode_tok_s_vs_fp32"),
        ]
        if with_mem:
            mem = sp.get("peak_memory_bytes")
            cells.append(f"{mem / 2**20:.0f} MiB" if mem is not None else "—")
            cells.append(f"{r['peak_memory_vs_bf16'] * 100:.1f}%" if "peak_memory_vs_bf16" in r else "—")
        cls = ' class="float"' if r.get("kind") == "float" else ""
        name = f"{_e(r['name'])}<br><small>{_e(_scheme(r))}</small>"
        out.append(f"<tr{cls}><td>{name}</td>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _scheme(row: dict[str, Any]) -> str:
    cfg = row.get("config")
    if not cfg:
        return f"float {row.get('dtype', '')}".strip()
    from ..config import QuantConfig

    config = QuantConfig.from_dict(cfg)
    return f"{config.label}; {config.embeddings_label}"


def _provenance(results: dict[str, Any]) -> str:
    """Where the numbers come from: machine, versions, command, protocols (escaped HTML)."""
    env = results.get("environment", {})
    proto = results.get("protocol", {})
    gpu = f", {env['gpu']}" if env.get("gpu") else ""
    items = [
        ("machine", _e(f"{env.get('cpu', '?')} ({env.get('threads', '?')} threads, {env.get('machine', '?')}){gpu}")),
        ("versions", _e(f"quantkit {env.get('quantkit', '?')}, torch {env.get('torch', '?')}, "
                        f"transformers {env.get('transformers', '?')}, Python {env.get('python', '?')}")),
        ("command", f"<code>{_e(results.get('command', '?'))}</code>"),
        ("perplexity", _e(f"{proto.get('windows', '?')} windows x {proto.get('window', '?')} tokens of "
                          f"{proto.get('text', '?')} ({proto.get('tokens_scored', '?')} tokens scored), "
                          f"{proto.get('perplexity_dtype', '?')} activations")),
        ("speed", _e(f"{', '.join(proto.get('speed_dtypes', []))} float baselines; quantized models in "
                     f"{(proto.get('speed_dtypes') or ['?'])[0]}; on {proto.get('device', '?')}")),
    ]  # fmt: skip
    if "calibration" in results:
        c = results["calibration"]
        items.append(("calibration", _e(f"{c.get('samples')} x {c.get('seq_len')} tokens of {c.get('text')}")))
    if "wall_seconds" in results:
        items.append(("wall time", _e(f"{results['wall_seconds']} s")))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in items)
    return f'<table class="prov">{rows}</table>'


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
 padding:0 1rem;color:#1b1b1b}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:1rem 0;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .5rem;border-bottom:1px solid #e5e5e5;text-align:right}
td{white-space:nowrap}
th:first-child,td:first-child{text-align:left}
td small{color:#666}
.scroll{overflow-x:auto}
thead th{background:#f4f6f8;border-bottom:2px solid #ccd}
tr.float td{color:#555;background:#fafafa}
table.prov th{text-align:left;color:#555;font-weight:600;vertical-align:top}
table.prov td{text-align:left;white-space:normal}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1.2rem}
figure{margin:0;border:1px solid #e5e5e5;border-radius:6px;padding:.6rem}
figure.empty{color:#777;display:flex;align-items:center}
figcaption{color:#555;font-size:.85rem;margin-top:.3rem}
svg.plot{width:100%;height:auto;display:block}
svg .title{font:600 14px system-ui,sans-serif;text-anchor:middle}
svg .label{font:12px system-ui,sans-serif;text-anchor:middle;fill:#333}
svg .xtick{font:11px system-ui,sans-serif;text-anchor:middle;fill:#444}
svg .ytick{font:11px system-ui,sans-serif;text-anchor:end;fill:#444}
svg .pt{font:11px system-ui,sans-serif;fill:#222}
svg .val{font:10px system-ui,sans-serif;text-anchor:middle;fill:#333}
svg .grid{stroke:#eee}svg .axis{stroke:#888}svg .ref{stroke:#c00;stroke-dasharray:4 3}
.legend{font-size:.85rem;display:flex;flex-wrap:wrap;gap:.4rem 1rem;margin-top:.3rem}
.legend i{display:inline-block;width:.8rem;height:.8rem;margin-right:.35rem;vertical-align:-.1rem;border-radius:2px}
code{font:13px ui-monospace,SFMono-Regular,Menlo,monospace;background:#f4f4f4;padding:.1rem .3rem;border-radius:3px;
 white-space:pre-wrap;word-break:break-all}
"""


def html_report(all_results: list[dict[str, Any]], titles: list[str] | None = None) -> str:
    """The whole page for one or more results files (``titles``: one heading per file)."""
    from .._version import __version__

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>quantkit report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>quantkit report</h1>",
        f'<p class="sub">{len(all_results)} results file{"s" if len(all_results) != 1 else ""}; '
        f"page written by quantkit {_e(__version__)}. Every number below comes from the run described above it.</p>",
    ]
    for i, results in enumerate(all_results, 1):
        title = _e(titles[i - 1] if titles else f"Results {i}")
        parts += [
            f"<h2>{title}</h2>",
            _provenance(results),
            f'<div class="scroll">{_table(results)}</div>',
            '<div class="plots">',
            *_plots(results),
            "</div>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(all_results: list[dict[str, Any]], out: str | Path, titles: list[str] | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(html_report(all_results, titles), encoding="utf-8")
    return out
