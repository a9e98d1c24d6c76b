"""Self-contained HTML report: the comparison table and plots as inline SVG (no JavaScript, no CDN).

One section per results file: where the numbers come from (machine, versions, command, protocol),
the comparison table (one row per variant), and plots drawn by :mod:`quantkit.evaluation.svg`:

* perplexity against checkpoint size (the trade-off quantization makes);
* speed relative to bf16 by tokens per forward pass (decode: 1 token, prefill: the prompt);
* bytes by kind (quantized linear layers, float linear layers, everything else);
* per-layer output error (SQNR in dB, layer by layer), when the results carry it
  (see :mod:`quantkit.evaluation.layer_error`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..formats.output_dir import write_text_atomic
from .report_md import MIB, SPEED_COLUMNS, embedding_notes, features_text, format_notes, table_rows, table_text
from .svg import FLOAT_COLOR, PALETTE, bar_plot, esc, line_plot, scatter_plot


def _colors(rows: list[dict[str, Any]]) -> dict[str, str]:
    quantized = [r["name"] for r in rows if r.get("kind") != "float"]
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(quantized)}
    return {r["name"]: colors.get(r["name"], FLOAT_COLOR) for r in rows}


def _plots(results: dict[str, Any]) -> list[str]:
    rows = table_rows(results)
    colors = _colors(rows)
    figures = []

    pts = [
        (r["name"], (r.get("checkpoint_bytes") or r["weight_bytes"]["total"]) / MIB, r["perplexity"], colors[r["name"]])
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
                    ("quantized linear layers", [q / MIB for q in quant], PALETTE[0]),
                    ("float linear layers", [(li - q) / MIB for li, q in zip(linear, quant, strict=True)], PALETTE[1]),
                    (
                        "embeddings, lm_head, norms (int8 or float)",
                        [(t - li) / MIB for t, li in zip(total, linear, strict=True)],
                        FLOAT_COLOR,
                    ),
                ],
                "Model bytes in memory by kind",
                "MiB",
                stacked=True,
            ),
            "Parameters and buffers held in memory. Quantized linear layers: int8 weights and their scales; "
            "the embedding/lm_head bar holds int8 tables where the variant stores them so (see the note under "
            "the tables).",
        )
    )

    searched = [r for r in rows if (r.get("config") or {}).get("alpha_search")]
    if searched:
        figures.append(_alpha_search_figure(searched, colors))

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
                f"{esc(le.get('metric', 'output SQNR (dB) per quantized layer'))}, on {esc(le.get('tokens', '?'))} "
                f"tokens of {esc(le.get('text', '?'))}. Higher is better; 20 dB is 1% error power.",
            )
        )
    else:
        figures.append(
            '<figure class="empty"><p>No per-layer data in this results file: <code>quantkit run</code> and '
            "<code>quantkit eval</code> record it.</p></figure>"
        )
    return figures


def _alpha_search_figure(rows: list[dict[str, Any]], colors: dict[str, str]) -> str:
    """What ``alpha="auto"`` tried: the calibration perplexity increase at each candidate alpha."""
    first = rows[0]["config"]["alpha_search"]
    alphas = first["alphas"]
    series, chosen = [], []
    for r in rows:
        block = r["config"]["alpha_search"]
        if block["alphas"] != alphas:  # another grid: not on the same axis
            continue
        drift = [100 * (math.exp(v - block["float_loss"]) - 1) for v in block["calibration_loss"]]
        series.append((r["name"], drift, colors[r["name"]]))
        chosen.append(f"{esc(r['name'])}: {block['chosen']:g}")
    marks = [(i, f"{a:g}") for i, a in enumerate(alphas)]
    return _figure(
        line_plot(
            series,
            "alpha auto: calibration perplexity increase by alpha",
            "SmoothQuant alpha (every group)",
            "calibration perplexity vs float (%)",
            x_marks=marks,
        ),
        f"The model quantized at each candidate alpha, measured on {first.get('tokens', '?')} calibration tokens "
        f"(not the evaluation text); the lowest is kept. Chosen: {'; '.join(chosen)}.",
    )


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


def _tables(results: dict[str, Any]) -> str:
    """The comparison as two tables, accuracy and size, then speed and peak memory: as one table its
    16 columns overflowed the page. Each table fits the page's content width (see ``_CSS``); how the
    quantized variants store their embeddings follows as a note (in every variant's cell it was too wide).
    """
    rows = table_rows(results)
    head, body = table_text(rows, memory_decimals=0)
    cut = SPEED_COLUMNS.start  # variant .. checkpoint; then speed and peak memory, when measured
    out = [_table("Accuracy and size", head[:cut], [cells[: cut - 1] for cells in body], rows, scheme=True)]
    if len(head) > cut:
        speed_head = [head[0], *head[cut:]]
        out.append(_table("Speed and peak memory", speed_head, [cells[cut - 1 :] for cells in body], rows))
    notes = embedding_notes(rows) + format_notes(rows)
    if notes:
        out.append(f'<p class="note">{esc(" ".join(notes))}</p>')
    return "\n".join(out)


def _table(
    caption: str, head: list[str], body: list[list[str]], rows: list[dict[str, Any]], *, scheme: bool = False
) -> str:
    """One comparison table; the variant cell names its scheme under the name where ``scheme``."""
    out = [
        f'<div class="scroll"><table><caption>{esc(caption)}</caption><thead><tr>'
        + "".join(f"<th>{esc(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
    ]
    for r, cells in zip(rows, body, strict=True):
        cls = ' class="float"' if r.get("kind") == "float" else ""
        name = f"{esc(r['name'])}<br><small>{esc(_scheme(r))}</small>" if scheme else esc(r["name"])
        out.append(f"<tr{cls}><td>{name}</td>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _scheme(row: dict[str, Any]) -> str:
    cfg, fmt = row.get("config"), row.get("format")
    if not cfg:
        return f"{fmt} export, not made by quantkit" if fmt else f"float {row.get('dtype', '')}".strip()
    from ..core.record import QuantRecord

    label = QuantRecord.from_dict(cfg).label
    return f"{label}, {fmt} export" if fmt else label


def _provenance(results: dict[str, Any]) -> str:
    """Where the numbers come from: machine, versions, command, protocols (escaped HTML)."""
    env = results.get("environment", {})
    proto = results.get("protocol", {})
    gpu = f", {env['gpu']}" if env.get("gpu") else ""
    items = [
        ("machine", esc(f"{env.get('cpu', '?')} ({env.get('threads', '?')} threads, {env.get('machine', '?')}"
                        f"{features_text(env)}){gpu}")),
        ("versions", esc(f"quantkit {env.get('quantkit', '?')}, torch {env.get('torch', '?')}, "
                        f"transformers {env.get('transformers', '?')}, Python {env.get('python', '?')}")),
        ("command", f"<code>{esc(results.get('command', '?'))}</code>"),
        ("perplexity", esc(f"{proto.get('windows', '?')} windows x {proto.get('window', '?')} tokens of "
                          f"{proto.get('text', '?')} ({proto.get('tokens_scored', '?')} tokens scored), "
                          f"{proto.get('perplexity_dtype', '?')} activations")),
        ("speed", esc(f"{', '.join(proto.get('speed_dtypes', []))} float baselines; quantized models in "
                     f"{(proto.get('speed_dtypes') or ['?'])[0]}; on {proto.get('device', '?')}")),
    ]  # fmt: skip
    if "calibration" in results:
        c = results["calibration"]
        items.append(("calibration", esc(f"{c.get('samples')} x {c.get('seq_len')} tokens of {c.get('text')}")))
    if "wall_seconds" in results:
        items.append(("wall time", esc(f"{results['wall_seconds']} s")))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in items)
    return f'<table class="prov">{rows}</table>'


# The page's content is at most 1200 px wide (1232 px with its padding), so that it fits a 1400 px window;
# the comparison tables are kept narrower than that (tests/evaluation/test_report_layout.py estimates
# their width), a scheme under a variant's name wraps beyond 24em, and .scroll only matters on narrow screens.
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;
 padding:0 1rem;color:#1b1b1b}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
.sub{color:#666;margin-top:0}
table{border-collapse:collapse;margin:1rem 0;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .5rem;border-bottom:1px solid #e5e5e5;text-align:right}
td{white-space:nowrap}
th:first-child,td:first-child{text-align:left}
td small{color:#666;font-size:13px;display:inline-block;max-width:24em;white-space:normal}
caption{text-align:left;font-weight:600;color:#444;padding:.2rem 0}
.note{color:#555;font-size:.85rem}
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
svg .grid{stroke:#eee}svg .axis{stroke:#888}svg .ref{stroke:#c00;stroke-dasharray:4 3}svg .leader{stroke:#999}
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
        f"page written by quantkit {esc(__version__)}. Every number below comes from the run described above it.</p>",
    ]
    for i, results in enumerate(all_results, 1):
        title = esc(titles[i - 1] if titles else f"Results {i}")
        parts += [
            f"<h2>{title}</h2>",
            _provenance(results),
            _tables(results),
            '<div class="plots">',
            *_plots(results),
            "</div>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(all_results: list[dict[str, Any]], out: str | Path, titles: list[str] | None = None) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, html_report(all_results, titles))
    return out
