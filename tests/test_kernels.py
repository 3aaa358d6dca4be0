"""Fused softmax and rotary kernels (CPU) against float64 torch references, gradcheck, fallbacks, errors.

Device-independent checks live in helpers shared with tests/test_kernels_cuda.py.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from megaglot.kernels import (apply_rotary_torch, available, fused_rotary, rotary_cos_sin, scaled_masked_softmax,
                              scaled_softmax, scaled_upper_triang_masked_softmax)
from megaglot.kernels import rotary as rotary_mod
from megaglot.kernels import extension as extension_mod

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol) for probabilities in [0, 1] and for their gradients, per storage dtype.
FWD_TOL = {torch.float32: (2e-6, 1e-5), torch.float16: (1e-3, 5e-3), torch.bfloat16: (8e-3, 2e-2)}
BWD_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (5e-3, 2e-2), torch.bfloat16: (4e-2, 5e-2)}
ROT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2e-2)}


def ref_softmax(x: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """float64 softmax of the (already dtype-rounded) scores; fully masked rows -> 0."""
    xd = x.double() * scale
    if mask is not None:
        xd = xd.masked_fill(mask, float("-inf"))
    return torch.softmax(xd, dim=-1).nan_to_num(0.0)


def ref_softmax_grad(probs64: torch.Tensor, grad: torch.Tensor, scale: float) -> torch.Tensor:
    g = grad.double()
    return scale * probs64 * (g - (g * probs64).sum(-1, keepdim=True))


def causal_mask(s: int, device="cpu") -> torch.Tensor:
    return torch.ones(s, s, dtype=torch.bool, device=device).triu(1)


def random_mask(b: int, sq: int, sk: int, gen: torch.Generator, device="cpu") -> torch.Tensor:
    mask = torch.rand(b, 1, sq, sk, generator=gen) < 0.3
    mask[:, :, sq // 2, :] = True  # a fully masked row in every batch element
    return mask.to(device)


def check_softmax_variant(kind: str, dtype: torch.dtype, shape, device: str = "cpu", seed: int = 0,
                          mask_batch: int = 1) -> None:
    """Forward against float64 and backward (through autograd) against the float64 gradient formula."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    scale = 0.37
    if kind == "causal":
        mask = causal_mask(shape[1], device)
        probs = scaled_upper_triang_masked_softmax(x, scale)
    elif kind == "masked":
        mask = random_mask(mask_batch, shape[2], shape[3], gen, device)
        probs = scaled_masked_softmax(x, mask, scale)
    else:
        mask = None
        probs = scaled_softmax(x, scale)
    assert probs.dtype == dtype and probs.shape == x.shape and probs.device == x.device
    want = ref_softmax(x.detach(), mask, scale)
    atol, rtol = FWD_TOL[dtype]
    torch.testing.assert_close(probs.double(), want, atol=atol, rtol=rtol)
    assert torch.isfinite(probs).all()
    grad = torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    (dx,) = torch.autograd.grad(probs, x, grad)
    assert dx.dtype == dtype
    # The kernel differentiates from its own (rounded) output: compare with that, in float64.
    want_dx = ref_softmax_grad(probs.detach().double(), grad, scale)
    atol, rtol = BWD_TOL[dtype]
    torch.testing.assert_close(dx.double(), want_dx, atol=atol, rtol=rtol)
    if mask is not None:
        full_mask = mask.expand_as(x)
        assert (dx[full_mask] == 0).all() and (probs[full_mask] == 0).all()


CAUSAL_SHAPES = [(1, 1, 1), (3, 5, 5), (2, 33, 33), (4, 70, 70), (1, 130, 130)]
MASKED_SHAPES = [(2, 3, 7, 1), (2, 3, 5, 37), (1, 2, 17, 100), (2, 1, 3, 129)]
PLAIN_SHAPES = [(2, 2, 3, 1), (2, 3, 9, 45), (1, 2, 4, 256)]


def rotary_case(dtype, s, b, heads, hn, rd, device="cpu", seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # q and k as views of a fused [s, b, np, 3 * hn] projection, like the model's QKV
        qkv = torch.randn(s, b, heads, 3 * hn, generator=gen).to(device=device, dtype=dtype)
        q, k = qkv[..., :hn], qkv[..., hn:2 * hn]
    else:
        q = torch.randn(s, b, heads, hn, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(s, b, heads, hn, generator=gen).to(device=device, dtype=dtype)
    cos, sin = rotary_cos_sin(s, rd, 10000, device)
    return q, k, cos, sin


def ref_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rotary_torch(t.double(), cos.double(), sin.double())


def check_rotary(dtype, s, b, heads, hn, rd, device="cpu", strided=False):
    q, k, cos, sin = rotary_case(dtype, s, b, heads, hn, rd, device, strided=strided)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_out, k_out = fused_rotary(q, k, cos, sin)
    assert q_out.dtype == dtype and q_out.shape == q.shape and q_out.is_contiguous()
    atol, rtol = ROT_TOL[dtype]
    torch.testing.assert_close(q_out.double(), ref_rotary(q.detach(), cos, sin), atol=atol, rtol=rtol)
    torch.testing.assert_close(k_out.double(), ref_rotary(k.detach(), cos, sin), atol=atol, rtol=rtol)
    assert torch.equal(q_out[..., rd:], q.detach()[..., rd:])  # pass-through is bit-exact
    gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = torch.autograd.grad((q_out, k_out), (q, k), (gq, gk))
    q64 = q.detach().double().requires_grad_(True)
    (want_dq,) = torch.autograd.grad(ref_rotary(q64, cos, sin), q64, gq.double())
    k64 = k.detach().double().requires_grad_(True)
    (want_dk,) = torch.autograd.grad(ref_rotary(k64, cos, sin), k64, gk.double())
    torch.testing.assert_close(dq.double(), want_dq, atol=atol, rtol=rtol)
    torch.testing.assert_close(dk.double(), want_dk, atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------- CPU


def test_extension_reports_kernels():
    info = available()
    assert info["extension"]
    for name in ("scaled_upper_triang_masked_softmax_forward", "scaled_masked_softmax_forward",
                 "scaled_softmax_forward", "scaled_softmax_backward", "fused_rotary_forward",
                 "fused_rotary_backward", "with_cuda"):
        assert name in info["functions"]
    assert isinstance(info["cuda"], bool)
    assert info["cpu_isa"] in ("avx512", "avx2", "baseline")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CAUSAL_SHAPES, ids=str)
def test_causal_softmax(dtype, shape):
    check_softmax_variant("causal", dtype, shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MASKED_SHAPES, ids=str)
@pytest.mark.parametrize("mask_batch", ["one", "b"])
def test_masked_softmax(dtype, shape, mask_batch):
    check_softmax_variant("masked", dtype, shape, mask_batch=1 if mask_batch == "one" else shape[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PLAIN_SHAPES, ids=str)
def test_plain_softmax(dtype, shape):
    check_softmax_variant("none", dtype, shape)


# Outputs of at least 8 MB with rows a multiple of 16 are written with streaming stores (AVX2 and AVX-512).
STREAMED = [("causal", (4, 1024, 1024)), ("masked", (1, 4, 1024, 1024)), ("none", (1, 4, 1024, 1024))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,shape", STREAMED, ids=str)
def test_softmax_streamed_outputs(dtype, kind, shape):
    check_softmax_variant(kind, dtype, shape, mask_batch=1)


SOFTMAX_CHECKS = ("causal_softmax or masked_softmax or plain_softmax or streamed or fully_masked or faithfully or "
                  "upper_triangle or nan_scores")


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_lower_cpu_isa_levels_in_a_subprocess(isa):
    """The softmax rows of a lower ISA level (what a CPU without AVX-512, or without AVX2, runs), forced
    with MEGAGLOT_CPU_ISA, pass the same checks as the best level this machine runs."""
    env = dict(os.environ, MEGAGLOT_CPU_ISA=isa)
    probe = subprocess.run([sys.executable, "-c", "import megaglot.kernels as k; print(k.available()['cpu_isa'])"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    ran = probe.stdout.split()[-1]
    # The cap is honoured; a CPU without AVX2 runs the baseline even when avx2 is asked for.
    assert ran == isa or (isa == "avx2" and ran == "baseline" and available()["cpu_isa"] == "baseline")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__), "-k",
           SOFTMAX_CHECKS]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


def test_unknown_cpu_isa_is_a_clear_error():
    code = "import torch; from megaglot.kernels import scaled_softmax; scaled_softmax(torch.randn(1, 1, 2, 3), 1.0)"
    result = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MEGAGLOT_CPU_ISA="sse9"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "MEGAGLOT_CPU_ISA must be avx512, avx2 or baseline (or unset), got 'sse9'" in result.stderr


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_softmax_outputs_are_faithfully_rounded(dtype):
    """16-bit outputs come from a shorter exp polynomial (cpu_math.h): every stored probability is the
    correctly rounded float64 softmax or its neighbour, and the neighbour is rare."""
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 4, 128, 1024, generator=gen) * 4).to(dtype)
    probs = scaled_softmax(x, 0.37)
    want = ref_softmax(x, None, 0.37).to(dtype)
    ulps = (probs.view(torch.int16).int() - want.view(torch.int16).int()).abs()
    assert ulps.max() <= 1
    assert (ulps != 0).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("s", [40, 64, 1024], ids=str)
def test_causal_softmax_never_uses_the_upper_triangle(dtype, s):
    """The kernels round each causal row up to whole 16-lane vectors and read past the diagonal: what
    sits there (NaN here, in the scores and in the incoming gradient) must not reach any output."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, s, s, generator=gen).to(dtype)
    grad = torch.randn(2, s, s, generator=gen).to(dtype)
    upper = causal_mask(s)
    poisoned_x = x.masked_fill(upper, float("nan")).requires_grad_(True)
    poisoned_g = grad.masked_fill(upper, float("nan"))
    clean_x = x.clone().requires_grad_(True)
    probs = scaled_upper_triang_masked_softmax(poisoned_x, 0.5)
    (dx,) = torch.autograd.grad(probs, poisoned_x, poisoned_g)
    clean_probs = scaled_upper_triang_masked_softmax(clean_x, 0.5)
    (clean_dx,) = torch.autograd.grad(clean_probs, clean_x, grad)
    assert torch.equal(probs, clean_probs) and torch.equal(dx, clean_dx)
    assert (probs[:, upper] == 0).all() and (dx[:, upper] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_scores_give_nan_rows(dtype):
    """As torch.softmax: a NaN score makes its row NaN (never a row of plausible numbers; a causal row's
    masked columns stay 0), and leaves the other rows alone."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, 3, 50, generator=gen).to(dtype)
    x[0, 1, 2, 17] = float("nan")
    probs = scaled_softmax(x, 0.5)
    assert probs[0, 1, 2].isnan().all()
    probs[0, 1, 2] = 0
    assert not probs.isnan().any()
    causal_x = torch.randn(2, 40, 40, generator=gen).to(dtype)
    causal_x[1, 30, 7] = float("nan")  # below the diagonal: a score the row uses
    causal = scaled_upper_triang_masked_softmax(causal_x, 0.5)
    assert causal[1, 30, :31].isnan().all() and (causal[1, 30, 31:] == 0).all()
    causal[1, 30, :31] = 0
    assert not causal.isnan().any()


def test_softmax_large_scores_and_threads():
    """Rows long enough to split across threads and to exercise the SIMD bodies plus tails."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 517, 517, generator=gen) * 40  # large logits: exp would overflow without the max
    probs = scaled_upper_triang_masked_softmax(x, 1.0)
    torch.testing.assert_close(probs.double(), ref_softmax(x, causal_mask(517), 1.0), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(probs.double().sum(-1), torch.ones(4, 517, dtype=torch.float64), atol=1e-5, rtol=0)


def test_fully_masked_rows_are_zero_with_zero_grad():
    x = torch.randn(2, 2, 4, 9, requires_grad=True)
    mask = torch.zeros(1, 1, 4, 9, dtype=torch.bool)
    mask[..., 1, :] = True
    probs = scaled_masked_softmax(x, mask, 1.0)
    probs.sum().backward()
    assert (probs[:, :, 1] == 0).all() and not probs.isnan().any()
    assert (x.grad[:, :, 1] == 0).all() and not x.grad.isnan().any()


@pytest.mark.parametrize("kind", ["causal", "masked", "none"])
def test_softmax_gradcheck_float64(kind):
    gen = torch.Generator().manual_seed(1)
    if kind == "causal":
        x = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        fn = lambda t: scaled_upper_triang_masked_softmax(t, 0.8)  # noqa: E731
    elif kind == "masked":
        x = torch.randn(2, 2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
        mask = random_mask(2, 3, 6, gen)
        fn = lambda t: scaled_masked_softmax(t, mask, 0.8)  # noqa: E731
    else:
        x = torch.randn(1, 2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
        fn = lambda t: scaled_softmax(t, 0.8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dims", [(5, 2, 3, 16, 16), (7, 1, 2, 24, 6), (33, 2, 2, 20, 8), (1, 3, 1, 2, 2)], ids=str)
def test_fused_rotary(dtype, dims):
    check_rotary(dtype, *dims)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_rotary_strided_views_of_qkv(dtype):
    check_rotary(dtype, 9, 2, 3, 32, 16, strided=True)


def test_fused_rotary_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(4, 2, 2, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 2, 2, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    cos, sin = rotary_cos_sin(4, 6, 10000, "cpu", dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: fused_rotary(a, b, cos, sin), (q, k), eps=1e-6, atol=1e-7)


def test_fused_rotary_only_q_reaches_the_loss():
    q, k, cos, sin = rotary_case(torch.float32, 4, 1, 2, 8, 8)
    q.requires_grad_(True)
    k.requires_grad_(True)
    q_out, _ = fused_rotary(q, k, cos, sin)
    q_out.sum().backward()
    assert k.grad is None or (k.grad == 0).all()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_rotary_matches_hugging_face():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding, apply_rotary_pos_emb

    s, b, heads, hn, pct, base = 19, 2, 4, 16, 0.5, 10000
    config = transformers.GPTNeoXConfig(hidden_size=heads * hn, num_attention_heads=heads, rotary_pct=pct,
                                        rotary_emb_base=base)
    rd = int(hn * pct)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(b, heads, s, hn, generator=gen)
    hf_cos, hf_sin = GPTNeoXRotaryEmbedding(config)(x, torch.arange(s)[None])
    cos, sin = rotary_cos_sin(s, rd, base, "cpu")
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])  # bit-exact tables
    q = torch.randn(b, heads, s, hn, generator=gen)
    k = torch.randn(b, heads, s, hn, generator=gen)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    to_sbnh = lambda t: t.permute(2, 0, 1, 3)  # noqa: E731  [b, np, s, hn] -> [s, b, np, hn]
    assert torch.equal(apply_rotary_torch(to_sbnh(q), cos, sin), to_sbnh(hf_q))
    fq, fk = fused_rotary(to_sbnh(q), to_sbnh(k), cos, sin)
    torch.testing.assert_close(fq, to_sbnh(hf_q), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fk, to_sbnh(hf_k), atol=1e-6, rtol=1e-6)


def test_rotary_cos_sin_is_cached_and_bounded():
    a = rotary_cos_sin(12, 8, 10000, "cpu")
    assert rotary_cos_sin(12, 8, 10000, torch.device("cpu"))[0] is a[0]
    assert rotary_cos_sin(12, 8, 10000, "cpu", dtype=torch.bfloat16)[0].dtype == torch.bfloat16
    assert rotary_cos_sin(13, 8, 10000, "cpu")[0] is not a[0]
    assert rotary_mod._cos_sin_cached.cache_info().maxsize is not None
    assert a[0].shape == (12, 8)
    torch.testing.assert_close(a[0][3, 0], torch.tensor(math.cos(3.0)))


# ----------------------------------------------------------------------------- fallbacks and errors


def test_pure_torch_fallback_matches(monkeypatch):
    monkeypatch.setattr(extension_mod, "load_extension", lambda: None)
    check_softmax_variant("causal", torch.float32, (2, 9, 9))
    check_softmax_variant("masked", torch.bfloat16, (2, 2, 5, 11), mask_batch=2)
    check_softmax_variant("none", torch.float16, (1, 2, 3, 5))
    check_rotary(torch.float32, 5, 2, 2, 12, 8)
    check_rotary(torch.bfloat16, 5, 2, 2, 12, 8, strided=True)
    x = torch.randn(1, 2, 3, 7, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(1, 1, 3, 7) < 0.4
    assert torch.autograd.gradcheck(lambda t: scaled_masked_softmax(t, mask, 0.5), (x,), eps=1e-6, atol=1e-6)


def test_stale_extension_warns_once(monkeypatch):
    class Stale:
        @staticmethod
        def with_cuda():
            return False

    monkeypatch.setattr(extension_mod, "load_extension", lambda: Stale())
    extension_mod.warn_once.cache_clear()
    x = torch.randn(1, 2, 4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            scaled_softmax(x, 1.0)
    assert len([w for w in caught if "scaled_softmax_forward" in str(w.message)]) == 1
    extension_mod.warn_once.cache_clear()


@pytest.mark.parametrize("call, error, message", [
    (lambda: scaled_upper_triang_masked_softmax(torch.randn(2, 3, 4), 1.0), ValueError, "sq == sk"),
    (lambda: scaled_upper_triang_masked_softmax(torch.randn(2, 3, 3, 3), 1.0), ValueError, r"\[b\*np, sq, sk\]"),
    (lambda: scaled_softmax(torch.randn(2, 3, 3, 3).int(), 1.0), TypeError, "float32, float16 or bfloat16"),
    (lambda: scaled_softmax(torch.randn(2, 3, 3, 3), float("nan")), ValueError, "finite"),
    (lambda: scaled_softmax(torch.randn(2, 3, 3, 3), "x"), TypeError, "scale must be a number"),
    (lambda: scaled_masked_softmax(torch.randn(2, 3, 4, 5), torch.zeros(2, 1, 4, 5), 1.0), TypeError, "bool"),
    (lambda: scaled_masked_softmax(torch.randn(2, 3, 4, 5), torch.zeros(3, 1, 4, 5, dtype=torch.bool), 1.0),
     ValueError, r"\[2 or 1, 1, 4, 5\]"),
    (lambda: scaled_masked_softmax(torch.randn(2, 3, 4, 5), torch.zeros(2, 3, 4, 5, dtype=torch.bool), 1.0),
     ValueError, "mask must be"),
])
def test_softmax_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _qk(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("call, error, message", [
    (lambda: fused_rotary(*_qk(4, 1, 2, 8), *rotary_cos_sin(5, 8, 10000, "cpu")), ValueError, "5 positions"),
    (lambda: fused_rotary(*_qk(4, 1, 2, 8), *rotary_cos_sin(4, 10, 10000, "cpu")), ValueError, "rotary_ndims"),
    (lambda: fused_rotary(torch.randn(4, 1, 2, 8), torch.randn(4, 1, 3, 8), *rotary_cos_sin(4, 8, 1e4, "cpu")),
     ValueError, "same shape"),
    (lambda: fused_rotary(torch.randn(4, 1, 2, 8), torch.randn(4, 1, 2, 8).half(), *rotary_cos_sin(4, 8, 1e4, "cpu")),
     TypeError, "but k is"),
    (lambda: fused_rotary(*_qk(4, 2, 8), *rotary_cos_sin(4, 8, 10000, "cpu")), ValueError, r"\[s, b, np, hn\]"),
    (lambda: fused_rotary(*_qk(4, 1, 2, 8), torch.ones(4, 8), torch.ones(4, 6)), ValueError, "cos and sin"),
    (lambda: rotary_cos_sin(4, 7, 10000, "cpu"), ValueError, "even"),
    (lambda: rotary_cos_sin(-1, 8, 10000, "cpu"), ValueError, "non-negative"),
])
def test_rotary_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_compiled_functions_check_their_inputs():
    """Direct callers of megaglot._C get clear errors too, not a crash."""
    ext = extension_mod.load_extension()
    with pytest.raises(RuntimeError, match="sq == sk"):
        ext.scaled_upper_triang_masked_softmax_forward(torch.randn(2, 3, 4), 1.0)
    with pytest.raises(RuntimeError, match="mask must be"):
        ext.scaled_masked_softmax_forward(torch.randn(2, 3, 4, 5), torch.zeros(2, 1, 4, 6, dtype=torch.bool), 1.0)
    with pytest.raises(RuntimeError, match="grad shape"):
        ext.scaled_softmax_backward(torch.randn(2, 3), torch.randn(2, 4), 1.0)
    with pytest.raises(RuntimeError, match="rotary_ndims"):
        ext.fused_rotary_forward(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4), torch.ones(2, 3), torch.ones(2, 3))
