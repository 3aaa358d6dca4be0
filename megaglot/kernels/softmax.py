"""Fused scaled softmax for attention scores (causal, boolean-masked, unmasked), autograd-aware.

The attention block spends most of its non-matmul time here; the compiled kernels do scale, mask,
softmax (and its backward) in one pass with fp32 accumulation. When megaglot._C (or its CUDA part
for a CUDA tensor) is missing, the same math runs in pure torch after a single warning, so a model
keeps working, only slower. Conventions, for every variant:

- input dtype float32, float16 or bfloat16; the result has the input's dtype; math is fp32;
- ``scale`` multiplies the scores before the softmax (1/sqrt(hn) folded into the kernel);
- a row whose elements are all masked gives zeros, never NaN, and passes a zero gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megaglot.kernels.extension import kernel_for, warn_once

__all__ = [
    "scaled_upper_triang_masked_softmax",
    "scaled_masked_softmax",
    "scaled_softmax",
    "softmax_torch",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # float64: for gradcheck


def _kernel(name: str, tensor: torch.Tensor):
    return kernel_for(name, tensor, "fused softmax")


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def softmax_torch(x: torch.Tensor, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Reference/fallback: softmax(x * scale) over the last dim, True in ``mask`` excluded, in fp32.

    The row max is subtracted explicitly so a fully masked row gives exp(-inf) = 0 and 0 / tiny = 0
    rather than softmax's NaN.
    """
    xf = x.to(_acc_dtype(x)) * scale
    if mask is not None:
        xf = xf.masked_fill(mask, float("-inf"))
    row_max = xf.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(xf - row_max)
    probs = e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(xf.dtype).tiny)
    return probs.to(x.dtype)


def _backward_torch(grad: torch.Tensor, probs: torch.Tensor, scale: float) -> torch.Tensor:
    g, y = grad.to(_acc_dtype(probs)), probs.to(_acc_dtype(probs))
    return (scale * y * (g - (g * y).sum(dim=-1, keepdim=True))).to(probs.dtype)


def _causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1)


def _check_scores(x: torch.Tensor, dim: int, op: str, shape: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: scores must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dim:
        raise ValueError(f"{op}: scores must be {shape}, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: scores must be float32, float16 or bfloat16 (or float64), got {x.dtype}")


def _check_scale(scale: float, op: str) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: scale must be a number, got {scale!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{op}: scale must be finite, got {value}")
    return value


def _softmax_backward(kernel_name: str, ctx, grad: torch.Tensor) -> torch.Tensor:
    """d softmax for all three variants: masking only shaped the forward (masked probs are 0)."""
    (probs,) = ctx.saved_tensors
    fn = _kernel(kernel_name, probs)
    grad = grad.to(probs.dtype)
    return fn(grad, probs, ctx.scale) if fn is not None else _backward_torch(grad, probs, ctx.scale)


class _ScaledUpperTriangMaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        fn = _kernel("scaled_upper_triang_masked_softmax_forward", x)
        if fn is not None:
            probs = fn(x, scale)
        else:
            probs = softmax_torch(x, _causal_mask(x.shape[1], x.shape[2], x.device), scale)
        ctx.save_for_backward(probs)
        ctx.scale = scale
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx = _softmax_backward("scaled_upper_triang_masked_softmax_backward", ctx, grad)
        return dx, None


class _ScaledMaskedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
        fn = _kernel("scaled_masked_softmax_forward", x)
        probs = fn(x, mask, scale) if fn is not None else softmax_torch(x, mask, scale)
        ctx.save_for_backward(probs)
        ctx.scale = scale
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx = _softmax_backward("scaled_masked_softmax_backward", ctx, grad)
        return dx, None, None


class _ScaledSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        fn = _kernel("scaled_softmax_forward", x)
        probs = fn(x, scale) if fn is not None else softmax_torch(x, None, scale)
        ctx.save_for_backward(probs)
        ctx.scale = scale
        return probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx = _softmax_backward("scaled_softmax_backward", ctx, grad)
        return dx, None


def scaled_upper_triang_masked_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax of scores ``[b*np, sq, sk]`` (sq == sk): row i sees columns 0..i."""
    op = "scaled_upper_triang_masked_softmax"
    _check_scores(x, 3, op, "[b*np, sq, sk]")
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"{op}: causal softmax needs sq == sk, got shape {tuple(x.shape)}")
    return _ScaledUpperTriangMaskedSoftmax.apply(x, _check_scale(scale, op))


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax of scores ``[b, np, sq, sk]``; ``mask`` bool ``[b or 1, 1, sq, sk]``, True = masked out."""
    op = "scaled_masked_softmax"
    _check_scores(x, 4, op, "[b, np, sq, sk]")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{op}: mask must be a bool tensor (True = masked), got {got}")
    b, _, sq, sk = x.shape
    if mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (sq, sk):
        raise ValueError(f"{op}: mask must be [b or 1, 1, sq, sk] = [{b} or 1, 1, {sq}, {sk}], "
                         f"got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{op}: mask is on {mask.device} but scores are on {x.device}")
    return _ScaledMaskedSoftmax.apply(x, mask, _check_scale(scale, op))


def scaled_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax of scores ``[b, np, sq, sk]`` times ``scale``, no mask."""
    op = "scaled_softmax"
    _check_scores(x, 4, op, "[b, np, sq, sk]")
    return _ScaledSoftmax.apply(x, _check_scale(scale, op))
