"""The perplexity protocol's windows: evenly spaced, non-overlapping, and led by the BOS token for
models whose tokenizer adds one (as lm-eval scores them)."""

import torch

from quantkit.evaluation.measure import bos_id, windows


class _Tokenizer:
    """Encodes each character as its code; ``adds_bos`` puts token 1 first, as Llama-2's tokenizer does."""

    def __init__(self, adds_bos: bool, bos_token_id: int | None = 1):
        self.adds_bos, self.bos_token_id = adds_bos, bos_token_id

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        if add_special_tokens and self.adds_bos:
            ids = [self.bos_token_id, *ids]
        return type("Encoding", (), {"input_ids": ids})()


def test_bos_is_found_only_where_the_tokenizer_adds_it():
    assert bos_id(_Tokenizer(adds_bos=True)) == 1
    assert bos_id(_Tokenizer(adds_bos=False)) is None  # SmolLM2: a BOS token exists but is not added
    assert bos_id(_Tokenizer(adds_bos=False, bos_token_id=None)) is None


def test_windows_without_and_with_bos():
    ids = torch.arange(100, 200)
    plain = windows(ids, 10, 4)
    assert plain.shape == (4, 10) and plain[0].tolist() == list(range(100, 110))
    assert plain[-1, -1].item() == 199  # spread to the end of the text
    led = windows(ids, 10, 4, bos=1)
    assert led.shape == (4, 10)
    assert (led[:, 0] == 1).all()
    text = led[:, 1:]
    assert text[0].tolist() == list(range(100, 109))  # window - 1 tokens of text each, still contiguous
    flat = text.reshape(-1).tolist()
    assert len(set(flat)) == len(flat)  # no overlap
    assert all(row == list(range(row[0], row[0] + 9)) for row in text.tolist())
