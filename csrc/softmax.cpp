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
#include <cstdlib>
#include <string>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "softmax.h"
#include "softmax_kernels.h"
#include "softmax_rows.h"

#ifdef MEGAGLOT_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace megaglot {
namespace {

// The portable rows: the baseline ISA at 4-float vectors (SSE2 on x86-64, NEON on aarch64), what a
// CPU below AVX2 (or a build without the x86 paths) runs; `stream` is ignored.
using cpu::kPortableLanes;

template <typename C>
void portable_forward(const typename C::storage* x, const uint8_t* mask, typename C::storage* y, int64_t begin,
                      int64_t end, const RowLayout& lay, int mode, float scale, float* buf, bool /*stream*/) {
  forward_rows<C>(x, mask, y, begin, end, lay, mode, scale, buf);
}

template <typename C>
void portable_backward(const typename C::storage* g, const typename C::storage* y, typename C::storage* dx,
                       int64_t begin, int64_t end, int64_t sq, int64_t sk, bool causal, float scale,
                       bool /*stream*/) {
  backward_rows<C>(g, y, dx, begin, end, sq, sk, causal, scale);
}

const SoftmaxCpuKernels kPortableKernels = {
    "baseline",
    false,
    &portable_forward<cpu::F32<kPortableLanes>>,
    &portable_forward<cpu::F16<kPortableLanes>>,
    &portable_forward<cpu::BF16<kPortableLanes>>,
    &portable_backward<cpu::F32<kPortableLanes>>,
    &portable_backward<cpu::F16<kPortableLanes>>,
    &portable_backward<cpu::BF16<kPortableLanes>>,
};

// The best level this CPU runs, capped by MEGAGLOT_CPU_ISA (avx512, avx2 or baseline: the tests run
// every level this machine has, and a user can rule out a path). Chosen once per process.
const SoftmaxCpuKernels& cpu_kernels() {
  static const SoftmaxCpuKernels* chosen = [] {
    const char* cap = std::getenv("MEGAGLOT_CPU_ISA");
    const std::string want = cap == nullptr ? "" : cap;
    TORCH_CHECK(want.empty() || want == "avx512" || want == "avx2" || want == "baseline",
                "MEGAGLOT_CPU_ISA must be avx512, avx2 or baseline (or unset), got '", want, "'");
    const SoftmaxCpuKernels* avx512 = avx512_softmax_kernels();
    const SoftmaxCpuKernels* avx2 = avx2_softmax_kernels();
    if (avx512 != nullptr && (want.empty() || want == "avx512")) return avx512;
    if (avx2 != nullptr && (want.empty() || want == "avx512" || want == "avx2")) return avx2;
    return &kPortableKernels;
  }();
  return *chosen;
}

void forward_f64(const double* x, const uint8_t* mask, double* y, int64_t begin, int64_t end, const RowLayout& lay,
                 int mode, double scale, double* buf) {
  forward_rows<cpu::F64>(x, mask, y, begin, end, lay, mode, scale, buf);
}

void backward_f64(const double* g, const double* y, double* dx, int64_t begin, int64_t end, int64_t sq, int64_t sk,
                  bool causal, double scale) {
  backward_rows<cpu::F64>(g, y, dx, begin, end, sq, sk, causal, scale);
}

// Outputs at least this large are written with streaming stores where the level has them: they
// cannot stay in the caches anyway, and a streamed line is not read from memory before it is
// overwritten. Every row then starts aligned to a whole vector (16 elements from a 64-byte base).
constexpr int64_t kStreamBytes = int64_t{8} << 20;

bool stream_output(const SoftmaxCpuKernels& k, const at::Tensor& out, int64_t sk) {
  return k.streams && out.nbytes() >= static_cast<size_t>(kStreamBytes) && sk % 16 == 0 &&
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
  const SoftmaxCpuKernels& k = cpu_kernels();
  const bool stream = stream_output(k, y, lay.sk);
  at::parallel_for(0, rows, grain_rows(lay.sk), [&](int64_t begin, int64_t end) {
    if (st == at::kDouble) {
      std::vector<double> buf(lay.sk);
      forward_f64(x.data_ptr<double>(), mp, y.data_ptr<double>(), begin, end, lay, mode, scale, buf.data());
      return;
    }
    std::vector<float> buf(lay.sk);
    if (st == at::kFloat) {
      k.forward_f32(x.data_ptr<float>(), mp, y.data_ptr<float>(), begin, end, lay, mode, s, buf.data(), stream);
    } else {
      const auto* xp = static_cast<const uint16_t*>(x.data_ptr());
      auto* yp = static_cast<uint16_t*>(y.data_ptr());
      (st == at::kHalf ? k.forward_f16 : k.forward_bf16)(xp, mp, yp, begin, end, lay, mode, s, buf.data(), stream);
    }
  });
  return y;
}

// dx may be g itself (the in-place backward): each row's dot(g, y) is taken before any of it is written,
// and every element of g is read before the same element of dx is stored.
at::Tensor cpu_backward_into(const at::Tensor& g_in, const at::Tensor& y_in, at::Tensor dx, int64_t sq, int64_t sk,
                             bool causal, double scale) {
  const at::Tensor g = g_in.contiguous();
  const at::Tensor y = y_in.contiguous();
  const int64_t rows = sk == 0 ? 0 : y.numel() / sk;
  if (rows == 0) return dx;
  const float s = static_cast<float>(scale);
  const auto st = y.scalar_type();
  const SoftmaxCpuKernels& k = cpu_kernels();
  const bool stream = stream_output(k, dx, sk);
  at::parallel_for(0, rows, grain_rows(sk), [&](int64_t begin, int64_t end) {
    if (st == at::kDouble) {
      backward_f64(g.data_ptr<double>(), y.data_ptr<double>(), dx.data_ptr<double>(), begin, end, sq, sk, causal,
                   scale);
    } else if (st == at::kFloat) {
      k.backward_f32(g.data_ptr<float>(), y.data_ptr<float>(), dx.data_ptr<float>(), begin, end, sq, sk, causal, s,
                     stream);
    } else {
      const auto* gp = static_cast<const uint16_t*>(g.data_ptr());
      const auto* yp = static_cast<const uint16_t*>(y.data_ptr());
      auto* dp = static_cast<uint16_t*>(dx.data_ptr());
      (st == at::kHalf ? k.backward_f16 : k.backward_bf16)(gp, yp, dp, begin, end, sq, sk, causal, s, stream);
    }
  });
  return dx;
}

at::Tensor cpu_backward(const at::Tensor& g, const at::Tensor& y, int64_t sq, int64_t sk, bool causal, double scale) {
  return cpu_backward_into(g, y, at::empty_like(y, at::MemoryFormat::Contiguous), sq, sk, causal, scale);
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

void check_backward(const at::Tensor& grad, const at::Tensor& probs, bool causal, const char* op) {
  TORCH_CHECK(grad.sizes() == probs.sizes(), op, ": grad shape ", grad.sizes(), " != probs shape ", probs.sizes());
  TORCH_CHECK(grad.scalar_type() == probs.scalar_type(), op, ": grad dtype ", grad.scalar_type(),
              " != probs dtype ", probs.scalar_type());
  TORCH_CHECK(grad.device() == probs.device(), op, ": grad and probs are on different devices");
  TORCH_CHECK(probs.dim() >= 2, op, ": probs must have at least 2 dimensions");
  const auto st = probs.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (st == at::kDouble && probs.is_cpu()),
              op, ": probs must be float32, float16 or bfloat16 (float64 on CPU), got ", st);
  if (causal) TORCH_CHECK(probs.size(-2) == probs.size(-1), op, ": causal softmax needs sq == sk, got ",
                          probs.size(-2), " and ", probs.size(-1));
}

at::Tensor dispatch_backward(const at::Tensor& grad, const at::Tensor& probs, bool causal, double scale,
                             const char* op) {
  check_backward(grad, probs, causal, op);
  const int64_t sq = probs.size(-2), sk = probs.size(-1);
  if (probs.is_cuda()) {
#ifdef MEGAGLOT_WITH_CUDA
    return cuda::softmax_backward(grad, probs, sq, sk, causal, scale);
#else
    TORCH_CHECK(false, op, ": megaglot._C was built without CUDA; rebuild with a CUDA torch and toolkit");
#endif
  }
  return cpu_backward(grad, probs, sq, sk, causal, scale);
}

// The backward written over grad (apex's in-place backward), so it allocates nothing, on CPU and CUDA:
// both kernels finish a row's dot(grad, probs) before writing any of it.
void backward_in_place(at::Tensor& grad, const at::Tensor& probs, bool causal, double scale, const char* op) {
  check_backward(grad, probs, causal, op);
  TORCH_CHECK(grad.is_contiguous(), op, ": the in-place backward needs a contiguous grad");
  const int64_t sq = probs.size(-2), sk = probs.size(-1);
  if (probs.is_cuda()) {
#ifdef MEGAGLOT_WITH_CUDA
    cuda::softmax_backward_into(grad, probs, grad, sq, sk, causal, scale);
    return;
#else
    TORCH_CHECK(false, op, ": megaglot._C was built without CUDA; rebuild with a CUDA torch and toolkit");
#endif
  }
  cpu_backward_into(grad, probs, grad, sq, sk, causal, scale);
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

void scaled_softmax_backward_(at::Tensor grad, const at::Tensor& probs, double scale, bool causal) {
  backward_in_place(grad, probs, causal, scale, "scaled_softmax_backward_");
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
  m.def("scaled_softmax_backward_", &scaled_softmax_backward_,
        "the backward of every variant written over grad (CPU; causal: the upper triangle becomes 0)",
        pybind11::arg("grad"), pybind11::arg("probs"), pybind11::arg("scale"), pybind11::arg("causal"));
  m.def("tensor_use_counts", [](const at::Tensor& t) {
          return std::vector<int64_t>{static_cast<int64_t>(t.use_count()),
                                      static_cast<int64_t>(t.storage().use_count())};
        },
        "(TensorImpl, storage) reference counts: whether autograd alone holds a gradient buffer");
  m.def("cpu_softmax_isa", [] { return std::string(cpu_kernels().isa); },
        "the instruction set the CPU softmax rows run with here: avx512, avx2 or baseline");
}
