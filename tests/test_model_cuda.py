"""The GPU paths of the model against references on the same GPU: transformers' GPT-NeoX in fp32
(logits, loss, every gradient) with the gradient buffer's fused weight-gradient GEMM and the
compiled residual sum and bias-GELU active, and a bf16 step whose fp32-accumulated gradients are compared with
plain bf16 autograd. Skipped without CUDA (the CPU suite covers the same code on CPU tensors).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dist_harness import run_distributed
from hf_models import random_gpt_neox

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _load(chunk, hf_state, cfg):
    from megaglot.checkpoint.hf import lookup, pad_vocab
    from megaglot.checkpoint.sharding import load_full_tensors

    load_full_tensors([chunk], lambda n: pad_vocab(lookup(hf_state, n), n, cfg).to(chunk_device(chunk)))


def chunk_device(chunk):
    return next(chunk.parameters()).device


def _fp32_parity_worker(rank, backend):
    from megaglot.checkpoint.hf import global_name, model_config_from_hf, pad_vocab
    from megaglot.checkpoint.sharding import named_global_parameters
    from megaglot.model import build_model_chunks, masked_mean
    from megaglot.model import fusions
    from megaglot.optim.grad_buffer import GradBuffer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", 0)
    hf_model = random_gpt_neox(7, rotary_pct=0.25, use_parallel_residual=True).to(device)
    tokens = torch.randint(0, 1003, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    labels = torch.randint(0, 1003, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    logits_ref = hf_model(input_ids=tokens).logits
    loss_ref = F.cross_entropy(logits_ref.reshape(-1, logits_ref.shape[-1]).float(), labels.reshape(-1))
    loss_ref.backward()
    grads_ref = {global_name(n): p.grad for n, p in hf_model.named_parameters()}

    cfg = model_config_from_hf(hf_model.config.to_dict(), attention_backend=backend)
    (chunk,) = build_model_chunks(cfg, device=device)
    _load(chunk, {k: v.cpu() for k, v in hf_model.state_dict().items()}, cfg)
    params = list(chunk.parameters())
    buffer = GradBuffer(params, dp_group=None)
    buffer.start_step(1)
    logits = chunk(None, {"tokens": tokens})[..., :cfg.vocab_size].transpose(0, 1)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4)
    losses = chunk(None, {"tokens": tokens, "labels": labels})
    loss = masked_mean(losses, torch.ones_like(losses))
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for name, param in named_global_parameters([chunk]):
        assert param.grad is None, name  # everything went into the fp32 buffer
        want = pad_vocab(grads_ref[name], name, cfg)
        torch.testing.assert_close(param.main_grad, want, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    return fusions.compiled_functions(), fusions.compiling_enabled()


@pytest.mark.parametrize("backend", ["sdpa", "fused", "torch"])
def test_fp32_model_matches_transformers_on_gpu(backend):
    (compiled, enabled), = run_distributed(_fp32_parity_worker, 1, backend, parallel=(1, 1))
    assert compiled == 2 and enabled, "the residual sum and bias-GELU were not compiled on CUDA"


def _bf16_worker(rank):
    from megaglot.config import get_model_preset
    from megaglot.model import build_model_chunks, masked_mean
    from megaglot.optim.grad_buffer import GradBuffer
    from megaglot.parallel import layers

    device = torch.device("cuda", 0)
    cfg = dataclasses.replace(get_model_preset("tiny"), hidden_dropout=0.0, attention_dropout=0.0,
                              attention_backend="sdpa")
    (fused,) = build_model_chunks(cfg, seed=3, params_dtype=torch.bfloat16, device=device)
    (plain,) = build_model_chunks(cfg, seed=3, params_dtype=torch.bfloat16, device=device)
    buffer = GradBuffer(list(fused.parameters()), dp_group=None)
    assert layers.accumulates_into_main_grad(fused.embed_out.weight), "no fp32-output GEMM on this GPU"
    buffer.start_step(2)
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):  # two microbatches accumulate
        batch = {"tokens": torch.randint(0, cfg.vocab_size, (2, 64), generator=gen).to(device),
                 "labels": torch.randint(0, cfg.vocab_size, (2, 64), generator=gen).to(device)}
        for chunk in (fused, plain):
            losses = chunk(None, batch)
            masked_mean(losses, torch.ones_like(losses)).backward()
    worst = 0.0
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert p.grad is None
        err = (p.main_grad - q.grad.float()).norm() / q.grad.float().norm().clamp_min(1e-12)
        worst = max(worst, float(err))
    return worst


def test_bf16_gradients_accumulate_in_fp32_on_gpu():
    (worst,) = run_distributed(_bf16_worker, 1, parallel=(1, 1))
    assert worst < 2e-2, f"relative gradient error {worst:.3g} between fused fp32 accumulation and bf16 autograd"
