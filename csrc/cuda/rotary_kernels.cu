// Fused NeoX rotary embedding for q and k on CUDA, torch-free (see csrc/rotary.cpp for the math).
//
// One block per (position, batch element): its threads walk the heads' kVec-element chunks, so
// the division that splits a flat index happens once per block (64-bit) and once per chunk in 32
// bits, and the block's cos/sin row stays in L1. (Four rows per block with every row's loads issued
// first measured slower on an H100: 128 registers per thread halved occupancy.) A rotated chunk reads x1 = x[i..i+kVec) and
// x2 = x[i+h..), the fp32 cos/sin of both halves, and writes both outputs; a pass-through chunk is
// a 16-byte copy. q and k go in one launch (blockIdx.y); inputs may be strided views (fused QKV),
// outputs are contiguous.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace megaglot {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <int N>
__device__ __forceinline__ void load_floats(const float* p, float (&out)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const Pack<float, 4> pack = *reinterpret_cast<const Pack<float, 4>*>(p + i);
#pragma unroll
      for (int j = 0; j < 4; ++j) out[i + j] = pack.v[j];
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = p[i];
  }
}

template <typename T, int kVec, bool kForward>
__device__ __forceinline__ void rotate(const Pack<T, kVec>& p1, const Pack<T, kVec>& p2, const float* cos_row,
                                       const float* sin_row, int i, int half, Pack<T, kVec>& o1,
                                       Pack<T, kVec>& o2) {
  float c1[kVec], c2[kVec], s1[kVec], s2[kVec];
  load_floats<kVec>(cos_row + i, c1);
  load_floats<kVec>(cos_row + half + i, c2);
  load_floats<kVec>(sin_row + i, s1);
  load_floats<kVec>(sin_row + half + i, s2);
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float x1 = to_float(p1.v[e]), x2 = to_float(p2.v[e]);
    if (kForward) {
      o1.v[e] = from_float<T>(x1 * c1[e] - x2 * s1[e]);
      o2.v[e] = from_float<T>(x2 * c2[e] + x1 * s2[e]);
    } else {
      o1.v[e] = from_float<T>(x1 * c1[e] + x2 * s2[e]);
      o2.v[e] = from_float<T>(x2 * c2[e] - x1 * s1[e]);
    }
  }
}

template <typename T, int kVec, bool kForward>
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ q_out, T* __restrict__ k_out,
                  const float* __restrict__ cos, const float* __restrict__ sin, RotaryShape shape) {
  const bool is_k = blockIdx.y == 1;
  const T* x = is_k ? k : q;
  T* y = is_k ? k_out : q_out;
  // Scalars, not a pointer into the parameter struct: indexing that would copy it to local memory.
  const int64_t stride_s = is_k ? shape.k_stride[0] : shape.q_stride[0];
  const int64_t stride_b = is_k ? shape.k_stride[1] : shape.q_stride[1];
  const int64_t stride_h = is_k ? shape.k_stride[2] : shape.q_stride[2];
  const int hn = static_cast<int>(shape.hn), rd = static_cast<int>(shape.rd), half = rd / 2;
  const int rot_chunks = half / kVec;
  const int chunks_per_head = rot_chunks + (hn - rd) / kVec;
  const int row_chunks = static_cast<int>(shape.heads) * chunks_per_head;
  const int64_t rows = shape.s * shape.b;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // row = pos * b + batch
    const int64_t pos = row / shape.b, batch = row % shape.b;
    const T* xr = x + pos * stride_s + batch * stride_b;
    T* yr = y + row * shape.heads * hn;
    for (int c = threadIdx.x; c < row_chunks; c += blockDim.x) {
      const int head = c / chunks_per_head, chunk = c - head * chunks_per_head;
      const T* xh = xr + head * stride_h;
      T* yh = yr + head * hn;
      if (chunk < rot_chunks) {
        const int i = chunk * kVec;
        const Pack<T, kVec> p1 = *reinterpret_cast<const Pack<T, kVec>*>(xh + i);
        const Pack<T, kVec> p2 = *reinterpret_cast<const Pack<T, kVec>*>(xh + i + half);
        Pack<T, kVec> o1, o2;
        rotate<T, kVec, kForward>(p1, p2, cos + pos * rd, sin + pos * rd, i, half, o1, o2);
        *reinterpret_cast<Pack<T, kVec>*>(yh + i) = o1;
        *reinterpret_cast<Pack<T, kVec>*>(yh + i + half) = o2;
      } else {
        const int i = rd + (chunk - rot_chunks) * kVec;
        *reinterpret_cast<Pack<T, kVec>*>(yh + i) = *reinterpret_cast<const Pack<T, kVec>*>(xh + i);
      }
    }
  }
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, int kVec>
cudaError_t launch_typed(const T* q, const T* k, T* q_out, T* k_out, const float* cos, const float* sin,
                         const RotaryShape& shape, bool forward, cudaStream_t stream) {
  // As many threads as a (position, batch element) row has chunks (whole warps, at most kThreads).
  const int64_t row_chunks = shape.heads * (shape.hn - shape.rd / 2) / kVec;
  const int64_t rows = shape.s * shape.b;
  const int threads = static_cast<int>(row_chunks >= kThreads ? kThreads : (row_chunks + kWarp - 1) / kWarp * kWarp);
  // At most 32 blocks per SM, each looping over rows: measured 0.131 ms against 0.140 ms with a
  // block per row at [2048, 8, 16, 128] bf16 on an H100 (benchmarks/cuda/rotary_grid.cu).
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    sms = 132;
  const int64_t max_blocks = int64_t{32} * sms;
  const dim3 grid(static_cast<unsigned>(rows < max_blocks ? rows : max_blocks), 2);
  if (forward)
    rotary_kernel<T, kVec, true><<<grid, threads, 0, stream>>>(q, k, q_out, k_out, cos, sin, shape);
  else
    rotary_kernel<T, kVec, false><<<grid, threads, 0, stream>>>(q, k, q_out, k_out, cos, sin, shape);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const void* q, const void* k, void* q_out, void* k_out, const float* cos, const float* sin,
                     const RotaryShape& shape, bool forward, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  bool vectorized = (shape.rd / 2) % kVec == 0 && (shape.hn - shape.rd) % kVec == 0 && aligned(q, 16) &&
                    aligned(k, 16) && aligned(q_out, 16) && aligned(k_out, 16) && aligned(cos, 16) &&
                    aligned(sin, 16);
  for (int d = 0; d < 3; ++d) vectorized = vectorized && shape.q_stride[d] % kVec == 0 && shape.k_stride[d] % kVec == 0;
  const T* qt = static_cast<const T*>(q);
  const T* kt = static_cast<const T*>(k);
  if (vectorized)
    return launch_typed<T, kVec>(qt, kt, static_cast<T*>(q_out), static_cast<T*>(k_out), cos, sin, shape, forward,
                                 stream);
  return launch_typed<T, 1>(qt, kt, static_cast<T*>(q_out), static_cast<T*>(k_out), cos, sin, shape, forward, stream);
}

}  // namespace

cudaError_t launch_rotary(const void* q, const void* k, void* q_out, void* k_out, const float* cos,
                          const float* sin, DType dtype, const RotaryShape& shape, bool forward,
                          cudaStream_t stream) {
  if (shape.s * shape.b * shape.heads * shape.hn == 0) return cudaSuccess;
  if (shape.rd <= 0 || shape.rd % 2 != 0 || shape.rd > shape.hn) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return dispatch<float>(q, k, q_out, k_out, cos, sin, shape, forward, stream);
    case DType::kFloat16:
      return dispatch<__half>(q, k, q_out, k_out, cos, sin, shape, forward, stream);
    case DType::kBFloat16:
      return dispatch<__nv_bfloat16>(q, k, q_out, k_out, cos, sin, shape, forward, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace megaglot
