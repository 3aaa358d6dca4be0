// Standalone check of the fused rotary kernel's grid size on a GPU, without torch: builds with
//   nvcc -O3 -std=c++17 -arch=sm_90 -Icsrc benchmarks/cuda/rotary_grid.cu -o /tmp/rotary_grid
// It includes csrc/cuda/rotary_kernels.cu to reach the kernel template, runs the bf16 forward on
// q, k [s=2048, b=8, np=16, hn=128] (rd = 64) with several grid sizes (all rows; a few blocks per
// SM looping over rows), checks every output element against a host fp32 reference, and prints
// the median time and GB/s next to a device-to-device copy of the same bytes.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../../csrc/cuda/rotary_kernels.cu"

#define CHECK(call)                                                                       \
  do {                                                                                    \
    cudaError_t err_ = (call);                                                            \
    if (err_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(err_));   \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

using megaglot::cuda::RotaryShape;
using T = __nv_bfloat16;

template <typename F>
float median_ms(F&& fn, int repeat = 50) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 5; ++i) fn();
  std::vector<float> t;
  for (int i = 0; i < repeat; ++i) {
    CHECK(cudaEventRecord(a));
    fn();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  const int64_t s = 2048, bsz = 8, heads = 16, hn = 128, rd = 64;
  const int64_t n = s * bsz * heads * hn;
  std::vector<T> hq(n), hk(n);
  std::vector<float> hcos(s * rd), hsin(s * rd);
  srand(1);
  for (int64_t i = 0; i < n; ++i) {
    hq[i] = __float2bfloat16(rand() / (float)RAND_MAX * 2 - 1);
    hk[i] = __float2bfloat16(rand() / (float)RAND_MAX * 2 - 1);
  }
  for (int64_t p = 0; p < s; ++p)
    for (int64_t j = 0; j < rd / 2; ++j) {
      const double f = p * std::pow(10000.0, -2.0 * j / rd);
      hcos[p * rd + j] = hcos[p * rd + j + rd / 2] = (float)std::cos(f);
      hsin[p * rd + j] = hsin[p * rd + j + rd / 2] = (float)std::sin(f);
    }
  T *q, *k, *qo, *ko;
  float *cs, *sn;
  CHECK(cudaMalloc(&q, n * 2));
  CHECK(cudaMalloc(&k, n * 2));
  CHECK(cudaMalloc(&qo, n * 2));
  CHECK(cudaMalloc(&ko, n * 2));
  CHECK(cudaMalloc(&cs, s * rd * 4));
  CHECK(cudaMalloc(&sn, s * rd * 4));
  CHECK(cudaMemcpy(q, hq.data(), n * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(k, hk.data(), n * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(cs, hcos.data(), s * rd * 4, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(sn, hsin.data(), s * rd * 4, cudaMemcpyHostToDevice));
  RotaryShape shape{s, bsz, heads, hn, rd, {bsz * heads * hn, heads * hn, hn}, {bsz * heads * hn, heads * hn, hn}};
  int sms;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  const double bytes = 4.0 * n * 2;
  const float copy_ms = median_ms([&] { CHECK(cudaMemcpyAsync(qo, q, 2 * n * 2 / 2, cudaMemcpyDeviceToDevice)); });
  // the copy above moves n*2 bytes read + n*2 written = half the rotary's bytes
  std::printf("copy: %.3f ms for %.0f MB read+write -> %.0f GB/s\n", copy_ms, 2.0 * n * 2 / 1e6,
              2.0 * n * 2 / copy_ms / 1e6);
  const int threads = 192;  // heads * (hn - rd/2) / 8 chunks per row
  const int64_t rows = s * bsz;
  std::printf("| grid.x | ms | GB/s | max abs err |\n|---|---|---|---|\n");
  for (int64_t grid_x : {rows, (int64_t)sms * 32, (int64_t)sms * 16, (int64_t)sms * 8, (int64_t)sms * 4}) {
    CHECK(cudaMemset(qo, 0xff, n * 2));
    CHECK(cudaMemset(ko, 0xff, n * 2));
    auto launch = [&] {
      megaglot::cuda::rotary_kernel<T, 8, true><<<dim3((unsigned)grid_x, 2), threads>>>(q, k, qo, ko, cs, sn, shape);
    };
    launch();
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::vector<T> out(n);
    CHECK(cudaMemcpy(out.data(), ko, n * 2, cudaMemcpyDeviceToHost));
    double worst = 0;
    std::vector<T> qout(n);  // q's output: every element written (the poison is NaN)
    CHECK(cudaMemcpy(qout.data(), qo, n * 2, cudaMemcpyDeviceToHost));
    for (int64_t idx = 0; idx < n; ++idx)
      if (std::isnan(__bfloat162float(qout[idx]))) worst = NAN;
    for (int64_t idx = 0; idx < n; ++idx) {
      const int64_t d = idx % hn, pos = idx / (bsz * heads * hn);
      float want;
      const float x = __bfloat162float(hk[idx]);
      if (d >= rd) {
        want = x;
      } else {
        const float other = __bfloat162float(hk[idx - d + (d < rd / 2 ? d + rd / 2 : d - rd / 2)]);
        want = d < rd / 2 ? x * hcos[pos * rd + d] - other * hsin[pos * rd + d]
                          : x * hcos[pos * rd + d] + other * hsin[pos * rd + d];
      }
      const double err = std::fabs(__bfloat162float(out[idx]) - want);
      if (std::isnan(err) || err > worst) worst = err;  // an unwritten (0xffff = NaN) element shows as nan
    }
    const float ms = median_ms(launch);
    CHECK(cudaGetLastError());
    std::printf("| %lld | %.3f | %.0f | %.4f |\n", (long long)grid_x, ms, bytes / ms / 1e6, worst);
  }
  return 0;
}
