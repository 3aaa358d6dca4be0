// The CPU softmax row kernels, shared by softmax.cpp (built for the baseline ISA and cloned per ISA
// level) and softmax_f16c.cpp (built for AVX2 + F16C, for hardware half conversions).
//
// Everything here is a template or always-inline and sits in an unnamed namespace on purpose: each
// translation unit gets its own copies, compiled for its own target, so the linker can never pick an
// AVX2 instantiation for the baseline path (inline functions with external linkage would be merged).
// Include the standard headers and cpu_math.h before this file.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu_math.h"
#include "softmax.h"

namespace megaglot {

struct RowLayout {
  int64_t sq, sk;
  int64_t heads;      // np: rows of one batch element are heads * sq
  bool mask_batched;  // mask has a batch dimension of b (else 1, broadcast)
};

namespace {

constexpr int kLanes = 16;  // independent accumulators: lets the compiler keep reductions in SIMD registers
template <typename A>
constexpr A neg_inf() { return -std::numeric_limits<A>::infinity(); }

// buf[j] = x[j] * scale, or -inf where mask[j] (mask may be null); returns the max. One fused loop:
// the row is read once and the max is kept in kLanes partial maxima (SIMD registers).
template <typename C, typename A = typename C::acc>
MG_INLINE A load_scaled_max(const typename C::storage* x, const uint8_t* mask, A scale, A* buf, int64_t n) {
  const A kNegInf = neg_inf<A>();
  int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (std::is_same<A, float>::value) {
    using cpu::f32x16;
    f32x16 vmax = f32x16{} + kNegInf;
    for (; j + 16 <= n; j += 16) {
      f32x16 v = C::load16(x + j) * scale;
      if (mask != nullptr) v = cpu::mask_lanes(mask + j) ? f32x16{} + kNegInf : v;
      cpu::store_f32x16(buf + j, v);
      vmax = vmax > v ? vmax : v;
    }
    A m = kNegInf;
    for (int l = 0; l < 16; ++l) m = m > vmax[l] ? m : vmax[l];
    for (; j < n; ++j) {
      const A scaled = C::load(x[j]) * scale;
      const A v = (mask != nullptr && mask[j]) ? kNegInf : scaled;
      buf[j] = v;
      m = m > v ? m : v;
    }
    return m;
  }
#endif
  A lanes[kLanes];
  for (int l = 0; l < kLanes; ++l) lanes[l] = kNegInf;
  if (mask == nullptr) {
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const A v = C::load(x[j + l]) * scale;
        buf[j + l] = v;
        lanes[l] = lanes[l] > v ? lanes[l] : v;
      }
  } else {
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const A v = mask[j + l] ? kNegInf : C::load(x[j + l]) * scale;
        buf[j + l] = v;
        lanes[l] = lanes[l] > v ? lanes[l] : v;
      }
  }
  A m = kNegInf;
  for (int l = 0; l < kLanes; ++l) m = m > lanes[l] ? m : lanes[l];
  for (; j < n; ++j) {
    const A v = (mask != nullptr && mask[j]) ? kNegInf : C::load(x[j]) * scale;
    buf[j] = v;
    m = m > v ? m : v;
  }
  return m;
}

// buf[j] = exp(buf[j] - m); returns the sum.
template <typename A>
MG_INLINE A exp_and_sum(A* v, int64_t n, A m) {
  int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (std::is_same<A, float>::value) {
    cpu::f32x16 acc{};
    for (; j + 16 <= n; j += 16) {
      const cpu::f32x16 e = cpu::exp16_nonpositive(cpu::load_f32x16(v + j) - m);
      cpu::store_f32x16(v + j, e);
      acc += e;
    }
    A s = 0;
    for (; j < n; ++j) {
      const A e = cpu::exp_nonpositive(v[j] - m);
      v[j] = e;
      s += e;
    }
    for (int l = 0; l < 16; ++l) s += acc[l];
    return s;
  }
#endif
  A lanes[kLanes] = {};
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const A e = cpu::exp_nonpositive(v[j + l] - m);
      v[j + l] = e;
      lanes[l] += e;
    }
  A s = 0;
  for (; j < n; ++j) {
    const A e = cpu::exp_nonpositive(v[j] - m);
    v[j] = e;
    s += e;
  }
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

template <typename C, typename A = typename C::acc>
MG_INLINE A dot_of(const typename C::storage* a, const typename C::storage* b, int64_t n) {
  int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (std::is_same<A, float>::value) {
    cpu::f32x16 acc{};
    for (; j + 16 <= n; j += 16) acc += C::load16(a + j) * C::load16(b + j);
    A s = 0;
    for (; j < n; ++j) s += C::load(a[j]) * C::load(b[j]);
    for (int l = 0; l < 16; ++l) s += acc[l];
    return s;
  }
#endif
  A lanes[kLanes] = {};
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += C::load(a[j + l]) * C::load(b[j + l]);
  A s = 0;
  for (; j < n; ++j) s += C::load(a[j]) * C::load(b[j]);
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// out[j] = C::store(buf[j] * factor) for j < n.
template <typename C, typename A = typename C::acc>
MG_INLINE void store_scaled(const A* buf, A factor, typename C::storage* out, int64_t n) {
  int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (std::is_same<A, float>::value)
    for (; j + 16 <= n; j += 16) C::store16(out + j, cpu::load_f32x16(buf + j) * factor);
#endif
  for (; j < n; ++j) out[j] = C::store(buf[j] * factor);
}

template <typename C, typename A = typename C::acc>
MG_INLINE void forward_rows(const typename C::storage* x, const uint8_t* mask, typename C::storage* y,
                            int64_t begin, int64_t end, const RowLayout& lay, int mode, A scale, A* buf) {
  using T = typename C::storage;
  const int64_t sk = lay.sk;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t qi = row % lay.sq;
    const int64_t valid = mode == kCausal ? std::min(qi + 1, sk) : sk;
    const T* xr = x + row * sk;
    T* yr = y + row * sk;
    const uint8_t* mr = nullptr;
    if (mode == kMasked) {
      const int64_t batch = row / (lay.heads * lay.sq);
      mr = mask + ((lay.mask_batched ? batch : 0) * lay.sq + qi) * sk;
    }
    const A m = load_scaled_max<C>(xr, mr, scale, buf, valid);
    if (m == neg_inf<A>()) {  // fully masked row: zeros, never NaN
      for (int64_t j = 0; j < sk; ++j) yr[j] = C::store(A(0));
      continue;
    }
    const A inv = A(1) / exp_and_sum(buf, valid, m);
    store_scaled<C>(buf, inv, yr, valid);
    for (int64_t j = valid; j < sk; ++j) yr[j] = C::store(A(0));
  }
}

// dx = scale * y * (g - sum(g * y)); masked entries have y = 0 and so get 0.
template <typename C, typename A = typename C::acc>
MG_INLINE void backward_rows(const typename C::storage* g, const typename C::storage* y, typename C::storage* dx,
                             int64_t begin, int64_t end, int64_t sq, int64_t sk, bool causal, A scale) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t valid = causal ? std::min(row % sq + 1, sk) : sk;
    const auto* gr = g + row * sk;
    const auto* yr = y + row * sk;
    auto* dr = dx + row * sk;
    const A dot = dot_of<C>(gr, yr, valid);
    int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
    if constexpr (std::is_same<A, float>::value)
      for (; j + 16 <= valid; j += 16) C::store16(dr + j, scale * C::load16(yr + j) * (C::load16(gr + j) - dot));
#endif
    for (; j < valid; ++j) dr[j] = C::store(scale * C::load(yr[j]) * (C::load(gr[j]) - dot));
    for (int64_t j = valid; j < sk; ++j) dr[j] = C::store(A(0));
  }
}

}  // namespace
}  // namespace megaglot
