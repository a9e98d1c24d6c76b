"""Fused CPU kernels: one C++ call per quantized linear, built once on first use.

Why C++: a decode step of the default model runs 210 quantized linears with one token each. The
matmul itself takes ~7-11 us (``torch._int_mm`` at M=1), but quantizing the activation and
rescaling the int32 result as separate PyTorch ops costs ~35 us more per call in Python and
dispatcher overhead (measured on the 2-core AVX512 machine: 576x576 at M=1, 43 us eager vs 7.5 us
fused; whole-model decode 35.4 ms/token eager vs 23.0 ms/token fused). ``torch.compile`` of the
same function was measured too and did not help: its per-call guard and wrapper overhead
(~15 us) left decode at 35.9 ms/token.

What the extension (C++ source: ``cpu_fused.cpp`` next to this file) does, bit-exact with
:mod:`quantkit.kernels.reference`:

- ``w8a8_linear``: one pass over the activation computes each row's abs-max (after the optional
  SmoothQuant pre-scale) and writes the int8 activation; ``at::_int_mm`` multiplies int8 by int8
  into int32 with the CPU's integer dot-product instructions (oneDNN, AVX512-VNNI where present);
  one pass rescales the int32 result in fp32, adds the bias and casts to the activation dtype.
  The arithmetic is the reference's, in the same order: fp32 division by the scale, round half to
  even, clamp to [-127, 127]; ``acc * x_scale * w_scale + bias`` without fused multiply-add
  (``-ffp-contract=off``), so the outputs are equal, not just close.
  On a CPU without native int8 dot products (no VNNI, e.g. AVX2-only), ``_int_mm`` is slow, so
  more rows go through the extension's AVX2 int8 GEMM instead: ``vpmaddubsw`` with the weight's
  magnitude as the unsigned operand and its sign moved onto the activation (``vpsignb``), which
  cannot saturate for any int8 weight since activations are clamped to +-127, then ``vpmaddwd`` into
  int32; the weight is repacked per call, 16 output columns at a time. Where AVX2 is missing too,
  the int8 values go through the fp32 GEMM, exactly: int8 products are integers below 2^14 and
  sums of up to 1,032 of them stay below 2^24, which fp32 holds exactly in any summation order;
  longer rows are split into such chunks, added in int32. ``int8_gemm_kind()`` says which runs
  ("int_mm", "avx2" or "fp32"; ``QUANTKIT_INT8_GEMM`` forces one). Same outputs bit for bit.
  At up to 4 rows (decode), a GEMV in the extension replaces ``_int_mm``: it streams each int8
  weight row once against every activation row, with ``vpdpbusd`` on AVX512-VNNI, or with
  ``vpmaddubsw`` as in the AVX2 GEMM on AVX2-only CPUs; exact in int32 either way, so the outputs
  are the same bit for bit. ``_int_mm`` spends more on setup than on the multiply at one
  row (576x576 at M = 1, weights from memory: 90 us with ``_int_mm``, 64 us with the VNNI GEMV, in
  the two A/B runs of ``eval/bench_cpu.py`` the README quotes). ``gemv_kind()`` says which runs;
  ``QUANTKIT_GEMV=0`` turns it off and ``QUANTKIT_GEMV=avx2`` picks the AVX2 one on a VNNI CPU too
  (A/B benchmarks and tests).
- ``w8a16_packed``: for few rows. At up to 4 tokens per sequence (decode), a GEMV in the extension:
  each int8 weight row is widened to fp32 in registers and multiplied into the activation rows with
  FMA (AVX512, or AVX2 + FMA), accumulated in fp32, then scaled per channel and cast once; four
  weight rows at a time keep four accumulation chains and memory streams in flight. Beyond that,
  ``at::_weight_int8pack_mm`` (int8 weights converted in registers, the scale applied in the
  activation dtype) plus the bias. Neither equals the reference bit for bit (they sum in another
  order); both are tested against it by SQNR. ``w16_gemv_kind()`` says which GEMV runs.
- ``w8a16_dequant``: for many rows, one pass writes the dequantized weight in the activation dtype
  (the reference's ``(q.float() * scale).to(dtype)``) and calls ``at::linear`` once per sequence of
  the batch (as the reference does): the conversion is amortized over the rows and the result is
  identical to the reference.

Batch invariance: ``w8a16_packed`` rounds unlike the float GEMM (it applies the scale, rounded to
the activation dtype, after the int8 dot product), so the choice between the two W8A16 paths is made
on tokens per sequence, never on the batch size, and the float GEMM runs once per sequence; W8A8 is
exact in int32 and rescaled per element. A sequence's outputs are thus bitwise the same alone or in
any batch, on every path (``tests/kernels/test_batch_invariance.py``).

The build needs a C++ compiler and ninja (as ``torch.utils.cpp_extension`` does); it takes ~30 s
once and is cached in ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Set
``QUANTKIT_COMPILE=0`` to never build or use it: the dispatch then falls back to the eager
PyTorch paths in :mod:`quantkit.kernels.cpu` and to the reference.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch

from .reference import rows_per_sequence
from .registry import Impl

log = logging.getLogger(__name__)

# torch's _weight_int8pack_mm is a matrix-vector style kernel: it beats the float GEMM on a weight
# dequantized by w8a16_dequant for a few rows only. Measured on the 2-core AVX512 machine (bf16, us
# per call, weights in cache, packed vs dequant): 576x1536 M=16 202 vs 246, M=24 299 vs 277, M=32
# 394 vs 316; 576x576 M=24 113 vs 137, M=32 149 vs 147; 1536x576 M=24 277 vs 280, M=32 364 vs 318.
# The crossover lies between 16 and 32 rows depending on the shape; 24 splits it.
PACKED_MAX_ROWS = 24

# Memory alignment (bytes) that torch's bf16 _weight_int8pack_mm needs: probed on torch 2.13 CPU,
# an activation 16 bytes off a 32-byte boundary or a weight 8 bytes off a 16-byte boundary
# segfaults. 64 (what torch's allocator returns) covers both; misaligned inputs are copied.
ALIGN = 64

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The C++ source (shipped as package data); it defines its own Python module (functions and the
# Replay class) and registers the ops torch.ops.quantkit.*.
_SOURCE_FILE = "cpu_fused.cpp"

_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False
# While set (per thread, as dispatch modes are), the kernels are called as dispatcher ops
# (torch.ops.quantkit.*) rather than through the extension's Python bindings (~4 us faster per call),
# so that a TorchDispatchMode sees each one as a single op: quantkit.evaluation.cpu_graph records a
# decode step this way.
_local = threading.local()


def _dispatching() -> bool:
    return getattr(_local, "through_dispatcher", False)


@contextlib.contextmanager
def through_dispatcher() -> Iterator[None]:
    """Call the kernels as ``torch.ops.quantkit.*`` ops inside the block, in this thread."""
    previous, _local.through_dispatcher = _dispatching(), True
    try:
        yield
    finally:
        _local.through_dispatcher = previous


def enabled() -> bool:
    """Whether the fused kernels may be used: not switched off with ``QUANTKIT_COMPILE=0``."""
    return os.environ.get("QUANTKIT_COMPILE", "1") != "0"


def _cflags() -> tuple[str, list[str]]:
    """Variant name and compiler flags for this CPU."""
    # No -ffast-math and no FMA contraction: the arithmetic must round exactly like the reference.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "avx2", [*flags, "-mavx2", "-mf16c"]
    return "generic", flags


def _build() -> ModuleType | None:
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None or not cpp_extension.is_ninja_available():
        log.warning("no C++ compiler (%s) or ninja found: fused CPU kernels disabled, using eager paths", compiler)
        return None
    variant, flags = _cflags()
    log.info("loading quantkit's fused CPU kernels (%s); the first time builds them (~30 s)", variant)
    try:
        source = importlib.resources.files(__package__).joinpath(_SOURCE_FILE).read_text(encoding="utf-8")
        return cpp_extension.load_inline(
            name=f"quantkit_cpu_fused_{variant}",
            cpp_sources=[source],
            extra_cflags=flags,
            # libgomp is the OpenMP runtime torch itself loads, so at::parallel_for shares its pool.
            extra_ldflags=["-fopenmp"],
        )
    except (RuntimeError, OSError, ImportError, subprocess.CalledProcessError) as e:
        tail = "\n".join(str(e).splitlines()[-5:])
        log.warning("building the fused CPU kernels failed, using eager paths:\n%s", tail)
        return None


def module() -> ModuleType | None:
    """The compiled extension, built on first call; None where it is disabled or cannot be built."""
    global _module, _failed
    if not enabled():
        return None
    if _module is None and not _failed:
        with _lock:
            if _module is None and not _failed:
                _module = _build()
                _failed = _module is None
    return _module


def gemv_kind() -> str | None:
    """The int8 GEMV the fused W8A8 kernel uses at a few rows: "vnni", "avx2" or "" (none); None when
    the extension is not loaded in this process (this never builds it)."""
    return None if _module is None else _module.gemv_kind()


def w16_gemv_kind() -> str | None:
    """The GEMV the W8A16 kernel uses at up to 4 tokens per sequence: "avx512", "avx2" or "" (none:
    torch's ``_weight_int8pack_mm``); None when the extension is not loaded in this process."""
    return None if _module is None else _module.w16_gemv_kind()


def int8_gemm_kind() -> str | None:
    """How the W8A8 kernel multiplies more than 4 rows: "int_mm" (oneDNN, where the CPU has native int8
    dot products), "avx2" (the extension's vpmaddubsw GEMM; x86 CPUs with AVX2 but no VNNI) or "fp32"
    (int8 values through the fp32 GEMM; others), all exact; None when the extension is not loaded in
    this process."""
    return None if _module is None else _module.int8_gemm_kind()


def _kernels() -> Any:
    """Where the kernels are called from: the extension's bindings, or while recording (see
    ``through_dispatcher``) the same functions as ``torch.ops.quantkit`` ops."""
    return torch.ops.quantkit if _dispatching() else (_module or _require())


def _require() -> ModuleType:
    mod = module()
    if mod is None:
        raise RuntimeError("quantkit's fused CPU kernels are disabled or failed to build; see the log")
    return mod


def _operands_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Called on every quantized linear (210 per decoded token of the default model): a few cheap
    # attribute reads, shapes compared as tuples.
    if x.dtype not in FLOAT_DTYPES or weight.dtype != torch.int8:
        return False
    xs, ws = x.shape, weight.shape
    return len(ws) == 2 and len(xs) >= 1 and xs[-1] == ws[1] and ws[0] > 0 and ws[1] > 0


def w8a8_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Every shape and float dtype; only where the extension is built."""
    return _operands_ok(x, weight) and module() is not None


def w8a8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth_inv: torch.Tensor | None = None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused W8A8 linear (contract: :class:`quantkit.kernels.W8A8Op`)."""
    return _kernels().w8a8_linear(x, weight, weight_scale, bias, smooth_inv, input_scale)


def packed_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Shapes on which torch's ``_weight_int8pack_mm`` is correct, safe and faster than dequantizing."""
    k = weight.shape[1]
    # Tokens per sequence, not rows in the batch: the packed kernel rounds unlike the float GEMM, so
    # a sequence must take the same path alone and in any batch (see reference.rows_per_sequence).
    if (
        not x.numel()
        or not 0 < rows_per_sequence(x) <= PACKED_MAX_ROWS
        or not weight.is_contiguous()
        or weight.data_ptr() % ALIGN
    ):
        return False
    # The bf16 kernel needs 32-byte aligned activation rows and 16-byte aligned weight rows
    # (see ALIGN): both hold for every row when K % 16 == 0. Probed K in {7, 8, 24, 33}: garbage,
    # NaN or segfault; every multiple of 16 tried: correct.
    return x.dtype != torch.bfloat16 or k % 16 == 0


def w8a16_packed_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Few rows (decode), where the packed kernel is safe; only where the extension is built.

    Expects operands that passed ``_operands_ok`` (``x.shape[-1] == weight.shape[1] > 0``).
    """
    return _operands_ok(x, weight) and packed_ok(x, weight) and module() is not None


def w8a16_packed(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A16 through ``_weight_int8pack_mm`` (contract: :class:`quantkit.kernels.W8A16Op`)."""
    return _kernels().w8a16_packed(x, weight, weight_scale, bias)


def w8a16_dequant_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Every shape and float dtype; only where the extension is built."""
    return _operands_ok(x, weight) and module() is not None


def w8a16_dequant(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A16 by one-pass dequantization and the float GEMM; equal to the reference's result."""
    return _kernels().w8a16_dequant(x, weight, weight_scale, bias)


def register_all(register: Callable[[str, Impl], None]) -> None:
    """Register the fused kernels ahead of the eager CPU paths (which stay as the fallback)."""
    register("w8a8", Impl("cpu_fused", "cpu", w8a8_linear, w8a8_supports, priority=20))
    register("w8a16", Impl("cpu_fused_int8pack", "cpu", w8a16_packed, w8a16_packed_supports, priority=20))
    register("w8a16", Impl("cpu_fused_dequant", "cpu", w8a16_dequant, w8a16_dequant_supports, priority=15))
