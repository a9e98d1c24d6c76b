"""Greedy decoding with a static KV cache and, on CUDA, one CUDA graph per decode step.

Why: Hugging Face's eager ``generate()`` is launch-bound at batch size 1. Every decode step runs
the whole model in Python, which launches several hundred small kernels (an 8B Llama: 32 layers x
norms, projections, rotary, attention, MLP) and rebuilds masks and cache bookkeeping on the host;
on an H100 that caps an 8B model at ~27 tokens/s where its weight bytes allow ~170. At that point
a faster matmul kernel changes nothing end to end. :class:`StaticDecoder` removes the host from
the loop: the KV cache is a transformers ``StaticCache`` (fixed-size tensors updated in place), every
decode step has the same shapes and reads its inputs from the same device buffers, so the step can
be captured once into a ``torch.cuda.CUDAGraph`` and replayed per token with a single launch.

Constraints the decode step obeys (they are what make it capturable):

- **Fixed shapes and addresses.** The step reads the current token from ``_input_ids`` ``[B, 1]``
  and its position from ``_position`` ``[1]``, and writes the next token and position back into
  them in place. The KV cache tensors are allocated once (on the first prefill) and only updated
  in place; ``StaticCache.reset()`` zeroes them in place too.
- **No host synchronization.** Nothing in the step reads a device value on the host: the next token
  is ``argmax`` on the device, the position advances with ``add_``, the attention mask is built on
  the device from the cache's (device) length counter. The decoder therefore never stops early at
  an end-of-sequence token (that check would need a sync per token): it always produces the number
  of tokens asked for.
- **Warm-up before capture.** The first call of a shape does work that must not be captured:
  Triton's autotuner times candidate configs (``quantkit.kernels.triton_kernels``), kernels are
  compiled, cuBLAS picks algorithms and allocates workspaces. The decoder runs a throw-away prefill
  and a few eager decode steps on a side stream first, then captures, then resets the cache.
- **No host-side decisions on device values in the forward.** Dynamic RoPE variants, for example,
  compare the largest position with a Python number on the host; capturing such a model fails
  with an error that says to pass ``cuda_graph=False``.
- **Only plain full-attention cache layers.** transformers' sliding-window static layers keep a
  Python-side length counter, which a captured graph would freeze; models with such layers (e.g.
  Mistral's default config, Gemma 2/3) decode eagerly, with a warning.

On CPU the decoder records the same step once and replays it from C++ per token (a *CPU graph*,
:mod:`quantkit.evaluation.cpu_graph`): the same ops with the same arguments, without Python between
them, so the tokens are those of the eager step, bit for bit. Where the C++ extension cannot be
built, or with ``cpu_graph=False``, the step runs eagerly; the CPU tests exercise the code that is
captured on CUDA either way.

Positions are passed as ``position_ids`` (transformers 5.x tracks the cache write position inside
``StaticCache``); models whose ``forward`` still takes ``cache_position`` (transformers 4.x) also get
it, from the same device buffer.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable

import torch
from torch import nn
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from . import cpu_graph as cpu_graph_mod

log = logging.getLogger(__name__)

# Eager decode steps run before capture: the first one autotunes/compiles, the rest make sure
# nothing lazy is left (allocator pools, cuBLAS handles) when capture starts.
WARMUP_STEPS = 3
# A CPU graph is recorded on a throw-away sequence: one prompt token, then two recorded steps.
CPU_CAPTURE_LEN = 4


def greedy_token(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of the last position's logits ``[B, L, V] -> [B]``, first index on ties (as argmax).

    ``max(dim).indices`` rather than ``argmax``: the same index, but PyTorch's CPU argmax over bf16
    is slow (190 us for the default model's 49,152 logits, measured, vs 50 us): 1% of a decode step.
    """
    return torch.max(logits[:, -1], dim=-1).indices


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def cache_supports_graphs(cache: StaticCache) -> bool:
    """Whether every layer of ``cache`` keeps its state in device tensors only (graph-replayable).

    Exact type check on purpose: subclasses such as the sliding-window layer add host-side state.
    """
    return all(type(layer) is StaticLayer for layer in cache.layers)


class StaticDecoder:
    """Greedy generation for one model with fixed shapes: batch ``batch_size``, at most ``max_len`` tokens.

    Args:
        model: a transformers causal LM, float or quantized by quantkit, on any device.
        max_len: capacity of the KV cache and of the token buffer: prompt length + new tokens.
        batch_size: rows per call; every row has the same prompt length (no padding).
        cuda_graph: capture the decode step into a CUDA graph. Default: when the model is on CUDA
            and its cache layers allow it (see the module docstring). ``True`` on a model that cannot
            use graphs raises ``ValueError``.
        cpu_graph: record the decode step and replay it from C++ (:mod:`~quantkit.evaluation.cpu_graph`).
            Default: when the model is on the CPU, its cache layers allow it and the C++ extension is
            available; a step that cannot be recorded faithfully then decodes eagerly, with a warning.
            ``True`` raises instead of falling back.

    A decoder is reusable: each :meth:`prefill` starts a new sequence in the same buffers, so the
    graph is captured once (on the first prefill) and replayed for every later sequence. It holds
    one sequence batch at a time: a service runs one decoder per worker thread.

    Example (``quantkit.Generator`` is this class)::

        >>> model = quantkit.load("smollm2-w8a8")
        >>> generator = quantkit.Generator(model, max_len=1024)      # reuse it for every request
        >>> ids = tokenizer(text, return_tensors="pt").input_ids
        >>> tokens = generator.generate(ids, 64, stop_tokens=[tokenizer.eos_token_id])
    """

    def __init__(
        self,
        model: nn.Module,
        max_len: int,
        batch_size: int = 1,
        *,
        cuda_graph: bool | None = None,
        cpu_graph: bool | None = None,
    ):
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2 (one prompt token and one new token), got {max_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.device = model_device(model)
        self.max_len = max_len
        self.batch_size = batch_size
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        params = inspect.signature(model.forward).parameters
        self._takes_cache_position = "cache_position" in params
        # transformers 5.2x names the cache argument `cache` (`past_key_values` is deprecated, to go in
        # 5.40); earlier versions only know `past_key_values`.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._takes_logits_to_keep = "logits_to_keep" in params

        # The decode step's static state, all on the model's device and only ever updated in place.
        kw = dict(dtype=torch.long, device=self.device)
        self._input_ids = torch.zeros(batch_size, 1, **kw)  # the token the next step feeds in
        self._position = torch.zeros(1, **kw)  # its position in the sequence
        self._tokens = torch.zeros(batch_size, max_len, **kw)  # prompt + generated tokens
        self._length = 0  # host-side count of valid tokens in _tokens (never read from the device)

        self._use_graph = self._want_graph(cuda_graph)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._cpu_graph_requested = cpu_graph
        self._use_cpu_graph = self._want_cpu_graph(cpu_graph)
        self._cpu_graph: cpu_graph_mod.CpuGraph | None = None

    def _want_graph(self, requested: bool | None) -> bool:
        on_cuda = self.device.type == "cuda"
        graphable = cache_supports_graphs(self.cache)
        if requested is None and on_cuda and self.max_len < WARMUP_STEPS + 2:
            return False  # too short to warm up before capture; not worth a graph either
        if requested is None:
            if on_cuda and not graphable:
                log.warning(
                    "%s has cache layers other than full-attention StaticLayer (e.g. sliding-window), whose "
                    "host-side state a CUDA graph would freeze: decoding eagerly (launch-bound)",
                    type(self.model).__name__,
                )
            return on_cuda and graphable
        if requested and not on_cuda:
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {self.device}")
        if requested and not graphable:
            raise ValueError("cuda_graph=True needs full-attention cache layers only (no sliding-window layers)")
        if requested and self.max_len < WARMUP_STEPS + 2:
            raise ValueError(f"cuda_graph=True needs max_len >= {WARMUP_STEPS + 2} for the warm-up steps")
        return requested

    def _want_cpu_graph(self, requested: bool | None) -> bool:
        if requested is False or (requested is None and self.device.type != "cpu"):
            return False
        if self.device.type != "cpu":
            raise ValueError(f"cpu_graph=True needs a model on the CPU, not {self.device}")
        if self.max_len < CPU_CAPTURE_LEN:
            if requested:
                raise ValueError(f"cpu_graph=True needs max_len >= {CPU_CAPTURE_LEN} for the two recorded steps")
            return False
        if not cache_supports_graphs(self.cache):
            if requested:
                raise ValueError("cpu_graph=True needs full-attention cache layers only (no sliding-window layers)")
            log.info("%s has sliding-window cache layers: decoding eagerly", type(self.model).__name__)
            return False
        if not cpu_graph_mod.available():
            if requested:
                raise RuntimeError(
                    "cpu_graph=True needs quantkit's C++ extension, which is disabled or failed to build"
                )
            return False  # cpu_fused has warned why
        return True

    @property
    def uses_cuda_graph(self) -> bool:
        return self._use_graph

    @property
    def uses_cpu_graph(self) -> bool:
        """Whether decode steps replay a recorded CPU graph (known for sure after the first prefill)."""
        return self._use_cpu_graph

    @property
    def capture_seconds(self) -> float | None:
        """Seconds the CPU graph took to record and build (None before it is captured, or without one)."""
        return None if self._cpu_graph is None else self._cpu_graph.capture_seconds

    # ------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty the KV cache (in place: the captured graph keeps pointing at the same tensors)."""
        self.cache.reset()
        self._length = 0

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, last_logits_only: bool) -> torch.Tensor:
        kwargs = {
            "input_ids": input_ids,
            "position_ids": positions.view(1, -1).expand(input_ids.shape[0], -1),
            self._cache_kwarg: self.cache,
            "use_cache": True,
        }
        if self._takes_cache_position:
            kwargs["cache_position"] = positions
        if last_logits_only and self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1  # as generate() does: the lm_head runs on the last token only
        return self.model(**kwargs).logits

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, *, reset: bool = True) -> torch.Tensor:
        """Start a sequence: one forward over the prompt fills the cache; returns the first new token ``[B]``.

        Args:
            input_ids: ``[batch_size, n]`` prompt, ``1 <= n < max_len``.
            reset: empty the cache first. Pass False only when :meth:`reset` was just called (the
                timing helpers do, to keep the cache memset out of the timed region).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids must be [{self.batch_size}, n], got {list(input_ids.shape)}")
        n = input_ids.shape[1]
        if not 1 <= n < self.max_len:
            raise ValueError(f"a prompt of {n} tokens does not fit max_len={self.max_len} with room for one new token")
        if self._use_graph and self._graph is None:
            self._capture()
        if self._use_cpu_graph and self._cpu_graph is None:
            self._capture_cpu()
        if reset:
            self.cache.reset()
        input_ids = input_ids.to(self.device)
        logits = self._forward(input_ids, torch.arange(n, device=self.device), last_logits_only=True)
        next_token = greedy_token(logits)
        self._tokens[:, :n] = input_ids
        self._tokens[:, n] = next_token
        self._input_ids.copy_(next_token[:, None])
        self._position.fill_(n)
        self._length = n + 1
        return next_token

    def _step(self) -> None:
        # The body that is captured: feed the last token at its position, write the argmax back.
        # Every tensor it reads or writes is a static buffer or cache tensor (see module docstring).
        logits = self._forward(self._input_ids, self._position, last_logits_only=False)
        next_token = greedy_token(logits)
        self._input_ids.copy_(next_token[:, None])
        self._position.add_(1)
        self._tokens.index_copy_(1, self._position, next_token[:, None])

    @torch.no_grad()
    def decode(self, n_steps: int) -> None:
        """Generate ``n_steps`` more tokens after :meth:`prefill` (graph replays where captured)."""
        if self._length == 0:
            raise RuntimeError("call prefill() before decode()")
        if self._length + n_steps > self.max_len:
            raise ValueError(
                f"{n_steps} more tokens after {self._length} exceed max_len={self.max_len}; build a larger decoder"
            )
        if self._graph is not None:
            for _ in range(n_steps):
                self._graph.replay()
        elif self._cpu_graph is not None:
            for _ in range(n_steps):
                self._cpu_graph.replay()
        else:
            for _ in range(n_steps):
                self._step()
        self._length += n_steps

    def tokens(self) -> torch.Tensor:
        """``[batch_size, length]``: the prompt followed by every token generated so far (a copy)."""
        return self._tokens[:, : self._length].clone()

    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, *, stop_tokens: Iterable[int] | None = None
    ) -> torch.Tensor:
        """Greedy tokens like ``model.generate(do_sample=False)``: ``[B, n + new]`` token ids.

        Without ``stop_tokens`` exactly ``max_new_tokens`` are generated. With them (e.g. the
        tokenizer's ``eos_token_id``), generation stops once every row has produced one of them; the
        stop token is kept, and a row that stopped early continues greedily until the others do.
        Checking costs a host read per token (nothing on a CPU; a synchronization on a GPU).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if input_ids.dim() == 1:
            input_ids = input_ids[None, :]
        if input_ids.shape[-1] + max_new_tokens > self.max_len:
            raise ValueError(
                f"{input_ids.shape[-1]} prompt + {max_new_tokens} new tokens exceed max_len={self.max_len}"
            )
        first = self.prefill(input_ids)
        if stop_tokens is None:
            self.decode(max_new_tokens - 1)
            return self.tokens()
        stop = torch.tensor(sorted({int(t) for t in stop_tokens}), dtype=torch.long, device=self.device)
        done = torch.isin(first, stop)
        for _ in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            self.decode(1)
            done |= torch.isin(self._input_ids[:, 0], stop)
        return self.tokens()

    def _start_dummy_sequence(self) -> None:
        """A one-token throw-away sequence in the cache and buffers, ready for a decode step."""
        self.cache.reset()
        dummy = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)
        logits = self._forward(dummy, torch.zeros(1, dtype=torch.long, device=self.device), last_logits_only=True)
        self._input_ids.copy_(greedy_token(logits)[:, None])
        self._position.fill_(1)

    def _capture_cpu(self) -> None:
        """Record the decode step on a throw-away sequence (two real steps), leave the cache empty."""
        self._start_dummy_sequence()
        try:
            self._cpu_graph = cpu_graph_mod.capture(self._step)
        except Exception as err:  # any failure to capture leaves the (correct) eager step
            if self._cpu_graph_requested:
                raise
            reason = str(err) if isinstance(err, cpu_graph_mod.CaptureError) else f"{type(err).__name__}: {err}"
            log.warning(
                "decoding %s eagerly: its decode step cannot be replayed as a CPU graph (%s)",
                type(self.model).__name__,
                reason.splitlines()[0] if reason else type(err).__name__,
            )
            self._use_cpu_graph = False
        finally:
            self.reset()
        if self._cpu_graph is not None:
            log.info(
                "recorded the decode step of %s as a CPU graph: %d ops, %.2f s",
                type(self.model).__name__,
                self._cpu_graph.n_ops,
                self._cpu_graph.capture_seconds,
            )

    def _capture(self) -> None:
        """Warm up on a throw-away sequence, capture one decode step, leave the cache empty."""
        self._start_dummy_sequence()
        # Warm-up on a side stream, as torch.cuda.graphs recommends: autotuning, compilation and lazy
        # initialization happen here, outside capture.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records the kernels without running them
                self._step()
        except RuntimeError as err:
            raise RuntimeError(
                f"capturing the decode step of {type(self.model).__name__} into a CUDA graph failed: its forward "
                "synchronizes with the host or copies from the CPU (e.g. dynamic RoPE scaling); use cuda_graph=False"
            ) from err
        self._graph = graph
        self.reset()
        log.debug("captured the decode step of %s into a CUDA graph", type(self.model).__name__)


def generate_greedy(
    model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, cuda_graph: bool | None = None
) -> torch.Tensor:
    """Greedy generation through a fresh :class:`StaticDecoder`: ``[B, n + max_new_tokens]`` token ids.

    Builds (and on CUDA captures) a decoder per call; keep a :class:`StaticDecoder` for repeated calls.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None, :]
    decoder = StaticDecoder(
        model, input_ids.shape[1] + max_new_tokens, batch_size=input_ids.shape[0], cuda_graph=cuda_graph
    )
    return decoder.generate(input_ids, max_new_tokens)
