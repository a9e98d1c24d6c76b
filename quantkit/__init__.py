"""quantkit: INT8 post-training quantization for Hugging Face causal language models.

Typical use::

    import quantkit
    model, tokenizer, _ = quantkit.load_float("smollm2-135m")
    stats = quantkit.calibrate(model, tokenizer)                  # shipped calibration text
    quantkit.quantize(model, quantkit.QuantConfig(scheme="w8a8"), stats)
    quantkit.save(model, "smollm2-w8a8", tokenizer)

    model = quantkit.load("smollm2-w8a8")                         # in an inference service
    generator = quantkit.Generator(model, max_len=1024)           # static KV cache, decode step captured once
    tokens = generator.generate(input_ids, 64, stop_tokens=[tokenizer.eos_token_id])
    # or, after `import quantkit`: AutoModelForCausalLM.from_pretrained("smollm2-w8a8")

    # quantize while loading a float model (transformers' quantization_config convention):
    model = AutoModelForCausalLM.from_pretrained("my-llama", quantization_config=quantkit.QuantkitConfig("w8a16"))
"""

from ._version import __version__
from .config import QuantConfig
from .core.quantize import calibrate, quantize, select_targets
from .core.record import QuantRecord
from .errors import QuantkitError
from .formats import hf_hook as _hf_hook
from .formats.float_models import load_float
from .formats.native import load, read_quant_config, read_record, save

__all__ = [
    "Generator",
    "QuantConfig",
    "QuantRecord",
    "QuantkitConfig",
    "QuantkitError",
    "__version__",
    "calibrate",
    "load",
    "load_float",
    "quantize",
    "read_quant_config",
    "read_record",
    "save",
    "select_targets",
]

# Make AutoModelForCausalLM.from_pretrained load quantkit checkpoints (cheap; see quantkit.formats.hf_hook).
_hf_hook.install()


def __getattr__(name: str):
    # QuantkitConfig subclasses transformers' QuantizationConfigMixin: imported on first use, as the
    # registration above is, so that `import quantkit` stays cheap.
    if name == "QuantkitConfig":
        from .formats.hf_quantizer import QuantkitConfig

        return QuantkitConfig
    if name == "Generator":  # imports transformers' cache classes: on first use too
        from .evaluation.fastgen import StaticDecoder

        return StaticDecoder
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
