// Torch glue for the CUDA rotary kernel (compiled only with MEGAGLOT_WITH_CUDA). q and k keep their
// strides (views of a fused QKV need no copy) as long as the last dimension is contiguous.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <vector>

#include "cuda/glue.h"
#include "cuda/kernels.h"

namespace megaglot {
namespace cuda {

DType kernel_dtype(const at::Tensor& t, const char* op);  // softmax_cuda.cpp

std::vector<at::Tensor> rotary(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& cos,
                               const at::Tensor& sin, bool forward) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.stride(3) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor c = cos.to(at::kFloat).contiguous();
  const at::Tensor s = sin.to(at::kFloat).contiguous();
  at::Tensor q_out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor k_out = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return {q_out, k_out};
  RotaryShape shape{q.size(0), q.size(1), q.size(2), q.size(3), c.size(1),
                    {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)}};
  C10_CUDA_CHECK(launch_rotary(q.data_ptr(), k.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), c.data_ptr<float>(),
                               s.data_ptr<float>(), kernel_dtype(q, "fused_rotary"), shape, forward,
                               c10::cuda::getCurrentCUDAStream().stream()));
  return {q_out, k_out};
}

}  // namespace cuda
}  // namespace megaglot
