"""Ablation on the default model: SmoothQuant alpha, pre-scale fallback, activation granularity, embeddings.

Usage: python eval/alpha_sweep.py [--windows 16]
Prints perplexity and drift vs the fp32 float model for each variant (README protocol, fp32 activations);
``emb=int8`` (the default) stores the tied embedding/lm_head as one int8 table, ``emb=float`` keeps it float.
"""

import argparse
import copy

import torch
import transformers

import quantkit
from quantkit import QuantConfig
from quantkit.evaluation import measure as evaluate

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens (default: 16)")
args = parser.parse_args()

d = quantkit.formats.float_models.prepare_default()
m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
tok = transformers.AutoTokenizer.from_pretrained(d)
batch = evaluate.windows(evaluate.eval_token_ids(tok), 512, args.windows)
stats = quantkit.calibrate(m, tok, progress=False)
p0 = evaluate.perplexity(m, batch, progress=False)
print(f"{'float (fp32)':45s} ppl={p0:.3f}", flush=True)
for cfg in [
    QuantConfig(smoothing="none"),
    QuantConfig(alpha=0.5, fallback_smoothing=False),
    QuantConfig(alpha=0.5),
    QuantConfig(alpha=0.65),
    QuantConfig(alpha=0.8),
    QuantConfig(alpha=0.5, activations="per_tensor"),
    QuantConfig(smoothing="none", activations="per_tensor"),
    QuantConfig(alpha=0.5, embeddings="float"),
    QuantConfig(scheme="w8a16"),
    QuantConfig(scheme="w8a16", embeddings="float"),
]:
    q = quantkit.quantize(copy.deepcopy(m), cfg, stats, progress=False)
    p = evaluate.perplexity(q, batch, progress=False)
    print(
        f"{cfg.label:45s} fallback={cfg.fallback_smoothing!s:5s} emb={cfg.embeddings:5s} "
        f"ppl={p:.3f} drift={100 * (p / p0 - 1):+.2f}%",
        flush=True,
    )
