"""Reports: eval results files in, one side-by-side comparison out."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import QuantkitError
from ..formats.output_dir import write_text_atomic


def read_results(paths: list[str | Path]) -> list[dict[str, Any]]:
    results = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise QuantkitError(f"results file {p} not found; create it with quantkit eval")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QuantkitError(f"{p} is not a quantkit results JSON file") from None
        if not isinstance(data, dict) or data.get("schema") != "quantkit.eval/1":
            raise QuantkitError(f"{p} is not a quantkit results file (no schema quantkit.eval/1)")
        _check_results(p, data)
        results.append(data)
    return results


def _check_results(path: Path, data: dict[str, Any]) -> None:
    """The fields a report reads, of the right kinds; perplexities finite and positive."""
    how = "; write it again with quantkit eval"
    if not isinstance(data.get("protocol"), dict):
        raise QuantkitError(f"{path} has no protocol block{how}")
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise QuantkitError(f"{path} has no rows of results{how}")
    names = [r.get("name") for r in rows]
    if data.get("baseline") not in names:
        raise QuantkitError(f"{path}: its baseline {data.get('baseline')!r} is not one of its rows{how}")
    for r in rows:
        ppl = r.get("perplexity")
        if isinstance(ppl, bool) or not isinstance(ppl, (int, float)) or not math.isfinite(ppl) or ppl <= 0:
            raise QuantkitError(f"{path}: row {r.get('name')!r} has perplexity {ppl!r}, not a positive number{how}")


MIB = 2**20


def mib(n: int | None, decimals: int = 1) -> str:
    """``n`` bytes for a table, e.g. ``12.3 MiB``; ``—`` when unknown."""
    return "—" if n is None else f"{n / MIB:.{decimals}f} MiB"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def embedding_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per way the quantized variants store their embeddings ("all weights" depends on it)."""
    from ..core.record import QuantRecord

    how: dict[str, list[str]] = {}
    for r in rows:
        if r.get("config"):
            how.setdefault(QuantRecord.from_dict(r["config"]).embeddings_label, []).append(r["name"])
    return [f"Quantized variants ({', '.join(names)}): {desc}." for desc, names in how.items()]


def features_text(env: dict[str, Any]) -> str:
    """``, avx2 avx512f ..., int8 GEMV vnni, W8A16 GEMV avx512`` from the environment's CPU features
    (results since they were recorded)."""
    f = env.get("cpu_features") or {}
    gemv, w16, gemm = f.get("int8_gemv"), f.get("w8a16_gemv"), f.get("int8_gemm")
    return (
        (", " + " ".join(f["flags"]) if f.get("flags") else "")
        + (f", int8 GEMV {gemv}" if gemv else "")
        + (f", W8A16 GEMV {w16}" if w16 else "")
        + (f", int8 GEMM {gemm}" if gemm else "")
    )


def format_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One sentence per row measured in another format than quantkit's (a compressed-tensors export):
    how it was loaded and what that means for its figures."""
    return [
        f"{r['name']}: {r['format']} export, {r['loaded_by']}; {r['note']}. Speed not measured: transformers "
        "runs it with float weights, not the int8 kernels vLLM serves it with."
        for r in rows
        if r.get("format")
    ]


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows with derived columns: drift vs the baseline, byte and speed ratios vs bf16/fp32."""
    rows = results["rows"]
    by_name = {r["name"]: r for r in rows}
    base = by_name.get(results["baseline"])
    bf16 = by_name.get("float (bfloat16)")
    fp32 = by_name.get("float (float32)")
    out = []
    for r in rows:
        d = dict(r)
        if base and r.get("perplexity") is not None and r is not base:
            d["drift_pct"] = 100 * (r["perplexity"] / base["perplexity"] - 1)
        ref = bf16 or base
        if ref:
            d["linear_bytes_vs_bf16"] = r["weight_bytes"]["linear"] / ref["weight_bytes"]["linear"]
            d["total_bytes_vs_bf16"] = r["weight_bytes"]["total"] / ref["weight_bytes"]["total"]
            mem, ref_mem = r.get("speed", {}).get("peak_memory_bytes"), ref.get("speed", {}).get("peak_memory_bytes")
            if mem and ref_mem:
                d["peak_memory_vs_bf16"] = mem / ref_mem
        for tag, ref in (("bf16", bf16), ("fp32", fp32)):
            if ref and "speed" in r and "speed" in ref:
                for k in ("prefill_tok_s", "decode_tok_s"):
                    d[f"{k}_vs_{tag}"] = r["speed"][k] / ref["speed"][k]
        out.append(d)
    return out


# The comparison table's columns, in the Markdown and the HTML report alike.
COLUMNS = (
    "variant", "perplexity", "drift", "linear weights", "vs bf16", "all weights", "vs bf16", "checkpoint",
    "prefill tok/s", "x bf16", "x fp32", "decode tok/s", "x bf16", "x fp32",
)  # fmt: skip
MEMORY_COLUMNS = ("peak memory", "vs bf16")  # where the results measured peak memory
SPEED_COLUMNS = slice(COLUMNS.index("prefill tok/s"), COLUMNS.index("prefill tok/s") + 6)  # without speed: left out


def table_text(rows: list[dict[str, Any]], *, memory_decimals: int = 1) -> tuple[list[str], list[list[str]]]:
    """``(column names, cells)`` of the comparison table for :func:`table_rows`; one list of cells per
    row, each without the ``variant`` cell (the reports write the name their own way). Results without
    speed measurements (``--no-speed``) get no speed columns."""
    with_mem = any("peak_memory_bytes" in r.get("speed", {}) for r in rows)
    with_speed = any("speed" in r for r in rows)
    body = []
    for r in rows:
        sp = r.get("speed", {})

        def ratio(key: str, row=r) -> str:
            return f"{row[key]:.2f}x" if key in row else "—"

        def tok_s(key: str, fmt: str, sp=sp) -> str:
            return format(sp[key], fmt) if key in sp else "—"

        cells = [
            f"{r['perplexity']:.3f}" if r.get("perplexity") is not None else "—",
            f"{r['drift_pct']:+.2f}%" if "drift_pct" in r else "baseline" if r.get("kind") == "float" else "—",
            mib(r["weight_bytes"]["linear"]),
            _pct(r.get("linear_bytes_vs_bf16")),
            mib(r["weight_bytes"]["total"]),
            _pct(r.get("total_bytes_vs_bf16")),
            mib(r.get("checkpoint_bytes")),
            tok_s("prefill_tok_s", ".0f"),
            ratio("prefill_tok_s_vs_bf16"),
            ratio("prefill_tok_s_vs_fp32"),
            tok_s("decode_tok_s", ".1f"),
            ratio("decode_tok_s_vs_bf16"),
            ratio("decode_tok_s_vs_fp32"),
        ]
        if not with_speed:  # cells lack the variant column: the slice is one to the left
            del cells[SPEED_COLUMNS.start - 1 : SPEED_COLUMNS.stop - 1]
        if with_mem:
            cells += [mib(sp.get("peak_memory_bytes"), memory_decimals), _pct(r.get("peak_memory_vs_bf16"))]
        body.append(cells)
    head = [c for i, c in enumerate(COLUMNS) if with_speed or not SPEED_COLUMNS.start <= i < SPEED_COLUMNS.stop]
    return [*head, *(MEMORY_COLUMNS if with_mem else ())], body


DECODE_METHODS = {
    "cpu_graph": "each step a replayed CPU graph",
    "cuda_graph": "each step a replayed CUDA graph",
    "cpu": "eager steps",
    "cuda": "eager steps",
}


def decode_method_text(rows: list[dict[str, Any]]) -> str:
    """How decode was run (static KV cache; graph replays or eager steps), and the CPU graphs' capture time."""
    methods = [r["speed"].get("method") for r in rows if "speed" in r]
    names = sorted({DECODE_METHODS[m] for m in methods if m in DECODE_METHODS})
    if not names:
        return ""
    captures = [r["speed"]["capture_seconds"] for r in rows if "capture_seconds" in r.get("speed", {})]
    capture = f", captured once in at most {max(captures):.2f} s, untimed" if captures else ""
    return f"; decode with a static KV cache, {' or '.join(names)}{capture}"


def markdown(all_results: list[dict[str, Any]]) -> str:
    lines = ["# quantkit report", ""]
    for results in all_results:
        proto = results["protocol"]
        env = results["environment"]
        rows = table_rows(results)
        head, body = table_text(rows)
        lines += [
            f"Perplexity: {proto['windows']} windows x {proto['window']} tokens of {proto['text']} "
            f"({proto['tokens_scored']} tokens scored, {proto['perplexity_dtype']} activations). "
            + (
                f"Speed: {', '.join(proto['speed_dtypes'])} baselines, quantized models in {proto['speed_dtypes'][0]}, "
                f"on {proto['device']}{decode_method_text(rows)}."
                if any("speed" in r for r in rows)
                else f"Speed: not measured (--no-speed); on {proto['device']}."
            ),
            "",
            "| " + " | ".join(head) + " |",
            "|---" + "|---:" * (len(head) - 1) + "|",
            *("| " + " | ".join([r["name"], *cells]) + " |" for r, cells in zip(rows, body, strict=True)),
        ]
        notes = embedding_notes(rows) + format_notes(rows)
        lines += ["", *notes, *([""] if notes else [])]
        lines += [
            f"Machine: {env.get('cpu')} ({env.get('threads')} threads{features_text(env)})"
            f"{', ' + env['gpu'] if 'gpu' in env else ''}; "
            f"torch {env['torch']}, transformers {env['transformers']}, quantkit {env['quantkit']}.",
            f"Command: `{results['command']}`",
            "",
        ]
    return "\n".join(lines)


def write_markdown(all_results: list[dict[str, Any]], out: str | Path) -> Path:
    out = Path(out)
    write_text_atomic(out, markdown(all_results))
    return out
