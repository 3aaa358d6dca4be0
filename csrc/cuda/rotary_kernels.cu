// Fused NeoX rotary embedding for q and k on CUDA, torch-free (see csrc/rotary.cpp for the math).
//
// One thread per kVec-element chunk: a rotated chunk reads x1 = x[i..i+kVec) and x2 = x[i+h..),
// the fp32 cos/sin of both halves, and writes both outputs; a pass-through chunk is a 16-byte copy.
// q and k go in one launch (blockIdx.y), inputs may be strided views (fused QKV), outputs contiguous.
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
__global__ void __launch_bounds__(kThreads)
    rotary_kernel(const T* __restrict__ q, const T* __restrict__ k, T* __restrict__ q_out, T* __restrict__ k_out,
                  const float* __restrict__ cos, const float* __restrict__ sin, RotaryShape shape) {
  const bool is_k = blockIdx.y == 1;
  const T* x = is_k ? k : q;
  T* y = is_k ? k_out : q_out;
  const int64_t* stride = is_k ? shape.k_stride : shape.q_stride;
  const int64_t half = shape.rd / 2;
  const int64_t rot_chunks = half / kVec;
  const int64_t chunks_per_head = rot_chunks + (shape.hn - shape.rd) / kVec;
  const int64_t total = shape.s * shape.b * shape.heads * chunks_per_head;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t head_row = idx / chunks_per_head;  // (pos * b + batch) * heads + head
    const int64_t chunk = idx % chunks_per_head;
    const int64_t head = head_row % shape.heads;
    const int64_t batch = (head_row / shape.heads) % shape.b;
    const int64_t pos = head_row / (shape.heads * shape.b);
    const T* xr = x + pos * stride[0] + batch * stride[1] + head * stride[2];
    T* yr = y + head_row * shape.hn;
    if (chunk < rot_chunks) {
      const int64_t i = chunk * kVec;
      const Pack<T, kVec> p1 = *reinterpret_cast<const Pack<T, kVec>*>(xr + i);
      const Pack<T, kVec> p2 = *reinterpret_cast<const Pack<T, kVec>*>(xr + i + half);
      float c1[kVec], c2[kVec], s1[kVec], s2[kVec];
      load_floats<kVec>(cos + pos * shape.rd + i, c1);
      load_floats<kVec>(cos + pos * shape.rd + half + i, c2);
      load_floats<kVec>(sin + pos * shape.rd + i, s1);
      load_floats<kVec>(sin + pos * shape.rd + half + i, s2);
      Pack<T, kVec> o1, o2;
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
      *reinterpret_cast<Pack<T, kVec>*>(yr + i) = o1;
      *reinterpret_cast<Pack<T, kVec>*>(yr + i + half) = o2;
    } else {
      const int64_t i = shape.rd + (chunk - rot_chunks) * kVec;
      *reinterpret_cast<Pack<T, kVec>*>(yr + i) = *reinterpret_cast<const Pack<T, kVec>*>(xr + i);
    }
  }
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, int kVec>
cudaError_t launch_typed(const T* q, const T* k, T* q_out, T* k_out, const float* cos, const float* sin,
                         const RotaryShape& shape, bool forward, cudaStream_t stream) {
  const int64_t chunks = shape.s * shape.b * shape.heads * (shape.hn - shape.rd / 2) / kVec;
  int64_t blocks = (chunks + kThreads - 1) / kThreads;
  blocks = blocks < 1 ? 1 : (blocks > 65535 * 16 ? 65535 * 16 : blocks);  // grid-stride beyond that
  const dim3 grid(static_cast<unsigned>(blocks), 2);
  if (forward)
    rotary_kernel<T, kVec, true><<<grid, kThreads, 0, stream>>>(q, k, q_out, k_out, cos, sin, shape);
  else
    rotary_kernel<T, kVec, false><<<grid, kThreads, 0, stream>>>(q, k, q_out, k_out, cos, sin, shape);
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
