"""Fused scaled softmax for attention scores (causal, boolean-masked, unmasked), autograd-aware.

The attention block spends most of its non-matmul time here; the compiled kernels do scale, mask,
softmax (and its backward) in one pass with fp32 accumulation. When megaglot._C (or its CUDA part
for a CUDA tensor) is missing, the same math runs in pure torch after a single warning, so a model
keeps working, only slower. Conventions, for every variant:

- input dtype float32, float16 or bfloat16; the result has the input's dtype; math is fp32;
- ``scale`` multiplies the scores before the softmax (1/sqrt(hn) folded into the kernel);
- a row whose elements are all masked gives zeros, never NaN, and passes a zero gradient.

Each variant is a torch op (``torch.ops.megaglot.*``, registered with ``torch.library``): a real
kernel, a fake (meta) kernel for tracing and a registered autograd formula, so ``torch.compile``
keeps them in one graph. The shape/dtype checks live in the ``_check_*`` functions that both the
real and the fake kernel call; the public functions only turn ``scale`` into a float.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megaglot.kernels.extension import kernel_for, load_extension

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
    if x.dim() != dim:
        raise ValueError(f"{op}: scores must be {shape}, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{op}: scores must be float32, float16 or bfloat16 (or float64), got {x.dtype}")


def _check_causal(x: torch.Tensor) -> None:
    op = "scaled_upper_triang_masked_softmax"
    _check_scores(x, 3, op, "[b*np, sq, sk]")
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"{op}: causal softmax needs sq == sk, got shape {tuple(x.shape)}")


def _check_masked(x: torch.Tensor, mask: torch.Tensor) -> None:
    op = "scaled_masked_softmax"
    _check_scores(x, 4, op, "[b, np, sq, sk]")
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor (True = masked), got {mask.dtype}")
    b, _, sq, sk = x.shape
    if mask.dim() != 4 or mask.shape[0] not in (1, b) or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (sq, sk):
        raise ValueError(f"{op}: mask must be [b or 1, 1, sq, sk] = [{b} or 1, 1, {sq}, {sk}], "
                         f"got {tuple(mask.shape)}")
    if mask.device != x.device:
        raise ValueError(f"{op}: mask is on {mask.device} but scores are on {x.device}")


def _check_tensor(value, what: str, op: str) -> None:
    """Before the op is called: a non-tensor would fail the op's schema with a less clear message."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {what} must be a torch.Tensor, got {type(value).__name__}")


def _check_scale(scale: float, op: str) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: scale must be a number, got {scale!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{op}: scale must be finite, got {value}")
    return value


def _empty_probs(x: torch.Tensor) -> torch.Tensor:
    """What every forward returns: a new contiguous tensor shaped and typed like the scores."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------ forward ops


@torch.library.custom_op("megaglot::scaled_upper_triang_masked_softmax", mutates_args=())
def _causal_op(x: torch.Tensor, scale: float) -> torch.Tensor:
    _check_causal(x)
    fn = _kernel("scaled_upper_triang_masked_softmax_forward", x)
    if fn is not None:
        return fn(x, scale)
    return softmax_torch(x, _causal_mask(x.shape[1], x.shape[2], x.device), scale).contiguous()


@_causal_op.register_fake
def _causal_fake(x: torch.Tensor, scale: float) -> torch.Tensor:
    _check_causal(x)
    return _empty_probs(x)


@torch.library.custom_op("megaglot::scaled_masked_softmax", mutates_args=())
def _masked_op(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    _check_masked(x, mask)
    fn = _kernel("scaled_masked_softmax_forward", x)
    return fn(x, mask, scale) if fn is not None else softmax_torch(x, mask, scale).contiguous()


@_masked_op.register_fake
def _masked_fake(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    _check_masked(x, mask)
    return _empty_probs(x)


@torch.library.custom_op("megaglot::scaled_softmax", mutates_args=())
def _plain_op(x: torch.Tensor, scale: float) -> torch.Tensor:
    _check_scores(x, 4, "scaled_softmax", "[b, np, sq, sk]")
    fn = _kernel("scaled_softmax_forward", x)
    return fn(x, scale) if fn is not None else softmax_torch(x, None, scale).contiguous()


@_plain_op.register_fake
def _plain_fake(x: torch.Tensor, scale: float) -> torch.Tensor:
    _check_scores(x, 4, "scaled_softmax", "[b, np, sq, sk]")
    return _empty_probs(x)


# ----------------------------------------------------------------------------------- backward ops


def _check_backward(grad: torch.Tensor, probs: torch.Tensor, causal: bool) -> None:
    op = "scaled_softmax_backward"
    if grad.shape != probs.shape or grad.dtype != probs.dtype or grad.device != probs.device:
        raise ValueError(f"{op}: grad {tuple(grad.shape)} {grad.dtype} on {grad.device} does not match probs "
                         f"{tuple(probs.shape)} {probs.dtype} on {probs.device}")
    if probs.dim() < 2 or (causal and probs.shape[-2] != probs.shape[-1]):
        raise ValueError(f"{op}: probs must be [..., sq, sk] (sq == sk when causal), got {tuple(probs.shape)}")


@torch.library.custom_op("megaglot::scaled_softmax_backward", mutates_args=())
def _backward_op(grad: torch.Tensor, probs: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """d softmax for all three variants: masking only shaped the forward (masked probs are 0)."""
    _check_backward(grad, probs, causal)
    name = "scaled_upper_triang_masked_softmax_backward" if causal else "scaled_softmax_backward"
    fn = _kernel(name, probs)
    return fn(grad, probs, scale) if fn is not None else _backward_torch(grad, probs, scale).contiguous()


@_backward_op.register_fake
def _backward_fake(grad: torch.Tensor, probs: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    _check_backward(grad, probs, causal)
    return _empty_probs(probs)


@torch.library.custom_op("megaglot::scaled_softmax_backward_", mutates_args=("grad",))
def _backward_inplace_op(grad: torch.Tensor, probs: torch.Tensor, scale: float, causal: bool) -> None:
    """The backward written over ``grad`` (apex's in-place backward); allocates nothing on the kernel path."""
    _check_backward(grad, probs, causal)
    fn = _kernel("scaled_softmax_backward_", probs) if grad.is_contiguous() else None
    if fn is not None:
        fn(grad, probs, scale, causal)
    else:  # no kernel here (a non-contiguous grad, no build): same result through a temporary
        grad.copy_(_backward_op(grad, probs, scale, causal))


@_backward_inplace_op.register_fake
def _backward_inplace_fake(grad: torch.Tensor, probs: torch.Tensor, scale: float, causal: bool) -> None:
    _check_backward(grad, probs, causal)


# The references to a gradient buffer that autograd alone holds while it runs a Python backward: the
# engine's input list and the Python object handed to the backward (TensorImpl); that tensor (storage).
_AUTOGRAD_ONLY_REFS = (2, 1)


def softmax_backward_may_overwrite(grad: torch.Tensor, probs: torch.Tensor) -> bool:
    """Whether the softmax backward may write its result over ``grad`` (as apex's does), so it allocates nothing.

    Only when nobody else can see ``grad``: autograd made it (it is not a tensor the caller passed
    as ``grad_outputs``/``gradient``, which the caller may read afterwards, nor a view or alias of
    one) and the engine holds the only references, the same test torch's own in-place gradient
    accumulation makes (TensorImpl and storage use counts). Not while tracing (torch.compile,
    opcheck: fake/functional tensors), where the out-of-place op lets the compiler plan memory; not
    for a grad that itself requires grad (double backward); and only where the in-place kernel
    exists (CPU, and CUDA in a CUDA build). One case the counts cannot see:
    a Python hook on the probabilities that keeps its ``grad`` argument sees it overwritten.
    """
    if type(grad) is not torch.Tensor or torch.compiler.is_compiling() or grad.requires_grad:
        return False
    if not (grad.is_contiguous() and grad.dtype == probs.dtype and grad.shape == probs.shape):
        return False
    ext = load_extension()
    if ext is None or not hasattr(ext, "tensor_use_counts") or _kernel("scaled_softmax_backward_", probs) is None:
        return False
    return tuple(ext.tensor_use_counts(grad)) == _AUTOGRAD_ONLY_REFS


def _softmax_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    """The registered autograd formula of all three variants: over ``grad`` itself where that is safe
    (``softmax_backward_may_overwrite``), so the backward allocates nothing; else into a new tensor."""
    (probs,) = ctx.saved_tensors
    grad = grad.to(probs.dtype)
    if softmax_backward_may_overwrite(grad, probs):
        _backward_inplace_op(grad, probs, ctx.scale, ctx.causal)
        return grad
    return _backward_op(grad, probs, ctx.scale, ctx.causal)


def _setup_context(ctx, inputs, output, causal: bool = False) -> None:
    ctx.save_for_backward(output)
    ctx.scale = inputs[-1]
    ctx.causal = causal


_causal_op.register_autograd(lambda ctx, grad: (_softmax_backward(ctx, grad), None),
                             setup_context=lambda ctx, inputs, output: _setup_context(ctx, inputs, output, True))
_masked_op.register_autograd(lambda ctx, grad: (_softmax_backward(ctx, grad), None, None),
                             setup_context=_setup_context)
_plain_op.register_autograd(lambda ctx, grad: (_softmax_backward(ctx, grad), None), setup_context=_setup_context)


# ------------------------------------------------------------------------------------ public face


def scaled_upper_triang_masked_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax of scores ``[b*np, sq, sk]`` (sq == sk): row i sees columns 0..i."""
    op = "scaled_upper_triang_masked_softmax"
    _check_tensor(x, "scores", op)
    return _causal_op(x, _check_scale(scale, op))


def scaled_masked_softmax(x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax of scores ``[b, np, sq, sk]``; ``mask`` bool ``[b or 1, 1, sq, sk]``, True = masked out."""
    op = "scaled_masked_softmax"
    _check_tensor(x, "scores", op)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: mask must be a bool tensor (True = masked), got {type(mask).__name__}")
    return _masked_op(x, mask, _check_scale(scale, op))


def scaled_softmax(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax of scores ``[b, np, sq, sk]`` times ``scale``, no mask."""
    op = "scaled_softmax"
    _check_tensor(x, "scores", op)
    return _plain_op(x, _check_scale(scale, op))
