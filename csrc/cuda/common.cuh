// Device helpers shared by the kernels: typed 16-byte packs, fp32 conversions, warp/block reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace megaglot {
namespace cuda {

constexpr int kWarp = 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N mask bytes in one load (N in 1, 2, 4, 8, 16), unpacked to flags.
template <int N>
__device__ __forceinline__ void load_mask(const uint8_t* p, bool (&out)[N]) {
  const Pack<uint8_t, N> pack = *reinterpret_cast<const Pack<uint8_t, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = pack.v[i] != 0;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Reduce over the whole block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* shared /* >= 33 floats */) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // shared may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < warps ? shared[lane] : (kMax ? -INFINITY : 0.0f);
    w = kMax ? warp_max(w) : warp_sum(w);
    if (lane == 0) shared[32] = w;
  }
  __syncthreads();
  return shared[32];
}

}  // namespace cuda
}  // namespace megaglot
