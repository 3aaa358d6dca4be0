// Torch-side entry points of the CUDA kernels (compiled only with MEGAGLOT_WITH_CUDA). They take
// tensors that the CPU-side dispatchers in csrc/softmax.cpp and csrc/rotary.cpp already validated.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace megaglot {
namespace cuda {

at::Tensor softmax_forward(const at::Tensor& x, const at::Tensor* mask, int64_t sq, int64_t sk, int64_t heads,
                           bool mask_batched, int mode, double scale);
at::Tensor softmax_backward(const at::Tensor& grad, const at::Tensor& probs, int64_t sq, int64_t sk, bool causal,
                            double scale);
// dx may be grad itself (the in-place backward); both contiguous.
void softmax_backward_into(const at::Tensor& grad, const at::Tensor& probs, at::Tensor& dx, int64_t sq, int64_t sk,
                           bool causal, double scale);
// Rotate (forward) or apply the transposed rotation (backward) to q and k in one launch.
std::vector<at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                               const at::Tensor& sin, bool forward);

}  // namespace cuda
}  // namespace megaglot
