// The CPU softmax rows for one x86 ISA level, included by one small translation unit per level
// (softmax_avx512.cpp: MG_X86_LEVEL 4, softmax_avx2.cpp: 3). The extension is compiled for the
// baseline ISA; each level's unit compiles the row templates (softmax_rows.h) under its own target
// pragma, at its native vector width, with what the portable build cannot assume:
//  - float16 through F16C: one vcvtph2ps / vcvtps2ph per vector instead of the ~15 integer
//    operations of the portable codec;
//  - bfloat16 widened and narrowed in one or two instructions (GCC lowers the portable vector
//    conversions to extract/insert and permute sequences, which made the backward compute-bound);
//  - streaming stores for outputs far larger than the caches: the output is written without first
//    reading its lines into the cache (a quarter of a row pass's memory traffic);
//  - an exp in this level's instructions (exp_avx512 / exp_avx2 below), bit-identical to the portable one.
// Only standard headers and the torch-free cpu_math.h come before the target pragma, so no function
// shared with other translation units is compiled for this level; the row templates included after
// it live in an unnamed namespace (softmax_rows.h), private to the unit. The table accessor is
// compiled after the pragma is popped, so asking for it is safe on any CPU.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu_math.h"
#include "softmax_kernels.h"

#if !defined(MG_X86_LEVEL) || (MG_X86_LEVEL != 3 && MG_X86_LEVEL != 4)
#error "define MG_X86_LEVEL as 3 (AVX2) or 4 (AVX-512) before including softmax_x86.h"
#endif

// GCC 11 or newer on x86-64 Linux (Clang has no `#pragma GCC target`). The levels are named by their
// feature lists rather than arch=x86-64-v3/v4, and detected through __builtin_cpu_supports features
// and CPUID rather than the level names, which GCC's __builtin_cpu_supports learned only in 12.
#if defined(__GNUC__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define MG_X86_PATHS 1
#else
#define MG_X86_PATHS 0
#endif

#if MG_X86_PATHS
#include <cpuid.h>
#include <immintrin.h>

#pragma GCC push_options
#if MG_X86_LEVEL == 4  // x86-64-v4 = v3 + these five
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,movbe,popcnt,avx512f,avx512bw,avx512vl,avx512dq,avx512cd")
#else  // x86-64-v3
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,movbe,popcnt")
#endif

#include "softmax_rows.h"

namespace megaglot {
namespace {

constexpr int W = MG_X86_LEVEL == 4 ? 16 : 8;  // floats per zmm / ymm
using V = cpu::f32v<W>;
#if MG_X86_LEVEL == 4
using Half = __m256i;  // W 16-bit values
#else
using Half = __m128i;
#endif

MG_INLINE Half load_half(const uint16_t* p) {
#if MG_X86_LEVEL == 4
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
#else
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
#endif
}
MG_INLINE void store_half(uint16_t* p, Half h) {
#if MG_X86_LEVEL == 4
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#else
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
#endif
}
MG_INLINE void stream_half(uint16_t* p, Half h) {  // p aligned to W * 2 bytes
#if MG_X86_LEVEL == 4
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h);
#else
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
#endif
}

#if MG_X86_LEVEL == 4
// cpu::exp_poly in AVX-512 instructions, the same polynomial (cpu::exp_reduced), so the same bits
// for x >= -87. Instead of the portable clamp-and-select chain (compare, blend, integer exponent add,
// NaN select): one vmaxps clamps (and passes a NaN in x through), vscalefps forms p * 2^n, and its
// zero-masking writes the 0 below -87 (and for -inf), as the portable exp does.
// 13 instructions for 16 exps at degree 6 against 20: the exp is most of the forward's work.
template <int Degree>
MG_INLINE V exp_avx512(V x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __m512 xv = (__m512)x;
  const __mmask16 keep = _mm512_cmp_ps_mask(xv, lo, _CMP_NLT_UQ);  // x >= -87 or NaN
  const __m512 xc = _mm512_max_ps(lo, xv);  // a NaN in the second operand is returned
  const __m512 magic = _mm512_set1_ps(cpu::kExpRoundMagic);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(cpu::kLog2e), magic), magic);
  const V p = cpu::exp_reduced<Degree>((V)xc, (V)n);
  return (V)_mm512_maskz_scalef_ps(keep, (__m512)p, n);
}
#else
// cpu::exp_poly in AVX2 instructions, the same polynomial and the same bits: vmaxps clamps (a NaN
// in x passes through), the exponent add forms p * 2^n, one compare and an and give the 0 below
// -87. n goes through vcvtps2dq, which turns a NaN into 0x80000000 and so leaves p's NaN a NaN
// (the portable exp needs a select for that). 16 instructions for 8 exps against 21.
template <int Degree>
MG_INLINE V exp_avx2(V x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 xv = (__m256)x;
  const __m256 keep = _mm256_cmp_ps(xv, lo, _CMP_NLT_UQ);  // all ones where x >= -87 or NaN
  const __m256 xc = _mm256_max_ps(lo, xv);  // a NaN in the second operand is returned
  const __m256 magic = _mm256_set1_ps(cpu::kExpRoundMagic);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(cpu::kLog2e), magic), magic);
  const V p = cpu::exp_reduced<Degree>((V)xc, (V)n);
  const __m256i scaled = _mm256_add_epi32((__m256i)p, _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
  return (V)_mm256_and_ps(_mm256_castsi256_ps(scaled), keep);
}
#endif

// A codec with this level's exp at its own accuracy.
template <typename Base>
struct WithLevelExp : Base {
  static MG_INLINE V expv(V x) {
#if MG_X86_LEVEL == 4
    return exp_avx512<Base::exp_degree>(x);
#else
    return exp_avx2<Base::exp_degree>(x);
#endif
  }
};

using F32Level = WithLevelExp<cpu::F32<W>>;

// IEEE half through F16C, round-to-nearest-even as the portable cpu::F16 codec rounds.
struct F16Level : WithLevelExp<cpu::F16<W>> {
  static MG_INLINE float load(uint16_t v) { return _cvtsh_ss(v); }
  static MG_INLINE uint16_t store(float v) { return _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); }
  static MG_INLINE V loadv(const uint16_t* p) {
#if MG_X86_LEVEL == 4
    return (V)_mm512_cvtph_ps(load_half(p));
#else
    return (V)_mm256_cvtph_ps(load_half(p));
#endif
  }
  static MG_INLINE Half bits(V v) {
#if MG_X86_LEVEL == 4
    return _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT);
#else
    return _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT);
#endif
  }
  static MG_INLINE void storev(uint16_t* p, V v) { store_half(p, bits(v)); }
};

// bfloat16 widened by vpmovzxwd and narrowed by vpmovdw (AVX-512) or vpackusdw + vpermq (AVX2: the
// bf16 patterns fit 16 bits, so the unsigned saturation never clips). Same rounding as cpu::BF16.
struct BF16Level : WithLevelExp<cpu::BF16<W>> {
  static MG_INLINE V loadv(const uint16_t* p) {
#if MG_X86_LEVEL == 4
    return (V)_mm512_slli_epi32(_mm512_cvtepu16_epi32(load_half(p)), 16);
#else
    return (V)_mm256_slli_epi32(_mm256_cvtepu16_epi32(load_half(p)), 16);
#endif
  }
  static MG_INLINE Half bits(V v) {
    const auto patterns = cpu::floatv_to_bf16_bits<W>(v);
#if MG_X86_LEVEL == 4
    return _mm512_cvtepi32_epi16((__m512i)patterns);
#else
    const __m256i packed = _mm256_packus_epi32((__m256i)patterns, (__m256i)patterns);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));  // quadwords 0 and 2
#endif
  }
  static MG_INLINE void storev(uint16_t* p, V v) { store_half(p, bits(v)); }
};

// The same codecs with vector stores that bypass the cache (p aligned to the vector's size).
struct F32Streaming : F32Level {
  static MG_INLINE void storev(float* p, V v) {
#if MG_X86_LEVEL == 4
    _mm512_stream_ps(p, (__m512)v);
#else
    _mm256_stream_ps(p, (__m256)v);
#endif
  }
};
struct F16Streaming : F16Level {
  static MG_INLINE void storev(uint16_t* p, V v) { stream_half(p, bits(v)); }
};
struct BF16Streaming : BF16Level {
  static MG_INLINE void storev(uint16_t* p, V v) { stream_half(p, bits(v)); }
};

template <typename C, typename Streaming>
void forward(const typename C::storage* x, const uint8_t* mask, typename C::storage* y, int64_t begin, int64_t end,
             const RowLayout& lay, int mode, float scale, float* buf, bool stream) {
  if (stream) {
    forward_rows<Streaming>(x, mask, y, begin, end, lay, mode, scale, buf);
    _mm_sfence();  // streamed stores are weakly ordered: make them visible before returning
  } else {
    forward_rows<C>(x, mask, y, begin, end, lay, mode, scale, buf);
  }
}

template <typename C, typename Streaming>
void backward(const typename C::storage* g, const typename C::storage* y, typename C::storage* dx, int64_t begin,
              int64_t end, int64_t sq, int64_t sk, bool causal, float scale, bool stream) {
  if (stream) {
    backward_rows<Streaming>(g, y, dx, begin, end, sq, sk, causal, scale);
    _mm_sfence();
  } else {
    backward_rows<C>(g, y, dx, begin, end, sq, sk, causal, scale);
  }
}

const SoftmaxCpuKernels kLevelKernels = {
    MG_X86_LEVEL == 4 ? "avx512" : "avx2",
    true,
    &forward<F32Level, F32Streaming>,
    &forward<F16Level, F16Streaming>,
    &forward<BF16Level, BF16Streaming>,
    &backward<F32Level, F32Streaming>,
    &backward<F16Level, F16Streaming>,
    &backward<BF16Level, BF16Streaming>,
};

}  // namespace
}  // namespace megaglot

#pragma GCC pop_options

namespace megaglot {
namespace {

// AVX2 with FMA, F16C and BMI2 (what the rows use of x86-64-v3). __builtin_cpu_supports("avx2") also
// checks that the OS saves the ymm state; F16C is read from CPUID leaf 1.
bool cpu_runs_avx2_level() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
  return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
}

}  // namespace

#if MG_X86_LEVEL == 4
const SoftmaxCpuKernels* avx512_softmax_kernels() {
  // The x86-64-v4 set; the avx512 checks include the OS saving the zmm state.
  static const bool runs = cpu_runs_avx2_level() && __builtin_cpu_supports("avx512f") &&
                           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd");
#else
const SoftmaxCpuKernels* avx2_softmax_kernels() {
  static const bool runs = cpu_runs_avx2_level();
#endif
  return runs ? &kLevelKernels : nullptr;
}

}  // namespace megaglot

#else  // not GCC >= 11 on x86-64 Linux: the portable kernels only

namespace megaglot {
#if MG_X86_LEVEL == 4
const SoftmaxCpuKernels* avx512_softmax_kernels() { return nullptr; }
#else
const SoftmaxCpuKernels* avx2_softmax_kernels() { return nullptr; }
#endif
}  // namespace megaglot

#endif
