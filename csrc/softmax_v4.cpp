// The CPU softmax rows built for x86-64-v4 (AVX-512), for what the cloned baseline build cannot do:
//  - float16 through F16C: one vcvtph2ps / vcvtps2ph per 16 elements instead of the ~15 integer
//    operations of the portable codec (the extension is compiled for the baseline ISA, where F16C
//    cannot be assumed). At the AVX2 level the 16-float vectors of the row code are split in halves
//    through the stack (measured 8x slower here), so AVX2-only machines keep the portable codec.
//  - streaming stores for outputs far larger than the caches: the output is written without first
//    reading its lines into the cache (a quarter of a row pass's memory traffic).
// softmax.cpp calls these only after checking the running CPU (v4_softmax_supported()).
//
// Only standard headers and the torch-free cpu_math.h come before the target pragma, so no function
// shared with other translation units is compiled for AVX-512 here; the row templates included after
// it live in an unnamed namespace (softmax_rows.h), private to this file.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_math.h"
#include "softmax_v4.h"

#if MG_V4_PATH
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")

#include "softmax_rows.h"

namespace megaglot {
namespace {

// cpu::exp_poly in AVX-512 instructions, the same polynomial (cpu::exp_reduced), so the same bits
// for x >= -87. Instead of the portable clamp-and-select chain (compare, blend, integer exponent add,
// NaN select): one vmaxps clamps (and passes a NaN in x through), vscalefps forms p * 2^n, and its
// zero-masking writes the 0 below -87 (and for -inf), so it is 0 there, as in the portable exp.
// 13 instructions for 16 exps at degree 6 against 20: the exp is most of the forward's work.
template <int Degree>
MG_INLINE cpu::f32x16 exp16_avx512(cpu::f32x16 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __m512 xv = (__m512)x;
  const __mmask16 keep = _mm512_cmp_ps_mask(xv, lo, _CMP_NLT_UQ);  // x >= -87 or NaN
  const __m512 xc = _mm512_max_ps(lo, xv);  // a NaN in the second operand is returned
  const __m512 magic = _mm512_set1_ps(cpu::kExpRoundMagic);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(cpu::kLog2e), magic), magic);
  const cpu::f32x16 p = cpu::exp_reduced<Degree>((cpu::f32x16)xc, (cpu::f32x16)n);
  return (cpu::f32x16)_mm512_maskz_scalef_ps(keep, (__m512)p, n);
}

// A codec with the AVX-512 exp at the codec's own accuracy.
template <typename Base>
struct WithAvx512Exp : Base {
  static MG_INLINE cpu::f32x16 exp16(cpu::f32x16 x) { return exp16_avx512<Base::exp_degree>(x); }
};

// IEEE half through F16C, round-to-nearest-even as the portable cpu::F16 codec rounds.
struct F16HardwareCodec {
  using storage = uint16_t;
  using acc = float;
  static constexpr int exp_degree = cpu::kExpDegree16;
  static MG_INLINE float load(uint16_t v) { return _cvtsh_ss(v); }
  static MG_INLINE uint16_t store(float v) { return _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }
  static MG_INLINE cpu::f32x16 load16(const uint16_t* p) {
    return (cpu::f32x16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static MG_INLINE __m256i bits16(cpu::f32x16 v) { return _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT); }
  static MG_INLINE void store16(uint16_t* p, cpu::f32x16 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits16(v));
  }
};

// bfloat16 with one-instruction widening (vpmovzxwd) and narrowing (vpmovdw): GCC lowers the
// portable codec's vector conversions to extract/insert and permute sequences, which made the
// backward compute-bound (30 instructions per 16 elements). Same rounding as cpu::BF16.
struct BF16WideCodec : cpu::BF16 {
  static MG_INLINE cpu::f32x16 load16(const uint16_t* p) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return (cpu::f32x16)_mm512_slli_epi32(wide, 16);
  }
  static MG_INLINE __m256i bits16(cpu::f32x16 v) {
    return _mm512_cvtepi32_epi16((__m512i)cpu::float16_to_bf16_bits(v));
  }
  static MG_INLINE void store16(uint16_t* p, cpu::f32x16 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits16(v));
  }
};

using F32Avx512 = WithAvx512Exp<cpu::F32>;
using F16Hardware = WithAvx512Exp<F16HardwareCodec>;
using BF16Wide = WithAvx512Exp<BF16WideCodec>;

// The same codecs with 16-element stores that bypass the cache (p must be 32/64-byte aligned).
struct F32Streaming : F32Avx512 {
  static MG_INLINE void store16(float* p, cpu::f32x16 v) { _mm512_stream_ps(p, (__m512)v); }
};
struct BF16Streaming : BF16Wide {
  static MG_INLINE void store16(uint16_t* p, cpu::f32x16 v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits16(v));
  }
};
struct F16Streaming : F16Hardware {
  static MG_INLINE void store16(uint16_t* p, cpu::f32x16 v) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), bits16(v));
  }
};

template <typename C, typename Streaming>
void forward_v4(const typename C::storage* x, const uint8_t* mask, typename C::storage* y, int64_t begin,
                int64_t end, const RowLayout& lay, int mode, float scale, float* buf, bool stream) {
  if (stream) {
    forward_rows<Streaming>(x, mask, y, begin, end, lay, mode, scale, buf);
    _mm_sfence();  // streamed stores are weakly ordered: make them visible before returning
  } else {
    forward_rows<C>(x, mask, y, begin, end, lay, mode, scale, buf);
  }
}

template <typename C, typename Streaming>
void backward_v4(const typename C::storage* g, const typename C::storage* y, typename C::storage* dx,
                 int64_t begin, int64_t end, int64_t sq, int64_t sk, bool causal, float scale, bool stream) {
  if (stream) {
    backward_rows<Streaming>(g, y, dx, begin, end, sq, sk, causal, scale);
    _mm_sfence();
  } else {
    backward_rows<C>(g, y, dx, begin, end, sq, sk, causal, scale);
  }
}

}  // namespace

void forward_f32_v4(const float* x, const uint8_t* mask, float* y, int64_t begin, int64_t end,
                    const RowLayout& lay, int mode, float scale, float* buf, bool stream) {
  forward_v4<F32Avx512, F32Streaming>(x, mask, y, begin, end, lay, mode, scale, buf, stream);
}
void forward_bf16_v4(const uint16_t* x, const uint8_t* mask, uint16_t* y, int64_t begin, int64_t end,
                     const RowLayout& lay, int mode, float scale, float* buf, bool stream) {
  forward_v4<BF16Wide, BF16Streaming>(x, mask, y, begin, end, lay, mode, scale, buf, stream);
}
void forward_f16_v4(const uint16_t* x, const uint8_t* mask, uint16_t* y, int64_t begin, int64_t end,
                    const RowLayout& lay, int mode, float scale, float* buf, bool stream) {
  forward_v4<F16Hardware, F16Streaming>(x, mask, y, begin, end, lay, mode, scale, buf, stream);
}
void backward_f32_v4(const float* g, const float* y, float* dx, int64_t begin, int64_t end, int64_t sq, int64_t sk,
                     bool causal, float scale, bool stream) {
  backward_v4<F32Avx512, F32Streaming>(g, y, dx, begin, end, sq, sk, causal, scale, stream);
}
void backward_bf16_v4(const uint16_t* g, const uint16_t* y, uint16_t* dx, int64_t begin, int64_t end, int64_t sq,
                      int64_t sk, bool causal, float scale, bool stream) {
  backward_v4<BF16Wide, BF16Streaming>(g, y, dx, begin, end, sq, sk, causal, scale, stream);
}
void backward_f16_v4(const uint16_t* g, const uint16_t* y, uint16_t* dx, int64_t begin, int64_t end, int64_t sq,
                     int64_t sk, bool causal, float scale, bool stream) {
  backward_v4<F16Hardware, F16Streaming>(g, y, dx, begin, end, sq, sk, causal, scale, stream);
}

}  // namespace megaglot

#pragma GCC pop_options

namespace megaglot {

bool v4_softmax_supported() {
  // MEGAGLOT_CPU_PORTABLE=1 keeps the cloned portable kernels (the tests run both paths).
  static const bool supported = [] {
    const char* portable = std::getenv("MEGAGLOT_CPU_PORTABLE");
    const bool forced = portable != nullptr && portable[0] != '\0' && std::strcmp(portable, "0") != 0;
    return !forced && __builtin_cpu_supports("x86-64-v4") && __builtin_cpu_supports("f16c");
  }();
  return supported;
}

}  // namespace megaglot

#else  // not GCC on x86-64 Linux: the cloned portable kernels only (v4_softmax_supported() is false)

namespace megaglot {

bool v4_softmax_supported() { return false; }
void forward_f32_v4(const float*, const uint8_t*, float*, int64_t, int64_t, const RowLayout&, int, float, float*,
                    bool) {}
void forward_bf16_v4(const uint16_t*, const uint8_t*, uint16_t*, int64_t, int64_t, const RowLayout&, int, float,
                     float*, bool) {}
void forward_f16_v4(const uint16_t*, const uint8_t*, uint16_t*, int64_t, int64_t, const RowLayout&, int, float,
                    float*, bool) {}
void backward_f32_v4(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t, bool, float, bool) {}
void backward_bf16_v4(const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t, int64_t, bool, float,
                      bool) {}
void backward_f16_v4(const uint16_t*, const uint16_t*, uint16_t*, int64_t, int64_t, int64_t, int64_t, bool, float,
                     bool) {}

}  // namespace megaglot

#endif
