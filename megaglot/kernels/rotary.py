"""Rotary position embedding in GPT-NeoX's rotate-half layout: cos/sin tables and the fused kernel.

The tables are computed exactly as Hugging Face's GPTNeoXRotaryEmbedding does (so converted
checkpoints give the same logits) and cached per (length, rotary_ndims, base, dtype, device), since
every layer of every step asks for the same ones. ``fused_rotary`` rotates the first
``rotary_ndims`` of every head of q and k in one pass (fp32 math, one rounding to the storage dtype);
``apply_rotary_torch`` is the eager formula, used by the model's ``torch`` backend and as fallback.

``fused_rotary`` is the torch op ``torch.ops.megaglot.fused_rotary`` (``torch.library``: real and
fake kernels sharing one check, ``_check_rotary``, and a registered autograd formula whose backward
is the op ``megaglot::fused_rotary_backward``), so ``torch.compile`` traces through it.
"""

from __future__ import annotations

import functools
from typing import Tuple

import torch

from megaglot.kernels.extension import kernel_for

__all__ = ["rotary_cos_sin", "fused_rotary", "apply_rotary_torch", "rotate_half"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: for gradcheck


@functools.lru_cache(maxsize=32)
def _cos_sin_cached(seq_len: int, rotary_ndims: int, base: float, dtype: torch.dtype,
                    device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    # HF computes inv_freq once at model init on the CPU, the rest on the model's device.
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_ndims, 2, dtype=torch.int64).float() / rotary_ndims))
    inv_freq = inv_freq.to(device)
    positions = torch.arange(seq_len, device=device, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_cos_sin(seq_len: int, rotary_ndims: int, base: float, device, dtype: torch.dtype = torch.float32
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each ``[seq_len, rotary_ndims]``, for positions 0..seq_len-1.

    Cached and shared between callers: treat them as read-only.
    """
    if int(seq_len) != seq_len or seq_len < 0:
        raise ValueError(f"rotary_cos_sin: seq_len must be a non-negative integer, got {seq_len!r}")
    if int(rotary_ndims) != rotary_ndims or rotary_ndims <= 0 or rotary_ndims % 2:
        raise ValueError(f"rotary_cos_sin: rotary_ndims must be a positive even integer, got {rotary_ndims!r}")
    if not float(base) > 0:
        raise ValueError(f"rotary_cos_sin: base must be positive, got {base!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"rotary_cos_sin: dtype must be floating point, got {dtype}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _cos_sin_cached(int(seq_len), int(rotary_ndims), float(base), dtype, device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dimension (Hugging Face's GPT-NeoX helper)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_torch(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Eager NeoX rotary of ``t`` ``[s, b, np, hn]`` with cos/sin ``[s, rotary_ndims]``.

    The same operations in the same dtype as Hugging Face's apply_rotary_pos_emb (cos/sin cast to
    t's dtype), so in fp16/bf16 it rounds like Hugging Face does, not like the fused kernel.
    """
    _check_cos_sin(t, cos, sin, "apply_rotary_torch")
    rd = cos.shape[-1]
    c = cos.to(t.dtype)[:, None, None, :]
    s = sin.to(t.dtype)[:, None, None, :]
    t_rot, t_pass = t[..., :rd], t[..., rd:]
    return torch.cat((t_rot * c + rotate_half(t_rot) * s, t_pass), dim=-1)


def _check_cos_sin(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, op: str) -> None:
    if t.dim() != 4:
        raise ValueError(f"{op}: expected [s, b, np, hn], got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{op}: expected float32, float16 or bfloat16 (or float64), got {t.dtype}")
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"{op}: cos and sin must both be [s, rotary_ndims], got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if not (cos.dtype.is_floating_point and sin.dtype.is_floating_point):
        raise TypeError(f"{op}: cos and sin must be floating point, got {cos.dtype} and {sin.dtype}")
    if cos.shape[0] != t.shape[0]:
        raise ValueError(f"{op}: cos/sin cover {cos.shape[0]} positions but the input has s = {t.shape[0]}")
    rd = cos.shape[1]
    if rd == 0 or rd % 2 or rd > t.shape[-1]:
        raise ValueError(f"{op}: rotary_ndims must be even and in (0, hn = {t.shape[-1]}], got {rd}")
    if not (t.device == cos.device == sin.device):
        raise ValueError(f"{op}: input, cos and sin must be on one device, got {t.device}, {cos.device}, "
                         f"{sin.device}")


def _kernel(name: str, tensor: torch.Tensor):
    return kernel_for(name, tensor, "fused rotary")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _transpose_torch(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient of the rotation: the transposed (inverse, for NeoX tables) rotation, in fp32."""
    rd, half = cos.shape[-1], cos.shape[-1] // 2
    acc = _acc_dtype(g)
    c = cos.to(acc)[:, None, None, :]
    s = sin.to(acc)[:, None, None, :]
    gf = g.to(acc)
    g1, g2 = gf[..., :half], gf[..., half:rd]
    d1 = g1 * c[..., :half] + g2 * s[..., half:]
    d2 = g2 * c[..., half:] - g1 * s[..., :half]
    return torch.cat((d1, d2, gf[..., rd:]), dim=-1).to(g.dtype)


def _check_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Every check of the fused op, shared by its real and fake kernels (and so by eager and traced calls)."""
    if q.shape != k.shape:
        raise ValueError(f"fused_rotary: q and k must have the same shape, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"fused_rotary: q is {q.dtype} but k is {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"fused_rotary: q is on {q.device} but k is on {k.device}")
    _check_cos_sin(q, cos, sin, "fused_rotary")


def _new_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation in fp32 (fp64 for fp64 inputs), cast back: the fallback of the compiled forward."""
    acc = _acc_dtype(x)
    return apply_rotary_torch(x.to(acc), cos.to(acc), sin.to(acc)).to(x.dtype)


def _rotate_pair(kernel: str, fallback, a: torch.Tensor, b: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both tensors through the compiled kernel when built for their device, else through `fallback`."""
    _check_rotary(a, b, cos, sin)
    fn = _kernel(kernel, a)
    if fn is not None:
        out_a, out_b = fn(a, b, cos, sin)
        return out_a, out_b
    return fallback(a, cos, sin).contiguous(), fallback(b, cos, sin).contiguous()


@torch.library.custom_op("megaglot::fused_rotary", mutates_args=())
def _rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    return _rotate_pair("fused_rotary_forward", _rotate_torch, q, k, cos, sin)


@_rotary_op.register_fake
def _rotary_fake(q, k, cos, sin):
    _check_rotary(q, k, cos, sin)
    return _new_like(q), _new_like(k)


@torch.library.custom_op("megaglot::fused_rotary_backward", mutates_args=())
def _rotary_backward_op(grad_q: torch.Tensor, grad_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The transposed rotation of both gradients (no gradient flows to cos/sin)."""
    return _rotate_pair("fused_rotary_backward", _transpose_torch, grad_q, grad_k, cos, sin)


@_rotary_backward_op.register_fake
def _rotary_backward_fake(grad_q, grad_k, cos, sin):
    _check_rotary(grad_q, grad_k, cos, sin)
    return _new_like(grad_q), _new_like(grad_k)


def _rotary_setup_context(ctx, inputs, output) -> None:
    _, _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _rotary_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    # autograd hands None for an output that did not reach the loss; rotate zeros for it.
    if grad_q is None:
        grad_q = torch.zeros_like(grad_k)
    if grad_k is None:
        grad_k = torch.zeros_like(grad_q)
    dq, dk = _rotary_backward_op(grad_q, grad_k, cos, sin)
    return dq, dk, None, None


_rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)


def fused_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first ``rotary_ndims`` of every head of q and k, ``[s, b, np, hn]``, in one pass.

    q and k may be strided views (e.g. slices of a fused QKV projection) as long as their last
    dimension is contiguous; the results are new contiguous tensors. No gradient flows to cos/sin.
    """
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fused_rotary: {name} must be a torch.Tensor, got {type(t).__name__}")
    return _rotary_op(q, k, cos, sin)
