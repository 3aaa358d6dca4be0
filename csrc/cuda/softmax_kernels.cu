// Fused scaled softmax (causal / boolean mask / none) forward and backward on CUDA, torch-free.
//
// Rows up to 16384 elements: one warp per row, the whole row in registers (kIters x kVec values per
// lane), read and written once with 16-byte vector accesses, fp32 math, warp-shuffle reductions.
// The causal kernel never loads the part of a row above the diagonal. Longer rows (or rows whose
// length/alignment rules out vectors beyond 1024 elements): one block per row, three passes through
// L2, so that no length is refused.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/kernels.h"
#include "softmax.h"

namespace megaglot {
namespace cuda {
namespace {

constexpr int kWarpRowsPerBlock = 4;  // 128 threads
constexpr int kMaxWarpRow = 16384;
constexpr int kBlockThreads = 512;

struct RowInfo {
  int64_t row;
  int valid;           // columns [0, valid) take part (causal: up to the diagonal)
  const uint8_t* mask;  // this row's mask, or null
};

__device__ __forceinline__ RowInfo row_info(int64_t row, const SoftmaxShape& shape, const uint8_t* mask, int mode) {
  const int64_t qi = row % shape.sq;
  RowInfo info{row, static_cast<int>(shape.sk), nullptr};
  if (mode == kCausal) info.valid = static_cast<int>(qi + 1 < shape.sk ? qi + 1 : shape.sk);
  if (mode == kMasked) {
    const int64_t batch = row / (shape.heads * shape.sq);
    info.mask = mask + ((shape.mask_batched ? batch : 0) * shape.sq + qi) * shape.sk;
  }
  return info;
}

// ------------------------------------------------------------------------------ warp per row

template <typename T, int kVec, int kIters>
__global__ void __launch_bounds__(kWarp* kWarpRowsPerBlock)
    softmax_forward_warp(const T* __restrict__ x, const uint8_t* __restrict__ mask, T* __restrict__ y,
                         SoftmaxShape shape, int mode, float scale) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarp;
  if (row >= shape.rows) return;  // uniform per warp
  const int lane = threadIdx.x % kWarp;
  const int sk = static_cast<int>(shape.sk);
  const RowInfo info = row_info(row, shape, mask, mode);
  const T* xr = x + row * shape.sk;
  T* yr = y + row * shape.sk;

  float v[kIters][kVec];
  float m = -INFINITY;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * kWarp + lane) * kVec;
    if (col < info.valid) {  // sk % kVec == 0, so the whole pack is inside the row
      const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(xr + col);
      bool masked[kVec];
      if (info.mask != nullptr) {
        load_mask<kVec>(info.mask + col, masked);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) masked[e] = false;
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        v[it][e] = (col + e < info.valid && !masked[e]) ? to_float(pack.v[e]) * scale : -INFINITY;
        m = fmaxf(m, v[it][e]);
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) v[it][e] = -INFINITY;
    }
  }
  m = warp_max(m);
  float sum = 0.0f;
  if (m != -INFINITY) {
#pragma unroll
    for (int it = 0; it < kIters; ++it)
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        v[it][e] = __expf(v[it][e] - m);  // exp(-inf) = 0 for masked entries
        sum += v[it][e];
      }
  }
  sum = warp_sum(sum);
  const bool any = m != -INFINITY;  // else a fully masked row: zeros (v is -inf there, never scaled)
  const float inv = any ? 1.0f / sum : 0.0f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * kWarp + lane) * kVec;
    if (col < sk) {
      Pack<T, kVec> out;
#pragma unroll
      for (int e = 0; e < kVec; ++e) out.v[e] = from_float<T>(any && col < info.valid ? v[it][e] * inv : 0.0f);
      *reinterpret_cast<Pack<T, kVec>*>(yr + col) = out;
    }
  }
}

// The backward kernels may run in place (dx == grad, apex's in-place backward): a thread writes only
// the columns it read itself, after the row's dot(grad, probs) is complete (warp_sum / block_reduce),
// so grad and dx are not __restrict__.
template <typename T, int kVec, int kIters>
__global__ void __launch_bounds__(kWarp* kWarpRowsPerBlock)
    softmax_backward_warp(const T* grad, const T* __restrict__ probs, T* dx, int64_t rows,
                          int64_t sq, int sk, bool causal, float scale) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock + threadIdx.x / kWarp;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarp;
  const int valid = causal ? static_cast<int>(row % sq + 1 < sk ? row % sq + 1 : sk) : sk;
  const T* gr = grad + row * sk;
  const T* pr = probs + row * sk;
  T* dr = dx + row * sk;

  float g[kIters][kVec], p[kIters][kVec];
  float dot = 0.0f;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * kWarp + lane) * kVec;
    if (col < valid) {
      const Pack<T, kVec> gp = *reinterpret_cast<const Pack<T, kVec>*>(gr + col);
      const Pack<T, kVec> pp = *reinterpret_cast<const Pack<T, kVec>*>(pr + col);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        g[it][e] = to_float(gp.v[e]);
        p[it][e] = col + e < valid ? to_float(pp.v[e]) : 0.0f;
        dot += g[it][e] * p[it][e];
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) g[it][e] = p[it][e] = 0.0f;
    }
  }
  dot = warp_sum(dot);
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int col = (it * kWarp + lane) * kVec;
    if (col < sk) {
      Pack<T, kVec> out;
#pragma unroll
      for (int e = 0; e < kVec; ++e) out.v[e] = from_float<T>(scale * p[it][e] * (g[it][e] - dot));
      *reinterpret_cast<Pack<T, kVec>*>(dr + col) = out;
    }
  }
}

// ----------------------------------------------------------------------------- block per row

template <typename T, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_forward_block(const T* __restrict__ x, const uint8_t* __restrict__ mask, T* __restrict__ y,
                          SoftmaxShape shape, int mode, float scale) {
  __shared__ float shared[33];
  const int64_t row = blockIdx.x;
  const RowInfo info = row_info(row, shape, mask, mode);
  const int sk = static_cast<int>(shape.sk);
  const T* xr = x + row * shape.sk;
  T* yr = y + row * shape.sk;
  auto value = [&](const Pack<T, kVec>& pack, int col, int e) {
    const bool masked = col + e >= info.valid || (info.mask != nullptr && info.mask[col + e] != 0);
    return masked ? -INFINITY : to_float(pack.v[e]) * scale;
  };
  float m = -INFINITY;
  for (int col = threadIdx.x * kVec; col < info.valid; col += blockDim.x * kVec) {
    const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(xr + col);
#pragma unroll
    for (int e = 0; e < kVec; ++e) m = fmaxf(m, value(pack, col, e));
  }
  m = block_reduce<true>(m, shared);
  float sum = 0.0f;
  if (m != -INFINITY) {
    for (int col = threadIdx.x * kVec; col < info.valid; col += blockDim.x * kVec) {
      const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(xr + col);
#pragma unroll
      for (int e = 0; e < kVec; ++e) sum += __expf(value(pack, col, e) - m);
    }
  }
  sum = block_reduce<false>(sum, shared);
  const float inv = m != -INFINITY ? 1.0f / sum : 0.0f;
  for (int col = threadIdx.x * kVec; col < sk; col += blockDim.x * kVec) {
    Pack<T, kVec> out;
    if (col < info.valid && m != -INFINITY) {
      const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(xr + col);
#pragma unroll
      for (int e = 0; e < kVec; ++e) out.v[e] = from_float<T>(__expf(value(pack, col, e) - m) * inv);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) out.v[e] = from_float<T>(0.0f);
    }
    *reinterpret_cast<Pack<T, kVec>*>(yr + col) = out;
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kBlockThreads)
    softmax_backward_block(const T* grad, const T* __restrict__ probs, T* dx, int64_t sq,
                           int sk, bool causal, float scale) {
  __shared__ float shared[33];
  const int64_t row = blockIdx.x;
  const int valid = causal ? static_cast<int>(row % sq + 1 < sk ? row % sq + 1 : sk) : sk;
  const T* gr = grad + row * sk;
  const T* pr = probs + row * sk;
  T* dr = dx + row * sk;
  float dot = 0.0f;
  for (int col = threadIdx.x * kVec; col < valid; col += blockDim.x * kVec) {
    const Pack<T, kVec> gp = *reinterpret_cast<const Pack<T, kVec>*>(gr + col);
    const Pack<T, kVec> pp = *reinterpret_cast<const Pack<T, kVec>*>(pr + col);
#pragma unroll
    for (int e = 0; e < kVec; ++e)
      if (col + e < valid) dot += to_float(gp.v[e]) * to_float(pp.v[e]);
  }
  dot = block_reduce<false>(dot, shared);
  for (int col = threadIdx.x * kVec; col < sk; col += blockDim.x * kVec) {
    Pack<T, kVec> out;
    if (col < valid) {
      const Pack<T, kVec> gp = *reinterpret_cast<const Pack<T, kVec>*>(gr + col);
      const Pack<T, kVec> pp = *reinterpret_cast<const Pack<T, kVec>*>(pr + col);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const float p = col + e < valid ? to_float(pp.v[e]) : 0.0f;
        out.v[e] = from_float<T>(scale * p * (to_float(gp.v[e]) - dot));
      }
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) out.v[e] = from_float<T>(0.0f);
    }
    *reinterpret_cast<Pack<T, kVec>*>(dr + col) = out;
  }
}

// ---------------------------------------------------------------------------------- dispatch

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The warp kernel for the smallest power-of-two kIters that holds the row; false if none does.
template <typename T, int kVec, int kIters, int kMaxIters, typename Launch>
bool dispatch_iters(int64_t sk, Launch&& launch) {
  if (sk <= static_cast<int64_t>(kWarp) * kVec * kIters) {
    launch(std::integral_constant<int, kIters>{});
    return true;
  }
  if constexpr (kIters < kMaxIters) {
    return dispatch_iters<T, kVec, kIters * 2, kMaxIters>(sk, launch);
  } else {
    return false;
  }
}

template <typename T>
cudaError_t forward_typed(const T* x, const uint8_t* mask, T* y, const SoftmaxShape& shape, int mode, float scale,
                          cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized = shape.sk % kVec == 0 && aligned(x, 16) && aligned(y, 16) &&
                          (mode != kMasked || aligned(mask, kVec));
  const dim3 warp_grid(static_cast<unsigned>(ceil_div(shape.rows, kWarpRowsPerBlock)));
  const dim3 warp_block(kWarp * kWarpRowsPerBlock);
  bool done = false;
  if (vectorized) {
    done = dispatch_iters<T, kVec, 1, kMaxWarpRow / (kWarp * kVec)>(shape.sk, [&](auto iters) {
      softmax_forward_warp<T, kVec, decltype(iters)::value>
          <<<warp_grid, warp_block, 0, stream>>>(x, mask, y, shape, mode, scale);
    });
  } else {
    done = dispatch_iters<T, 1, 1, 32>(shape.sk, [&](auto iters) {
      softmax_forward_warp<T, 1, decltype(iters)::value>
          <<<warp_grid, warp_block, 0, stream>>>(x, mask, y, shape, mode, scale);
    });
  }
  if (!done) {
    const dim3 grid(static_cast<unsigned>(shape.rows));
    if (vectorized)
      softmax_forward_block<T, kVec><<<grid, kBlockThreads, 0, stream>>>(x, mask, y, shape, mode, scale);
    else
      softmax_forward_block<T, 1><<<grid, kBlockThreads, 0, stream>>>(x, mask, y, shape, mode, scale);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const T* grad, const T* probs, T* dx, int64_t rows, int64_t sq, int64_t sk, bool causal,
                           float scale, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorized = sk % kVec == 0 && aligned(grad, 16) && aligned(probs, 16) && aligned(dx, 16);
  const dim3 warp_grid(static_cast<unsigned>(ceil_div(rows, kWarpRowsPerBlock)));
  const dim3 warp_block(kWarp * kWarpRowsPerBlock);
  const int n = static_cast<int>(sk);
  bool done = false;
  if (vectorized) {
    done = dispatch_iters<T, kVec, 1, kMaxWarpRow / (kWarp * kVec)>(sk, [&](auto iters) {
      softmax_backward_warp<T, kVec, decltype(iters)::value>
          <<<warp_grid, warp_block, 0, stream>>>(grad, probs, dx, rows, sq, n, causal, scale);
    });
  } else {
    done = dispatch_iters<T, 1, 1, 32>(sk, [&](auto iters) {
      softmax_backward_warp<T, 1, decltype(iters)::value>
          <<<warp_grid, warp_block, 0, stream>>>(grad, probs, dx, rows, sq, n, causal, scale);
    });
  }
  if (!done) {
    const dim3 grid(static_cast<unsigned>(rows));
    if (vectorized)
      softmax_backward_block<T, kVec><<<grid, kBlockThreads, 0, stream>>>(grad, probs, dx, sq, n, causal, scale);
    else
      softmax_backward_block<T, 1><<<grid, kBlockThreads, 0, stream>>>(grad, probs, dx, sq, n, causal, scale);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_softmax_forward(const void* x, const uint8_t* mask, void* y, DType dtype,
                                   const SoftmaxShape& shape, int mode, float scale, cudaStream_t stream) {
  if (shape.rows == 0 || shape.sk == 0) return cudaSuccess;
  if (shape.rows > 0x7fffffffLL || shape.sk > 0x7fffffffLL) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed(static_cast<const float*>(x), mask, static_cast<float*>(y), shape, mode, scale, stream);
    case DType::kFloat16:
      return forward_typed(static_cast<const __half*>(x), mask, static_cast<__half*>(y), shape, mode, scale, stream);
    case DType::kBFloat16:
      return forward_typed(static_cast<const __nv_bfloat16*>(x), mask, static_cast<__nv_bfloat16*>(y), shape, mode,
                           scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_softmax_backward(const void* grad, const void* probs, void* dx, DType dtype, int64_t rows,
                                    int64_t sq, int64_t sk, bool causal, float scale, cudaStream_t stream) {
  if (rows == 0 || sk == 0) return cudaSuccess;
  if (rows > 0x7fffffffLL || sk > 0x7fffffffLL) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed(static_cast<const float*>(grad), static_cast<const float*>(probs), static_cast<float*>(dx),
                            rows, sq, sk, causal, scale, stream);
    case DType::kFloat16:
      return backward_typed(static_cast<const __half*>(grad), static_cast<const __half*>(probs),
                            static_cast<__half*>(dx), rows, sq, sk, causal, scale, stream);
    case DType::kBFloat16:
      return backward_typed(static_cast<const __nv_bfloat16*>(grad), static_cast<const __nv_bfloat16*>(probs),
                            static_cast<__nv_bfloat16*>(dx), rows, sq, sk, causal, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace megaglot
