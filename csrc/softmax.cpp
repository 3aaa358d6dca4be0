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
#include "softmax_v4.h"
#include "softmax_rows.h"

#ifdef MEGAGLOT_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace megaglot {
namespace {

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

// Outputs at least this large are written with streaming stores on x86-64-v4: they cannot stay in
// the caches anyway, and a streamed line is not read from memory before it is overwritten.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

bool stream_output(const at::Tensor& out, int64_t sk) {
  return out.nbytes() >= static_cast<size_t>(kStreamBytes) && sk % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out.data_ptr()) % 64 == 0;
}

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
  const bool v4 = v4_softmax_supported();
  const bool stream = v4 && stream_output(y, lay.sk);
  at::parallel_for(0, rows, grain_rows(lay.sk), [&](int64_t begin, int64_t end) {
    if (st == at::kDouble) {
      std::vector<double> buf(lay.sk);
      forward_f64(x.data_ptr<double>(), mp, y.data_ptr<double>(), begin, end, lay, mode, scale, buf.data());
      return;
    }
    std::vector<float> buf(lay.sk);
    if (st == at::kFloat) {
      const float* xp = x.data_ptr<float>();
      float* yp = y.data_ptr<float>();
      if (v4)
        forward_f32_v4(xp, mp, yp, begin, end, lay, mode, s, buf.data(), stream);
      else
        forward_f32(xp, mp, yp, begin, end, lay, mode, s, buf.data());
    } else if (st == at::kHalf) {
      const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::Half>());
      auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::Half>());
      if (v4)
        forward_f16_v4(xp, mp, yp, begin, end, lay, mode, s, buf.data(), stream);
      else
        forward_f16(xp, mp, yp, begin, end, lay, mode, s, buf.data());
    } else {
      const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
      auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
      if (v4)
        forward_bf16_v4(xp, mp, yp, begin, end, lay, mode, s, buf.data(), stream);
      else
        forward_bf16(xp, mp, yp, begin, end, lay, mode, s, buf.data());
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
  const bool v4 = v4_softmax_supported();
  const bool stream = v4 && stream_output(dx, sk);
  at::parallel_for(0, rows, grain_rows(sk), [&](int64_t begin, int64_t end) {
    if (st == at::kDouble) {
      backward_f64(g.data_ptr<double>(), y.data_ptr<double>(), dx.data_ptr<double>(), begin, end, sq, sk, causal,
                   scale);
    } else if (st == at::kFloat) {
      if (v4)
        backward_f32_v4(g.data_ptr<float>(), y.data_ptr<float>(), dx.data_ptr<float>(), begin, end, sq, sk, causal, s,
                        stream);
      else
        backward_f32(g.data_ptr<float>(), y.data_ptr<float>(), dx.data_ptr<float>(), begin, end, sq, sk, causal, s);
    } else {
      const bool half = st == at::kHalf;
      const auto* gp = static_cast<const uint16_t*>(g.data_ptr());
      const auto* yp = static_cast<const uint16_t*>(y.data_ptr());
      auto* dp = static_cast<uint16_t*>(dx.data_ptr());
      if (v4 && half)
        backward_f16_v4(gp, yp, dp, begin, end, sq, sk, causal, s, stream);
      else if (v4)
        backward_bf16_v4(gp, yp, dp, begin, end, sq, sk, causal, s, stream);
      else if (half)
        backward_f16(gp, yp, dp, begin, end, sq, sk, causal, s);
      else
        backward_bf16(gp, yp, dp, begin, end, sq, sk, causal, s);
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
