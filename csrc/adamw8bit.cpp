// Fused blockwise 8-bit AdamW step for the CPU, registered as t2i_fast::adamw8bit_step.
//
// Design (same algorithm and state layout as bitsandbytes' AdamW8bit, so state moves between the two):
//   - state1 (m) and state2 (v) are uint8 codes into two 256-entry dynamic maps (signed for m, unsigned
//     for v); each block of 256 values has its own fp32 absmax: value = map[code] * absmax[block].
//   - per block: dequantize -> AdamW update with decoupled weight decay -> new absmax -> requantize,
//     all while the block is in L1, so memory is read and written once (g, p, codes, absmax).
//   - tensors whose state1 is float32 (under min_8bit_size elements, 4096 by default) keep fp32 state and
//     take the same update without quantization.
//   - quantization = nearest map entry = number of midpoints strictly below x (torch.searchsorted's left
//     side). A lookup table indexed by the top 17 bits of the float (sign, exponent, 8 mantissa bits) gives
//     a lower bound on that count; at most kCorrections comparisons against the midpoints finish it.
//     Python builds the tables (t2i_fast.optim) and checks the bound, so twin and kernel share them.
//   - the arithmetic is written in the same order, with the same fp32 roundings, as the PyTorch twin
//     t2i_fast.optim.adamw8bit_step_ref; compiled with -ffp-contract=off the two agree bit for bit.
//   - the whole parameter list goes in one call: one OpenMP region over chunks of blocks of all tensors.
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

#ifdef _OPENMP
#include <omp.h>
#endif

namespace t2i_fast {
namespace {

constexpr int64_t kBlock = 256;
constexpr int kLutShift = 15;          // float bits >> 15: sign, 8 exponent bits, 8 mantissa bits
constexpr int64_t kLutSize = 1 << 17;
constexpr int kCorrections = 2;        // checked against the tables in Python (optim._quant_tables)
constexpr int64_t kChunkBlocks = 64;   // 16384 values per work item

inline float to_f(float x) { return x; }
inline float to_f(c10::Half x) { return static_cast<float>(x); }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }
template <typename T> inline T from_f(float x) { return static_cast<T>(x); }

inline uint8_t quantize(float x, const uint8_t* lut, const float* mid) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  int idx = lut[bits >> kLutShift];
  for (int k = 0; k < kCorrections; ++k) idx += (x > mid[idx]) ? 1 : 0;  // mid[255] = +inf
  return static_cast<uint8_t>(idx);
}

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

// One block of an 8-bit-state tensor: n <= 256 values starting at p, g, s1, s2.
template <typename T>
void block_8bit(T* p, const T* g, uint8_t* s1, uint8_t* s2, float* am1, float* am2, int64_t n,
                const Hyper& h, const float* q1, const float* q2, const float* mid1, const float* mid2,
                const uint8_t* lut1, const uint8_t* lut2) {
  float m[kBlock], v[kBlock];
  const float a1 = *am1, a2 = *am2;
  float mx1 = 0.f, mx2 = 0.f;
#pragma omp simd reduction(max : mx1, mx2)
  for (int64_t j = 0; j < n; ++j) {
    const float gj = to_f(g[j]);
    float mj = q1[s1[j]] * a1;
    float vj = q2[s2[j]] * a2;
    mj = mj * h.beta1 + gj * h.omb1;
    vj = vj * h.beta2 + (gj * gj) * h.omb2;
    const float pj = to_f(p[j]) * h.decay;
    const float upd = (mj / (std::sqrt(vj) + h.eps_c2)) * h.step_size;
    p[j] = from_f<T>(pj - upd);
    m[j] = mj;
    v[j] = vj;
    mx1 = std::max(mx1, std::fabs(mj));
    mx2 = std::max(mx2, vj);
  }
  for (int64_t j = 0; j < n; ++j) {
    const float x1 = mx1 > 0.f ? m[j] / mx1 : 0.f;
    const float x2 = mx2 > 0.f ? v[j] / mx2 : 0.f;
    s1[j] = quantize(x1, lut1, mid1);
    s2[j] = quantize(x2, lut2, mid2);
  }
  *am1 = mx1;
  *am2 = mx2;
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
                        const at::Tensor& qmaps, const at::Tensor& mids, const at::Tensor& luts,
                        at::IntArrayRef steps, double lr, double beta1, double beta2, double eps,
                        double weight_decay) {
  const int64_t nt = static_cast<int64_t>(params.size());
  TORCH_CHECK(grads.size() == params.size() && state1.size() == params.size() &&
                  state2.size() == params.size() && absmax1.size() == params.size() &&
                  absmax2.size() == params.size() && static_cast<int64_t>(steps.size()) == nt,
              "adamw8bit_step: all lists must have one entry per parameter");
  TORCH_CHECK(qmaps.dtype() == at::kFloat && qmaps.is_contiguous() && qmaps.numel() == 2 * 256,
              "adamw8bit_step: qmaps must be a contiguous float32 (2, 256) tensor");
  TORCH_CHECK(mids.dtype() == at::kFloat && mids.is_contiguous() && mids.numel() == 2 * 256,
              "adamw8bit_step: mids must be a contiguous float32 (2, 256) tensor");
  TORCH_CHECK(luts.dtype() == at::kByte && luts.is_contiguous() && luts.numel() == 2 * kLutSize,
              "adamw8bit_step: luts must be a contiguous uint8 (2, 131072) tensor");
  const float* q1 = qmaps.data_ptr<float>();
  const float* q2 = q1 + 256;
  const float* mid1 = mids.data_ptr<float>();
  const float* mid2 = mid1 + 256;
  const uint8_t* lut1 = luts.data_ptr<uint8_t>();
  const uint8_t* lut2 = lut1 + kLutSize;

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
        for (int64_t b = it.begin; b < it.end; b += kBlock) {
          const int64_t len = std::min(kBlock, it.end - b);
          block_8bit<scalar_t>(pp + b, gp + b, s1 + b, s2 + b, am1 + b / kBlock, am2 + b / kBlock, len, h,
                               q1, q2, mid1, mid2, lut1, lut2);
        }
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
      "Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor qmaps, Tensor mids, Tensor luts, int[] steps, "
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
