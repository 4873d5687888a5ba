// Fused blockwise 8-bit AdamW step for the CPU, registered as t2i_fast::adamw8bit_step.
//
// Design (same algorithm and state layout as bitsandbytes' AdamW8bit, so state moves between the two):
//   - state1 (m) and state2 (v) are uint8 codes into two 256-entry dynamic maps (signed for m, unsigned
//     for v); each block of 256 values has its own fp32 absmax: value = map[code] * absmax[block].
//   - per block: dequantize -> AdamW update with decoupled weight decay -> new absmax -> requantize,
//     all while the block is in L1, so memory is read and written once (g, p, codes, absmax).
//   - tensors whose state1 is float32 (under min_8bit_size elements, 4096 by default) keep fp32 state and
//     take the same update without quantization.
//   - quantization of x = value * (1 / absmax) in [-1, 1] is arithmetic, not a table search: the map is
//     7 decades of evenly spaced entries (bitsandbytes' create_dynamic_map), so the decade d is the count of
//     7 decade thresholds (the table's own midpoints between decades, and towards 0) below |x|, the entry
//     inside it is trunc((|x| * 10^(6-(d-1)) - 0.1) * N_d / 0.9), clamped to the decade's last entry, and an
//     8th threshold (midway to 1.0) picks the map's top entry. This is the nearest entry except within an
//     ulp of a midpoint (measured: ~1 in 40,000 values, one code off, error larger by <= 1.2e-7). Gathers
//     are slow on the hosts we measured, and this needs none: 8-entry permutes of per-decade constants.
//     Measured on an AMD EPYC (Zen 4, AVX2, 1 thread), quantization was ~2/3 of the step, bound by vector
//     shuffle/permute throughput: the decade count uses integer compares of the float bits (|x| >= 0, so
//     the bits order like the floats), the clamp below the decade is left to truncation towards zero, the
//     map offset is added as an integer after the fp32 arithmetic (folding it into the fp32 constants would
//     move code boundaries), and codes are packed 32 at a time. Python builds the constants
//     (optim.quant_tables).
//   - the arithmetic is written in the same order, with the same fp32 roundings, as the PyTorch twin
//     t2i_fast.optim.adamw8bit_step_ref; compiled with -ffp-contract=off the two agree bit for bit.
//   - the whole parameter list goes in one call: one OpenMP region over chunks of blocks of all tensors.
//     Full blocks take an AVX2 path where the compiler targets AVX2; other blocks, and other hosts, a
//     portable loop of the same arithmetic.
// Limits: CPU tensors only, contiguous, float32 / float16 / bfloat16 params with grads of the same dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace t2i_fast {
namespace {

constexpr int64_t kBlock = 256;
constexpr int64_t kChunkBlocks = 64;   // 16384 values per work item

inline float to_f(float x) { return x; }
inline float to_f(c10::Half x) { return static_cast<float>(x); }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }
template <typename T> inline T from_f(float x) { return static_cast<T>(x); }

struct Hyper {
  float beta1, omb1, beta2, omb2, decay, eps_c2, step_size;
};

Hyper make_hyper(double lr, double beta1, double beta2, double eps, double wd, int64_t step) {
  // Scalars are formed in double and rounded once to fp32, as PyTorch does with Python-float scalars.
  const double c1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double c2 = std::sqrt(1.0 - std::pow(beta2, static_cast<double>(step)));
  Hyper h;
  h.beta1 = static_cast<float>(beta1);
  h.omb1 = static_cast<float>(1.0 - beta1);
  h.beta2 = static_cast<float>(beta2);
  h.omb2 = static_cast<float>(1.0 - beta2);
  h.decay = static_cast<float>(1.0 - lr * wd);
  h.eps_c2 = static_cast<float>(eps * c2);
  h.step_size = static_cast<float>(lr * c2 / c1);
  return h;
}

// Per map, 5 rows of 8 floats; rows 1-4 are indexed by d = number of the first 7 thresholds below |x|:
//   kU: the 8 thresholds (the last one separates the map's top entry 1.0); kS: 10^(6-(d-1)); kW: N_d/0.9;
//   kOff: the code of the decade's first entry; kHi: the code of its last entry (both integers).
// Row d = 0 (|x| at or below the first threshold) is S = W = 0 and Off = Hi = the code of the map's zero.
// Inside decade d, t = (|x| S - 0.1) W lies in (-1, N_d]: truncation towards zero is the floor clamped at 0.
enum { kU = 0, kS = 8, kW = 16, kOff = 24, kHi = 32, kConst = 40 };

struct Tables {
  const float *q1, *q2;   // the maps (dequantization)
  const float *c1, *c2;   // quantization constants (signed, unsigned)
};

// 1 / absmax, or 0 for an all-zero block (whose codes then all point at the map's zero).
inline float inv_or_zero(float mx) { return mx > 0.f ? 1.f / mx : 0.f; }

inline int32_t bits_of(float x) {
  int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}

// The scalar quantizer; quantize8 below is the same arithmetic on 8 lanes. Signed map: positive codes
// count up from 128, negative ones mirror them as 254 - code (the map has no -1.0, so no top there).
template <bool kSigned>
inline uint8_t quantize(float x, const float* c) {
  const float a = std::fabs(x);
  const int32_t ai = bits_of(a);
  int d = 0;
  for (int k = 0; k < 7; ++k) d += ai > bits_of(c[kU + k]) ? 1 : 0;
  const int top = ai > bits_of(c[kU + 7]) ? 1 : 0;
  const float t = (a * c[kS + d] - 0.1f) * c[kW + d];
  const int k = std::min(static_cast<int>(t) + static_cast<int>(c[kOff + d]), static_cast<int>(c[kHi + d]));
  if (kSigned) return static_cast<uint8_t>(std::signbit(x) ? 254 - k : k + top);
  return static_cast<uint8_t>(k + top);
}

// One block of an 8-bit-state tensor, fp32 params: n <= 256 values at p, g, s1, s2. Portable code.
void block_8bit_scalar(float* p, const float* g, uint8_t* s1, uint8_t* s2, float* am1, float* am2,
                       int64_t n, const Hyper& h, const Tables& t) {
  float m[kBlock], v[kBlock];
  const float a1 = *am1, a2 = *am2;
  float mx1 = 0.f, mx2 = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float gj = g[j];
    float mj = t.q1[s1[j]] * a1;
    float vj = t.q2[s2[j]] * a2;
    mj = mj * h.beta1 + gj * h.omb1;
    vj = vj * h.beta2 + (gj * gj) * h.omb2;
    const float pj = p[j] * h.decay;
    const float upd = (mj / (std::sqrt(vj) + h.eps_c2)) * h.step_size;
    p[j] = pj - upd;
    m[j] = mj;
    v[j] = vj;
    mx1 = std::max(mx1, std::fabs(mj));
    mx2 = std::max(mx2, vj);
  }
  const float i1 = inv_or_zero(mx1), i2 = inv_or_zero(mx2);
  for (int64_t j = 0; j < n; ++j) {
    s1[j] = quantize<true>(m[j] * i1, t.c1);
    s2[j] = quantize<false>(v[j] * i2, t.c2);
  }
  *am1 = mx1;
  *am2 = mx2;
}

#ifdef __AVX2__
inline float hmax8(__m256 x) {
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_shuffle_ps(a, a, 1));
  return _mm_cvtss_f32(a);
}

// Map lookup without a gather instruction (slow on the hosts we measured): 8 scalar loads.
inline __m256 lookup8(const float* q, const uint8_t* c) {
  return _mm256_set_ps(q[c[7]], q[c[6]], q[c[5]], q[c[4]], q[c[3]], q[c[2]], q[c[1]], q[c[0]]);
}

struct QConst8 {
  __m256i u[8], off, hi;  // thresholds as int32 bit patterns; offsets and last codes as int32
  __m256 s, w;
  explicit QConst8(const float* c) {
    for (int k = 0; k < 8; ++k) u[k] = _mm256_set1_epi32(bits_of(c[kU + k]));
    s = _mm256_loadu_ps(c + kS);
    w = _mm256_loadu_ps(c + kW);
    off = _mm256_cvtps_epi32(_mm256_loadu_ps(c + kOff));
    hi = _mm256_cvtps_epi32(_mm256_loadu_ps(c + kHi));
  }
};

// quantize<kSigned> on 8 lanes; returns the 8 codes as int32 lanes.
template <bool kSigned>
inline __m256i quantize8(__m256 x, const QConst8& c) {
  const __m256 a = kSigned ? _mm256_andnot_ps(_mm256_set1_ps(-0.f), x) : x;
  const __m256i ai = _mm256_castps_si256(a);
  __m256i d = _mm256_setzero_si256();  // compare masks are -1: subtracting them counts
  for (int k = 0; k < 7; ++k) d = _mm256_sub_epi32(d, _mm256_cmpgt_epi32(ai, c.u[k]));
  const __m256i top = _mm256_cmpgt_epi32(ai, c.u[7]);
  const __m256 t = _mm256_mul_ps(_mm256_sub_ps(_mm256_mul_ps(a, _mm256_permutevar8x32_ps(c.s, d)),
                                               _mm256_set1_ps(0.1f)),
                                 _mm256_permutevar8x32_ps(c.w, d));
  const __m256i k = _mm256_min_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(t), _mm256_permutevar8x32_epi32(c.off, d)),
                                     _mm256_permutevar8x32_epi32(c.hi, d));
  const __m256i pos = _mm256_sub_epi32(k, top);
  if (!kSigned) return pos;
  const __m256i neg = _mm256_sub_epi32(_mm256_set1_epi32(254), k);
  // blendv picks by the sign bit of x itself, as the scalar path's signbit does
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(pos), _mm256_castsi256_ps(neg), x));
}

// Quantizes 32 values (x[0:32] * inv) and stores their 32 codes: one 32-byte store, and 3 shuffles per
// 32 codes for the packing instead of 3 per 8.
template <bool kSigned>
inline void quantize32(const float* x, __m256 inv, const QConst8& c, uint8_t* out) {
  __m256i q[4];
  for (int r = 0; r < 4; ++r) q[r] = quantize8<kSigned>(_mm256_mul_ps(_mm256_load_ps(x + 8 * r), inv), c);
  // packs work within 128-bit lanes: the bytes come out as 4-byte groups in the order 0 2 4 6 1 3 5 7
  const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(b, order));
}

// A full block with AVX2: the same operations, in the same order, 8 lanes at a time (no FMA contraction).
void block_8bit_avx2(float* p, const float* g, uint8_t* s1, uint8_t* s2, float* am1, float* am2,
                     const Hyper& h, const Tables& t, const QConst8& c1, const QConst8& c2) {
  alignas(32) float m[kBlock], v[kBlock];
  const __m256 a1 = _mm256_set1_ps(*am1), a2 = _mm256_set1_ps(*am2);
  const __m256 b1 = _mm256_set1_ps(h.beta1), omb1 = _mm256_set1_ps(h.omb1);
  const __m256 b2 = _mm256_set1_ps(h.beta2), omb2 = _mm256_set1_ps(h.omb2);
  const __m256 decay = _mm256_set1_ps(h.decay), eps = _mm256_set1_ps(h.eps_c2);
  const __m256 step = _mm256_set1_ps(h.step_size), sign = _mm256_set1_ps(-0.f);
  __m256 mx1 = _mm256_setzero_ps(), mx2 = _mm256_setzero_ps();
  for (int64_t j = 0; j < kBlock; j += 8) {
    __m256 mj = _mm256_mul_ps(lookup8(t.q1, s1 + j), a1);
    __m256 vj = _mm256_mul_ps(lookup8(t.q2, s2 + j), a2);
    const __m256 gj = _mm256_loadu_ps(g + j);
    mj = _mm256_add_ps(_mm256_mul_ps(mj, b1), _mm256_mul_ps(gj, omb1));
    vj = _mm256_add_ps(_mm256_mul_ps(vj, b2), _mm256_mul_ps(_mm256_mul_ps(gj, gj), omb2));
    const __m256 pj = _mm256_mul_ps(_mm256_loadu_ps(p + j), decay);
    const __m256 upd = _mm256_mul_ps(_mm256_div_ps(mj, _mm256_add_ps(_mm256_sqrt_ps(vj), eps)), step);
    _mm256_storeu_ps(p + j, _mm256_sub_ps(pj, upd));
    _mm256_store_ps(m + j, mj);
    _mm256_store_ps(v + j, vj);
    mx1 = _mm256_max_ps(mx1, _mm256_andnot_ps(sign, mj));
    mx2 = _mm256_max_ps(mx2, vj);
  }
  const float x1 = hmax8(mx1), x2 = hmax8(mx2);
  const __m256 i1 = _mm256_set1_ps(inv_or_zero(x1)), i2 = _mm256_set1_ps(inv_or_zero(x2));
  for (int64_t j = 0; j < kBlock; j += 32) {
    quantize32<true>(m + j, i1, c1, s1 + j);
    quantize32<false>(v + j, i2, c2, s2 + j);
  }
  *am1 = x1;
  *am2 = x2;
}
#endif

// Applies the step to the blocks of [begin, end) of one tensor (fp32 params).
void run_8bit(float* p, const float* g, uint8_t* s1, uint8_t* s2, float* am1, float* am2, int64_t begin,
              int64_t end, const Hyper& h, const Tables& t) {
  int64_t b = begin;
#ifdef __AVX2__
  const QConst8 c1(t.c1), c2(t.c2);
  for (; b + kBlock <= end; b += kBlock)
    block_8bit_avx2(p + b, g + b, s1 + b, s2 + b, am1 + b / kBlock, am2 + b / kBlock, h, t, c1, c2);
#endif
  for (; b < end; b += kBlock)
    block_8bit_scalar(p + b, g + b, s1 + b, s2 + b, am1 + b / kBlock, am2 + b / kBlock,
                      std::min(kBlock, end - b), h, t);
}

// fp16 / bf16 params: widen each block to fp32, update, round back (as the twin's .float() / copy_ do).
template <typename T>
void run_8bit(T* p, const T* g, uint8_t* s1, uint8_t* s2, float* am1, float* am2, int64_t begin, int64_t end,
              const Hyper& h, const Tables& t) {
  alignas(32) float p32[kBlock], g32[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    for (int64_t j = 0; j < n; ++j) {
      p32[j] = to_f(p[b + j]);
      g32[j] = to_f(g[b + j]);
    }
    run_8bit(p32, g32, s1 + b, s2 + b, am1 + b / kBlock, am2 + b / kBlock, 0, n, h, t);
    for (int64_t j = 0; j < n; ++j) p[b + j] = from_f<T>(p32[j]);
  }
}

// A run of an fp32-state tensor (small tensors).
template <typename T>
void run_fp32(T* p, const T* g, float* m, float* v, int64_t n, const Hyper& h) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float gj = to_f(g[j]);
    const float mj = m[j] * h.beta1 + gj * h.omb1;
    const float vj = v[j] * h.beta2 + (gj * gj) * h.omb2;
    const float pj = to_f(p[j]) * h.decay;
    const float upd = (mj / (std::sqrt(vj) + h.eps_c2)) * h.step_size;
    p[j] = from_f<T>(pj - upd);
    m[j] = mj;
    v[j] = vj;
  }
}

struct Item {
  int64_t tensor, begin, end;  // element range [begin, end) of one tensor, block aligned
};

int num_threads() {
  return std::max(1, at::get_num_threads());
}

void adamw8bit_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state1,
                        at::TensorList state2, at::TensorList absmax1, at::TensorList absmax2,
                        const at::Tensor& qmaps, const at::Tensor& qconst,
                        at::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                        double weight_decay) {
  const int64_t nt = static_cast<int64_t>(params.size());
  TORCH_CHECK(grads.size() == params.size() && state1.size() == params.size() &&
                  state2.size() == params.size() && absmax1.size() == params.size() &&
                  absmax2.size() == params.size() && static_cast<int64_t>(steps.size()) == nt,
              "adamw8bit_step: all lists must have one entry per parameter");
  TORCH_CHECK(qmaps.dtype() == at::kFloat && qmaps.is_contiguous() && qmaps.numel() == 2 * 256,
              "adamw8bit_step: qmaps must be a contiguous float32 (2, 256) tensor");
  TORCH_CHECK(qconst.dtype() == at::kFloat && qconst.is_contiguous() && qconst.numel() == 2 * kConst,
              "adamw8bit_step: qconst must be a contiguous float32 (2, 5, 8) tensor");
  Tables tab;
  tab.q1 = qmaps.data_ptr<float>();
  tab.q2 = tab.q1 + 256;
  tab.c1 = qconst.data_ptr<float>();
  tab.c2 = tab.c1 + kConst;

  std::vector<Item> items;
  std::vector<Hyper> hyper(nt);
  for (int64_t t = 0; t < nt; ++t) {
    const at::Tensor& p = params[t];
    const at::Tensor& g = grads[t];
    const int64_t n = p.numel();
    TORCH_CHECK(p.device().is_cpu() && g.device().is_cpu(), "adamw8bit_step: CPU tensors only");
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && g.numel() == n && g.dtype() == p.dtype(),
                "adamw8bit_step: param ", t, " and its grad must be contiguous, same size and dtype");
    TORCH_CHECK(p.dtype() == at::kFloat || p.dtype() == at::kHalf || p.dtype() == at::kBFloat16,
                "adamw8bit_step: params must be float32, float16 or bfloat16");
    const at::Tensor& s1 = state1[t];
    const at::Tensor& s2 = state2[t];
    TORCH_CHECK(s1.is_contiguous() && s2.is_contiguous() && s1.numel() == n && s2.numel() == n &&
                    s1.dtype() == s2.dtype() && (s1.dtype() == at::kByte || s1.dtype() == at::kFloat),
                "adamw8bit_step: state of param ", t, " must be two contiguous uint8 or float32 tensors of ",
                n, " elements");
    if (s1.dtype() == at::kByte) {
      const int64_t nb = (n + kBlock - 1) / kBlock;
      TORCH_CHECK(absmax1[t].dtype() == at::kFloat && absmax2[t].dtype() == at::kFloat &&
                      absmax1[t].numel() == nb && absmax2[t].numel() == nb &&
                      absmax1[t].is_contiguous() && absmax2[t].is_contiguous(),
                  "adamw8bit_step: absmax of param ", t, " must be float32 with ", nb, " blocks");
    }
    TORCH_CHECK(steps[t] >= 1, "adamw8bit_step: steps must be >= 1");
    hyper[t] = make_hyper(lr, beta1, beta2, eps, weight_decay, steps[t]);
    for (int64_t b = 0; b < n; b += kChunkBlocks * kBlock)
      items.push_back({t, b, std::min(n, b + kChunkBlocks * kBlock)});
  }

  const int64_t ni = static_cast<int64_t>(items.size());
  auto work = [&](int64_t i) {
    const Item& it = items[i];
    const at::Tensor& p = params[it.tensor];
    const Hyper& h = hyper[it.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "adamw8bit_step", [&] {
      scalar_t* pp = p.data_ptr<scalar_t>();
      const scalar_t* gp = grads[it.tensor].data_ptr<scalar_t>();
      if (state1[it.tensor].dtype() == at::kByte) {
        uint8_t* s1 = state1[it.tensor].data_ptr<uint8_t>();
        uint8_t* s2 = state2[it.tensor].data_ptr<uint8_t>();
        float* am1 = absmax1[it.tensor].data_ptr<float>();
        float* am2 = absmax2[it.tensor].data_ptr<float>();
        run_8bit(pp, gp, s1, s2, am1, am2, it.begin, it.end, h, tab);
      } else {
        float* m = state1[it.tensor].data_ptr<float>();
        float* v = state2[it.tensor].data_ptr<float>();
        run_fp32<scalar_t>(pp + it.begin, gp + it.begin, m + it.begin, v + it.begin, it.end - it.begin, h);
      }
    });
  };
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads()) if (ni > 1)
#endif
  for (int64_t i = 0; i < ni; ++i) work(i);
}

// True when every element of every tensor is finite. One parallel read pass.
at::Tensor all_finite_cpu(at::TensorList tensors) {
  std::vector<Item> items;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const at::Tensor& x = tensors[t];
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "all_finite: contiguous CPU tensors only");
    TORCH_CHECK(x.dtype() == at::kFloat || x.dtype() == at::kHalf || x.dtype() == at::kBFloat16,
                "all_finite: float32, float16 or bfloat16 tensors only");
    const int64_t n = x.numel();
    for (int64_t b = 0; b < n; b += kChunkBlocks * kBlock)
      items.push_back({t, b, std::min(n, b + kChunkBlocks * kBlock)});
  }
  const int64_t ni = static_cast<int64_t>(items.size());
  int bad = 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) reduction(| : bad) num_threads(num_threads()) if (ni > 1)
#endif
  for (int64_t i = 0; i < ni; ++i) {
    const Item& it = items[i];
    const at::Tensor& x = tensors[it.tensor];
    int local = 0;
    if (x.dtype() == at::kFloat) {
      const uint32_t* u = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
#pragma omp simd reduction(| : local)
      for (int64_t j = it.begin; j < it.end; ++j) local |= ((u[j] & 0x7f800000u) == 0x7f800000u);
    } else {
      // fp16: exponent 0x7c00; bf16: exponent 0x7f80.
      const uint16_t mask = x.dtype() == at::kHalf ? 0x7c00 : 0x7f80;
      const uint16_t* u = reinterpret_cast<const uint16_t*>(x.data_ptr());
#pragma omp simd reduction(| : local)
      for (int64_t j = it.begin; j < it.end; ++j) local |= ((u[j] & mask) == mask);
    }
    bad |= local;
  }
  return at::scalar_tensor(bad == 0, at::TensorOptions().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY(t2i_fast, m) {
  m.def(
      "adamw8bit_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2, "
      "Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor qmaps, Tensor qconst, int[] steps, "
      "float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
  m.def("all_finite(Tensor[] tensors) -> Tensor");
}

TORCH_LIBRARY_IMPL(t2i_fast, CPU, m) {
  m.impl("adamw8bit_step", &adamw8bit_step_cpu);
  m.impl("all_finite", &all_finite_cpu);
}

}  // namespace t2i_fast

// `import t2i_fast._C` loads this library, which runs the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
