"""megaglot's GPT-NeoX against transformers.GPTNeoXForCausalLM: logits, loss and every gradient.

Random small configs (odd vocabulary, rotary_pct 0.25 and 0.5, parallel residual on and off) at
TP = 1, 2, 4, sequence parallel off and on, each attention backend. float32; logits and loss to
rtol 1e-5 / atol 1e-5, gradients to rtol 1e-4 / atol 1e-6 (sums over the batch in another order).
"""

import pytest
import torch
import torch.nn.functional as F

from dist_harness import run_distributed
from hf_models import random_gpt_neox
from megaglot.checkpoint.hf import global_name, lookup, model_config_from_hf, pad_vocab
from megaglot.checkpoint.sharding import gather_full_tensor, load_full_tensors, named_global_parameters
from megaglot.config import get_model_preset, model_presets
from megaglot.model import build_model_chunks, masked_mean
from megaglot.parallel import state
from megaglot.parallel.layers import reduce_sequence_parallel_gradients

HF_CONFIGS = [
    dict(rotary_pct=0.25, use_parallel_residual=True, hidden_act="gelu"),
    dict(rotary_pct=0.5, use_parallel_residual=False, hidden_act="gelu_new"),
]


def make_hf_model(overrides, seed):
    return random_gpt_neox(seed, **overrides)


def hf_reference(model, tokens, labels):
    model.zero_grad()
    logits = model(input_ids=tokens).logits  # [b, s, V]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    loss.backward()
    grads = {global_name(n): p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def _parity_worker(rank):
    checked = 0
    for i, overrides in enumerate(HF_CONFIGS):
        hf_model = make_hf_model(overrides, seed=10 + i)
        cfg_dict = hf_model.config.to_dict()
        tokens = torch.randint(0, 1003, (2, 12), generator=torch.Generator().manual_seed(i))
        labels = torch.randint(0, 1003, (2, 12), generator=torch.Generator().manual_seed(100 + i))
        ref_logits, ref_loss, ref_grads = hf_reference(hf_model, tokens, labels)
        hf_state = hf_model.state_dict()
        for tp in (4, 2, 1):
            state.initialize(tp, 1)
            for sp in ((False, True) if tp > 1 else (False,)):
                for backend in (("torch", "sdpa", "fused") if not sp else ("fused",)):
                    cfg = model_config_from_hf(cfg_dict, attention_backend=backend)
                    (chunk,) = build_model_chunks(cfg, sequence_parallel=sp)
                    load_full_tensors([chunk], lambda n: pad_vocab(lookup(hf_state, n), n, cfg))
                    # logits
                    logits = chunk(None, {"tokens": tokens})  # [s, b, V/tp]
                    full = gather_full_tensor_like(logits)[..., :cfg.vocab_size].transpose(0, 1)
                    torch.testing.assert_close(full, ref_logits, rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"logits tp={tp} sp={sp} {backend} cfg{i}: {m}")
                    # loss and gradients
                    losses = chunk(None, {"tokens": tokens, "labels": labels})
                    loss = masked_mean(losses, torch.ones_like(losses))
                    loss.backward()
                    reduce_sequence_parallel_gradients(chunk.parameters())
                    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
                    for name, param in named_global_parameters([chunk]):
                        grad = param.grad
                        grad.partition_dim = param.partition_dim
                        full_grad = gather_full_tensor(grad)
                        want = pad_vocab(ref_grads[name], name, cfg)
                        torch.testing.assert_close(full_grad, want, rtol=1e-4, atol=1e-6,
                                                   msg=lambda m: f"grad {name} tp={tp} sp={sp} {backend}: {m}")
                    checked += 1
            state.destroy()
    return checked


def gather_full_tensor_like(logits):
    logits.partition_dim = logits.dim() - 1
    return gather_full_tensor(logits)


def test_logits_loss_and_gradients_equal_transformers_at_tp_1_2_4():
    pytest.importorskip("transformers")
    counts = run_distributed(_parity_worker, 4, timeout=400)
    assert counts[0] == len(HF_CONFIGS) * (3 + 3 + 1 + 3 + 1)


PARAMETER_COUNTS = {
    "polyglot-ko-1.3b": 1_331_810_304,
    "polyglot-ko-3.8b": 3_809_974_272,
    "polyglot-ko-5.8b": 5_885_059_072,
    "polyglot-ko-12.8b": 12_893_603_840,
}


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_preset_parameter_counts_on_meta_device(name):
    cfg = get_model_preset(name)
    (chunk,) = build_model_chunks(cfg, device="meta")
    assert sum(p.numel() for p in chunk.parameters()) == PARAMETER_COUNTS[name] == cfg.num_parameters()
    assert cfg.rotary_ndims == 64 and cfg.padded_vocab_size == 30080


def test_presets_match_published_shapes():
    p = model_presets()
    assert (p["polyglot-ko-5.8b"].head_dim, p["polyglot-ko-5.8b"].rotary_pct) == (256, 0.25)
    assert all(p[n].use_parallel_residual and not p[n].tie_word_embeddings for n in PARAMETER_COUNTS)
