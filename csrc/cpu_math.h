// Branch-free scalar and vector helpers for the CPU kernels: element codecs, exp, half/bf16 conversions.
//
// Why not c10::Half / std::exp: the extension is compiled for the baseline ISA (no -mavx2). The rotary
// kernel is built as function clones for x86-64-v4 / v3 / baseline (MG_CLONES, picked at load time by
// the dynamic loader), the softmax rows once per ISA level in their own translation units
// (softmax_x86.h); in both only straight-line code without library calls turns into SIMD. std::exp is
// a libm call per element and c10's conversions are not guaranteed inlinable, so both are written
// here as select-only bit manipulation. Torch-free, so the ISA translation units include nothing else.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__) && !defined(__clang__)
#define MG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MG_CLONES
#endif

#if defined(__GNUC__)
#define MG_INLINE inline __attribute__((always_inline))
#else
#define MG_INLINE inline
#endif

namespace megaglot {
namespace cpu {

MG_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

MG_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE half -> float, exact for every input (normals, subnormals, inf, NaN); after M. Dukhan's FP16.
MG_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized));
  return bits_to_float(result);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN stays NaN. Integer-only except one
// exact-by-construction add (no multiply, so FMA contraction cannot change it).
MG_INLINE uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // |f| < 2^-14: a subnormal half; adding 0.5 (ulp 2^-24) rounds |f| to the half's integer mantissa.
  const uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3F000000u;
  const uint32_t r = a - 0x38000000u;  // rebias the exponent from 127 to 15
  const uint32_t norm = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;  // a carry rounds up into inf correctly
  uint32_t h = a < 0x38800000u ? sub : norm;
  h = a >= 0x47800000u ? 0x7C00u : h;
  h = a > 0x7F800000u ? 0x7E00u : h;
  return static_cast<uint16_t>(sign | h);
}

MG_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// float -> bfloat16, round to nearest even, NaN kept quiet (as c10::BFloat16 does).
MG_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

constexpr float kExpRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits
constexpr float kLog2e = 1.44269504088896341f;

// Bit views of a float or of a vector of floats, so one exp template serves both.
template <typename F>
struct Bits;
template <>
struct Bits<float> {
  using U = uint32_t;
  static MG_INLINE U of(float f) { return float_to_bits(f); }
  static MG_INLINE float from(U u) { return bits_to_float(u); }
};

// How many polynomial terms the softmax exp needs depends on where its result goes. A float32 output
// wants the exp to about 1 ulp: degree 6 after a two-constant Cody-Waite reduction, 1.05 ulp over every
// float in [-87, 0] (Cephes' degree-7 form measured 1.02). An output stored in bf16 or fp16 is rounded
// to 2^-9 or 2^-12 relative anyway: degree 4 after a one-constant reduction (5.5e-6 relative, 46 float
// ulp, 44x below half an fp16 ulp) leaves every stored probability within 1 ulp of the correctly
// rounded float64 softmax (off by that ulp for 0.24% of fp16 and 0.03% of bf16 outputs of a [4, 64,
// 1024] softmax, against 0.02% and 0.001% at degree 6) and made the bf16 forward 20% faster on the
// dev VM (3.8 to 3.1 ms at [16, 1024, 1024]). The sum is accumulated in fp32 either way.
constexpr int kExpDegreeF32 = 6;
constexpr int kExpDegree16 = 4;

// exp(xc) = p(r) * 2^n with r = xc - n ln2 in [-ln2/2, ln2/2]: returns p(r). Shared by the portable
// exp below and the AVX-512 one in softmax_x86.h, so both give the same bits wherever both are normal.
// The minimax coefficients (relative error, p(0) = 1) were fitted for this file on [-ln2/2, ln2/2].
template <int Degree, typename F>
MG_INLINE F exp_reduced(F xc, F n) {
  static_assert(Degree == 4 || Degree == 6, "fitted for degree 4 and 6 only");
  F r, p;
  if constexpr (Degree == 6) {
    r = xc - n * 0.693359375f;  // ln2 split in two: n * 0.693359375 is exact
    r = r - n * -2.12194440e-4f;
    p = r * 0x1.6ae730p-10f + 0x1.126782p-7f;
    p = p * r + 0x1.555822p-5f;
    p = p * r + 0x1.55541ap-3f;
    p = p * r + 0x1.fffffcp-2f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
  } else {
    r = xc - n * 0.693147182f;
    p = r * 0x1.5414dap-5f + 0x1.57ceb6p-3f;
    p = p * r + 0x1.0003f4p-1f;
    p = p * r + 0x1.fffba8p-1f;
    p = p * r + 1.0f;
  }
  return p;
}

// exp(x) for x <= 0 (softmax after subtracting the row max); 0 below -87 and for -inf, NaN stays NaN.
// p * 2^n is formed by adding n to p's exponent field, an integer add instead of a multiply: the FMA
// pipes are what bound this loop. With xc >= -87 the sum never leaves the normal range (n >= -126 and
// then p >= 1), and bits(t) << 23 == n << 23 because t = 1.5 * 2^23 + n.
template <int Degree, typename F>
MG_INLINE F exp_poly(F x) {
  using B = Bits<F>;
  const F lo = F{} - 87.0f;
  const F xc = x < lo ? lo : x;
  const F t = xc * kLog2e + kExpRoundMagic;
  const F n = t - kExpRoundMagic;
  const F p = exp_reduced<Degree>(xc, n);
  const F result = B::from(B::of(p) + (B::of(t) << 23));
  return x < lo ? F{} : (x != x ? x : result);
}

template <int Degree>
MG_INLINE float exp_nonpositive(float x) {
  return exp_poly<Degree>(x);
}

// float64 exists only so that torch.autograd.gradcheck can check the kernels' gradients: no SIMD needed.
template <int Degree>
MG_INLINE double exp_nonpositive(double x) {
  return std::exp(x);
}

// W floats as one GCC/Clang vector value, W the target's native width: 16 (one zmm) where the
// rows are compiled for AVX-512, 8 (one ymm) for AVX2, 4 (one xmm, or a NEON register) for the
// baseline. Wider than the target is not free: GCC lowered 16-float vectors on AVX2 through the
// stack, and that build ran the softmax 13x slower than the AVX-512 one. GCC turns `a > b ? a : b`
// over plain floats into a SIMD max only under -ffinite-math-only, which the masks' -inf rules out;
// on vector types the compare and select are explicit. Other compilers get the scalar rows
// (-DMG_NO_VECTOR_EXT builds those with GCC, to check that path by hand).
#if defined(__GNUC__) && !defined(MG_NO_VECTOR_EXT)
#define MG_HAVE_VECTOR_EXT 1

template <int W>
struct Lanes;
#define MG_DEFINE_LANES(W)                                                  \
  template <>                                                               \
  struct Lanes<W> {                                                         \
    typedef float f32 __attribute__((vector_size(4 * W)));                  \
    typedef int32_t i32 __attribute__((vector_size(4 * W)));                \
    typedef uint32_t u32 __attribute__((vector_size(4 * W)));               \
    typedef uint16_t u16 __attribute__((vector_size(2 * W)));               \
    typedef uint8_t u8 __attribute__((vector_size(W)));                     \
  };
MG_DEFINE_LANES(4)
MG_DEFINE_LANES(8)
MG_DEFINE_LANES(16)
#undef MG_DEFINE_LANES

template <int W>
using f32v = typename Lanes<W>::f32;
template <int W>
using i32v = typename Lanes<W>::i32;
template <int W>
using u32v = typename Lanes<W>::u32;

template <int W>
MG_INLINE f32v<W> load_f32(const float* p) {
  f32v<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
MG_INLINE void store_f32(float* p, f32v<W> v) {
  std::memcpy(p, &v, sizeof v);
}

template <int W>
MG_INLINE u32v<W> load_u16_widened(const uint16_t* p) {
  typename Lanes<W>::u16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, u32v<W>);
}

template <int W>
MG_INLINE void store_narrowed(uint16_t* p, u32v<W> bits) {
  const auto h = __builtin_convertvector(bits, typename Lanes<W>::u16);
  std::memcpy(p, &h, sizeof h);
}

template <int W>
MG_INLINE f32v<W> bf16v_to_float(const uint16_t* p) {
  return (f32v<W>)(load_u16_widened<W>(p) << 16);
}

// half_to_float below, W at a time.
template <int W>
MG_INLINE f32v<W> halfv_to_float(const uint16_t* p) {
  using U = u32v<W>;
  using F = f32v<W>;
  const U w = load_u16_widened<W>(p) << 16;
  const U sign = w & 0x80000000u;
  const U two_w = w + w;
  const F normalized = (F)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const F denormalized = (F)((two_w >> 17) | (126u << 23)) - 0.5f;
  const U magnitude = two_w < (1u << 27) ? (U)denormalized : (U)normalized;
  return (F)(sign | magnitude);
}

// float_to_half below, W at a time (same integer steps, same rounding).
template <int W>
MG_INLINE void floatv_to_half(uint16_t* p, f32v<W> f) {
  using U = u32v<W>;
  const U u = (U)f;
  const U sign = (u >> 16) & 0x8000u;
  const U a = u & 0x7FFFFFFFu;
  const U sub = (U)((f32v<W>)a + 0.5f) - 0x3F000000u;
  const U r = a - 0x38000000u;
  const U norm = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
  U h = a < 0x38800000u ? sub : norm;
  h = a >= 0x47800000u ? U{} + 0x7C00u : h;
  h = a > 0x7F800000u ? U{} + 0x7E00u : h;
  store_narrowed<W>(p, sign | h);
}

// float_to_bf16 below, W at a time: the bf16 bit patterns in 32-bit lanes.
template <int W>
MG_INLINE u32v<W> floatv_to_bf16_bits(f32v<W> f) {
  using U = u32v<W>;
  const U u = (U)f;
  const U rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? U{} + 0x7FC0u : rounded;
}

#define MG_DEFINE_BITS(W)                                         \
  template <>                                                     \
  struct Bits<f32v<W>> {                                          \
    using U = u32v<W>;                                            \
    static MG_INLINE U of(f32v<W> v) { return (U)v; }             \
    static MG_INLINE f32v<W> from(U u) { return (f32v<W>)u; }     \
  };
MG_DEFINE_BITS(4)
MG_DEFINE_BITS(8)
MG_DEFINE_BITS(16)
#undef MG_DEFINE_BITS

// Lanes at or past `count` (all ones there): the unused end of a row's last, partial vector.
template <int W>
MG_INLINE i32v<W> lanes_from(int64_t count) {
  i32v<W> iota;
  for (int l = 0; l < W; ++l) iota[l] = l;  // folded to a constant
  return iota >= static_cast<int32_t>(count);
}

// W mask bytes -> lanes that are all ones where the byte is nonzero.
template <int W>
MG_INLINE i32v<W> mask_lanes(const uint8_t* p) {
  typename Lanes<W>::u8 m;
  std::memcpy(&m, p, sizeof m);
  // Compare as bytes, then sign-extend the 0 / -1 lanes: one vpmovsxbd (a direct byte -> int
  // conversion of the data is split into scalar extracts by GCC 12).
  return __builtin_convertvector(m != 0, i32v<W>);
}
#endif

// Element codecs: a tensor's storage type, its accumulation type, the exact conversions between them
// and the exp accuracy its outputs need; with the vector extension, the same W lanes at a time
// (loadv, storev, expv; `vec` is their vector type). The scalar members serve any W.
#ifdef MG_HAVE_VECTOR_EXT
#define MG_CODEC_VECTOR_MEMBERS(W)                                                      \
  static constexpr int lanes = W;                                                       \
  using vec = f32v<W>;                                                                  \
  static MG_INLINE vec expv(vec x) { return exp_poly<exp_degree>(x); }
#else
#define MG_CODEC_VECTOR_MEMBERS(W) static constexpr int lanes = 1;
#endif

// The baseline's native width (SSE2 on x86-64, NEON on aarch64).
constexpr int kPortableLanes = 4;

template <int W>
struct F32 {
  using storage = float;
  using acc = float;
  static constexpr int exp_degree = kExpDegreeF32;
  static MG_INLINE float load(float v) { return v; }
  static MG_INLINE float store(float v) { return v; }
  MG_CODEC_VECTOR_MEMBERS(W)
#ifdef MG_HAVE_VECTOR_EXT
  static MG_INLINE vec loadv(const float* p) { return load_f32<W>(p); }
  static MG_INLINE void storev(float* p, vec v) { store_f32<W>(p, v); }
#endif
};
template <int W>
struct F16 {
  using storage = uint16_t;
  using acc = float;
  static constexpr int exp_degree = kExpDegree16;
  static MG_INLINE float load(uint16_t v) { return half_to_float(v); }
  static MG_INLINE uint16_t store(float v) { return float_to_half(v); }
  MG_CODEC_VECTOR_MEMBERS(W)
#ifdef MG_HAVE_VECTOR_EXT
  static MG_INLINE vec loadv(const uint16_t* p) { return halfv_to_float<W>(p); }
  static MG_INLINE void storev(uint16_t* p, vec v) { floatv_to_half<W>(p, v); }
#endif
};
template <int W>
struct BF16 {
  using storage = uint16_t;
  using acc = float;
  static constexpr int exp_degree = kExpDegree16;
  static MG_INLINE float load(uint16_t v) { return bf16_to_float(v); }
  static MG_INLINE uint16_t store(float v) { return float_to_bf16(v); }
  MG_CODEC_VECTOR_MEMBERS(W)
#ifdef MG_HAVE_VECTOR_EXT
  static MG_INLINE vec loadv(const uint16_t* p) { return bf16v_to_float<W>(p); }
  static MG_INLINE void storev(uint16_t* p, vec v) { store_narrowed<W>(p, floatv_to_bf16_bits<W>(v)); }
#endif
};
#undef MG_CODEC_VECTOR_MEMBERS

// float64 exists only so that torch.autograd.gradcheck can check the kernels' gradients: scalar only.
struct F64 {
  using storage = double;
  using acc = double;
  static constexpr int exp_degree = kExpDegreeF32;  // unused: float64 calls std::exp
  static constexpr int lanes = 1;
  static MG_INLINE double load(double v) { return v; }
  static MG_INLINE double store(double v) { return v; }
};

}  // namespace cpu
}  // namespace megaglot
