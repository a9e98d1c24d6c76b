"""Train a small OPT model on a shipped Austen novel: a second, *trained* model of another
architecture than the default one (LayerNorm with biases, ReLU MLP, learned positions), built
offline, to check that quantization choices made on the default model carry over.

It trains on Pride and Prejudice (``eval/texts/``), so that the calibration text (Persuasion) and the
evaluation text (Emma) stay unseen, with its own byte-level BPE tokenizer, on the CPU:

    python eval/train_tiny.py --out /tmp/opt-austen              # ~10 minutes on 2 cores
    quantkit quantize /tmp/opt-austen --out /tmp/opt-a05 --alpha 0.5
    quantkit quantize /tmp/opt-austen --out /tmp/opt-auto --alpha auto
    quantkit eval /tmp/opt-a05 /tmp/opt-auto --baseline /tmp/opt-austen --out /tmp/opt.json --no-speed

The run is seeded; the folder records the training loss and settings in ``training.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "eval" / "texts" / "pride_and_prejudice.txt"
log = logging.getLogger("train_tiny")


def train(
    out: Path,
    *,
    layers: int = 4,
    hidden: int = 256,
    vocab: int = 4096,
    seq_len: int = 128,
    batch: int = 16,
    steps: int = 600,
    lr: float = 1.5e-3,
    seed: int = 0,
) -> dict:
    import torch
    from tiny_model import train_bpe  # eval/, beside this script
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(seed)
    text = TEXT.read_text(encoding="utf-8")
    tokenizer = train_bpe(text, vocab, "</s>")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    config = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        ffn_dim=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        max_position_embeddings=max(512, seq_len),
        word_embed_proj_dim=hidden,
        dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    model.train()
    for _ in tqdm(range(steps), desc="Training", unit="step"):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "text": TEXT.name,
        "tokens": len(ids),
        "config": {"layers": layers, "hidden": hidden, "vocab": len(tokenizer), "seq_len": seq_len},
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "seconds": round(time.time() - t0, 1),
    }
    (out / "training.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="model folder to write (must not exist)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.out.exists():
        p.error(f"{args.out} already exists; choose another folder")
    info = train(args.out, layers=args.layers, hidden=args.hidden, steps=args.steps, seed=args.seed)
    log.info("wrote %s: final training loss %.3f after %.0f s", args.out, info["final_train_loss"], info["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
