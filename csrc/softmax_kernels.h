// The CPU softmax row kernels of one ISA level, as a table of plain functions: softmax.cpp picks
// one table per process (the best level the CPU runs, capped by MEGAGLOT_CPU_ISA) and calls it from
// torch-aware code; the ISA translation units (softmax_x86.h) stay torch-free.
#pragma once

#include <cstdint>

namespace megaglot {

struct RowLayout;

using SoftmaxForward32 = void (*)(const float* x, const uint8_t* mask, float* y, int64_t begin, int64_t end,
                                  const RowLayout& lay, int mode, float scale, float* buf, bool stream);
using SoftmaxForward16 = void (*)(const uint16_t* x, const uint8_t* mask, uint16_t* y, int64_t begin,
                                  int64_t end, const RowLayout& lay, int mode, float scale, float* buf,
                                  bool stream);
using SoftmaxBackward32 = void (*)(const float* g, const float* y, float* dx, int64_t begin, int64_t end,
                                   int64_t sq, int64_t sk, bool causal, float scale, bool stream);
using SoftmaxBackward16 = void (*)(const uint16_t* g, const uint16_t* y, uint16_t* dx, int64_t begin,
                                   int64_t end, int64_t sq, int64_t sk, bool causal, float scale, bool stream);

// stream: write the output with non-temporal stores (only where `streams`); every row must then
// start at a multiple of 64 bytes.
struct SoftmaxCpuKernels {
  const char* isa;  // "avx512", "avx2" or "baseline": what MEGAGLOT_CPU_ISA names
  bool streams;     // has streaming stores
  SoftmaxForward32 forward_f32;
  SoftmaxForward16 forward_f16, forward_bf16;
  SoftmaxBackward32 backward_f32;
  SoftmaxBackward16 backward_f16, backward_bf16;
};

// The x86 levels: nullptr where this build has no such path (not GCC >= 11 on x86-64 Linux) or the
// running CPU lacks the instructions.
const SoftmaxCpuKernels* avx512_softmax_kernels();
const SoftmaxCpuKernels* avx2_softmax_kernels();

}  // namespace megaglot
