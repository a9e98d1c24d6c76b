"""Write a tiny random-weight Llama with its own small tokenizer: a model folder for smoke tests where
nothing can be downloaded (the GPU check, CI).

The tokenizer is a byte-level BPE trained in a second on the shipped calibration text (Persuasion) (``--vocab``
tokens); the model is built from a config (``--layers``, ``--hidden``; bf16, seeded), so its
perplexity means nothing; the point is that every command runs end to end on it.

    python eval/tiny_model.py --out /tmp/tiny-llama
    quantkit run --model /tmp/tiny-llama --out /tmp/tiny-run --windows 2 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_bpe(text: str, vocab: int, special: str):
    """A byte-level BPE tokenizer of ``vocab`` tokens trained on ``text`` (a second or so), with
    ``special`` as its BOS and EOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=special, bos_token=special)


def write_tiny_model(out: Path, *, layers: int = 2, hidden: int = 128, vocab: int = 512, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    text = (ROOT / "quantkit" / "data" / "persuasion.txt").read_text(encoding="utf-8")
    tokenizer = train_bpe(text, vocab, "<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512, help="tokenizer vocabulary (default: 512)")
    args = p.parse_args(argv)
    write_tiny_model(args.out, layers=args.layers, hidden=args.hidden, vocab=args.vocab)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
