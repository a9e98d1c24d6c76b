"""Peak memory of ``quantkit.load`` against the checkpoint's bytes (bar: peak <= 1.3x the checkpoint).

Builds a from-config Llama with random weights (``torch.manual_seed(0)``; about 1 GB in bf16 with the
defaults: hidden 1024, intermediate 4096, 24 layers, 16 heads, 8 KV heads, vocab 32000), quantizes it
W8A8 with naive smoothing (``QuantConfig(scheme="w8a8", smoothing="none")``: no calibration needed)
and saves it sharded (``--shard``, 200MB by default). Then, in a fresh Python process, imports the
libraries, resets the peak RSS (writing ``5`` to ``/proc/self/clear_refs`` sets ``VmHWM`` to the
current RSS, as :mod:`quantkit.evaluation.measure` does), calls ``quantkit.load(DIR)`` and reads
``VmHWM``: the peak bytes of loading are ``VmHWM`` minus the RSS after the imports.

    python eval/bench_load.py                                  # ~1 GB bf16 model, a few minutes on 2 cores
    python eval/bench_load.py --layers 4 --hidden 512          # a quick run
    python eval/bench_load.py --out bench_load.json --keep ck  # keep the checkpoint in ck/

Linux only (``/proc/self/status``). Prints one JSON object and writes it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BAR = 1.3  # the bar: peak memory of loading <= 1.3x the checkpoint's bytes
ROOT = Path(__file__).resolve().parents[1]


def child(folder: str) -> dict:
    """Run in a fresh process: peak RSS of ``quantkit.load(folder)`` above the RSS after the imports."""
    import accelerate  # noqa: F401  (what load imports, imported before the baseline)
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import quantkit
    from quantkit.evaluation.measure import release_free_heap, status_bytes

    torch.set_grad_enabled(False)
    release_free_heap()
    baseline = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0, proc(5))
    t0 = time.perf_counter()
    model = quantkit.load(folder)
    seconds = time.perf_counter() - t0
    peak = status_bytes("VmHWM")
    after = status_bytes("VmRSS")
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_bytes": peak - baseline,
        "rss_after_load_bytes": after - baseline,
        "model_state_bytes": model_bytes,
        "load_seconds": round(seconds, 2),
    }


def build_checkpoint(args: argparse.Namespace, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import quantkit
    from quantkit import QuantConfig

    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=args.vocab,
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    quantkit.quantize(model, QuantConfig(scheme="w8a8", smoothing="none"), progress=False)
    quantkit.save(model, out, max_shard_size=args.shard, overwrite=True)
    files = sorted(out.glob("*.safetensors"))
    return {
        "model": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers")}
        | {"vocab_size": args.vocab, "float_bf16_bytes": float_bytes},
        "scheme": "W8A8 naive per-token (int8 embeddings)",
        "max_shard_size": args.shard,
        "shards": len(files),
        "checkpoint_bytes": sum(f.stat().st_size for f in files),
        "build_seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size; intermediate is 4x, heads hidden/64")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard", default="200MB", help="max shard size of the saved checkpoint")
    p.add_argument("--keep", type=Path, help="write the checkpoint here and keep it (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("BENCH_LOAD " + json.dumps(child(args.child)))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench_load-") as tmp:
        folder = args.keep or Path(tmp) / "ck"
        result = {"command": shlex.join([sys.executable, *sys.argv])} | build_checkpoint(args, folder)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(folder)], capture_output=True, text=True, env=env
        )
        line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH_LOAD ")), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stderr[-4000:])
            return 1
        result |= json.loads(line.split(" ", 1)[1])
    result["ratio"] = round(result["peak_bytes"] / result["checkpoint_bytes"], 3)
    result["bar"] = BAR
    result["within_bar"] = result["ratio"] <= BAR
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if result["within_bar"] else 3


if __name__ == "__main__":
    sys.exit(main())
