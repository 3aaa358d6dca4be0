// Torch glue for the CUDA softmax kernels (compiled only with MEGAGLOT_WITH_CUDA): device guard,
// current stream, contiguity, and the launch error turned into a Python exception.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "cuda/glue.h"
#include "cuda/kernels.h"

namespace megaglot {
namespace cuda {

DType kernel_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": CUDA kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;  // not reached
}

at::Tensor softmax_forward(const at::Tensor& x_in, const at::Tensor* mask_in, int64_t sq, int64_t sk, int64_t heads,
                           bool mask_batched, int mode, double scale) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor mask;
  if (mask_in != nullptr) mask = mask_in->contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t rows = sk == 0 ? 0 : x.numel() / sk;
  if (rows == 0) return y;
  const SoftmaxShape shape{rows, sq, sk, heads, mask_batched};
  const uint8_t* mp = mask_in != nullptr ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  C10_CUDA_CHECK(launch_softmax_forward(x.data_ptr(), mp, y.data_ptr(), kernel_dtype(x, "fused softmax"), shape, mode,
                                        static_cast<float>(scale), c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

at::Tensor softmax_backward(const at::Tensor& grad_in, const at::Tensor& probs_in, int64_t sq, int64_t sk,
                            bool causal, double scale) {
  const c10::cuda::CUDAGuard guard(probs_in.device());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor probs = probs_in.contiguous();
  at::Tensor dx = at::empty_like(probs, at::MemoryFormat::Contiguous);
  softmax_backward_into(grad, probs, dx, sq, sk, causal, scale);
  return dx;
}

void softmax_backward_into(const at::Tensor& grad, const at::Tensor& probs_in, at::Tensor& dx, int64_t sq,
                           int64_t sk, bool causal, double scale) {
  const c10::cuda::CUDAGuard guard(probs_in.device());
  TORCH_CHECK(grad.is_contiguous() && dx.is_contiguous(), "fused softmax backward: grad and dx must be contiguous");
  const at::Tensor probs = probs_in.contiguous();
  const int64_t rows = sk == 0 ? 0 : probs.numel() / sk;
  if (rows == 0) return;
  C10_CUDA_CHECK(launch_softmax_backward(grad.data_ptr(), probs.data_ptr(), dx.data_ptr(),
                                         kernel_dtype(probs, "fused softmax backward"), rows, sq, sk, causal,
                                         static_cast<float>(scale), c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace cuda
}  // namespace megaglot
