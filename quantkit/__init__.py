"""quantkit: INT8 post-training quantization for Hugging Face causal language models.

Typical use::

    import quantkit
    model, tokenizer, _ = quantkit.load_float("smollm2-135m")
    stats = quantkit.calibrate(model, tokenizer)                  # shipped calibration text
    quantkit.quantize(model, quantkit.QuantConfig(scheme="w8a8"), stats)
    quantkit.save(model, "smollm2-w8a8", tokenizer)

    model = quantkit.load("smollm2-w8a8")                         # in an inference service
    # or, after `import quantkit`: AutoModelForCausalLM.from_pretrained("smollm2-w8a8")
"""

__version__ = "0.1.0"

from . import _hf_hook
from .checkpoint import load, read_quant_config, save
from .config import QuantConfig
from .errors import QuantkitError
from .models import load_float
from .quantize import calibrate, quantize, select_targets

__all__ = [
    "QuantConfig",
    "QuantkitError",
    "__version__",
    "calibrate",
    "load",
    "load_float",
    "quantize",
    "read_quant_config",
    "save",
    "select_targets",
]

# Make AutoModelForCausalLM.from_pretrained load quantkit checkpoints (cheap; see quantkit._hf_hook).
_hf_hook.install()
