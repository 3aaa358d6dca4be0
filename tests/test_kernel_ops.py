"""The fused kernels as torch ops (torch.library): registration, opcheck, equality with the kernels
called directly, the in-place softmax backward, and torch.compile(fullgraph=True) against eager."""

from __future__ import annotations

import time

import pytest
import torch
from torch.library import opcheck

from megaglot.kernels import (fused_rotary, rotary_cos_sin, scaled_masked_softmax, scaled_softmax,
                              scaled_upper_triang_masked_softmax)
from megaglot.kernels import extension as extension_mod
from megaglot.kernels.rotary import apply_rotary_torch

OPS = ("scaled_softmax", "scaled_masked_softmax", "scaled_upper_triang_masked_softmax", "scaled_softmax_backward",
       "scaled_softmax_backward_", "fused_rotary", "fused_rotary_backward")
DTYPES = [torch.float32, torch.bfloat16]


def ext():
    module = extension_mod.load_extension()
    assert module is not None, "these tests check the compiled kernels: build megaglot._C (make setup)"
    return module


def scores(*shape, dtype=torch.float32, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * 2).to(dtype).requires_grad_(grad)


def mask_of(b, sq, sk, seed=1):
    mask = torch.rand(b, 1, sq, sk, generator=torch.Generator().manual_seed(seed)) < 0.3
    mask[:, :, 0, :] = True  # a fully masked row
    return mask


def test_ops_are_registered_under_megaglot():
    for name in OPS:
        packet = getattr(torch.ops.megaglot, name)
        assert isinstance(packet.default, torch._ops.OpOverload)
    mutated = [a.name for a in torch.ops.megaglot.scaled_softmax_backward_.default._schema.arguments
               if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["grad"]


def softmax_cases(dtype):
    """(op, args) for every softmax op, on scores that require grad where the op is differentiable."""
    m = torch.ops.megaglot
    x4, x3 = scores(2, 3, 5, 7, dtype=dtype, grad=True), scores(3, 6, 6, dtype=dtype, grad=True)
    probs4 = scaled_softmax(x4.detach(), 0.5)
    probs3 = scaled_upper_triang_masked_softmax(x3.detach(), 0.5)
    g4, g3 = scores(2, 3, 5, 7, dtype=dtype, seed=2), scores(3, 6, 6, dtype=dtype, seed=3)
    return [(m.scaled_softmax, (x4, 0.5)), (m.scaled_masked_softmax, (x4, mask_of(1, 5, 7), 0.5)),
            (m.scaled_masked_softmax, (x4, mask_of(2, 5, 7), 0.7)),
            (m.scaled_upper_triang_masked_softmax, (x3, 0.5)),
            (m.scaled_softmax_backward, (g4, probs4, 0.5, False)),
            (m.scaled_softmax_backward, (g3, probs3, 0.5, True)),
            (m.scaled_softmax_backward_, (g4.clone(), probs4, 0.5, False)),
            (m.scaled_softmax_backward_, (g3.clone(), probs3, 0.5, True))]


def rotary_cases(dtype):
    m = torch.ops.megaglot
    qkv = scores(5, 2, 3, 3 * 8, dtype=dtype, seed=4)
    q, k = qkv[..., :8].requires_grad_(False), qkv[..., 8:16]  # strided views, like the model's QKV
    cos, sin = rotary_cos_sin(5, 6, 10000, "cpu")
    dense_q, dense_k = scores(5, 2, 3, 8, dtype=dtype, seed=5, grad=True), scores(5, 2, 3, 8, dtype=dtype, seed=6,
                                                                                   grad=True)
    return [(m.fused_rotary, (dense_q, dense_k, cos, sin)), (m.fused_rotary, (q, k, cos, sin)),
            (m.fused_rotary_backward, (dense_q.detach(), dense_k.detach(), cos, sin))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_kernels(dtype):
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch, on the compiled kernels."""
    assert ext() is not None
    for op, args in softmax_cases(dtype) + rotary_cases(dtype):
        opcheck(op, args)


def test_opcheck_pure_torch_fallback(monkeypatch):
    monkeypatch.setattr(extension_mod, "load_extension", lambda: None)
    for op, args in softmax_cases(torch.float32) + rotary_cases(torch.bfloat16):
        opcheck(op, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_equal_the_kernels_called_directly(dtype):
    """What the Python autograd.Function path computed before: the compiled forward and backward, bit for bit."""
    k = ext()
    x, g = scores(2, 3, 9, 33, dtype=dtype, grad=True), scores(2, 3, 9, 33, dtype=dtype, seed=7)
    mask = mask_of(2, 9, 33)
    for probs, want in ((scaled_softmax(x, 0.3), k.scaled_softmax_forward(x.detach(), 0.3)),
                        (scaled_masked_softmax(x, mask, 0.3), k.scaled_masked_softmax_forward(x.detach(), mask, 0.3))):
        assert torch.equal(probs, want)
        (dx,) = torch.autograd.grad(probs, x, g)
        assert torch.equal(dx, k.scaled_softmax_backward(g, want, 0.3))
    xc, gc = scores(4, 20, 20, dtype=dtype, grad=True), scores(4, 20, 20, dtype=dtype, seed=8)
    probs = scaled_upper_triang_masked_softmax(xc, 0.3)
    want = k.scaled_upper_triang_masked_softmax_forward(xc.detach(), 0.3)
    assert torch.equal(probs, want)
    (dx,) = torch.autograd.grad(probs * 1, xc, gc)  # through a product: the in-place path
    assert torch.equal(dx, k.scaled_upper_triang_masked_softmax_backward(gc, want, 0.3))
    q, kk = scores(7, 2, 2, 16, dtype=dtype, grad=True), scores(7, 2, 2, 16, dtype=dtype, seed=9, grad=True)
    cos, sin = rotary_cos_sin(7, 8, 10000, "cpu")
    q_out, k_out = fused_rotary(q, kk, cos, sin)
    want_q, want_k = k.fused_rotary_forward(q.detach(), kk.detach(), cos, sin)
    assert torch.equal(q_out, want_q) and torch.equal(k_out, want_k)
    gq, gk = scores(7, 2, 2, 16, dtype=dtype, seed=10), scores(7, 2, 2, 16, dtype=dtype, seed=11)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, kk), (gq, gk))
    want_dq, want_dk = k.fused_rotary_backward(gq, gk, cos, sin)
    assert torch.equal(dq, want_dq) and torch.equal(dk, want_dk)


def _incoming_and_returned(fn, x):
    """data_ptr of the gradient arriving at fn's output and of the one it returns for x, plus x.grad."""
    seen = {}
    y = fn(x)
    y.register_hook(lambda g: seen.__setitem__("in", g.data_ptr()))
    x.register_hook(lambda g: seen.__setitem__("out", g.data_ptr()))
    weights = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    (y * weights).sum().backward()  # the incoming grad is a fresh product, owned by autograd
    return seen["in"], seen["out"], x.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_backward_writes_over_the_incoming_grad(dtype):
    mask = mask_of(2, 6, 10)
    calls = [lambda t: scaled_softmax(t, 0.4), lambda t: scaled_masked_softmax(t, mask, 0.4)]
    for fn, shape in [(calls[0], (2, 3, 6, 10)), (calls[1], (2, 3, 6, 10)),
                      (lambda t: scaled_upper_triang_masked_softmax(t, 0.4), (6, 10, 10))]:
        x = scores(*shape, dtype=dtype, grad=True)
        incoming, returned, dx = _incoming_and_returned(fn, x)
        assert incoming == returned == dx.data_ptr()  # no new gradient tensor: apex's in-place backward
        probs = fn(x.detach())
        weights = torch.linspace(-1, 1, shape[-1], dtype=dtype).expand(shape).contiguous()
        assert torch.equal(dx, torch.ops.megaglot.scaled_softmax_backward(weights, probs, 0.4, len(shape) == 3))


def test_softmax_backward_leaves_grads_it_does_not_own():
    """A caller's grad_outputs (read again afterwards), a grad shared with another input's AccumulateGrad
    and a view of a caller's tensor are never overwritten; results stay the out-of-place ones."""
    x, b = scores(2, 2, 4, 8, grad=True), scores(2, 2, 4, 8, seed=3, grad=True)
    probs = scaled_softmax(x, 0.5)
    g = scores(2, 2, 4, 8, seed=4)
    kept = g.clone()
    (dx,) = torch.autograd.grad(probs, x, g)
    assert torch.equal(g, kept) and dx.data_ptr() != g.data_ptr()
    want = torch.ops.megaglot.scaled_softmax_backward(g, probs.detach(), 0.5, False)
    assert torch.equal(dx, want)
    (scaled_softmax(x, 0.5) + b).backward(g)  # AddBackward hands the same tensor to b and to the softmax
    assert torch.equal(g, kept) and torch.equal(b.grad, g) and torch.equal(x.grad, want)
    flat = g.reshape(-1).clone()
    (dx_view,) = torch.autograd.grad(scaled_softmax(x, 0.5).reshape(-1), x, flat)
    assert torch.equal(flat, kept.reshape(-1)) and torch.equal(dx_view, want)


def attention_like(q, k, v, cos, sin, mask):
    """Rotary, causal softmax, masked and plain softmax: every fused op in one function, as a model calls them."""
    q, k = fused_rotary(q, k, cos, sin)  # [s, b, np, hn]
    s, b, heads, hn = q.shape
    qb, kb = q.permute(1, 2, 0, 3).reshape(b * heads, s, hn), k.permute(1, 2, 0, 3).reshape(b * heads, s, hn)
    raw = torch.bmm(qb, kb.transpose(1, 2))  # [b*np, s, s]
    causal = scaled_upper_triang_masked_softmax(raw, hn ** -0.5)
    masked = scaled_masked_softmax(raw.view(b, heads, s, s), mask, 0.5)
    plain = scaled_softmax(raw.view(b, heads, s, s), 0.25)
    mixed = causal.view(b, heads, s, s) + masked + plain
    return torch.matmul(mixed, v)  # [b, np, s, hn]


def test_torch_compile_fullgraph_matches_eager():
    """No graph break (fullgraph=True) on CPU with inductor; outputs and gradients as eager."""
    s, b, heads, hn = 6, 2, 2, 8
    cos, sin = rotary_cos_sin(s, 4, 10000, "cpu")
    inputs = [scores(s, b, heads, hn, seed=i, grad=True) for i in range(2)] + [scores(b, heads, s, hn, seed=3,
                                                                                     grad=True)]
    mask = mask_of(b, s, s)
    torch._dynamo.reset()
    compiled = torch.compile(attention_like, fullgraph=True, dynamic=False)
    start = time.perf_counter()
    out = compiled(*inputs, cos, sin, mask)
    grads = torch.autograd.grad(out.square().sum(), inputs)
    elapsed = time.perf_counter() - start
    eager_inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    want = attention_like(*eager_inputs, cos, sin, mask)
    want_grads = torch.autograd.grad(want.square().sum(), eager_inputs)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, want_grads):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert elapsed < 120, f"compiling took {elapsed:.0f} s"


def test_rotary_op_matches_eager_formula_in_float64():
    q, k = scores(4, 1, 2, 10, dtype=torch.float64), scores(4, 1, 2, 10, dtype=torch.float64, seed=2)
    cos, sin = rotary_cos_sin(4, 6, 10000, "cpu", dtype=torch.float64)
    q_out, k_out = torch.ops.megaglot.fused_rotary(q, k, cos, sin)
    torch.testing.assert_close(q_out, apply_rotary_torch(q, cos, sin), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(k_out, apply_rotary_torch(k, cos, sin), atol=1e-12, rtol=1e-12)


def test_op_checks_are_the_public_errors():
    """The one set of checks runs inside the ops: a direct op call fails like the public function."""
    with pytest.raises(ValueError, match="sq == sk"):
        torch.ops.megaglot.scaled_upper_triang_masked_softmax(torch.randn(2, 3, 4), 1.0)
    with pytest.raises(ValueError, match="same shape"):
        torch.ops.megaglot.fused_rotary(torch.randn(4, 1, 2, 8), torch.randn(4, 1, 3, 8),
                                        *rotary_cos_sin(4, 8, 1e4, "cpu"))
    with pytest.raises(ValueError, match="does not match probs"):
        torch.ops.megaglot.scaled_softmax_backward_(torch.randn(2, 3), torch.randn(2, 4), 1.0, False)
