// Fused rotary position embedding (GPT-NeoX rotate-half layout) for q and k in one pass.
//
// For each head, with h = rotary_ndims / 2 and x1 = x[:h], x2 = x[h:rd]:
//   forward   y1 = x1 * cos1 - x2 * sin1      y2 = x2 * cos2 + x1 * sin2     (y[rd:] = x[rd:])
//   backward  d1 = g1 * cos1 + g2 * sin2      d2 = g2 * cos2 - g1 * sin1     (the transpose)
// Eager torch needs slices, a negation, two cats and four elementwise ops (each a full pass); here
// every element is read and written once, in fp32, and q/k may be strided views of a fused QKV
// tensor (only the last dimension must be contiguous), so the wrapper never copies them.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_math.h"

#ifdef MEGAGLOT_WITH_CUDA
#include "cuda/glue.h"
#endif

namespace megaglot {
namespace {

struct RotaryLayout {
  int64_t s, b, heads, hn, rd;
  int64_t stride_s, stride_b, stride_h;  // of the input, in elements; last dimension contiguous
};

template <typename C, bool kForward, typename A = typename C::acc>
MG_INLINE void rotate_rows(const typename C::storage* x, typename C::storage* y, const A* cos, const A* sin,
                           int64_t begin, int64_t end, const RotaryLayout& lay) {
  const int64_t half = lay.rd / 2;
  for (int64_t row = begin; row < end; ++row) {  // row = position * b + batch
    const int64_t pos = row / lay.b, batch = row % lay.b;
    const A* c = cos + pos * lay.rd;
    const A* s = sin + pos * lay.rd;
    for (int64_t head = 0; head < lay.heads; ++head) {
      const auto* xr = x + pos * lay.stride_s + batch * lay.stride_b + head * lay.stride_h;
      auto* yr = y + (row * lay.heads + head) * lay.hn;
      for (int64_t i = 0; i < half; ++i) {
        const A x1 = C::load(xr[i]), x2 = C::load(xr[i + half]);
        if (kForward) {
          yr[i] = C::store(x1 * c[i] - x2 * s[i]);
          yr[i + half] = C::store(x2 * c[i + half] + x1 * s[i + half]);
        } else {
          yr[i] = C::store(x1 * c[i] + x2 * s[i + half]);
          yr[i + half] = C::store(x2 * c[i + half] - x1 * s[i]);
        }
      }
      if (lay.hn > lay.rd) std::memcpy(yr + lay.rd, xr + lay.rd, (lay.hn - lay.rd) * sizeof(*xr));
    }
  }
}

#define MG_ROTARY_ENTRY(NAME, CODEC)                                                                       \
  MG_CLONES void rotary_##NAME(const CODEC::storage* x, CODEC::storage* y, const CODEC::acc* cos,             \
                               const CODEC::acc* sin,                                                       \
                               int64_t begin, int64_t end, const RotaryLayout& lay, bool forward) {          \
    if (forward)                                                                                            \
      rotate_rows<CODEC, true>(x, y, cos, sin, begin, end, lay);                                            \
    else                                                                                                    \
      rotate_rows<CODEC, false>(x, y, cos, sin, begin, end, lay);                                           \
  }
MG_ROTARY_ENTRY(f32, cpu::F32<cpu::kPortableLanes>)
MG_ROTARY_ENTRY(f16, cpu::F16<cpu::kPortableLanes>)
MG_ROTARY_ENTRY(bf16, cpu::BF16<cpu::kPortableLanes>)
MG_ROTARY_ENTRY(f64, cpu::F64)
#undef MG_ROTARY_ENTRY

at::Tensor rotate_cpu(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, bool forward) {
  const at::Tensor x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  const RotaryLayout lay{x.size(0), x.size(1), x.size(2), x.size(3), cos.size(1),
                         x.stride(0), x.stride(1), x.stride(2)};
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t rows = lay.s * lay.b;
  if (y.numel() == 0) return y;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(lay.heads * lay.hn, 1));
  const auto st = x.scalar_type();
  // float64 (gradcheck only) keeps its tables in float64; every other dtype rotates with fp32 tables.
  const at::Tensor cos_acc = cos.to(st == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  const at::Tensor sin_acc = sin.to(st == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    if (st == at::kDouble) {
      rotary_f64(x.data_ptr<double>(), y.data_ptr<double>(), cos_acc.data_ptr<double>(), sin_acc.data_ptr<double>(),
                 begin, end, lay, forward);
      return;
    }
    const float* c = cos_acc.data_ptr<float>();
    const float* s = sin_acc.data_ptr<float>();
    if (st == at::kFloat) {
      rotary_f32(x.data_ptr<float>(), y.data_ptr<float>(), c, s, begin, end, lay, forward);
    } else if (st == at::kHalf) {
      rotary_f16(reinterpret_cast<const uint16_t*>(x.data_ptr<at::Half>()),
                 reinterpret_cast<uint16_t*>(y.data_ptr<at::Half>()), c, s, begin, end, lay, forward);
    } else {
      rotary_bf16(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                  reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), c, s, begin, end, lay, forward);
    }
  });
  return y;
}

std::vector<at::Tensor> rotary_dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_in,
                                        const at::Tensor& sin_in, bool forward) {
  const char* op = forward ? "fused_rotary" : "fused_rotary_backward";
  TORCH_CHECK(q.dim() == 4, op, ": q must be [s, b, np, hn], got shape ", q.sizes());
  TORCH_CHECK(q.sizes() == k.sizes(), op, ": q and k must have the same shape, got ", q.sizes(), " and ", k.sizes());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || (st == at::kDouble && q.is_cpu()), op,
              ": q must be float32, float16 or bfloat16 (float64 on CPU, for gradcheck), got ", st);
  TORCH_CHECK(k.scalar_type() == st, op, ": q is ", st, " but k is ", k.scalar_type());
  TORCH_CHECK(cos_in.dim() == 2 && cos_in.sizes() == sin_in.sizes(), op,
              ": cos and sin must both be [s, rotary_ndims], got ", cos_in.sizes(), " and ", sin_in.sizes());
  TORCH_CHECK(cos_in.size(0) == q.size(0), op, ": cos/sin cover ", cos_in.size(0), " positions but q has s = ",
              q.size(0));
  const int64_t rd = cos_in.size(1);
  TORCH_CHECK(rd > 0 && rd % 2 == 0 && rd <= q.size(3), op, ": rotary_ndims must be even and in (0, hn = ",
              q.size(3), "], got ", rd);
  TORCH_CHECK(q.device() == k.device() && q.device() == cos_in.device() && q.device() == sin_in.device(), op,
              ": q, k, cos and sin must be on one device, got ", q.device(), ", ", k.device(), ", ",
              cos_in.device(), ", ", sin_in.device());
  TORCH_CHECK(at::isFloatingType(cos_in.scalar_type()) && at::isFloatingType(sin_in.scalar_type()), op,
              ": cos and sin must be floating point");
  if (q.is_cuda()) {
#ifdef MEGAGLOT_WITH_CUDA
    return cuda::rotary(q, k, cos_in.to(at::kFloat).contiguous(), sin_in.to(at::kFloat).contiguous(), forward);
#else
    TORCH_CHECK(false, op, ": megaglot._C was built without CUDA; rebuild with a CUDA torch and toolkit");
#endif
  }
  TORCH_CHECK(q.device().is_cpu(), op, ": unsupported device ", q.device());
  return {rotate_cpu(q, cos_in, sin_in, forward), rotate_cpu(k, cos_in, sin_in, forward)};
}

}  // namespace

std::vector<at::Tensor> fused_rotary_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                             const at::Tensor& sin) {
  return rotary_dispatch(q, k, cos, sin, true);
}

std::vector<at::Tensor> fused_rotary_backward(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                              const at::Tensor& cos, const at::Tensor& sin) {
  return rotary_dispatch(grad_q, grad_k, cos, sin, false);
}

}  // namespace megaglot

void register_rotary(pybind11::module& m) {
  m.def("fused_rotary_forward", &megaglot::fused_rotary_forward,
        "NeoX rotate-half rotary on the first rotary_ndims of each head of q and k ([s, b, np, hn])",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("cos"), pybind11::arg("sin"));
  m.def("fused_rotary_backward", &megaglot::fused_rotary_backward, "transposed rotation of the gradients",
        pybind11::arg("grad_q"), pybind11::arg("grad_k"), pybind11::arg("cos"), pybind11::arg("sin"));
}
