"""The CUDA kernels: the same checks as tests/test_kernels.py on a GPU, plus the paths only CUDA has
(warp-per-row up to 16384 columns, block-per-row beyond, unaligned rows without 16-byte vectors).
Skipped without a GPU or without a CUDA build of megaglot._C.
"""

from __future__ import annotations

import pytest
import torch

from megaglot.kernels import (available, fused_rotary, rotary_cos_sin, scaled_masked_softmax,
                              scaled_upper_triang_masked_softmax)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from test_kernels import (CAUSAL_SHAPES, DTYPES, FWD_TOL, MASKED_SHAPES, PLAIN_SHAPES,  # noqa: E402
                                check_rotary, check_softmax_variant)


@pytest.fixture(autouse=True, scope="module")
def _needs_cuda_build():
    if not available()["cuda"]:
        pytest.skip("megaglot._C was built without CUDA (rebuild with a CUDA torch and toolkit)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CAUSAL_SHAPES + [(2, 2048, 2048)], ids=str)
def test_causal_softmax_cuda(dtype, shape):
    check_softmax_variant("causal", dtype, shape, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MASKED_SHAPES + [(2, 2, 8, 1000), (1, 2, 4, 4096)], ids=str)
@pytest.mark.parametrize("mask_batch", ["one", "b"])
def test_masked_softmax_cuda(dtype, shape, mask_batch):
    check_softmax_variant("masked", dtype, shape, device="cuda", mask_batch=1 if mask_batch == "one" else shape[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PLAIN_SHAPES, ids=str)
def test_plain_softmax_cuda(dtype, shape):
    check_softmax_variant("none", dtype, shape, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sk", [16384, 16385, 20000, 32768])
def test_long_rows_use_every_path(dtype, sk):
    """16384: warp per row (vectorized); 16385 / 20000: unaligned, block per row; 32768: block, vectorized."""
    check_softmax_variant("masked", dtype, (1, 1, 3, sk), device="cuda")


def test_long_causal_rows_cuda():
    """sq = sk = 16385 takes the block-per-row path; check a few rows against float64."""
    s = 16385
    x = torch.randn(1, s, s, device="cuda", dtype=torch.bfloat16)
    probs = scaled_upper_triang_masked_softmax(x, 0.5)
    for row in (0, 1, 4097, s - 1):
        want = torch.softmax(x[0, row, : row + 1].double() * 0.5, dim=-1)
        torch.testing.assert_close(probs[0, row, : row + 1].double(), want, atol=8e-3, rtol=2e-2)
        assert (probs[0, row, row + 1:] == 0).all()


def test_cuda_matches_cpu_bit_for_bit_in_shape_and_closely_in_value():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 33, 77, generator=gen)
    mask = torch.rand(2, 1, 33, 77, generator=gen) < 0.25
    cpu = scaled_masked_softmax(x, mask, 0.3)
    gpu = scaled_masked_softmax(x.cuda(), mask.cuda(), 0.3).cpu()
    atol, rtol = FWD_TOL[torch.float32]
    torch.testing.assert_close(gpu, cpu, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(6, 40, 40), (2, 3000, 3000), (1, 16500, 16500)], ids=str)
def test_cuda_softmax_backward_writes_over_the_incoming_grad(dtype, shape):
    """apex's in-place backward on CUDA, warp-per-row and block-per-row: the gradient autograd hands
    the softmax is the one it returns, with the values of the out-of-place op."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 2).to(dtype).cuda().requires_grad_(True)
    seen = {}
    y = scaled_upper_triang_masked_softmax(x, 0.3)
    y.register_hook(lambda g: seen.__setitem__("in", g.data_ptr()))
    weights = torch.linspace(-1, 1, shape[-1], dtype=dtype, device="cuda")
    (y * weights).sum().backward()
    assert seen["in"] == x.grad.data_ptr()
    want = torch.ops.megaglot.scaled_softmax_backward(weights.expand(shape).contiguous(), y.detach(), 0.3, True)
    assert torch.equal(x.grad, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(5, 2, 3, 16, 16), (7, 1, 2, 24, 6), (33, 2, 2, 128, 64), (3, 2, 2, 20, 8)],
                         ids=str)
def test_fused_rotary_cuda(dtype, dims):
    check_rotary(dtype, *dims, device="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_rotary_strided_cuda(dtype):
    check_rotary(dtype, 9, 2, 3, 128, 32, device="cuda", strided=True)


def test_rotary_tables_on_cuda_are_cached_per_device():
    a = rotary_cos_sin(16, 8, 10000, "cuda")
    assert a[0].is_cuda and rotary_cos_sin(16, 8, 10000, torch.device("cuda"))[0] is a[0]
    cpu = rotary_cos_sin(16, 8, 10000, "cpu")
    torch.testing.assert_close(a[0].cpu(), cpu[0], atol=1e-6, rtol=0)
    q = torch.randn(16, 1, 2, 8, device="cuda")
    fused_rotary(q, q, *a)
