"""CPU graphs: a decode step recorded once and replayed from C++ (quantkit.evaluation.cpu_graph).

The contract is bit-exactness with the eager step: the replay runs the same ops with the same
arguments, so greedy tokens (and the logits behind them) must be equal, not close, on every
architecture and scheme. The refusal tests check that a step the recording cannot reproduce (a
value computed on the host, a host read of a tensor, work done outside the dispatcher) is refused
rather than replayed wrong.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from tiny_models import make_lively

from quantkit.evaluation import cpu_graph
from quantkit.evaluation.fastgen import StaticDecoder, cache_supports_graphs

pytestmark = pytest.mark.skipif(not cpu_graph.available(), reason="needs quantkit's C++ extension (a compiler)")

PROMPT_LEN = 7
NEW_TOKENS = 24
# Architectures whose decode step reads a tensor on the host (OPT reads the cache length for its
# learned positions), and those with sliding-window cache layers: both decode eagerly.
HOST_READS = {"opt"}
EAGER_ARCHS = HOST_READS | {"mistral", "gemma2", "gemma3_text"}


def _prompt(batch: int = 1, seed: int = 1, length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, cpu_graph_flag, n=NEW_TOKENS):
    decoder = StaticDecoder(model, ids.shape[1] + n, batch_size=ids.shape[0], cpu_graph=cpu_graph_flag)
    return decoder, decoder.generate(ids, n)


@pytest.mark.parametrize("scheme", [None, "w8a16", "w8a8"])
def test_replay_equals_the_eager_step_on_every_architecture(tiny_arch, scheme):
    model = make_lively(tiny_arch, scheme)
    ids = _prompt(batch=2)
    eager, want = _generate(model, ids, False)
    assert not eager.uses_cpu_graph
    replayed, got = _generate(model, ids, None)
    assert torch.equal(got, want)
    if replayed.uses_cpu_graph:
        assert replayed._cpu_graph.n_ops > 0
    elif tiny_arch in HOST_READS:
        assert cache_supports_graphs(replayed.cache)  # refused at capture, with a warning
    else:  # sliding-window cache layers (Mistral's default config, Gemma 2/3) keep host-side state
        assert not cache_supports_graphs(replayed.cache)
    assert replayed.uses_cpu_graph is (tiny_arch not in EAGER_ARCHS)
    assert len(set(want[0, PROMPT_LEN:].tolist())) > 2  # the tokens vary: the equality has power


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replayed_logits_are_bitwise_the_eager_ones(dtype):
    model = make_lively("llama", "w8a8").to(dtype)
    ids = _prompt()
    logits, caches = {}, {}
    for flag in (False, True):
        decoder = StaticDecoder(model, PROMPT_LEN + 8, cpu_graph=flag)
        decoder.prefill(ids)
        decoder.decode(5)
        # The last step's logits: run one more step by hand, eagerly, from the same state.
        with torch.no_grad():
            logits[flag] = decoder._forward(decoder._input_ids, decoder._position, last_logits_only=False)
        caches[flag] = [t.clone() for layer in decoder.cache.layers for t in (layer.keys, layer.values)]
        assert decoder.uses_cpu_graph is flag
    assert torch.equal(logits[True], logits[False])
    assert all(torch.equal(a, b) for a, b in zip(caches[True], caches[False], strict=True))


def test_a_decoder_replays_across_sequences_and_batches():
    model = make_lively("qwen2", "w8a16")
    first, second = _prompt(batch=3, seed=1), _prompt(batch=3, seed=5)
    _, want_first = _generate(model, first, False)
    _, want_second = _generate(model, second, False)
    decoder = StaticDecoder(model, PROMPT_LEN + NEW_TOKENS, batch_size=3)
    for ids, want in ((first, want_first), (second, want_second), (first, want_first)):
        assert torch.equal(decoder.generate(ids, NEW_TOKENS), want)
    assert decoder.uses_cpu_graph and decoder.capture_seconds is not None
    # Decoding in pieces replays the same steps.
    decoder.prefill(second)
    decoder.decode(5)
    decoder.decode(NEW_TOKENS - 6)
    assert torch.equal(decoder.tokens(), want_second)


def test_replay_does_not_run_python_per_step():
    model = make_lively("llama", "w8a8")
    decoder = StaticDecoder(model, PROMPT_LEN + NEW_TOKENS)
    decoder.prefill(_prompt())
    calls = []
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in (model, model.model.layers[0].mlp)]
    decoder.decode(NEW_TOKENS - 1)
    for h in handles:
        h.remove()
    assert calls == [] and decoder.uses_cpu_graph


# ----------------------------------------------------------------------------------------------
# Steps that cannot be replayed are refused
# ----------------------------------------------------------------------------------------------


def _capture(step):
    with pytest.raises(cpu_graph.CaptureError) as info:
        cpu_graph.capture(step)
    return str(info.value)


def test_a_value_computed_on_the_host_is_refused():
    buf = torch.zeros(4)
    counter = [0]

    def step():
        counter[0] += 1
        buf.add_(torch.full((4,), float(counter[0])))  # depends on a Python int that changes

    assert "differs between positions" in _capture(step)


def test_a_host_read_of_a_tensor_is_refused():
    buf = torch.ones(4)

    def step():
        if buf.sum().item() > 0:  # .item(): a decision the replay would freeze
            buf.mul_(2)

    assert "host-side read" in _capture(step)


def test_work_outside_the_dispatcher_is_refused():
    buf = torch.ones(4)

    def step():
        # numpy computes the new value where the recorder cannot see: it enters as a constant.
        buf.copy_(torch.from_numpy(np.asarray(buf) * 2.0))

    assert "differs between positions" in _capture(step)


def test_writing_into_a_tensor_made_outside_the_dispatcher_is_refused():
    # torch.tensor() builds its data outside the dispatcher: eager gets a new one every step, a replay
    # would keep multiplying the recorded one.
    out = torch.zeros(3)

    def step():
        t = torch.tensor([1.0, 2.0, 3.0])
        t.mul_(2)
        out.copy_(t)

    assert "made outside the dispatcher" in _capture(step)


def test_ops_without_results_are_kept():
    buf = torch.ones(4)

    def step():
        torch._assert_async(buf.sum() > 0)  # returns nothing; runs for its check
        buf.mul_(2)

    graph = cpu_graph.capture(step)
    graph.replay()
    assert buf.tolist() == [8.0] * 4 and "aten._assert_async.default" in graph.ops


def test_the_recording_switch_is_per_thread():
    import threading

    from quantkit.kernels import cpu_fused

    seen = []
    with cpu_fused.through_dispatcher():
        worker = threading.Thread(target=lambda: seen.append(cpu_fused._dispatching()))
        worker.start()
        worker.join()
        assert cpu_fused._dispatching()
    assert seen == [False] and not cpu_fused._dispatching()


def test_a_faithful_step_replays_and_frees_its_intermediates():
    buf = torch.arange(4.0)
    pos = torch.zeros((), dtype=torch.long)

    def step():
        buf.mul_(2).add_(pos.float())
        pos.add_(1)

    graph = cpu_graph.capture(step)  # runs the step twice
    assert buf.tolist() == [1.0, 5.0, 9.0, 13.0] and pos.item() == 2
    graph.replay()
    assert buf.tolist() == [4.0, 12.0, 20.0, 28.0] and pos.item() == 3


def test_constants_are_folded_unless_something_writes_them():
    buf = torch.arange(4.0)

    def step():
        acc = torch.zeros(4)  # a factory op: constant, but written below, so not folded
        acc.add_(buf)
        offset = torch.full((4,), 0.5) * 2  # constant and never written: folded
        buf.copy_(acc * 2 + offset)

    graph = cpu_graph.capture(step)
    assert buf.tolist() == [3.0, 7.0, 11.0, 15.0]
    graph.replay()
    assert buf.tolist() == [7.0, 15.0, 23.0, 31.0]
    assert "aten.full.default" not in graph.ops and "aten.zeros.default" in graph.ops


def test_the_mask_arange_is_folded_in_a_decode_step():
    decoder = StaticDecoder(make_lively("llama", "w8a8"), 16)
    decoder.prefill(_prompt())
    ops = decoder._cpu_graph.ops
    assert "aten.arange.default" not in ops and "aten.scalar_tensor.default" not in ops
    assert ops.count("quantkit.w8a8_linear.default") == 7 * 2  # two layers, seven linears each
    assert decoder._cpu_graph.recorded_ops > len(ops)


def test_decoder_falls_back_to_eager_with_a_warning(caplog):
    model = make_lively("llama", "w8a16")
    # A hook that reads a tensor on the host, as dynamic RoPE variants do.
    handle = model.model.layers[0].register_forward_hook(lambda m, a, out: out[0].abs().max().item() and None)
    ids = _prompt()
    _, want = _generate(model, ids, False)
    with caplog.at_level(logging.WARNING, logger="quantkit.evaluation.fastgen"):
        decoder, got = _generate(model, ids, None)
    assert torch.equal(got, want) and not decoder.uses_cpu_graph
    assert "decoding LlamaForCausalLM eagerly" in caplog.text and "host-side read" in caplog.text
    with pytest.raises(cpu_graph.CaptureError):
        _generate(model, ids, True)
    handle.remove()


def test_without_the_extension_the_decoder_is_eager(monkeypatch):
    monkeypatch.setenv("QUANTKIT_COMPILE", "0")
    model = make_lively("llama", "w8a16")
    decoder, got = _generate(model, _prompt(), None)
    assert not decoder.uses_cpu_graph and decoder._cpu_graph is None
    with pytest.raises(RuntimeError, match="C\\+\\+ extension"):
        StaticDecoder(model, 16, cpu_graph=True)
    monkeypatch.delenv("QUANTKIT_COMPILE")
    _, want = _generate(model, _prompt(), None)
    assert torch.equal(got, want)


def test_cpu_graph_argument_errors():
    model = make_lively("llama")
    with pytest.raises(ValueError, match="max_len >= 4"):
        StaticDecoder(model, 3, cpu_graph=True)
    assert not StaticDecoder(model, 3).uses_cpu_graph
    with pytest.raises(ValueError, match="sliding-window"):
        StaticDecoder(make_lively("mistral"), 16, cpu_graph=True)


def test_the_default_model_replays_its_eager_tokens(default_model_dir, tokenizer):
    import quantkit

    model = quantkit.load_float(default_model_dir, dtype=torch.bfloat16)[0]
    config = quantkit.QuantConfig(scheme="w8a8")
    stats = quantkit.calibrate(model, tokenizer, config=config, n_samples=4, seq_len=128, progress=False)
    quantkit.quantize(model, config, stats, progress=False)
    text = "Emma Woodhouse, handsome, clever, and rich, with a comfortable home"
    ids = tokenizer(text, return_tensors="pt").input_ids
    _, want = _generate(model, ids, False, n=48)
    decoder, got = _generate(model, ids, None, n=48)
    assert decoder.uses_cpu_graph and torch.equal(got, want)
    assert len(set(want[0, ids.shape[1] :].tolist())) > 10


def test_public_generator_and_stop_tokens():
    import quantkit

    assert quantkit.Generator is StaticDecoder
    model = make_lively("llama", "w8a8")
    ids = _prompt()
    generator = quantkit.Generator(model, max_len=PROMPT_LEN + NEW_TOKENS)
    full = generator.generate(ids[0], NEW_TOKENS)  # a 1-D prompt is one row
    new = full[0, PROMPT_LEN:].tolist()
    stop = new[5]
    first_stop = new.index(stop)
    stopped = generator.generate(ids, NEW_TOKENS, stop_tokens=[stop, 10_000])
    assert torch.equal(stopped, full[:, : PROMPT_LEN + first_stop + 1])  # the stop token is kept
    assert generator.uses_cpu_graph
    # Two rows: generation goes on until both have stopped.
    generator_2 = quantkit.Generator(model, max_len=PROMPT_LEN + NEW_TOKENS, batch_size=2)
    rows = torch.cat([ids, _prompt(seed=5)])
    full2 = generator_2.generate(rows, NEW_TOKENS)
    stop2 = full2[1, PROMPT_LEN + 3].item()
    ends = [
        next((i for i, t in enumerate(r[PROMPT_LEN:].tolist()) if t in (stop, stop2)), NEW_TOKENS - 1) for r in full2
    ]
    got = generator_2.generate(rows, NEW_TOKENS, stop_tokens=[stop, stop2])
    assert torch.equal(got, full2[:, : PROMPT_LEN + max(ends) + 1])
