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

// Cephes' exp polynomial on the Cody-Waite reduced argument r = xc - n ln2, for a float or a
// vector of floats (exp_nonpositive and exp16_nonpositive share it, so they round alike).
template <typename F>
MG_INLINE F exp_reduced_poly(F xc, F n) {
  F r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  F p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

constexpr float kExpRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low bits

// exp(x) for x <= 0 (softmax after subtracting the row max); 0 below -87 and for -inf.
// ~1 ulp, vectorizes to a dozen FMAs.
MG_INLINE float exp_nonpositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * 1.44269504088896341f + kExpRoundMagic;
  const float n = t - kExpRoundMagic;
  const int32_t ni = static_cast<int32_t>(float_to_bits(t) - float_to_bits(kExpRoundMagic));
  const float p = exp_reduced_poly(xc, n);
  const float pow2n = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  const float result = p * pow2n;
  return x < -87.0f ? 0.0f : result;
}

// float64 exists only so that torch.autograd.gradcheck can check the kernels' gradients: no SIMD needed.
MG_INLINE double exp_nonpositive(double x) { return std::exp(x); }

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

// exp_nonpositive above, sixteen at a time (the same operations in the same order, so the same
// results): written on vector types because GCC's vectorization of the scalar form was not assured.
MG_INLINE f32x16 exp16_nonpositive(f32x16 x) {
  const f32x16 lo = f32x16{} - 87.0f;
  const f32x16 xc = x < lo ? lo : x;
  const f32x16 t = xc * 1.44269504088896341f + kExpRoundMagic;
  const f32x16 n = t - kExpRoundMagic;
  const i32x16 ni = (i32x16)((u32x16)t - float_to_bits(kExpRoundMagic));
  const f32x16 p = exp_reduced_poly(xc, n);
  const f32x16 pow2n = (f32x16)((u32x16)(ni + 127) << 23);
  const f32x16 result = p * pow2n;
  return x < lo ? f32x16{} : result;
}

// float_to_bf16 below, sixteen at a time: the bf16 bit patterns in 32-bit lanes, then stored.
MG_INLINE u32x16 float16_to_bf16_bits(f32x16 f) {
  const u32x16 u = (u32x16)f;
  const u32x16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? splat_u32(0x7FC0u) : rounded;
}

MG_INLINE void float16_to_bf16(uint16_t* p, f32x16 f) { store_narrowed(p, float16_to_bf16_bits(f)); }

// 16 mask bytes -> lanes that are all ones where the byte is nonzero.
MG_INLINE i32x16 mask_lanes(const uint8_t* p) {
  u8x16 m;
  std::memcpy(&m, p, sizeof m);
  // Compare as bytes, then sign-extend the 0 / -1 lanes: one vpmovsxbd (a direct byte -> int
  // conversion of the data is split into sixteen scalar extracts by GCC 12).
  return __builtin_convertvector(m != 0, i32x16);
}
#endif

// Element codecs: a tensor's storage type, its accumulation type and the exact conversions between them.
struct F32 {
  using storage = float;
  using acc = float;
  static MG_INLINE float load(float v) { return v; }
  static MG_INLINE float store(float v) { return v; }
#ifdef MG_HAVE_VECTOR_EXT
  static MG_INLINE f32x16 load16(const float* p) { return load_f32x16(p); }
  static MG_INLINE void store16(float* p, f32x16 v) { store_f32x16(p, v); }
#endif
};
struct F16 {
  using storage = uint16_t;
  using acc = float;
  static MG_INLINE float load(uint16_t v) { return half_to_float(v); }
  static MG_INLINE uint16_t store(float v) { return float_to_half(v); }
#ifdef MG_HAVE_VECTOR_EXT
  static MG_INLINE f32x16 load16(const uint16_t* p) { return half16_to_float(p); }
  static MG_INLINE void store16(uint16_t* p, f32x16 v) { float16_to_half(p, v); }
#endif
};
struct BF16 {
  using storage = uint16_t;
  using acc = float;
  static MG_INLINE float load(uint16_t v) { return bf16_to_float(v); }
  static MG_INLINE uint16_t store(float v) { return float_to_bf16(v); }
#ifdef MG_HAVE_VECTOR_EXT
  static MG_INLINE f32x16 load16(const uint16_t* p) { return bf16x16_to_float(p); }
  static MG_INLINE void store16(uint16_t* p, f32x16 v) { float16_to_bf16(p, v); }
#endif
};

struct F64 {
  using storage = double;
  using acc = double;
  static MG_INLINE double load(double v) { return v; }
  static MG_INLINE double store(double v) { return v; }
};

}  // namespace cpu
}  // namespace megaglot
