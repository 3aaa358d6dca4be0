"""The gradient buffer's fp32 accumulation: the fused weight-gradient GEMM (LinearIntoMainGrad)
against plain autograd, over several microbatches, and that a dropped buffer frees its model."""

from __future__ import annotations

import gc
import weakref

import torch

from megaglot.optim.grad_buffer import GradBuffer
from megaglot.parallel import layers


def _params(seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    bias = torch.nn.Parameter(torch.randn(6, generator=gen))
    return weight, bias


def test_fused_weight_gradient_accumulates_like_autograd():
    weight, bias = _params(0)
    ref_weight, ref_bias = (torch.nn.Parameter(t.detach().clone()) for t in (weight, bias))
    buffer = GradBuffer([weight, bias], dp_group=None)
    buffer.start_step(num_microbatches=3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4, 2, 5, generator=gen)  # [s, b, in]
        grad = torch.randn(4, 2, 6, generator=gen)
        assert layers.accumulates_into_main_grad(weight)
        layers.linear(x, weight, bias).backward(grad)
        torch.nn.functional.linear(x, ref_weight, ref_bias).backward(grad)
    assert weight.grad is None and bias.grad is None  # the hook moved everything into main_grad
    assert not weight.grad_added_to_main_grad
    torch.testing.assert_close(weight.main_grad, ref_weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bias.main_grad, ref_bias.grad, rtol=1e-6, atol=1e-6)


def test_input_gradient_of_fused_linear():
    weight, bias = _params(2)
    GradBuffer([weight, bias], dp_group=None).start_step(1)
    x = torch.randn(3, 2, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 2, 6)
    layers.linear(x, weight, bias).backward(grad)
    torch.nn.functional.linear(x_ref, weight.detach(), bias.detach()).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_without_buffer_linear_is_plain_autograd():
    weight, bias = _params(3)
    assert not layers.accumulates_into_main_grad(weight)
    x = torch.randn(2, 5)
    layers.linear(x, weight, bias).sum().backward()
    torch.testing.assert_close(weight.grad, torch.ones(2, 6).t() @ x)


def test_dropped_buffer_frees_parameters():
    weight, bias = _params(4)
    buffer = GradBuffer([weight, bias], dp_group=None)
    alive = weakref.ref(weight), weakref.ref(buffer)
    del weight, bias, buffer
    gc.collect()
    assert alive[0]() is None and alive[1]() is None
