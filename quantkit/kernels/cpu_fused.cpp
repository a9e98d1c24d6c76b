// quantkit's fused CPU kernels, compiled on first use by quantkit/kernels/cpu_fused.py (its module
// docstring explains what each function does, why it is C++, and the build flags).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <string>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define QK_AVX2 1
#endif

namespace {

// C++ cannot import them: these restate quantkit.qmath.QMAX and quantkit.qmath.EPS (an all-zero row
// gets a tiny positive scale), and quantkit.kernels.cpu_fused.ALIGN (bytes). Change them together.
constexpr float kQmax = 127.0f;
constexpr float kEps = 1e-8f;
constexpr uintptr_t kAlign = 64;
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

// Runs f(row) for every row in [0, rows), rows of `cols` elements each, split across threads.
template <typename F>
void parallel_rows(int64_t rows, int64_t cols, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

inline bool aligned(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % kAlign == 0; }

at::Tensor aligned_rows(const at::Tensor& x, int64_t K) {
  at::Tensor x2d = x.reshape({-1, K});
  if (!x2d.is_contiguous() || !aligned(x2d)) {
    x2d = x2d.clone(at::MemoryFormat::Contiguous);  // fresh allocations are kAlign-byte aligned
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

// ---- int8 GEMV for a few rows (decode) with AVX512-VNNI --------------------------------------------
// At one to a few rows, oneDNN's _int_mm spends more on setup than on the multiply (58 us per call
// on the default model's 576-wide layers, measured). This kernel streams each weight row once and
// multiplies it with every activation row using vpdpbusd (4 u8 x s8 products summed into each int32
// lane). vpdpbusd wants an unsigned operand, so the activations are shifted to u8 (x + 128, by
// flipping the sign bit) and 128 * sum(w) is subtracted: int32 arithmetic, exact, so the result is
// bit-identical to _int_mm's (and the reference's).
constexpr int64_t kGemvMaxRows = 4;

#if defined(__x86_64__) && defined(__GNUC__)
#define QK_VNNI 1
// Output columns [begin, end) of acc [M, N] (its own function: the target attribute does not reach
// into a lambda, and code using AVX512 intrinsics must carry it).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void gemv_vnni_columns(
    const int8_t* q, int64_t M, int64_t K, const int8_t* w, int64_t N, int32_t* acc, int64_t begin, int64_t end) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));  // int8 x -> uint8 x + 128
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));  // 128 as the unsigned operand
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* wr = w + n * K;
    __m512i corr = _mm512_setzero_si512();
    __m512i a[kGemvMaxRows];
    for (int64_t m = 0; m < M; ++m) a[m] = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64) {
      // Lanes past K load as zero weights: their products vanish whatever the activation lane holds.
      const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, wr + k);
      corr = _mm512_dpbusd_epi32(corr, c128, wv);
      for (int64_t m = 0; m < M; ++m) {
        const __m512i xv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, q + m * K + k), flip);
        a[m] = _mm512_dpbusd_epi32(a[m], xv, wv);
      }
    }
    const int32_t c = _mm512_reduce_add_epi32(corr);
    for (int64_t m = 0; m < M; ++m) acc[m * N + n] = _mm512_reduce_add_epi32(a[m]) - c;
  }
}

// The same GEMV for x86 CPUs without VNNI (AVX2 only), with vpmaddubsw as in the AVX2 GEMM below:
// the weight's magnitude as the unsigned operand, its sign moved onto the activation (vpsignb), pairs
// summed in int16 without saturation (|a| <= 127, |w| <= 128), then vpmaddwd by ones into int32:
// exact. Two weight rows per pass; the K tail past a multiple of 32 in scalar code. Activations must
// lie in [-127, 127] (the quantizer's clamp). It replaced a version that widened both operands to
// int16: on the AVX2 stand-in the default model's layers at one row took 24-71 us instead of 27-101
// us, and W8A8 decode with CPU graphs went from 2.0x to 2.5-2.7x HF bf16 (README).
__attribute__((target("avx2"))) inline __m256i gemv_avx2_step(__m256i a, __m256i u, __m256i v, const int8_t* x) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  return _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(xv, v)), _mm256_set1_epi16(1)));
}

// Sum of a's lanes plus the scalar K tail [K32, K) of row x . column wr.
__attribute__((target("avx2"))) inline int32_t gemv_avx2_finish(__m256i a, const int8_t* x, const int8_t* wr, int64_t K32,
                                                                int64_t K) {
  int32_t lanes[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), a);
  int32_t sum = 0;
  for (int32_t v : lanes) sum += v;
  for (int64_t k = K32; k < K; ++k) sum += int32_t(x[k]) * int32_t(wr[k]);
  return sum;
}

template <int M>
__attribute__((target("avx2"))) void gemv_avx2_columns(const int8_t* q, int64_t K, const int8_t* w, int64_t N,
                                                       int32_t* acc, int64_t begin, int64_t end) {
  const int64_t K32 = K - K % 32;
  int64_t n = begin;
  for (; n + 2 <= end; n += 2) {
    __m256i a0[M], a1[M];
    for (int m = 0; m < M; ++m) a0[m] = a1[m] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K32; k += 32) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K + k));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n + 1) * K + k));
      const __m256i u0 = _mm256_abs_epi8(v0), u1 = _mm256_abs_epi8(v1);
      for (int m = 0; m < M; ++m) {
        a0[m] = gemv_avx2_step(a0[m], u0, v0, q + m * K + k);
        a1[m] = gemv_avx2_step(a1[m], u1, v1, q + m * K + k);
      }
    }
    for (int m = 0; m < M; ++m) {
      acc[m * N + n] = gemv_avx2_finish(a0[m], q + m * K, w + n * K, K32, K);
      acc[m * N + n + 1] = gemv_avx2_finish(a1[m], q + m * K, w + (n + 1) * K, K32, K);
    }
  }
  for (; n < end; ++n) {
    __m256i a0[M];
    for (int m = 0; m < M; ++m) a0[m] = _mm256_setzero_si256();
    for (int64_t k = 0; k < K32; k += 32) {
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + n * K + k));
      const __m256i u0 = _mm256_abs_epi8(v0);
      for (int m = 0; m < M; ++m) a0[m] = gemv_avx2_step(a0[m], u0, v0, q + m * K + k);
    }
    for (int m = 0; m < M; ++m) acc[m * N + n] = gemv_avx2_finish(a0[m], q + m * K, w + n * K, K32, K);
  }
}

bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vnni");
  return yes;
}
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#else
bool has_vnni() { return false; }
bool has_avx2() { return false; }
#endif

// Which GEMV the fused W8A8 kernel uses at up to kGemvMaxRows rows: "vnni", "avx2" or "" (none:
// _int_mm for every row count). QUANTKIT_GEMV=0 turns it off; QUANTKIT_GEMV=avx2 picks the AVX2 one
// on a VNNI CPU too (to test and time it where the other is available).
const std::string& gemv_kind() {
  static const std::string kind = [] {
    const char* v = std::getenv("QUANTKIT_GEMV");
    const std::string want = v ? v : "";
    if (want == "0") return std::string();
    if (has_vnni() && want != "avx2") return std::string("vnni");
    return has_avx2() ? std::string("avx2") : std::string();
  }();
  return kind;
}

// ---- W8A16 GEMV for a few rows (decode) -----------------------------------------------------------
#ifdef QK_VNNI
// fp32 activations [M, K] x int8 weights [N, K]^T -> fp32 dot products [M, N]: each weight row is
// read once, widened to fp32 in registers and multiplied into every activation row with FMA. Four
// weight rows at a time, so four independent accumulation chains (and four memory streams) are in
// flight. Each output's arithmetic depends only on its own row and column, never on M: a sequence
// gets the same result alone and in a batch. At one row torch's _weight_int8pack_mm reads the
// default model's 49,152 x 576 tied lm_head at ~11 GB/s; this kernel reaches more (see README).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void w16_gemv_avx512(const float* x, int64_t K, const int8_t* w,
                                                                          int64_t N, float* acc, int64_t begin,
                                                                          int64_t end) {
  int64_t n = begin;
  for (; n + 4 <= end; n += 4) {
    __m512 a[4][M];
    for (int c = 0; c < 4; ++c)
      for (int m = 0; m < M; ++m) a[c][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      for (int c = 0; c < 4; ++c) {
        const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + (n + c) * K + k)));
        for (int m = 0; m < M; ++m) a[c][m] = _mm512_fmadd_ps(wf, xv[m], a[c][m]);
      }
    }
    for (int c = 0; c < 4; ++c)
      for (int m = 0; m < M; ++m) acc[m * N + n + c] = _mm512_reduce_add_ps(a[c][m]);
  }
  for (; n < end; ++n) {
    __m512 a[M];
    for (int m = 0; m < M; ++m) a[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
      const __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, w + n * K + k)));
      for (int m = 0; m < M; ++m) a[m] = _mm512_fmadd_ps(wf, _mm512_maskz_loadu_ps(mask, x + m * K + k), a[m]);
    }
    for (int m = 0; m < M; ++m) acc[m * N + n] = _mm512_reduce_add_ps(a[m]);
  }
}

// The same for AVX2 + FMA (8 lanes; the K tail in scalar code, in the same order for every row).
template <int M>
__attribute__((target("avx2,fma"))) void w16_gemv_avx2(const float* x, int64_t K, const int8_t* w, int64_t N,
                                                       float* acc, int64_t begin, int64_t end) {
  const int64_t K8 = K - K % 8;
  for (int64_t n = begin; n < end; ++n) {
    const int8_t* wr = w + n * K;
    __m256 a[M];
    for (int m = 0; m < M; ++m) a[m] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + k))));
      for (int m = 0; m < M; ++m) a[m] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + m * K + k), a[m]);
    }
    for (int m = 0; m < M; ++m) {
      float lanes[8];
      _mm256_storeu_ps(lanes, a[m]);
      float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
      for (int64_t k = K8; k < K; ++k) sum += x[m * K + k] * static_cast<float>(wr[k]);
      acc[m * N + n] = sum;
    }
  }
}

template <int M>
void w16_gemv(bool avx512, const float* x, int64_t K, const int8_t* w, int64_t N, float* acc) {
  // 4-column blocks, so a thread's share starts on a block boundary.
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b, int64_t e) {
    const int64_t begin = 4 * b, end = std::min<int64_t>(4 * e, N);
    if (avx512) {
      w16_gemv_avx512<M>(x, K, w, N, acc, begin, end);
    } else {
      w16_gemv_avx2<M>(x, K, w, N, acc, begin, end);
    }
  });
}

bool has_fma() {
  static const bool yes = __builtin_cpu_supports("fma");
  return yes;
}
#endif  // QK_VNNI

// ---- int8 GEMM for many rows (prefill) without fast int8 dot products -------------------------------
// oneDNN's _int_mm is fast where the CPU multiplies int8 natively (AVX512-VNNI, AVX-VNNI, AMX); on an
// AVX2-only CPU it ran W8A8 prefill at 0.29x bf16 (issue 16). There the int8 values go through the
// fp32 GEMM instead, which is exact: every product is an integer of magnitude <= 127 * 128 (the
// activations are clamped to +-127) and every partial sum of up to kExactK of them stays below 2^24, where fp32 represents integers exactly, in
// whatever order the GEMM adds them. Longer rows are split into chunks of kExactK whose exact sums
// are added in int32. The result is _int_mm's, bit for bit; the weight is widened per call, which a
// prefill's rows amortize. Not used when fp32 matmuls may run in reduced precision
// (torch.set_float32_matmul_precision other than "highest").
constexpr int64_t kExactK = 1032;  // 1032 * 128 * 127 = 16,776,192 < 2^24 = 16,777,216 (any int8 weight)

// "int_mm", "avx2" or "fp32": how the W8A8 kernel multiplies more than kGemvMaxRows rows.
// QUANTKIT_INT8_GEMM picks one (A/B benchmarks, tests; "avx2" only where the CPU has AVX2); by default
// int_mm where the CPU has native int8 dot products, else the AVX2 kernel below, else fp32.
const std::string& int8_gemm_kind() {
  static const std::string kind = [] {
    const char* v = std::getenv("QUANTKIT_INT8_GEMM");
    const std::string want = v ? v : "";
    if (want == "int_mm" || want == "fp32") return want;
#ifdef QK_VNNI
    if (want == "avx2" && has_avx2()) return want;
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
    // AMX CPUs have AVX512-VNNI too; AVX-VNNI (client CPUs without AVX512) is oneDNN's avx2_vnni.
    const bool native = has_vnni() || __builtin_cpu_supports("avxvnni");
#elif defined(__x86_64__) && defined(__GNUC__)
    const bool native = has_vnni();
#else
    const bool native = true;  // ARM and others: leave it to oneDNN / torch
#endif
#ifdef QK_VNNI
    if (!native && has_avx2()) return std::string("avx2");
#endif
    return std::string(native ? "int_mm" : "fp32");
  }();
  return kind;
}

// Whether fp32 matmuls run in full precision (set_float32_matmul_precision("highest")). torch 2.9+
// throws from this query once the per-backend precision settings are used: then assume they are not.
bool fp32_matmul_is_ieee() {
  try {
    return at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST;
  } catch (const std::exception&) {
    return false;
  }
}

// M, N, K > 0 (int8_matmul returns empty products before calling it).
at::Tensor int8_matmul_fp32(const at::Tensor& q, const at::Tensor& weight) {
  const int64_t K = q.size(1);
  at::Tensor qf = q.to(at::kFloat);
  at::Tensor acc;
  for (int64_t k0 = 0; k0 < K; k0 += kExactK) {
    const int64_t len = std::min(kExactK, K - k0);
    at::Tensor wf = weight.narrow(1, k0, len).to(at::kFloat);
    at::Tensor part = at::mm(qf.narrow(1, k0, len), wf.t()).to(at::kInt);
    acc = acc.defined() ? acc.add_(part) : part;
  }
  return acc;
}

#ifdef QK_VNNI
// ---- int8 GEMM with AVX2 (no VNNI): vpmaddubsw ---------------------------------------------------
// vpmaddubsw multiplies 32 unsigned by 32 signed bytes and adds adjacent pairs into int16 lanes,
// saturating: exact when each pair sum stays within +-32767. With the weight's magnitude as the
// unsigned operand (|w| <= 128, also for -128) and the activation carrying the weight's sign (vpsignb;
// activations are clamped to +-127, so negating one cannot overflow), every product is exactly
// a * w and a pair sums to at most 2 * 128 * 127 = 32512: no saturation, for any int8 weight. vpmaddwd
// by ones widens the pairs into int32 lanes. 32 products per three instructions on the two vector
// ports, where fp32 FMA needs four: the whole W8A8 linear ran 1.11-1.22x MKL's AVX2 fp32 linear at
// M = 512 and 1.31-2.15x at M = 16 on the default model's shapes (README, AVX2 stand-in).
//
// The weight is repacked per call, one block of 16 output columns at a time, in the order the kernel
// reads it: [K / 4][16 columns][4 bytes], so one 32-byte load holds 8 columns x 4 k, and an
// activation's 4 bytes broadcast to all 8 lanes. Rows past K (to a multiple of 4) and columns past N
// are zero, which adds nothing. A block is 16 x K bytes (L1/L2-resident) and serves every row of
// the thread's row range.
constexpr int64_t kPackCols = 16;

// Columns [n0, n0 + cols) of w [N, K] into out [K4][16][4] (zero-padded); AVX2 8 x 8 transposes of
// int32 groups where 8 columns and 8 groups are whole, scalar code elsewhere.
__attribute__((target("avx2"))) void pack_block(const int8_t* w, int64_t K, int64_t n0, int64_t cols, int8_t* out) {
  const int64_t K4 = (K + 3) / 4, whole = K / 4;
  int64_t g0 = 0;
  if (cols == kPackCols) {
    for (; g0 + 8 <= whole; g0 += 8) {
      for (int half = 0; half < 2; ++half) {
        __m256i r[8];
        for (int c = 0; c < 8; ++c)
          r[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + half * 8 + c) * K + g0 * 4));
        // 8 x 8 transpose of int32: r[c] holds groups g0..g0+7 of column c; each store below holds
        // one group of columns 0..7.
        __m256i a[8], b[8];
        for (int i = 0; i < 4; ++i) {
          a[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
          a[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 2; ++i) {
          b[4 * i] = _mm256_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
          b[4 * i + 1] = _mm256_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
          b[4 * i + 2] = _mm256_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
          b[4 * i + 3] = _mm256_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
        }
        for (int j = 0; j < 4; ++j) {
          const __m256i lo = _mm256_permute2x128_si256(b[j], b[4 + j], 0x20);  // groups j (columns 0..7)
          const __m256i hi = _mm256_permute2x128_si256(b[j], b[4 + j], 0x31);  // groups j + 4
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + ((g0 + j) * kPackCols + half * 8) * 4), lo);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + ((g0 + j + 4) * kPackCols + half * 8) * 4), hi);
        }
      }
    }
  }
  for (int64_t g = g0; g < K4; ++g)
    for (int64_t c = 0; c < kPackCols; ++c)
      for (int64_t j = 0; j < 4; ++j) {
        const int64_t k = g * 4 + j;
        out[(g * kPackCols + c) * 4 + j] = c < cols && k < K ? w[(n0 + c) * K + k] : 0;
      }
}

// R rows of q (row stride lda >= 4 * K4, zero past K) x one packed block -> acc rows (stride N).
template <int R>
__attribute__((target("avx2"))) void gemm_avx2_tile(const int8_t* q, int64_t lda, const int8_t* packed, int64_t K4,
                                                    int32_t* acc, int64_t N, int64_t cols) {
  __m256i a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t g = 0; g < K4; ++g) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + g * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(packed + g * 64 + 32));
    const __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, q + r * lda + g * 4, 4);
      const __m256i x = _mm256_set1_epi32(four);
      a[r][0] = _mm256_add_epi32(a[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(x, w0)), ones));
      a[r][1] = _mm256_add_epi32(a[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(x, w1)), ones));
    }
  }
  for (int r = 0; r < R; ++r) {
    int32_t lanes[kPackCols];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), a[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes + 8), a[r][1]);
    std::memcpy(acc + r * N, lanes, cols * sizeof(int32_t));
  }
}

// q's values must lie in [-127, 127] (the activation quantizer's clamp), any int8 weight; M, N, K > 0
// (int8_matmul returns empty products before calling it).
at::Tensor int8_matmul_avx2(const at::Tensor& q_in, const at::Tensor& weight_in) {
  const int64_t M = q_in.size(0), K = q_in.size(1), N = weight_in.size(0), K4 = (K + 3) / 4;
  const at::Tensor weight = weight_in.contiguous();
  // The kernel reads activations 4 bytes at a time: pad rows to a multiple of 4 with zeros.
  const at::Tensor q = K % 4 == 0 ? q_in.contiguous() : at::constant_pad_nd(q_in, {0, 4 * K4 - K}, 0);
  const int64_t lda = q.size(1);
  at::Tensor acc = at::empty({M, N}, q.options().dtype(at::kInt));
  const int8_t* qp = q.data_ptr<int8_t>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  int32_t* ap = acc.data_ptr<int32_t>();
  // Tiles: (row range, column block), column blocks innermost so a thread's consecutive tiles reuse
  // one row range from cache. Row ranges hold ~256 KB of activations (at least 64 rows, so packing a
  // block costs at most 1/64 of its multiplies) and are cut finer where N alone gives too few tiles
  // for the threads.
  const int64_t blocks = (N + kPackCols - 1) / kPackCols;
  const int64_t want = 4 * at::get_num_threads();
  const int64_t cached_rows = std::max<int64_t>(64, (256 << 10) / lda);
  const int64_t row_parts = std::max<int64_t>((M + cached_rows - 1) / cached_rows,
                                              std::min<int64_t>((M + 15) / 16, (want + blocks - 1) / blocks));
  const int64_t rows_per = (M + row_parts - 1) / row_parts;
  at::parallel_for(0, blocks * row_parts, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> packed(K4 * kPackCols * 4);
    int64_t packed_block = -1;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t block = t % blocks, part = t / blocks;
      const int64_t n0 = block * kPackCols, cols = std::min(kPackCols, N - n0);
      if (block != packed_block) {
        pack_block(wp, K, n0, cols, packed.data());
        packed_block = block;
      }
      const int64_t m1 = std::min(M, (part + 1) * rows_per);
      int64_t m = part * rows_per;
      for (; m + 4 <= m1; m += 4) gemm_avx2_tile<4>(qp + m * lda, lda, packed.data(), K4, ap + m * N + n0, N, cols);
      for (; m < m1; ++m) gemm_avx2_tile<1>(qp + m * lda, lda, packed.data(), K4, ap + m * N + n0, N, cols);
    }
  });
  return acc;
}
#endif  // QK_VNNI

// int8 [M, K] x int8 [N, K]^T -> int32 [M, N], exact: a GEMV for a few rows, else _int_mm, the AVX2
// GEMM or the exact fp32 GEMM (int8_gemm_kind).
at::Tensor int8_matmul(const at::Tensor& q, const at::Tensor& weight) {
  const int64_t M = q.size(0), K = q.size(1), N = weight.size(0);
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, q.options().dtype(at::kInt));
#ifdef QK_VNNI
  const std::string& kind = gemv_kind();
  if (M <= kGemvMaxRows && !kind.empty() && weight.is_contiguous()) {
    at::Tensor acc = at::empty({M, N}, q.options().dtype(at::kInt));
    const int8_t* qp = q.data_ptr<int8_t>();
    const int8_t* wp = weight.data_ptr<int8_t>();
    int32_t* ap = acc.data_ptr<int32_t>();
    const bool vnni = kind == "vnni";
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      if (vnni) {
        gemv_vnni_columns(qp, M, K, wp, N, ap, begin, end);
      } else if (M == 1) {
        gemv_avx2_columns<1>(qp, K, wp, N, ap, begin, end);
      } else if (M == 2) {
        gemv_avx2_columns<2>(qp, K, wp, N, ap, begin, end);
      } else if (M == 3) {
        gemv_avx2_columns<3>(qp, K, wp, N, ap, begin, end);
      } else {  // M == kGemvMaxRows (M >= 1 here)
        gemv_avx2_columns<kGemvMaxRows>(qp, K, wp, N, ap, begin, end);
      }
    });
    return acc;
  }
#endif
  // torch 2.13's CPU _int_mm returns wrong sums for K = 1 (probed: every M); tiny K is cheap in int32.
  if (K == 1) return at::matmul(q.to(at::kInt), weight.to(at::kInt).t());
#ifdef QK_VNNI
  if (int8_gemm_kind() == "avx2") return int8_matmul_avx2(q, weight);
#endif
  if (int8_gemm_kind() == "fp32" && fp32_matmul_is_ieee()) {
    return int8_matmul_fp32(q, weight);
  }
  return at::_int_mm(q, weight.t());
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
    parallel_rows(M, K, [&](int64_t m) { sp[m] = quantize_row(xp + m * K, sm, K, static_scale, qp + m * K); });
  });
  // int32 accumulation is exact: |sum| <= K * 127 * 127 < 2^31 for K up to 133,000.
  at::Tensor acc = int8_matmul(q, weight);
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* sp = scales.data_ptr<float>();
  const float* wp = ws.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_rows(M, N, [&](int64_t m) {
      const float s = sp[m];
      const int32_t* a = ap + m * N;
      scalar_t* o = op + m * N;
      // Rescale in fp32, in the reference's order: (acc * x_scale) * w_scale + bias.
      if (bp) {
        for (int64_t n = 0; n < N; ++n) o[n] = static_cast<scalar_t>(static_cast<float>(a[n]) * s * wp[n] + bp[n]);
      } else {
        for (int64_t n = 0; n < N; ++n) o[n] = static_cast<scalar_t>(static_cast<float>(a[n]) * s * wp[n]);
      }
    });
  });
  return out;
}

// Which W8A16 GEMV runs at up to kGemvMaxRows tokens per sequence: "avx512", "avx2" or "" (none:
// _weight_int8pack_mm). Follows the W8A8 GEMV's choice: QUANTKIT_GEMV=0 turns it off, =avx2 forces AVX2.
const std::string& w16_gemv_kind() {
  static const std::string kind = [] {
#ifdef QK_VNNI
    const std::string& w8a8 = gemv_kind();
    if (w8a8 == "vnni") return std::string("avx512");
    if (w8a8 == "avx2" && has_fma()) return std::string("avx2");
#endif
    return std::string();
  }();
  return kind;
}

#ifdef QK_VNNI
at::Tensor w8a16_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                      const std::optional<at::Tensor>& bias, bool avx512) {
  const int64_t K = weight.size(1), N = weight.size(0);
  at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor acc = at::empty({M, N}, xf.options());
  at::Tensor out = at::empty(out_sizes(x, N), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return out;
  at::Tensor ws = weight_scale.to(at::kFloat).contiguous().view({N});
  at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  float* ap = acc.data_ptr<float>();
  // Rows in groups of up to kGemvMaxRows: every output is computed the same way whatever the group.
  for (int64_t m0 = 0; m0 < M; m0 += kGemvMaxRows) {
    const float* xm = xp + m0 * K;
    float* am = ap + m0 * N;
    switch (std::min<int64_t>(M - m0, kGemvMaxRows)) {
      case 1: w16_gemv<1>(avx512, xm, K, wp, N, am); break;
      case 2: w16_gemv<2>(avx512, xm, K, wp, N, am); break;
      case 3: w16_gemv<3>(avx512, xm, K, wp, N, am); break;
      default: w16_gemv<4>(avx512, xm, K, wp, N, am); break;
    }
  }
  const float* sp = ws.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* op = out.data_ptr<scalar_t>();
    parallel_rows(M, N, [&](int64_t m) {
      for (int64_t n = 0; n < N; ++n) {
        const float y = ap[m * N + n] * sp[n];
        op[m * N + n] = static_cast<scalar_t>(bp ? y + bp[n] : y);
      }
    });
  });
  return out;
}
#endif  // QK_VNNI

at::Tensor w8a16_packed(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                        const std::optional<at::Tensor>& bias) {
  check_operands(x, weight, weight_scale);
  const int64_t K = weight.size(1), N = weight.size(0);
  // Tokens per sequence, as the Python side chooses paths (quantkit.kernels.reference.rows_per_sequence).
  const int64_t L = x.dim() >= 3 ? x.size(-2) : x.numel() / std::max<int64_t>(K, 1);
#ifdef QK_VNNI
  if (L <= kGemvMaxRows && weight.is_contiguous() && !w16_gemv_kind().empty()) {
    return w8a16_gemv(x, weight, weight_scale, bias, w16_gemv_kind() == "avx512");
  }
#endif
  TORCH_CHECK(weight.is_contiguous() && aligned(weight),
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
    parallel_rows(N, K, [&](int64_t n) {
      const float s = sp[n];
      for (int64_t k = 0; k < K; ++k) wp[n * K + k] = static_cast<scalar_t>(static_cast<float>(qp[n * K + k]) * s);
    });
  });
  std::optional<at::Tensor> b;
  if (bias) b = bias->to(x.scalar_type());
  // One GEMM per sequence of a batch [..., L, K]: the float GEMM's rounding may depend on the row
  // count (MKL and oneDNN pick kernels by M), so each sequence gets the call it would get alone and
  // its outputs do not depend on the rest of the batch (the reference does the same).
  const int64_t L = x.dim() >= 3 ? x.size(-2) : x.numel() / K;
  const int64_t B = L > 0 ? x.numel() / (L * K) : 0;
  if (B <= 1) return at::linear(aligned_rows(x, K), w, b).view(out_sizes(x, N));
  at::Tensor seqs = x.reshape({B, L, K});
  at::Tensor out = at::empty({B, L, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  for (int64_t i = 0; i < B; ++i) out.select(0, i).copy_(at::linear(aligned_rows(seqs.select(0, i), K), w, b));
  return out.view(out_sizes(x, N));
}

namespace {

// Shape-only versions of the ops for the Meta device (torch.compile and fake tensors trace with them).
at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1), "x [..., K] does not match weight [N, K]");
  return at::empty(out_sizes(x, weight.size(0)), x.options());
}
at::Tensor w8a8_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor&, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  return linear_meta(x, weight);
}
at::Tensor w8a16_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor&, const std::optional<at::Tensor>&) {
  return linear_meta(x, weight);
}

}  // namespace

// The kernels as dispatcher ops (torch.ops.quantkit.*): the profiler, torch.compile and the decode-step
// recorder (quantkit/evaluation/cpu_graph.py) see each quantized linear as one op.
TORCH_LIBRARY(quantkit, m) {
  m.def("w8a8_linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias=None, Tensor? smooth_inv=None, "
        "Tensor? input_scale=None) -> Tensor");
  m.def("w8a16_packed(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias=None) -> Tensor");
  m.def("w8a16_dequant(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("w8a16_packed", &w8a16_packed);
  m.impl("w8a16_dequant", &w8a16_dequant);
}
TORCH_LIBRARY_IMPL(quantkit, Meta, m) {
  m.impl("w8a8_linear", &w8a8_meta);
  m.impl("w8a16_packed", &w8a16_meta);
  m.impl("w8a16_dequant", &w8a16_meta);
}

// ---- Replay of a recorded op sequence (the CPU counterpart of a CUDA graph) -----------------------
// quantkit/evaluation/cpu_graph.py records the ATen (and quantkit) ops one decode step dispatches and
// hands them here; run() calls the same ops with the same arguments through the dispatcher, with no
// Python in between. Each argument is a constant (weights, cache tensors, static buffers, numbers), a
// slot (the output of an earlier op in the sequence), or a list mixing both.
namespace {

struct ArgSpec {
  enum Kind { kConst = 0, kRef = 1, kList = 2 };
  Kind kind = kConst;
  c10::IValue value;  // kConst
  int64_t slot = -1;  // kRef: the slot holding the value
  int64_t index = -1;  // kRef: element of a list-valued slot, or -1 for the slot itself
  std::vector<ArgSpec> items;  // kList
  bool optional_items = false;  // kList: Tensor?[] rather than Tensor[]
};

struct Node {
  c10::OperatorHandle op;
  std::vector<ArgSpec> args;
  std::vector<int64_t> outs;  // slot for each return value, -1 to drop it
  std::vector<int64_t> release;  // slots last read by this node
};

ArgSpec parse_arg(const py::handle& spec, const c10::TypePtr& type) {
  auto t = spec.cast<py::tuple>();
  ArgSpec a;
  a.kind = static_cast<ArgSpec::Kind>(t[0].cast<int>());
  if (a.kind == ArgSpec::kConst) {
    py::handle obj = t[1];
    if (type->kind() == c10::TypeKind::TensorType && !THPVariable_Check(obj.ptr())) {
      // A Python number where the schema has a Tensor (x + 1): what Python's binding passes is a
      // "wrapped number" tensor, which type promotion treats as a scalar; make the same one.
      at::Scalar s = py::isinstance<py::bool_>(obj)  ? at::Scalar(obj.cast<bool>())
                     : py::isinstance<py::int_>(obj) ? at::Scalar(obj.cast<int64_t>())
                                                     : at::Scalar(obj.cast<double>());
      at::Tensor wrapped = at::scalar_to_tensor(s);
      wrapped.unsafeGetTensorImpl()->set_wrapped_number(true);
      a.value = wrapped;
    } else {
      a.value = torch::jit::toIValue(obj, type);
    }
  } else if (a.kind == ArgSpec::kRef) {
    a.slot = t[1].cast<int64_t>();
    a.index = t[2].cast<int64_t>();
  } else {
    auto list_type = type->castRaw<c10::ListType>();
    TORCH_CHECK(list_type != nullptr, "a list argument where the schema has ", type->str());
    const c10::TypePtr& elem = list_type->getElementType();
    a.optional_items = elem->kind() == c10::TypeKind::OptionalType;
    TORCH_CHECK(a.optional_items || elem->kind() == c10::TypeKind::TensorType,
                "lists with recorded tensors must be Tensor[] or Tensor?[], not ", type->str());
    for (const auto& item : t[1].cast<py::list>()) a.items.push_back(parse_arg(item, elem));
  }
  return a;
}

class Replay {
 public:
  // nodes: [(name, overload, [arg spec or None for the schema's default], [out slot], [released slot])]
  Replay(const py::list& nodes, int64_t n_slots) : slots_(n_slots) {
    for (const auto& item : nodes) {
      auto t = item.cast<py::tuple>();
      auto op = c10::Dispatcher::singleton().findSchemaOrThrow(t[0].cast<std::string>().c_str(),
                                                               t[1].cast<std::string>().c_str());
      const auto& schema_args = op.schema().arguments();
      auto specs = t[2].cast<py::list>();
      TORCH_CHECK(specs.size() == schema_args.size(), op.schema().name(), ": ", specs.size(),
                  " arguments recorded, the schema has ", schema_args.size());
      std::vector<ArgSpec> args;
      for (size_t i = 0; i < schema_args.size(); ++i) {
        if (specs[i].is_none()) {
          TORCH_CHECK(schema_args[i].default_value().has_value(), op.schema().name(), ": argument ",
                      schema_args[i].name(), " was not recorded and has no default");
          ArgSpec a;
          a.value = *schema_args[i].default_value();
          args.push_back(std::move(a));
        } else {
          args.push_back(parse_arg(specs[i], schema_args[i].type()));
        }
      }
      nodes_.push_back(Node{op, std::move(args), t[3].cast<std::vector<int64_t>>(), t[4].cast<std::vector<int64_t>>()});
    }
  }

  void run() {
    py::gil_scoped_release no_gil;
    c10::InferenceMode inference;
    torch::jit::Stack stack;
    for (const Node& n : nodes_) {
      stack.clear();
      for (const ArgSpec& a : n.args) stack.push_back(resolve(a));
      n.op.callBoxed(stack);
      for (size_t i = 0; i < n.outs.size(); ++i) {
        if (n.outs[i] >= 0) slots_[n.outs[i]] = std::move(stack[i]);
      }
      for (int64_t s : n.release) slots_[s] = c10::IValue();
    }
  }

  int64_t size() const { return static_cast<int64_t>(nodes_.size()); }

 private:
  c10::IValue resolve(const ArgSpec& a) const {
    switch (a.kind) {
      case ArgSpec::kConst:
        return a.value;
      case ArgSpec::kRef:
        return a.index < 0 ? slots_[a.slot] : slots_[a.slot].toListRef()[a.index];
      case ArgSpec::kList:
        if (a.optional_items) {
          c10::List<std::optional<at::Tensor>> list;
          for (const ArgSpec& item : a.items) {
            c10::IValue v = resolve(item);
            list.push_back(v.isNone() ? std::optional<at::Tensor>() : std::optional<at::Tensor>(v.toTensor()));
          }
          return list;
        } else {
          c10::List<at::Tensor> list;
          for (const ArgSpec& item : a.items) list.push_back(resolve(item).toTensor());
          return list;
        }
    }
    return c10::IValue();
  }

  std::vector<Node> nodes_;
  std::vector<c10::IValue> slots_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("w8a8_linear", &w8a8_linear, "fused W8A8 linear");
  m.def("w8a16_packed", &w8a16_packed, "W8A16 through _weight_int8pack_mm");
  m.def("w8a16_dequant", &w8a16_dequant, "W8A16 by one-pass dequantization and the float GEMM");
  m.def("gemv_kind", &gemv_kind, "the int8 GEMV used at a few rows: vnni, avx2 or empty");
  m.def("int8_matmul", &int8_matmul, "the W8A8 kernel's exact int8 [M, K] x int8 [N, K]^T -> int32 [M, N] (tests)");
  m.def("int8_gemm_kind", &int8_gemm_kind, "how W8A8 multiplies many rows: int_mm, avx2 or fp32 (all exact)");
  m.def("w16_gemv_kind", &w16_gemv_kind, "the W8A16 GEMV used at a few tokens per sequence: avx512, avx2 or empty");
  py::class_<Replay>(m, "Replay")
      .def(py::init<const py::list&, int64_t>())
      .def("run", &Replay::run)
      .def("__len__", &Replay::size);
}
