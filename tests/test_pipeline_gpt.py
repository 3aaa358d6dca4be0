"""GPT-NeoX through interleaved 1F1B (p=2, v=2) with TP=2 and sequence parallel, against one process.

One 8-rank spawn (DP = 2 replicas running the same data): the reference is the same seeded model
built at TP = PP = 1 on each rank, over the whole global batch; the pipelined run splits that
batch into M = 4 microbatches of equal token counts, so the mean of the microbatch losses equals
the global masked mean. Loss and every parameter gradient must agree (float32, rtol 1e-5, atol 1e-6).
"""

import torch
import torch.distributed as dist

from dist_harness import run_distributed
from megaglot.config import get_model_preset
from megaglot.model import build_model_chunks, masked_mean
from megaglot.parallel import state
from megaglot.pipeline import ScheduleStats, forward_backward

TOL = dict(rtol=1e-5, atol=1e-6)
M, B, S = 4, 2, 16


def batches(vocab):
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(M):
        tokens = torch.randint(0, vocab, (B, S), generator=gen)
        labels = torch.randint(0, vocab, (B, S), generator=gen)
        out.append({"tokens": tokens, "labels": labels, "loss_mask": torch.ones(B, S)})
    return out


def forward_step(chunk, input_tensor, mb):
    out = chunk(input_tensor, mb)
    if chunk.post_process:  # the model's last chunk (it knows from construction)
        return masked_mean(out, mb["loss_mask"])
    return out


def gpt_worker(rank):
    cfg = get_model_preset("tiny-test")  # 4 layers: one per global chunk at p x v = 4
    mbs = batches(cfg.vocab_size)

    state.initialize(1, 1)
    (ref,) = build_model_chunks(cfg, seed=99)
    full = {k: torch.cat([mb[k] for mb in mbs], dim=0) for k in mbs[0]}
    ref_loss = masked_mean(ref(None, full), full["loss_mask"])
    ref_loss.backward()
    ref_grads = {p.global_name: p.grad for p in ref.parameters()}
    state.destroy()

    tp, pp, vp = 2, 2, 2
    state.initialize(tp, pp, vp)
    chunks = build_model_chunks(cfg, seed=99, sequence_parallel=True)
    stats = ScheduleStats()
    loss = forward_backward(chunks, mbs, forward_step, tensor_shape=(S // tp, B, cfg.hidden_size),
                            dtype=torch.float32, stats=stats)
    if state.is_pipeline_last_stage():
        torch.testing.assert_close(loss, ref_loss.detach(), **TOL)
    else:
        assert loss is None
    assert stats.max_live_total <= stats.bound
    checked = []
    tp_rank = state.get_tensor_parallel_rank()
    for chunk in chunks:
        for param in chunk.parameters():
            grad = param.grad.clone()
            if getattr(param, "sequence_parallel", False):
                dist.all_reduce(grad, group=state.get_tensor_parallel_group())
            want = ref_grads[param.global_name]
            if param.partition_dim is not None:
                want = want.chunk(tp, dim=param.partition_dim)[tp_rank]
            torch.testing.assert_close(grad, want, **TOL, msg=lambda m: f"{param.global_name}: {m}")
            checked.append(param.global_name)
    state.destroy()
    return checked


def test_gpt_neox_interleaved_tp_sp_matches_single_process():
    results = run_distributed(gpt_worker, 8, timeout=300)
    names = set().union(*results)
    assert {"embed_in.weight", "embed_out.weight", "final_layer_norm.weight"} <= names
    assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {"0", "1", "2", "3"}
