"""Batched greedy decode on CPU: eager steps vs CPU-graph replays, at several batch sizes, in one run.

For each batch size B, :func:`quantkit.evaluation.speed.time_decode` times ``--tokens`` decode steps
after a ``--prompt-tokens`` prompt (prefill untimed) twice: with the eager Python step
(``cpu_graph=False``) and with the recorded CPU graph (the default, what ``quantkit.Generator``
runs). Tokens/s count every row: ``B * tokens / seconds``. Medians of ``--repeats`` runs.

    OMP_NUM_THREADS=2 python eval/bench_decode_batch.py smollm2-w8a8 --batch-sizes 1,4,8 --out batch.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import quantkit
from quantkit.evaluation import measure
from quantkit.evaluation.speed import time_decode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="quantkit checkpoint folder")
    p.add_argument("--batch-sizes", default="1,4,8", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=32, help="decode steps timed (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (default: %(default)s)")
    p.add_argument("--out", type=Path, help="write the results as JSON to this file")
    args = p.parse_args(argv)

    model = quantkit.load(args.checkpoint, dtype=torch.bfloat16)
    rows = []
    for b in (int(v) for v in args.batch_sizes.split(",")):
        common = dict(prompt_len=args.prompt_tokens, batch_size=b, repeats=args.repeats)
        eager = time_decode(model, args.tokens, cpu_graph=False, **common)
        graph = time_decode(model, args.tokens, **common)
        rows.append(
            {
                "batch_size": b,
                "eager_tok_s": eager.tokens_per_s,
                "graph_tok_s": graph.tokens_per_s,
                "graph_method": graph.method,
                "capture_seconds": graph.capture_seconds,
            }
        )
        print(
            f"batch {b}: eager {eager.tokens_per_s:.1f} tok/s, {graph.method} {graph.tokens_per_s:.1f} tok/s "
            f"({graph.tokens_per_s / eager.tokens_per_s:.2f}x)"
        )
    if args.out:
        results = {
            "command": " ".join([sys.executable, *sys.argv]),
            "environment": measure.environment(),
            "checkpoint": str(args.checkpoint),
            "rows": rows,
        }
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
