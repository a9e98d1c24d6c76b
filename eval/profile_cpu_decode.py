"""Where a CPU decode step spends its time: torch.profiler over greedy decoding with a static KV cache.

Loads a quantkit checkpoint (or, with ``--float``, a float model folder / ``smollm2-135m``) in bf16,
prefills a prompt, then profiles ``--tokens`` decode steps of :class:`quantkit.evaluation.fastgen.StaticDecoder`
(the path ``quantkit eval`` times): replays of the recorded CPU graph, or with ``--eager`` the eager
Python forward. Prints wall time per token, the ops by self CPU time, and a breakdown into int8
linears, attention and the rest. A replayed step calls quantkit's linears as dispatcher ops
(``quantkit::w8a8_linear``...), which the profiler lists; an eager step calls them through the
extension's Python bindings, so there each quantized module's forward is wrapped in a profiler
range (``quantkit linear``) to count them.

    OMP_NUM_THREADS=2 python eval/profile_cpu_decode.py smollm2-w8a8
    OMP_NUM_THREADS=2 python eval/profile_cpu_decode.py smollm2-w8a8 --eager          # Python forward per step
    QUANTKIT_GEMV=0 OMP_NUM_THREADS=2 python eval/profile_cpu_decode.py smollm2-w8a8  # _int_mm instead of the GEMV
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import quantkit
from quantkit.core.modules import QUANT_MODULES, Int8TiedHead
from quantkit.evaluation.fastgen import StaticDecoder


def _label_linears(model: torch.nn.Module) -> None:
    """Wrap every quantized module's forward in a profiler range, so fused C++ calls are counted."""
    for module in model.modules():
        if isinstance(module, (*QUANT_MODULES.values(), Int8TiedHead)):
            forward = module.forward

            def labelled(*args, _forward=forward, **kwargs):
                with record_function("quantkit linear"):
                    return _forward(*args, **kwargs)

            module.forward = labelled


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="quantkit checkpoint folder (or a float model with --float)")
    p.add_argument("--float", action="store_true", help="MODEL is a float model (folder or smollm2-135m)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32, help="decode steps profiled (default: %(default)s)")
    p.add_argument("--eager", action="store_true", help="run the Python forward per step, not the CPU graph")
    args = p.parse_args(argv)

    if args.float:
        model = quantkit.load_float(args.model, dtype=torch.bfloat16)[0]
    else:
        model = quantkit.load(args.model, dtype=torch.bfloat16)
    model.eval()
    torch.manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens))
    max_len = args.prompt_tokens + args.tokens + 8
    decoder = StaticDecoder(model, max_len=max_len, cpu_graph=False if args.eager else None)
    with torch.no_grad():
        decoder.prefill(prompt)
        decoder.decode(4)  # warm: extension built, caches allocated
        decoder.prefill(prompt)
        t0 = time.perf_counter()
        decoder.decode(args.tokens)
        per_token = (time.perf_counter() - t0) / args.tokens
        if not decoder.uses_cpu_graph:
            _label_linears(model)
        decoder.prefill(prompt)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decoder.decode(args.tokens)
    events = {e.key: e for e in prof.key_averages()}

    def total_ms(key: str) -> float:
        e = events.get(key)
        return 0.0 if e is None else e.cpu_time_total / 1e3 / args.tokens

    linear = total_ms("quantkit linear") + sum(total_ms(k) for k in events if k.startswith("quantkit::"))
    # An eager step calls the composite op; a replayed one the CPU kernel it decomposes into.
    attention = total_ms("aten::scaled_dot_product_attention") or sum(
        total_ms(k) for k in events if k.startswith("aten::_scaled_dot_product_")
    )
    profiled = sum(e.self_cpu_time_total for e in events.values()) / 1e3 / args.tokens
    how = "CPU graph replay" if decoder.uses_cpu_graph else "eager forward"
    print(f"decode ({how}, unprofiled): {per_token * 1e3:.2f} ms/token ({1 / per_token:.1f} tok/s)")
    print(f"profiled: {profiled:.2f} ms/token, of which per token:")
    print(f"  quantized linears (int8 matmuls, their quantize/rescale; lm_head included): {linear:.2f} ms")
    print(f"  attention (scaled_dot_product_attention): {attention:.2f} ms")
    rest = profiled - linear - attention
    print(f"  everything else (norms, rotary, cache updates, embedding, Python and dispatch): {rest:.2f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
