// The CPU softmax row kernels, shared by softmax.cpp (the baseline ISA, 4-float vectors) and the
// translation units of softmax_x86.h (AVX2 with 8-float vectors, AVX-512 with 16; F16C half
// conversions, streaming stores). The codec C brings the vector width (C::lanes, C::vec).
//
// Everything here is a template or always-inline and sits in an unnamed namespace on purpose: each
// translation unit gets its own copies, compiled for its own target, so the linker can never pick an
// AVX2 instantiation for the baseline path (inline functions with external linkage would be merged).
// The vector code runs for codecs with lanes > 1 (float storage or accumulation; float64 is scalar).
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

// Where a row's vector passes end: its `valid` prefix (a causal row's columns 0..i) rounded up to whole
// vectors while that stays inside the row. The lanes past `valid` in the last vector are read
// but treated as masked, so a row needs no scalar tail and every store is a full vector: scalar
// exps cost ~20 instructions each, and with streaming stores a regular store into a streamed line
// stalls. Without the vector path, `valid` itself.
template <typename C>
MG_INLINE int64_t vector_end(int64_t valid, int64_t sk) {
  constexpr int W = C::lanes;
  if constexpr (W > 1) {
    const int64_t up = (valid + W - 1) / W * W;
    return up <= sk ? up : valid;
  }
  return valid;
}

// Columns 0..i of row i of a square causal block.
MG_INLINE int64_t causal_valid(int64_t row, int64_t sq, int64_t sk) { return std::min(row % sq + 1, sk); }

// A causal row reads only its prefix, so the rows' reads are a chain of short streams that the
// hardware prefetcher keeps losing at every row start (masked float32 rows, whose loads GCC turns
// into masked loads, stalled the same way). Fetching two rows ahead in software took the float32
// forward on the 2-core dev VM (AMD EPYC with AVX-512, one thread, [16, 1024, 1024]) from 5.4 to
// 2.8 ms causal and from 10 to 4.4 ms masked; plain rows are one sequential stream and gained nothing.
constexpr int64_t kPrefetchRowsAhead = 2;

template <typename T>
MG_INLINE void prefetch_prefix(const T* row, int64_t count) {
#if defined(__GNUC__)
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < count * int64_t(sizeof(T)); b += 64) __builtin_prefetch(p + b);
#endif
}

// out[j] = 0 for begin <= j < n, in whole vectors from the first multiple of the width on.
template <typename C, typename A = typename C::acc>
MG_INLINE void store_zeros(typename C::storage* out, int64_t begin, int64_t n) {
  int64_t j = begin;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (C::lanes > 1) {
    constexpr int W = C::lanes;
    using V = typename C::vec;
    for (; j < n && j % W != 0; ++j) out[j] = C::store(A(0));
    for (; j + W <= n; j += W) C::storev(out + j, V{});
  }
#endif
  for (; j < n; ++j) out[j] = C::store(A(0));
}

// buf[j] = x[j] * scale, or -inf where mask[j] (mask may be null) or j >= n; returns the max over j < n.
// Writes buf up to `end` (vector_end(n, ...)). One fused loop: the row is read once and the max is kept
// in kLanes partial maxima (SIMD registers).
template <typename C, typename A = typename C::acc>
MG_INLINE A load_scaled_max(const typename C::storage* x, const uint8_t* mask, A scale, A* buf, int64_t n,
                            int64_t end) {
  const A kNegInf = neg_inf<A>();
  int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (C::lanes > 1) {
    constexpr int W = C::lanes;
    using V = typename C::vec;
    V vmax = V{} + kNegInf;
    for (; j + W <= n; j += W) {
      V v = C::loadv(x + j) * scale;
      if (mask != nullptr) v = cpu::mask_lanes<W>(mask + j) ? V{} + kNegInf : v;
      cpu::store_f32<W>(buf + j, v);
      vmax = vmax > v ? vmax : v;
    }
    if (j < n && j + W <= end) {  // the last, partial vector: lanes past n are masked
      V v = C::loadv(x + j) * scale;
      cpu::i32v<W> dead = cpu::lanes_from<W>(n - j);
      if (mask != nullptr) dead |= cpu::mask_lanes<W>(mask + j);
      v = dead ? V{} + kNegInf : v;
      cpu::store_f32<W>(buf + j, v);
      vmax = vmax > v ? vmax : v;
      j += W;
    }
    A m = kNegInf;
    for (int l = 0; l < W; ++l) m = m > vmax[l] ? m : vmax[l];
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

// v[j] = exp(v[j] - m) for begin <= j < n, one at a time; returns their sum (the rows' tails).
template <int Degree, typename A>
MG_INLINE A exp_and_sum_scalar(A* v, int64_t begin, int64_t n, A m) {
  A s = 0;
  for (int64_t j = begin; j < n; ++j) {
    const A e = cpu::exp_nonpositive<Degree>(v[j] - m);
    v[j] = e;
    s += e;
  }
  return s;
}

// buf[j] = exp(buf[j] - m); returns the sum. The codec C picks the exp: its accuracy (exp_degree, the
// polynomial's degree) and, for whole vectors, its instructions (expv).
template <typename C, typename A = typename C::acc>
MG_INLINE A exp_and_sum(A* v, int64_t n, A m) {
  constexpr int Degree = C::exp_degree;
  int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (C::lanes > 1) {
    constexpr int W = C::lanes;
    using V = typename C::vec;
    V acc{};
    for (; j + W <= n; j += W) {
      const V e = C::expv(cpu::load_f32<W>(v + j) - m);
      cpu::store_f32<W>(v + j, e);
      acc += e;
    }
    A s = exp_and_sum_scalar<Degree>(v, j, n, m);
    for (int l = 0; l < W; ++l) s += acc[l];
    return s;
  }
#endif
  A lanes[kLanes] = {};
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const A e = cpu::exp_nonpositive<Degree>(v[j + l] - m);
      v[j + l] = e;
      lanes[l] += e;
    }
  A s = exp_and_sum_scalar<Degree>(v, j, n, m);
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// sum of a[j] * b[j] over j < n; reads up to `end` (vector_end(n, ...)), the lanes past n left out.
template <typename C, typename A = typename C::acc>
MG_INLINE A dot_of(const typename C::storage* a, const typename C::storage* b, int64_t n, int64_t end) {
  int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (C::lanes > 1) {
    constexpr int W = C::lanes;
    using V = typename C::vec;
    V acc{};
    for (; j + W <= n; j += W) acc += C::loadv(a + j) * C::loadv(b + j);
    if (j < n && j + W <= end) {
      const V ab = C::loadv(a + j) * C::loadv(b + j);
      acc += cpu::lanes_from<W>(n - j) ? V{} : ab;
      j += W;
    }
    A s = 0;
    for (; j < n; ++j) s += C::load(a[j]) * C::load(b[j]);
    for (int l = 0; l < W; ++l) s += acc[l];
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

// out[j] = C::store(buf[j] * factor) for j < n, and 0 from n up to `end` (vector_end(n, ...)); returns
// where it stopped. The lanes past n are written 0 whatever buf holds there (in a row with a NaN score
// they would hold exp(-inf - NaN)).
template <typename C, typename A = typename C::acc>
MG_INLINE int64_t store_scaled(const A* buf, A factor, typename C::storage* out, int64_t n, int64_t end) {
  int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
  if constexpr (C::lanes > 1) {
    constexpr int W = C::lanes;
    using V = typename C::vec;
    for (; j + W <= n; j += W) C::storev(out + j, cpu::load_f32<W>(buf + j) * factor);
    if (j < n && j + W <= end) {
      const V v = cpu::load_f32<W>(buf + j) * factor;
      C::storev(out + j, cpu::lanes_from<W>(n - j) ? V{} : v);
      j += W;
    }
  }
#endif
  for (; j < n; ++j) out[j] = C::store(buf[j] * factor);
  return j;
}

template <typename C, typename A = typename C::acc>
MG_INLINE void forward_rows(const typename C::storage* x, const uint8_t* mask, typename C::storage* y,
                            int64_t begin, int64_t end, const RowLayout& lay, int mode, A scale, A* buf) {
  using T = typename C::storage;
  const int64_t sk = lay.sk;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t qi = row % lay.sq;
    const int64_t valid = mode == kCausal ? causal_valid(row, lay.sq, sk) : sk;
    const T* xr = x + row * sk;
    T* yr = y + row * sk;
    const uint8_t* mr = nullptr;
    if (mode == kMasked) {
      const int64_t batch = row / (lay.heads * lay.sq);
      mr = mask + ((lay.mask_batched ? batch : 0) * lay.sq + qi) * sk;
    }
    const int64_t stop = vector_end<C>(valid, sk);
    if (mode != kNone && row + kPrefetchRowsAhead < end)
      prefetch_prefix(x + (row + kPrefetchRowsAhead) * sk,
                      mode == kCausal ? causal_valid(row + kPrefetchRowsAhead, lay.sq, sk) : sk);
    const A m = load_scaled_max<C>(xr, mr, scale, buf, valid, stop);
    if (m == neg_inf<A>()) {  // fully masked row: zeros, never NaN
      store_zeros<C>(yr, 0, sk);
      continue;
    }
    const A inv = A(1) / exp_and_sum<C>(buf, stop, m);  // lanes past valid hold -inf: exp 0 (or NaN)
    store_zeros<C>(yr, store_scaled<C>(buf, inv, yr, valid, stop), sk);
  }
}

// dx = scale * y * (g - sum(g * y)); masked entries have y = 0 and so get 0.
template <typename C, typename A = typename C::acc>
MG_INLINE void backward_rows(const typename C::storage* g, const typename C::storage* y, typename C::storage* dx,
                             int64_t begin, int64_t end, int64_t sq, int64_t sk, bool causal, A scale) {
  for (int64_t row = begin; row < end; ++row) {
    const int64_t valid = causal ? causal_valid(row, sq, sk) : sk;
    if (causal && row + kPrefetchRowsAhead < end) {
      const int64_t ahead = (row + kPrefetchRowsAhead) * sk, ahead_valid = causal_valid(row + kPrefetchRowsAhead, sq, sk);
      prefetch_prefix(g + ahead, ahead_valid);
      prefetch_prefix(y + ahead, ahead_valid);
    }
    const auto* gr = g + row * sk;
    const auto* yr = y + row * sk;
    auto* dr = dx + row * sk;
    const int64_t stop = vector_end<C>(valid, sk);
    const A dot = dot_of<C>(gr, yr, valid, stop);
    int64_t j = 0;
#ifdef MG_HAVE_VECTOR_EXT
    if constexpr (C::lanes > 1) {
      constexpr int W = C::lanes;
      using V = typename C::vec;
      for (; j + W <= valid; j += W) C::storev(dr + j, scale * C::loadv(yr + j) * (C::loadv(gr + j) - dot));
      if (j < valid && j + W <= stop) {  // the last, partial vector: 0 past valid whatever g holds there
        const V d = scale * C::loadv(yr + j) * (C::loadv(gr + j) - dot);
        C::storev(dr + j, cpu::lanes_from<W>(valid - j) ? V{} : d);
        j += W;
      }
    }
#endif
    for (; j < valid; ++j) dr[j] = C::store(scale * C::load(yr[j]) * (C::load(gr[j]) - dot));
    store_zeros<C>(dr, j, sk);
  }
}

}  // namespace
}  // namespace megaglot
