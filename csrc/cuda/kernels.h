// Launchers of the CUDA kernels: raw pointers, sizes and a stream, no torch types, so the .cu files
// compile with plain `nvcc -c` on any machine with a CUDA toolkit (tests/test_nvcc_compile.py).
// Each returns the launch's cudaError_t; the torch glue (softmax_cuda.cpp, rotary_cuda.cpp) checks it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace megaglot {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct SoftmaxShape {
  int64_t rows;       // number of score rows (all leading dimensions flattened)
  int64_t sq, sk;     // row i belongs to query position i % sq; sk elements per row
  int64_t heads;      // np, to find a row's batch element for the mask
  bool mask_batched;  // mask is [b, 1, sq, sk] (else [1, 1, sq, sk])
};

// y = softmax(x * scale) row-wise; mode is a megaglot::SoftmaxMode (mask is read only for kMasked,
// bool bytes, nonzero = masked out). Fully masked rows give zeros.
cudaError_t launch_softmax_forward(const void* x, const uint8_t* mask, void* y, DType dtype,
                                   const SoftmaxShape& shape, int mode, float scale, cudaStream_t stream);

// dx = scale * y * (g - sum(g * y)); with causal, columns beyond the diagonal are written as 0 unread.
cudaError_t launch_softmax_backward(const void* grad, const void* probs, void* dx, DType dtype, int64_t rows,
                                    int64_t sq, int64_t sk, bool causal, float scale, cudaStream_t stream);

struct RotaryShape {
  int64_t s, b, heads, hn, rd;
  int64_t q_stride[3], k_stride[3];  // strides (elements) of dims s, b, np of the inputs; last dim is contiguous
};

// NeoX rotate-half on the first rd of every head of q and k (outputs contiguous [s, b, np, hn]);
// forward = rotation, !forward = its transpose (the backward). cos/sin are fp32 [s, rd].
cudaError_t launch_rotary(const void* q, const void* k, void* q_out, void* k_out, const float* cos,
                          const float* sin, DType dtype, const RotaryShape& shape, bool forward,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace megaglot
