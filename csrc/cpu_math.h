// Branch-free scalar helpers that GCC/Clang auto-vectorize inside the CPU kernels' inner loops.
//
// Why not c10::Half / std::exp: the extension is compiled for the baseline ISA (no -mavx2), so the
// kernels are built as function clones for x86-64-v4 / v3 / baseline (MG_CLONES, picked at load time
// by the dynamic loader); inside those clones only straight-line code without library calls turns
// into SIMD. std::exp is a libm call per element and c10's conversions are not guaranteed inlinable,
// so both are written here as select-only bit manipulation.
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
// rounded float64 softmax (off by that ulp for 0.24% of fp16 and 0.03% of bf16 outputs, against 0.02%
// and 0.001% at degree 6; CUDA's __expf is looser still) and made the bf16 forward 20% faster on the
// dev VM (3.8 to 3.1 ms at [16, 1024, 1024]). The sum is accumulated in fp32 either way.
constexpr int kExpDegreeF32 = 6;
constexpr int kExpDegree16 = 4;

// exp(xc) = p(r) * 2^n with r = xc - n ln2 in [-ln2/2, ln2/2]: returns p(r). Shared by the portable
// exp below and the AVX-512 one in softmax_v4.cpp, so both give the same bits wherever both are normal.
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

// Sixteen floats as one GCC/Clang vector value. GCC turns `a > b ? a : b` over plain floats into a
// SIMD max only under -ffinite-math-only, which the masks' -inf rules out; on vector types the
// compare and select are explicit, and each target clone lowers them to its own widths (one zmm on
// x86-64-v4, two ymm on v3, four xmm on the baseline).
#if defined(__GNUC__)
#define MG_HAVE_VECTOR_EXT 1
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));

MG_INLINE f32x16 load_f32x16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

MG_INLINE void store_f32x16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

MG_INLINE u32x16 load_u16x16_widened(const uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, u32x16);
}

MG_INLINE f32x16 bf16x16_to_float(const uint16_t* p) { return (f32x16)(load_u16x16_widened(p) << 16); }

MG_INLINE u16x16 narrow_u16x16(u32x16 bits) { return __builtin_convertvector(bits, u16x16); }

MG_INLINE void store_narrowed(uint16_t* p, u32x16 bits) {
  const u16x16 h = narrow_u16x16(bits);
  std::memcpy(p, &h, sizeof h);
}

MG_INLINE u32x16 splat_u32(uint32_t v) { return u32x16{} + v; }

// half_to_float below, sixteen at a time.
MG_INLINE f32x16 half16_to_float(const uint16_t* p) {
  const u32x16 w = load_u16x16_widened(p) << 16;
  const u32x16 sign = w & 0x80000000u;
  const u32x16 two_w = w + w;
  const f32x16 normalized = (f32x16)((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const f32x16 denormalized = (f32x16)((two_w >> 17) | (126u << 23)) - 0.5f;
  const u32x16 magnitude = two_w < (1u << 27) ? (u32x16)denormalized : (u32x16)normalized;
  return (f32x16)(sign | magnitude);
}

// float_to_half below, sixteen at a time (same integer steps, same rounding).
MG_INLINE void float16_to_half(uint16_t* p, f32x16 f) {
  const u32x16 u = (u32x16)f;
  const u32x16 sign = (u >> 16) & 0x8000u;
  const u32x16 a = u & 0x7FFFFFFFu;
  const u32x16 sub = (u32x16)((f32x16)a + 0.5f) - 0x3F000000u;
  const u32x16 r = a - 0x38000000u;
  const u32x16 norm = (r + 0xFFFu + ((r >> 13) & 1u)) >> 13;
  u32x16 h = a < 0x38800000u ? sub : norm;
  h = a >= 0x47800000u ? splat_u32(0x7C00u) : h;
  h = a > 0x7F800000u ? splat_u32(0x7E00u) : h;
  store_narrowed(p, sign | h);
}

template <>
struct Bits<f32x16> {
  using U = u32x16;
  static MG_INLINE U of(f32x16 v) { return (U)v; }
  static MG_INLINE f32x16 from(U u) { return (f32x16)u; }
};

// exp_nonpositive above, sixteen at a time: the same template, so scalar tails and vector bodies round alike.
template <int Degree>
MG_INLINE f32x16 exp16_nonpositive(f32x16 x) {
  return exp_poly<Degree>(x);
}

// float_to_bf16 below, sixteen at a time: the bf16 bit patterns in 32-bit lanes, then stored.
MG_INLINE u32x16 float16_to_bf16_bits(f32x16 f) {
  const u32x16 u = (u32x16)f;
  const u32x16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? splat_u32(0x7FC0u) : rounded;
}

MG_INLINE void float16_to_bf16(uint16_t* p, f32x16 f) { store_narrowed(p, float16_to_bf16_bits(f)); }

// Lanes at or past `count` (all ones there): the unused end of a row's last, partial vector.
MG_INLINE i32x16 lanes_from(int64_t count) {
  const i32x16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return iota >= static_cast<int32_t>(count);
}

// 16 mask bytes -> lanes that are all ones where the byte is nonzero.
MG_INLINE i32x16 mask_lanes(const uint8_t* p) {
  u8x16 m;
  std::memcpy(&m, p, sizeof m);
  // Compare as bytes, then sign-extend the 0 / -1 lanes: one vpmovsxbd (a direct byte -> int
  // conversion of the data is split into sixteen scalar extracts by GCC 12).
  return __builtin_convertvector(m != 0, i32x16);
}
#endif

// Element codecs: a tensor's storage type, its accumulation type, the exact conversions between them
// and the exp accuracy its outputs need.
struct F32 {
  using storage = float;
  using acc = float;
  static constexpr int exp_degree = kExpDegreeF32;
  static MG_INLINE float load(float v) { return v; }
  static MG_INLINE float store(float v) { return v; }
#ifdef MG_HAVE_VECTOR_EXT
  static MG_INLINE f32x16 load16(const float* p) { return load_f32x16(p); }
  static MG_INLINE void store16(float* p, f32x16 v) { store_f32x16(p, v); }
  static MG_INLINE f32x16 exp16(f32x16 x) { return exp16_nonpositive<exp_degree>(x); }
#endif
};
struct F16 {
  using storage = uint16_t;
  using acc = float;
  static constexpr int exp_degree = kExpDegree16;
  static MG_INLINE float load(uint16_t v) { return half_to_float(v); }
  static MG_INLINE uint16_t store(float v) { return float_to_half(v); }
#ifdef MG_HAVE_VECTOR_EXT
  static MG_INLINE f32x16 load16(const uint16_t* p) { return half16_to_float(p); }
  static MG_INLINE void store16(uint16_t* p, f32x16 v) { float16_to_half(p, v); }
  static MG_INLINE f32x16 exp16(f32x16 x) { return exp16_nonpositive<exp_degree>(x); }
#endif
};
struct BF16 {
  using storage = uint16_t;
  using acc = float;
  static constexpr int exp_degree = kExpDegree16;
  static MG_INLINE float load(uint16_t v) { return bf16_to_float(v); }
  static MG_INLINE uint16_t store(float v) { return float_to_bf16(v); }
#ifdef MG_HAVE_VECTOR_EXT
  static MG_INLINE f32x16 load16(const uint16_t* p) { return bf16x16_to_float(p); }
  static MG_INLINE void store16(uint16_t* p, f32x16 v) { float16_to_bf16(p, v); }
  static MG_INLINE f32x16 exp16(f32x16 x) { return exp16_nonpositive<exp_degree>(x); }
#endif
};

struct F64 {
  using storage = double;
  using acc = double;
  static constexpr int exp_degree = kExpDegreeF32;  // unused: float64 calls std::exp
  static MG_INLINE double load(double v) { return v; }
  static MG_INLINE double store(double v) { return v; }
};

}  // namespace cpu
}  // namespace megaglot
