"""Fused CPU kernels: one C++ call per quantized linear, built once on first use.

Why C++: a decode step of the default model runs 210 quantized linears with one token each. The
matmul itself takes ~7-11 us (``torch._int_mm`` at M=1), but quantizing the activation and
rescaling the int32 result as separate PyTorch ops costs ~35 us more per call in Python and
dispatcher overhead (measured on the 2-core AVX512 machine: 576x576 at M=1, 43 us eager vs 7.5 us
fused; whole-model decode 35.4 ms/token eager vs 23.0 ms/token fused). ``torch.compile`` of the
same function was measured too and did not help: its per-call guard and wrapper overhead
(~15 us) left decode at 35.9 ms/token.

What the extension does (bit-exact with :mod:`quantkit.kernels.reference`):

- ``w8a8_linear``: one pass over the activation computes each row's abs-max (after the optional
  SmoothQuant pre-scale) and writes the int8 activation; ``at::_int_mm`` multiplies int8 by int8
  into int32 with the CPU's integer dot-product instructions (oneDNN, AVX512-VNNI where present);
  one pass rescales the int32 result in fp32, adds the bias and casts to the activation dtype.
  The arithmetic is the reference's, in the same order: fp32 division by the scale, round half to
  even, clamp to [-127, 127]; ``acc * x_scale * w_scale + bias`` without fused multiply-add
  (``-ffp-contract=off``), so the outputs are equal, not just close.
- ``w8a16_packed``: ``at::_weight_int8pack_mm`` (int8 weights converted in registers) plus the
  bias, with the scale cast and alignment checks in C++ rather than Python.
- ``w8a16_dequant``: for many rows, one pass writes the dequantized weight in the activation dtype
  (the reference's ``(q.float() * scale).to(dtype)``) and calls ``at::linear``: the conversion is
  amortized over the rows and the result is identical to the reference.

The build needs a C++ compiler and ninja (as ``torch.utils.cpp_extension`` does); it takes ~30 s
once and is cached in ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Set
``QUANTKIT_COMPILE=0`` to never build or use it: the dispatch then falls back to the eager
PyTorch paths in :mod:`quantkit.kernels.cpu` and to the reference.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Callable
from types import ModuleType

import torch

from . import Impl

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

_SOURCE = r"""
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define QK_AVX2 1
#endif

namespace {

constexpr float kQmax = 127.0f;
constexpr float kEps = 1e-8f;  // quantkit.qmath._EPS: an all-zero row gets a tiny positive scale
constexpr int64_t kGrain = 32768;  // elements per thread below which a loop stays single-threaded

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f(c10::Half v) { return static_cast<float>(v); }

inline float quantize_one(float v, float s) {
  float r = std::nearbyint(v / s);  // fp32 division, round half to even: as torch.round(x / s)
  return r < -kQmax ? -kQmax : (r > kQmax ? kQmax : r);
}

#ifdef QK_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// Row m of x (times smooth, if given) -> int8 row of q; returns the row's scale. With a static
// scale the abs-max pass is skipped.
template <typename T>
float quantize_row(const T* x, const float* smooth, int64_t K, float static_scale, int8_t* q) {
  int64_t k = 0;
  float s = static_scale;
  if (s <= 0.0f) {
    // The maximum of |v| is taken on the IEEE bit patterns: for non-negative floats integer order
    // is float order, and a NaN sorts above +inf, so it reaches the scale as in the reference.
    uint32_t mx = 0;
#ifdef QK_AVX2
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
    __m256i vmx = _mm256_setzero_si256();
    for (; k + 8 <= K; k += 8) {
      __m256 v = load8(x + k);
      if (smooth) v = _mm256_mul_ps(v, _mm256_loadu_ps(smooth + k));
      vmx = _mm256_max_epu32(vmx, _mm256_and_si256(_mm256_castps_si256(v), absmask));
    }
    uint32_t lanes[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), vmx);
    for (uint32_t l : lanes) mx = l > mx ? l : mx;
#endif
    for (; k < K; ++k) {
      float v = smooth ? to_f(x[k]) * smooth[k] : to_f(x[k]);
      uint32_t u;
      std::memcpy(&u, &v, sizeof(u));
      u &= 0x7fffffffu;
      mx = u > mx ? u : mx;
    }
    float amax;
    std::memcpy(&amax, &mx, sizeof(amax));
    s = (amax > kEps || std::isnan(amax) ? amax : kEps) / kQmax;
  }
  k = 0;
#ifdef QK_AVX2
  const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-kQmax), hi = _mm256_set1_ps(kQmax);
  for (; k + 32 <= K; k += 32) {
    __m256i i32[4];
    for (int j = 0; j < 4; ++j) {
      __m256 v = load8(x + k + 8 * j);
      if (smooth) v = _mm256_mul_ps(v, _mm256_loadu_ps(smooth + k + 8 * j));
      v = _mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      i32[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
    }
    // packs work within 128-bit lanes; the permute restores element order.
    __m256i i8 = _mm256_packs_epi16(_mm256_packs_epi32(i32[0], i32[1]), _mm256_packs_epi32(i32[2], i32[3]));
    i8 = _mm256_permutevar8x32_epi32(i8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k), i8);
  }
#endif
  for (; k < K; ++k) {
    float v = smooth ? to_f(x[k]) * smooth[k] : to_f(x[k]);
    q[k] = static_cast<int8_t>(quantize_one(v, s));
  }
  return s;
}

// Runs f(T{}) for the activation dtypes quantkit supports: float32, bfloat16, float16.
template <typename F>
void dispatch_float(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "quantkit CPU kernels take float32, bfloat16 or float16 activations");
  }
}

inline int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1)); }

at::Tensor aligned_rows(const at::Tensor& x, int64_t K) {
  at::Tensor x2d = x.reshape({-1, K});
  if (!x2d.is_contiguous() || reinterpret_cast<uintptr_t>(x2d.data_ptr()) % 64 != 0) {
    x2d = x2d.clone(at::MemoryFormat::Contiguous);  // fresh allocations are 64-byte aligned
  }
  return x2d;
}

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return sizes;
}

void check_operands(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "quantkit CPU kernels take CPU tensors");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "weight must be int8 [N, K]");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "x [..., K] does not match weight [N, K]");
  TORCH_CHECK(weight_scale.numel() == weight.size(0), "weight_scale must have N elements");
}

}  // namespace

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth_inv,
                       const std::optional<at::Tensor>& input_scale) {
  check_operands(x, weight, weight_scale);
  const int64_t K = weight.size(1), N = weight.size(0);
  at::Tensor x2d = aligned_rows(x, K);
  const int64_t M = x2d.size(0);
  at::Tensor out = at::empty(out_sizes(x, N), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return out;
  at::Tensor ws = weight_scale.to(at::kFloat).contiguous().view({N});
  at::Tensor smooth = smooth_inv ? smooth_inv->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  float static_scale = 0.0f;
  if (input_scale) {
    static_scale = input_scale->to(at::kFloat).item<float>();
    TORCH_CHECK(static_scale > 0.0f, "input_scale must be positive");
  }
  at::Tensor q = at::empty({M, K}, x2d.options().dtype(at::kChar));
  at::Tensor scales = at::empty({M}, x2d.options().dtype(at::kFloat));
  const float* sm = smooth.defined() ? smooth.data_ptr<float>() : nullptr;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x2d.data_ptr<scalar_t>();
    int8_t* qp = q.data_ptr<int8_t>();
    float* sp = scales.data_ptr<float>();
    at::parallel_for(0, M, grain_rows(K), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) sp[m] = quantize_row(xp + m * K, sm, K, static_scale, qp + m * K);
    });
  });
  // int32 accumulation is exact: |sum| <= K * 127 * 127 < 2^31 for K up to 133,000.
  at::Tensor acc = at::_int_mm(q, weight.t());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* sp = scales.data_ptr<float>();
  const float* wp = ws.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, grain_rows(N), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const float s = sp[m];
        const int32_t* a = ap + m * N;
        scalar_t* o = op + m * N;
        // Rescale in fp32, in the reference's order: (acc * x_scale) * w_scale + bias.
        if (bp) {
          for (int64_t n = 0; n < N; ++n) o[n] = static_cast<scalar_t>(static_cast<float>(a[n]) * s * wp[n] + bp[n]);
        } else {
          for (int64_t n = 0; n < N; ++n) o[n] = static_cast<scalar_t>(static_cast<float>(a[n]) * s * wp[n]);
        }
      }
    });
  });
  return out;
}

at::Tensor w8a16_packed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                        const std::optional<at::Tensor>& bias) {
  check_operands(x, weight, weight_scale);
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(weight.is_contiguous() && reinterpret_cast<uintptr_t>(weight.data_ptr()) % 64 == 0,
              "_weight_int8pack_mm needs a contiguous, 64-byte aligned weight");
  at::Tensor x2d = aligned_rows(x, K);
  at::Tensor y = at::_weight_int8pack_mm(x2d, weight, weight_scale.to(x.scalar_type()).contiguous().view({N}));
  if (bias) y.add_(bias->to(x.scalar_type()));
  return y.view(out_sizes(x, N));
}

at::Tensor w8a16_dequant(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                         const std::optional<at::Tensor>& bias) {
  check_operands(x, weight, weight_scale);
  const int64_t K = weight.size(1), N = weight.size(0);
  at::Tensor wq = weight.contiguous();
  at::Tensor ws = weight_scale.to(at::kFloat).contiguous().view({N});
  at::Tensor w = at::empty({N, K}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const int8_t* qp = wq.data_ptr<int8_t>();
  const float* sp = ws.data_ptr<float>();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(K), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const float s = sp[n];
        for (int64_t k = 0; k < K; ++k) wp[n * K + k] = static_cast<scalar_t>(static_cast<float>(qp[n * K + k]) * s);
      }
    });
  });
  std::optional<at::Tensor> b;
  if (bias) b = bias->to(x.scalar_type());
  return at::linear(x, w, b);
}
"""

_FUNCTIONS = ["w8a8_linear", "w8a16_packed", "w8a16_dequant"]

_lock = threading.Lock()
_module: ModuleType | None = None
_failed = False


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
        return cpp_extension.load_inline(
            name=f"quantkit_cpu_fused_{variant}",
            cpp_sources=[_SOURCE],
            functions=_FUNCTIONS,
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
    """Fused W8A8 linear (contract: :func:`quantkit.kernels.reference.w8a8_linear`)."""
    return (_module or _require()).w8a8_linear(x, weight, weight_scale, bias, smooth_inv, input_scale)


def packed_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Shapes on which torch's ``_weight_int8pack_mm`` is correct, safe and faster than dequantizing."""
    k = weight.shape[1]
    if not 0 < x.numel() <= PACKED_MAX_ROWS * k or not weight.is_contiguous() or weight.data_ptr() % ALIGN:
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
    """W8A16 through ``_weight_int8pack_mm`` (contract: :func:`quantkit.kernels.reference.w8a16_linear`)."""
    return (_module or _require()).w8a16_packed(x, weight, weight_scale, bias)


def w8a16_dequant_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Every shape and float dtype; only where the extension is built."""
    return _operands_ok(x, weight) and module() is not None


def w8a16_dequant(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A16 by one-pass dequantization and the float GEMM; equal to the reference's result."""
    return (_module or _require()).w8a16_dequant(x, weight, weight_scale, bias)


def register_all(register: Callable[[str, Impl], None]) -> None:
    """Register the fused kernels ahead of the eager CPU paths (which stay as the fallback)."""
    register("w8a8", Impl("cpu_fused", "cpu", w8a8_linear, w8a8_supports, priority=20))
    register("w8a16", Impl("cpu_fused_int8pack", "cpu", w8a16_packed, w8a16_packed_supports, priority=20))
    register("w8a16", Impl("cpu_fused_dequant", "cpu", w8a16_dequant, w8a16_dequant_supports, priority=15))
