"""Tiny from-config models of every architecture in quantkit's table (importable by tests)."""

from __future__ import annotations

import torch
import transformers

# Tiny, but with GQA where the architecture has it and odd-ish sizes, so shape bugs show.
_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(_COMMON, intermediate_size=96, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(_COMMON, intermediate_size=96, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(_COMMON, intermediate_size=96, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16)),
    "phi3": (
        "Phi3Config",
        dict(
            _COMMON,
            intermediate_size=96,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "gemma": ("GemmaConfig", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16)),
    "gemma2": ("Gemma2Config", dict(_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16)),
    "gemma3_text": (
        "Gemma3TextConfig",
        dict(_COMMON, intermediate_size=96, num_key_value_heads=2, head_dim=16),
    ),
    "opt": (
        "OPTConfig",
        dict(
            vocab_size=256,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=96,
            word_embed_proj_dim=64,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2),
    ),
    "falcon-sequential": ("FalconConfig", dict(_COMMON, parallel_attn=False, new_decoder_architecture=False)),
    "falcon-parallel": ("FalconConfig", dict(_COMMON, parallel_attn=True, new_decoder_architecture=False)),
    "falcon-new": ("FalconConfig", dict(_COMMON, new_decoder_architecture=True, num_kv_heads=2)),
}


def make_tiny(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model; norm weights/biases randomized so that a wrong smoothing fold shows."""
    cls_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "ln" in n:
                p.copy_(p + 0.5 * torch.rand_like(p) + (0.5 if p.ndim == 1 and "bias" not in n else 0))
    return model


def make_lively(name: str, scheme: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny model whose greedy tokens vary along the sequence, optionally quantized (``scheme``).

    Weights are redrawn as N(0, 1/fan_in): with transformers' N(0, 0.02) init a tiny model repeats
    one token forever, which would hide a position bug in a decoder. W8A8 is calibrated on random ids.
    """
    import quantkit
    from quantkit.core.calibration import collect_stats
    from quantkit.core.modules import QUANT_MODULES

    model = make_tiny(name, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    if scheme is not None:
        stats = None
        if scheme == "w8a8":
            samples = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
            targets = quantkit.select_targets(model, quantkit.QuantConfig())
            stats = collect_stats(model, samples, targets, progress=False)
        quantkit.quantize(model, quantkit.QuantConfig(scheme=scheme), stats, progress=False)
        assert any(isinstance(m, QUANT_MODULES[scheme]) for m in model.modules())
    return model
