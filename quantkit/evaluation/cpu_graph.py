"""CPU graphs: record the ops of one decode step once, then replay them from C++ with no Python.

Why: at batch 1 a decode step of a small model is made of thousands of tiny ops (the default model:
~1,950 per token with quantkit's int8 linears, ~2,600 in bf16; 30 layers x norms, projections,
rotary, cache writes, attention, MLP). In
eager PyTorch each one costs Python and module-call overhead several times its arithmetic, which
left the int8 matmuls, whose weights set the speed limit, with well under half of the step's time.
On CUDA the same problem is solved by capturing the step into a CUDA graph; this module is the CPU
counterpart, built on the same property of :class:`~quantkit.evaluation.fastgen.StaticDecoder`'s
step: it has fixed shapes, reads its inputs from static buffers and writes its outputs into them.

How:

- **Record.** The step runs eagerly under a ``TorchDispatchMode`` that logs every op that reaches the
  dispatcher (after autograd and composite decompositions: exactly the kernels eager runs) with its
  arguments. quantkit's fused CPU linears are dispatcher ops too (``torch.ops.quantkit.*``), called
  that way while recording (:func:`quantkit.kernels.cpu_fused.through_dispatcher`). An argument is
  either the output of an earlier op (a *slot*) or a constant: weights, the KV cache and the
  decoder's buffers, numbers, dtypes.
- **Check.** The step is recorded twice, at two positions. The two recordings must be the same
  sequence with the same constants: a value the forward computed on the host from the position (or
  anything computed outside the dispatcher, which the recording cannot see) shows up as a constant
  that differs, and the capture is refused with :class:`CaptureError` naming the op. Ops that hand a
  value back to Python (``.item()``, data-dependent shapes) are refused too: replaying them would
  freeze the value; so are writes into a tensor the step makes outside the dispatcher
  (``torch.tensor(...)``), which a replay would accumulate into. Not caught: a host decision that
  changes only at some later position (the recordings are at two adjacent positions), and host
  reads that bypass the dispatcher (``.tolist()``) unless they change a constant.
- **Replay.** The sequence goes to ``Replay`` in the C++ extension, less the ops whose results
  nothing uses and those that only compute constants (folded into their recorded result: e.g. the
  ``arange`` behind the attention mask, computed the same way at every step). ``Replay`` calls
  each op through the dispatcher with its recorded arguments (in ``InferenceMode``, which skips the
  autograd bookkeeping), drops each intermediate after its last use, and releases the GIL while it
  runs.

Same ops, same arguments, same kernels: a replayed step computes exactly what the eager step does,
bit for bit (``tests/evaluation/test_cpu_graph.py`` checks greedy tokens against the eager decoder
on every tiny architecture). As with CUDA graphs, the replay keeps pointing at the tensors it
recorded: change the model's weights or move it after capture and the decoder must be rebuilt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..kernels import cpu_fused

log = logging.getLogger(__name__)

# Argument encodings shared with the C++ side (ArgSpec::Kind in cpu_fused.cpp).
_CONST, _REF, _LIST = 0, 1, 2


class CaptureError(RuntimeError):
    """The step cannot be replayed as recorded (the message says which op and why)."""


@dataclass
class _Node:
    func: torch._ops.OpOverload
    args: list[Any]  # one encoding per schema argument; None where the schema's default applies
    outs: list[int]  # slot per return value (-1: not a tensor slot)
    values: tuple  # what the op returned when recorded
    written: list[torch.Tensor]  # tensors the op writes into (in-place and out= arguments)
    reads: list[int] = field(default_factory=list)


def _kind(value: Any) -> str:
    return "tensor" if isinstance(value, torch.Tensor) else type(value).__name__


class _Recorder(TorchDispatchMode):
    """Logs the ops of one step, mapping every tensor an op produced to a slot."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[_Node] = []
        self._slot_of: dict[int, tuple[int, int]] = {}  # id(tensor) -> (slot, list index or -1)
        self._alive: list[Any] = []  # keeps produced tensors alive, so their ids are not reused
        self.n_slots = 0

    def _encode(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            ref = self._slot_of.get(id(value))
            return (_REF, *ref) if ref is not None else (_CONST, value)
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
            return (_LIST, [self._encode(v) if v is not None else (_CONST, None) for v in value])
        return (_CONST, value)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        encoded = []
        for i, arg in enumerate(schema.arguments):
            if i < len(args) and not arg.kwarg_only:
                encoded.append(self._encode(args[i]))
            elif arg.name in kwargs:
                encoded.append(self._encode(kwargs[arg.name]))
            else:
                encoded.append(None)  # the schema's default, filled in by the C++ side
        written = [
            v
            for i, arg in enumerate(schema.arguments)
            if arg.alias_info is not None and arg.alias_info.is_write
            for v in _tensors(args[i] if i < len(args) and not arg.kwarg_only else kwargs.get(arg.name))
        ]
        returns = () if not schema.returns else out if isinstance(out, tuple) else (out,)
        if len(schema.returns) != len(returns):
            raise CaptureError(f"{func} returned {len(returns)} values, its schema says {len(schema.returns)}")
        outs = []
        for value in returns:
            if isinstance(value, torch.Tensor):
                outs.append(self._new_slot(value))
            elif isinstance(value, list) and all(isinstance(v, torch.Tensor) for v in value):
                slot = self._new_slot(value)
                for j, v in enumerate(value):
                    self._slot_of[id(v)] = (slot, j)
                    self._alive.append(v)
                outs.append(slot)
            elif value is None:
                outs.append(-1)
            else:
                # A number or bool handed back to Python: the forward decides something on the host
                # from a tensor's value, and a replay would freeze that decision.
                raise CaptureError(f"{func} returns a {_kind(value)} to Python (a host-side read of a tensor)")
        self.nodes.append(_Node(func, encoded, outs, returns, written))
        return out

    def _new_slot(self, value: Any) -> int:
        slot = self.n_slots
        self.n_slots += 1
        if isinstance(value, torch.Tensor):
            self._slot_of[id(value)] = (slot, -1)
        self._alive.append(value)
        return slot


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _refs(encoding: Any) -> list[int]:
    if encoding is None or encoding[0] == _CONST:
        return []
    if encoding[0] == _REF:
        return [encoding[1]]
    return [s for item in encoding[1] for s in _refs(item)]


def _same_constant(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return False
        if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
            return True  # the same buffer (a weight, the cache, a decoder buffer)
        return bool(torch.equal(a, b))  # a fresh tensor with the same value both times: baked in
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)  # NaN equals NaN here
    return type(a) is type(b) and a == b


def _compare(first: list[_Node], second: list[_Node]) -> None:
    """Raise CaptureError unless the two recordings are the same program."""
    if len(first) != len(second):
        raise CaptureError(f"the step ran {len(first)} ops at one position and {len(second)} at the next")
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        if a.func != b.func:
            raise CaptureError(f"op {i} is {a.func} at one position and {b.func} at the next")
        if a.outs != b.outs:
            raise CaptureError(f"op {i} ({a.func}) returned different values at the two positions")
        for j, (ea, eb) in enumerate(zip(a.args, b.args, strict=True)):
            if not _same_encoding(ea, eb):
                name = a.func._schema.arguments[j].name
                raise CaptureError(
                    f"argument {name!r} of op {i} ({a.func}) differs between positions: the forward computes "
                    "it on the host, or outside the dispatcher"
                )


def _written(nodes: list[_Node]) -> set[int]:
    """Storages the step writes into (in place or as out= arguments)."""
    return {_storage(t) for node in nodes for t in node.written}


def _check_fresh_constants(first: list[_Node], second: list[_Node], written: set[int]) -> None:
    """Refuse a step that writes into a tensor it creates outside the dispatcher (``torch.tensor(...)``).

    Eager gets a new such tensor every step; a replay would keep writing into the recorded one, so
    the writes would build up from step to step. Such a tensor is a constant whose buffer differs
    between the two recordings.
    """
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        fresh = [
            tb
            for ea, eb in zip(a.args, b.args, strict=True)
            for ta, tb in zip(_const_tensors(ea), _const_tensors(eb), strict=True)
            if _storage(ta) != _storage(tb)
        ]
        if any(_storage(t) in written for t in fresh):
            raise CaptureError(
                f"op {i} ({b.func}) reads a tensor made outside the dispatcher that the step then writes into"
            )


def _same_encoding(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a[0] != b[0]:
        return False
    if a[0] == _CONST:
        return _same_constant(a[1], b[1])
    if a[0] == _REF:
        return a == b
    return len(a[1]) == len(b[1]) and all(_same_encoding(x, y) for x, y in zip(a[1], b[1], strict=True))


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _const_tensors(encoding: Any) -> list[torch.Tensor]:
    if encoding is None or encoding[0] == _REF:
        return []
    if encoding[0] == _CONST:
        return [encoding[1]] if isinstance(encoding[1], torch.Tensor) else []
    return [t for item in encoding[1] for t in _const_tensors(item)]


def _fold(nodes: list[_Node], written: set[int]) -> list[_Node]:
    """Replace ops whose every input is a constant the step never writes by their recorded result.

    E.g. ``arange(max_len)`` for the mask, ``scalar_tensor(-inf)``, and what is computed from them
    only: they would compute the same value at every step. Not folded: ops that write (the cache,
    the buffers), ops whose result something writes into later, ops with a random generator.
    """
    folded: dict[int, Any] = {}  # slot -> recorded value

    def substitute(enc: Any) -> Any:
        if enc is None or enc[0] == _CONST:
            return enc
        if enc[0] == _REF:
            if enc[1] not in folded:
                return enc
            value = folded[enc[1]]
            return (_CONST, value if enc[2] < 0 else value[enc[2]])
        return (_LIST, [substitute(item) for item in enc[1]])

    kept = []
    for node in nodes:
        node.args = [substitute(enc) for enc in node.args]
        schema = node.func._schema
        foldable = (
            not schema.is_mutable
            and not any(_refs(enc) for enc in node.args)
            and not any("Generator" in str(a.type) for a in schema.arguments)
            and all(_storage(t) not in written for enc in node.args for t in _const_tensors(enc))
            and all(_storage(t) not in written for v in node.values for t in _tensors(v))
        )
        if foldable:
            for slot, value in zip(node.outs, node.values, strict=True):
                if slot >= 0:
                    folded[slot] = value
        else:
            kept.append(node)
    return kept


def _prune(nodes: list[_Node]) -> list[_Node]:
    """Drop ops whose results nothing uses, unless they write into an argument (cache, buffers)."""
    needed: set[int] = set()
    kept: list[_Node] = []
    for node in reversed(nodes):
        schema = node.func._schema
        # Kept: ops that write (cache, buffers), ops that return nothing (run for their checks),
        # and ops whose results a kept op reads.
        if schema.is_mutable or not schema.returns or any(s in needed for s in node.outs if s >= 0):
            node.reads = sorted({s for enc in node.args for s in _refs(enc)})
            needed.update(node.reads)
            kept.append(node)
    return kept[::-1]


def _program(nodes: list[_Node], n_slots: int) -> list[tuple]:
    """The C++ Replay's input: per node (name, overload, args, out slots, slots released after it)."""
    last_read: dict[int, int] = {}
    for i, node in enumerate(nodes):
        for s in node.reads:
            last_read[s] = i
    program = []
    for i, node in enumerate(nodes):
        released = [s for s in node.reads if last_read[s] == i]
        # Results never read are dropped at once (e.g. the logsumexp attention also returns).
        outs = [s if s in last_read else -1 for s in node.outs]
        schema = node.func._schema
        program.append((schema.name, schema.overload_name, node.args, outs, released))
    return program


class CpuGraph:
    """One decode step, recorded and replayable from C++ (see the module docstring).

    Built by :func:`capture`; :meth:`replay` runs the step once.
    """

    def __init__(self, replay: Any, ops: list[str], recorded_ops: int, seconds: float) -> None:
        self._replay = replay
        self.ops = ops  # names of the ops replayed per step, in order
        self.recorded_ops = recorded_ops  # ops the eager step dispatched
        self.capture_seconds = seconds

    @property
    def n_ops(self) -> int:
        return len(self.ops)

    def replay(self) -> None:
        self._replay.run()


def available() -> bool:
    """Whether CPU graphs can be built here: the fused extension (a C++ compiler) is available."""
    return cpu_fused.module() is not None


def _record(step: Callable[[], None]) -> tuple[list[_Node], int]:
    recorder = _Recorder()
    with cpu_fused.through_dispatcher(), recorder:
        step()
    return recorder.nodes, recorder.n_slots


@torch.no_grad()
def capture(step: Callable[[], None]) -> CpuGraph:
    """Record ``step`` (a decode step: fixed shapes, static buffers) twice and build its replay.

    ``step`` runs twice, for real: the caller resets whatever state the two steps advanced. Raises
    :class:`CaptureError` when the step cannot be replayed faithfully, ``RuntimeError`` when the
    C++ extension is unavailable.
    """
    ext = cpu_fused.module()
    if ext is None:
        raise RuntimeError("CPU graphs need quantkit's C++ extension, which is disabled or failed to build")
    t0 = time.perf_counter()
    first, _ = _record(step)
    second, n_slots = _record(step)
    _compare(first, second)
    written = _written(second)
    _check_fresh_constants(first, second, written)
    nodes = _prune(_fold(second, written))
    replay = ext.Replay(_program(nodes, n_slots), n_slots)
    seconds = time.perf_counter() - t0
    log.debug("CPU graph: %d ops recorded per step, %d replayed, captured in %.2f s", len(second), len(nodes), seconds)
    return CpuGraph(replay, [str(n.func) for n in nodes], len(second), seconds)
