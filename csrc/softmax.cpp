// Fused scaled softmax for attention scores: scale, mask (causal, boolean or none), softmax and
// the backward in one pass over each row, fp32 accumulation for fp32/fp16/bf16 storage.
//
// Eager PyTorch spends three to five full passes over the [b, np, sq, sk] scores (scale, build or
// apply the mask, max, exp-sum, normalize); here each row is read once into an fp32 scratch row that
// stays in L1 and written once. The causal variant also never touches the upper triangle.
// A row whose every element is masked yields zeros (not NaN) and a zero gradient.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "softmax.h"

#ifdef MEGAGLOT_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace megaglot {
namespace {

constexpr int kLanes = 16;  // independent accumulators: lets the compiler keep reductions in SIMD registers
template <typename A>
constexpr A neg_inf() { return -std::numeric_limits<A>::infinity(); }

struct RowLayout {
  int64_t sq, sk;
  int64_t heads;      // np: rows of one batch element are heads * sq
  bool mask_batched;  // mask has a batch dimension of b (else 1, broadcast)
};

// buf[j] = x[j] * scale, or -inf where mask[j] (mask may be null); returns the max. One fused loop:
// the row is read once and the max is kept in kLanes partial maxima (SIMD registers).
template <typename C, typename A = typename C::acc>
MG_INLINE A load_scaled_max(const typename C::storage* x, const uint8_t* mask, A scale, A* buf, int64_t n) {
  const A kNegInf = neg_inf<A>();
  int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (std::is_same<A, float>::value) {
    using cpu::f32x16;
    f32x16 vmax = f32x16{} + kNegInf;
    for (; j + 16 <= n; j += 16) {
      f32x16 v = C::load16(x + j) * scale;
      if (mask != nullptr) v = cpu::mask_lanes(mask + j) ? f32x16{} + kNegInf : v;
      cpu::store_f32x16(buf + j, v);
      vmax = vmax > v ? vmax : v;
    }
    A m = kNegInf;
    for (int l = 0; l < 16; ++l) m = m > vmax[l] ? m : vmax[l];
    for (; j < n; ++j) {
      const A scaled = C::load(x[j]) * scale;
      const A v = (mask != nullptr && mask[j]) ? kNegInf : scaled;
      buf[j] = v;
      m = m > v ? m : v;
    }
    return m;
  }
#endif
  A lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = kNegInf;
  if (mask == nullptr) {
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const A v = C::load(x[j + l]) * scale;
        buf[j + l] = v;
        lanes[l] = lanes[l] > v ? lanes[l] : v;
      }
  } else {
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const A v = mask[j + l] ? kNegInf : C::load(x[j + l]) * scale;
        buf[j + l] = v;
        lanes[l] = lanes[l] > v ? lanes[l] : v;
      }
  }
  A m = kNegInf;
  for (int l = 0; l < kLanes; ++l) m = m > lanes[l] ? m : lanes[l];
  for (; j < n; ++j) {
    const A v = (mask != nullptr && mask[j]) ? kNegInf : C::load(x[j]) * scale;
    buf[j] = v;
    m = m > v ? m : v;
  }
  return m;
}

// buf[j] = exp(buf[j] - m); returns the sum.
template <typename A>
MG_INLINE A exp_and_sum(A* v, int64_t n, A m) {
  A lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const A e = cpu::exp_nonpositive(v[j + l] - m);
      v[j + l] = e;
      lanes[l] += e;
    }
  A s = 0;
  for (; j < n; ++j) {
    const A e = cpu::exp_nonpositive(v[j] - m);
    v[j] = e;
    s += e;
  }
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

template <typename C, typename A = typename C::acc>
MG_INLINE A dot_of(const typename C::storage* a, const typename C::storage* b, int64_t n) {
  int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (std::is_same<A, float>::value) {
    cpu::f32x16 acc{};
    for (; j + 16 <= n; j += 16) acc += C::load16(a + j) * C::load16(b + j);
    A s = 0;
    for (; j < n; ++j) s += C::load(a[j]) * C::load(b[j]);
    for (int l = 0; l < 16; ++l) s += acc[l];
    return s;
  }
#endif
  A lanes[kLanes] = {};
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += C::load(a[j + l]) * C::load(b[j + l]);
  A s = 0;
  for (; j < n; ++j) s += C::load(a[j]) * C::load(b[j]);
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// out[j] = C::store(buf[j] * factor) for j < n.
template <typename C, typename A = typename C::acc>
MG_INLINE void store_scaled(const A* buf, A factor, typename C::storage* out, int64_t n) {
  int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (std::is_same<A, float>::value)
    for (; j + 16 <= n; j += 16) C::store16(out + j, cpu::load_f32x16(buf + j) * factor);
#endif
  for (; j < n; ++j) out[j] = C::store(buf[j] * factor);
}

template <typename C, typename A = typename C::acc>
MG_INLINE void forward_rows(const typename C::storage* x, const uint8_t* mask, typename C::storage* y,
                            int64_t begin, int64_t end, const RowLayout& lay, int mode, A scale, A* buf) {
  using T = typename C::storage;
  const int64_t sk = lay.sk;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t qi = row % lay.sq;
    const int64_t valid = mode == kCausal ? std::min(qi + 1, sk) : sk;
    const T* xr = x + row * sk;
    T* yr = y + row * sk;
    const uint8_t* mr = nullptr;
    if (mode == kMasked) {
      const int64_t batch = row / (lay.heads * lay.sq);
      mr = mask + ((lay.mask_batched ? batch : 0) * lay.sq + qi) * sk;
    }
    const A m = load_scaled_max<C>(xr, mr, scale, buf, valid);
    if (m == neg_inf<A>()) {  // fully masked row: zeros, never NaN
      for (int64_t j = 0; j < sk; ++j) yr[j] = C::store(A(0));
      continue;
    }
    const A inv = A(1) / exp_and_sum(buf, valid, m);
    store_scaled<C>(buf, inv, yr, valid);
    for (int64_t j = valid; j < sk; ++j) yr[j] = C::store(A(0));
  }
}

// dx = scale * y * (g - sum(g * y)); masked entries have y = 0 and so get 0.
template <typename C, typename A = typename C::acc>
MG_INLINE void backward_rows(const typename C::storage* g, const typename C::storage* y, typename C::storage* dx,
                             int64_t begin, int64_t end, int64_t sq, int64_t sk, bool causal, A scale) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t valid = causal ? std::min(row % sq + 1, sk) : sk;
    const auto* gr = g + row * sk;
    const auto* yr = y + row * sk;
    auto* dr = dx + row * sk;
    const A dot = dot_of<C>(gr, yr, valid);
    int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
    if constexpr (std::is_same<A, float>::value)
      for (; j + 16 <= valid; j += 16) C::store16(dr + j, scale * C::load16(yr + j) * (C::load16(gr + j) - dot));
#endif
    for (; j < valid; ++j) dr[j] = C::store(scale * C::load(yr[j]) * (C::load(gr[j]) - dot));
    for (int64_t j = valid; j < sk; ++j) dr[j] = C::store(A(0));
  }
}

// One non-template entry per storage type, each cloned per ISA level (see cpu_math.h).
#define MG_SOFTMAX_ENTRIES(NAME, CODEC)                                                                  \
  MG_CLONES void forward_##NAME(const CODEC::storage* x, const uint8_t* mask, CODEC::storage* y,          \
                                int64_t begin, int64_t end, const RowLayout& lay, int mode,               \
                                CODEC::acc scale, CODEC::acc* buf) {                                      \
    forward_rows<CODEC>(x, mask, y, begin, end, lay, mode, scale, buf);                                   \
  }                                                                                                       \
  MG_CLONES void backward_##NAME(const CODEC::storage* g, const CODEC::storage* y, CODEC::storage* dx,    \
                                 int64_t begin, int64_t end, int64_t sq, int64_t sk, bool causal,         \
                                 CODEC::acc scale) {                                                      \
    backward_rows<CODEC>(g, y, dx, begin, end, sq, sk, causal, scale);                                    \
  }
MG_SOFTMAX_ENTRIES(f32, cpu::F32)
MG_SOFTMAX_ENTRIES(f16, cpu::F16)
MG_SOFTMAX_ENTRIES(bf16, cpu::BF16)
MG_SOFTMAX_ENTRIES(f64, cpu::F64)
#undef MG_SOFTMAX_ENTRIES

int64_t grain_rows(int64_t sk) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(sk, 1)); }

void check_scores(const at::Tensor& x, int64_t dim, const char* op, const char* shape) {
  TORCH_CHECK(x.dim() == dim, op, ": scores must be ", shape, ", got a ", x.dim(), "-d tensor of shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              ": scores must be float32, float16 or bfloat16 (float64 on CPU, for gradcheck), got ", st);
  TORCH_CHECK(st != at::kDouble || x.is_cpu(), op, ": float64 is supported on CPU only (for gradcheck)");
}

at::Tensor cpu_forward(const at::Tensor& x_in, const at::Tensor* mask_in, const RowLayout& lay, int mode,
                       double scale) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor mask;
  if (mask_in != nullptr) mask = mask_in->contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = lay.sk == 0 ? 0 : x.numel() / lay.sk;
  if (rows == 0) return y;
  const uint8_t* mp = mask_in != nullptr ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  const float s = static_cast<float>(scale);
  const auto st = x.scalar_type();
  at::parallel_for(0, rows, grain_rows(lay.sk), [&](int64_t begin, int64_t end) {
    if (st == at::kDouble) {
      std::vector<double> buf(lay.sk);
      forward_f64(x.data_ptr<double>(), mp, y.data_ptr<double>(), begin, end, lay, mode, scale, buf.data());
      return;
    }
    std::vector<float> buf(lay.sk);
    if (st == at::kFloat) {
      forward_f32(x.data_ptr<float>(), mp, y.data_ptr<float>(), begin, end, lay, mode, s, buf.data());
    } else if (st == at::kHalf) {
      forward_f16(reinterpret_cast<const uint16_t*>(x.data_ptr<at::Half>()), mp,
                  reinterpret_cast<uint16_t*>(y.data_ptr<at::Half>()), begin, end, lay, mode, s, buf.data());
    } else {
      forward_bf16(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), mp,
                   reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), begin, end, lay, mode, s, buf.data());
    }
  });
  return y;
}

at::Tensor cpu_backward(const at::Tensor& g_in, const at::Tensor& y_in, int64_t sq, int64_t sk, bool causal,
                        double scale) {
  const at::Tensor g = g_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  at::Tensor dx = at::empty_like(y, at::MemoryFormat::Contiguous);
  const int64_t rows = sk == 0 ? 0 : y.numel() / sk;
  if (rows == 0) return dx;
  const float s = static_cast<float>(scale);
  const auto st = y.scalar_type();
  at::parallel_for(0, rows, grain_rows(sk), [&](int64_t begin, int64_t end) {
    if (st == at::kDouble) {
      backward_f64(g.data_ptr<double>(), y.data_ptr<double>(), dx.data_ptr<double>(), begin, end, sq, sk, causal,
                   scale);
    } else if (st == at::kFloat) {
      backward_f32(g.data_ptr<float>(), y.data_ptr<float>(), dx.data_ptr<float>(), begin, end, sq, sk, causal, s);
    } else if (st == at::kHalf) {
      backward_f16(reinterpret_cast<const uint16_t*>(g.data_ptr<at::Half>()),
                   reinterpret_cast<const uint16_t*>(y.data_ptr<at::Half>()),
                   reinterpret_cast<uint16_t*>(dx.data_ptr<at::Half>()), begin, end, sq, sk, causal, s);
    } else {
      backward_bf16(reinterpret_cast<const uint16_t*>(g.data_ptr<at::BFloat16>()),
                    reinterpret_cast<const uint16_t*>(y.data_ptr<at::BFloat16>()),
                    reinterpret_cast<uint16_t*>(dx.data_ptr<at::BFloat16>()), begin, end, sq, sk, causal, s);
    }
  });
  return dx;
}

at::Tensor dispatch_forward(const at::Tensor& x, const at::Tensor* mask, const RowLayout& lay, int mode,
                            double scale, const char* op) {
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (x.is_cuda()) {
#ifdef MEGAGLOT_WITH_CUDA
    return cuda::softmax_forward(x, mask, lay.sq, lay.sk, lay.heads, lay.mask_batched, mode, scale);
#else
    TORCH_CHECK(false, op, ": megaglot._C was built without CUDA; rebuild with a CUDA torch and toolkit");
#endif
  }
  TORCH_CHECK(x.device().is_cpu(), op, ": unsupported device ", x.device());
  return cpu_forward(x, mask, lay, mode, scale);
}

at::Tensor dispatch_backward(const at::Tensor& grad, const at::Tensor& probs, bool causal, double scale,
                             const char* op) {
  TORCH_CHECK(grad.sizes() == probs.sizes(), op, ": grad shape ", grad.sizes(), " != probs shape ", probs.sizes());
  TORCH_CHECK(grad.scalar_type() == probs.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
              " != probs dtype ", probs.scalar_type());
  TORCH_CHECK(grad.device() == probs.device(), op, ": grad and probs are on different devices");
  TORCH_CHECK(probs.dim() >= 2, op, ": probs must have at least 2 dimensions");
  const auto st = probs.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (st == at::kDouble && probs.is_cpu()),
              op, ": probs must be float32, float16 or bfloat16 (float64 on CPU), got ", st);
  const int64_t sq = probs.size(-2), sk = probs.size(-1);
  if (causal) TORCH_CHECK(sq == sk, op, ": causal softmax needs sq == sk, got ", sq, " and ", sk);
  if (probs.is_cuda()) {
#ifdef MEGAGLOT_WITH_CUDA
    return cuda::softmax_backward(grad, probs, sq, sk, causal, scale);
#else
    TORCH_CHECK(false, op, ": megaglot._C was built without CUDA; rebuild with a CUDA torch and toolkit");
#endif
  }
  return cpu_backward(grad, probs, sq, sk, causal, scale);
}

}  // namespace

at::Tensor scaled_upper_triang_masked_softmax_forward(const at::Tensor& x, double scale) {
  const char* op = "scaled_upper_triang_masked_softmax";
  check_scores(x, 3, op, "[b*np, sq, sk]");
  TORCH_CHECK(x.size(1) == x.size(2), op, ": causal softmax needs sq == sk, got shape ", x.sizes());
  const RowLayout lay{x.size(1), x.size(2), 1, false};
  return dispatch_forward(x, nullptr, lay, kCausal, scale, op);
}

at::Tensor scaled_masked_softmax_forward(const at::Tensor& x, const at::Tensor& mask, double scale) {
  const char* op = "scaled_masked_softmax";
  check_scores(x, 4, op, "[b, np, sq, sk]");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool (True = masked), got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 4 && (mask.size(0) == 1 || mask.size(0) == x.size(0)) && mask.size(1) == 1 &&
                  mask.size(2) == x.size(2) && mask.size(3) == x.size(3),
              op, ": mask must be [b or 1, 1, sq, sk] = [", x.size(0), " or 1, 1, ", x.size(2), ", ", x.size(3),
              "], got ", mask.sizes());
  TORCH_CHECK(mask.device() == x.device(), op, ": mask is on ", mask.device(), " but scores are on ", x.device());
  const RowLayout lay{x.size(2), x.size(3), x.size(1), mask.size(0) != 1};
  return dispatch_forward(x, &mask, lay, kMasked, scale, op);
}

at::Tensor scaled_softmax_forward(const at::Tensor& x, double scale) {
  const char* op = "scaled_softmax";
  check_scores(x, 4, op, "[b, np, sq, sk]");
  const RowLayout lay{x.size(2), x.size(3), x.size(1), false};
  return dispatch_forward(x, nullptr, lay, kNone, scale, op);
}

at::Tensor scaled_softmax_backward(const at::Tensor& grad, const at::Tensor& probs, double scale) {
  return dispatch_backward(grad, probs, false, scale, "scaled_softmax_backward");
}

at::Tensor scaled_upper_triang_masked_softmax_backward(const at::Tensor& grad, const at::Tensor& probs,
                                                       double scale) {
  return dispatch_backward(grad, probs, true, scale, "scaled_upper_triang_masked_softmax_backward");
}

}  // namespace megaglot

void register_softmax(pybind11::module& m) {
  using namespace megaglot;
  m.def("scaled_upper_triang_masked_softmax_forward", &scaled_upper_triang_masked_softmax_forward,
        "causal scaled softmax of [b*np, sq, sq] scores", pybind11::arg("x"), pybind11::arg("scale"));
  m.def("scaled_upper_triang_masked_softmax_backward", &scaled_upper_triang_masked_softmax_backward,
        pybind11::arg("grad"), pybind11::arg("probs"), pybind11::arg("scale"));
  m.def("scaled_masked_softmax_forward", &scaled_masked_softmax_forward,
        "scaled softmax of [b, np, sq, sk] scores with a bool mask [b or 1, 1, sq, sk] (True = masked)",
        pybind11::arg("x"), pybind11::arg("mask"), pybind11::arg("scale"));
  m.def("scaled_masked_softmax_backward", &scaled_softmax_backward, pybind11::arg("grad"), pybind11::arg("probs"),
        pybind11::arg("scale"));
  m.def("scaled_softmax_forward", &scaled_softmax_forward, pybind11::arg("x"), pybind11::arg("scale"));
  m.def("scaled_softmax_backward", &scaled_softmax_backward, pybind11::arg("grad"), pybind11::arg("probs"),
        pybind11::arg("scale"));
}
