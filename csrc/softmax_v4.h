// Entry points of softmax_v4.cpp: the CPU softmax rows built for x86-64-v4 (F16C half conversions,
// streaming stores for large outputs). Call only when v4_softmax_supported().
#pragma once

#include <cstdint>

// GCC 12 or newer on x86-64 Linux: it knows arch=x86-64-v4 as a target and in __builtin_cpu_supports.
#if defined(__GNUC__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define MG_V4_PATH 1
#else
#define MG_V4_PATH 0
#endif

namespace megaglot {

struct RowLayout;

// True when the running CPU is x86-64-v4 (AVX-512) with F16C and the path was built.
bool v4_softmax_supported();

// stream: write the output with non-temporal stores; every row must start 64-byte aligned.
void forward_f32_v4(const float* x, const uint8_t* mask, float* y, int64_t begin, int64_t end,
                    const RowLayout& lay, int mode, float scale, float* buf, bool stream);
void forward_bf16_v4(const uint16_t* x, const uint8_t* mask, uint16_t* y, int64_t begin, int64_t end,
                     const RowLayout& lay, int mode, float scale, float* buf, bool stream);
void forward_f16_v4(const uint16_t* x, const uint8_t* mask, uint16_t* y, int64_t begin, int64_t end,
                    const RowLayout& lay, int mode, float scale, float* buf, bool stream);
void backward_f32_v4(const float* g, const float* y, float* dx, int64_t begin, int64_t end, int64_t sq, int64_t sk,
                     bool causal, float scale, bool stream);
void backward_bf16_v4(const uint16_t* g, const uint16_t* y, uint16_t* dx, int64_t begin, int64_t end, int64_t sq,
                      int64_t sk, bool causal, float scale, bool stream);
void backward_f16_v4(const uint16_t* g, const uint16_t* y, uint16_t* dx, int64_t begin, int64_t end, int64_t sq,
                     int64_t sk, bool causal, float scale, bool stream);

}  // namespace megaglot
