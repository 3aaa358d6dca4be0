"""Tensor-parallel layers against plain torch.nn built from the gathered weights.

float32 (except the half-precision cross-entropy check); tolerance rtol 1e-5, atol 1e-6 (collectives sum partial products in another
order than one matmul, so results agree to round-off, not bit for bit).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_harness import run_distributed
from megaglot.parallel import comm, state
from megaglot.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaglot.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                      seeded_normal_init)
from megaglot.parallel.random import checkpoint, get_rng_tracker, model_parallel_seed

TOL = dict(rtol=1e-5, atol=1e-6)
S, B, H, F_OUT, VOCAB = 8, 2, 16, 24, 40


def close(a, b, what):
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def gather(x, dim):
    """Concatenate every TP rank's piece along dim."""
    group = state.get_tensor_parallel_group()
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return torch.cat(pieces, dim=dim)


def shard(x, dim):
    return x.chunk(state.get_tensor_parallel_world_size(), dim=dim)[state.get_tensor_parallel_rank()]


def data(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def check_column(sp, gather_output):
    layer = ColumnParallelLinear(H, F_OUT, gather_output=gather_output, sequence_parallel=sp,
                                 init_method=seeded_normal_init(0.5, 11))
    with torch.no_grad():
        layer.bias.copy_(shard(data(12, F_OUT), 0))
    x_full, r_full = data(1, S, B, H), data(2, S, B, F_OUT)
    ref = torch.nn.Linear(H, F_OUT)
    with torch.no_grad():
        ref.weight.copy_(gather(layer.weight.detach(), 0))
        ref.bias.copy_(data(12, F_OUT))
    x_ref = x_full.clone().requires_grad_()
    (ref(x_ref) * r_full).sum().backward()

    x = (shard(x_full, 0) if layer.sequence_parallel else x_full).clone().requires_grad_()
    out, _ = layer(x)
    r = r_full if gather_output else shard(r_full, -1)
    (out * r).sum().backward()
    full_out = out if gather_output else gather(out, -1)
    close(full_out, ref(x_full), "column output")
    close(x.grad, shard(x_ref.grad, 0) if layer.sequence_parallel else x_ref.grad, "column input grad")
    close(layer.weight.grad, shard(ref.weight.grad, 0), "column weight grad")
    close(layer.bias.grad, shard(ref.bias.grad, 0), "column bias grad")


def check_row(sp, input_is_parallel):
    layer = RowParallelLinear(F_OUT, H, input_is_parallel=input_is_parallel, sequence_parallel=sp,
                              init_method=seeded_normal_init(0.5, 21))
    with torch.no_grad():
        layer.bias.copy_(data(22, H))
    x_full, r_full = data(3, S, B, F_OUT), data(4, S, B, H)
    ref = torch.nn.Linear(F_OUT, H)
    with torch.no_grad():
        ref.weight.copy_(gather(layer.weight.detach(), 1))
        ref.bias.copy_(data(22, H))
    x_ref = x_full.clone().requires_grad_()
    (ref(x_ref) * r_full).sum().backward()

    x = (shard(x_full, -1) if input_is_parallel else x_full).clone().requires_grad_()
    out, _ = layer(x)
    r = shard(r_full, 0) if layer.sequence_parallel else r_full
    (out * r).sum().backward()
    if layer.sequence_parallel:  # replicated bias fed a sequence slice: its grad is partial
        assert layer.bias.sequence_parallel
        dist.all_reduce(layer.bias.grad, group=state.get_tensor_parallel_group())
        out = gather(out, 0)
    close(out, ref(x_full), "row output")
    close(x.grad, shard(x_ref.grad, -1) if input_is_parallel else x_ref.grad, "row input grad")
    close(layer.weight.grad, shard(ref.weight.grad, 1), "row weight grad")
    close(layer.bias.grad, ref.bias.grad, "row bias grad")


def check_embedding(sp):
    layer = VocabParallelEmbedding(VOCAB, H, sequence_parallel=sp, init_method=seeded_normal_init(1.0, 31))
    ids = torch.randint(0, VOCAB, (S, B), generator=torch.Generator().manual_seed(5))
    r_full = data(6, S, B, H)
    ref = torch.nn.Embedding(VOCAB, H)
    with torch.no_grad():
        ref.weight.copy_(gather(layer.weight.detach(), 0))
    (ref(ids) * r_full).sum().backward()
    out = layer(ids)
    r = shard(r_full, 0) if layer.sequence_parallel else r_full
    (out * r).sum().backward()
    if layer.sequence_parallel:
        out = gather(out, 0)
    close(out, ref(ids), "embedding output")
    close(layer.weight.grad, shard(ref.weight.grad, 0), "embedding weight grad")


def check_cross_entropy(label_smoothing):
    vocab_real = VOCAB - 3  # the last 3 columns are padding
    logits_full = data(7, S, B, VOCAB) * 3
    labels = torch.randint(0, vocab_real, (S, B), generator=torch.Generator().manual_seed(8))
    labels[0, 0] = labels[5, 1] = -100  # masked labels
    weights = data(9, S, B)
    ref_logits = logits_full[..., :vocab_real].clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_logits.reshape(-1, vocab_real), labels.reshape(-1), reduction="none",
                               label_smoothing=label_smoothing).view(S, B)
    (ref_loss * weights).sum().backward()
    ref_grad = torch.cat([ref_logits.grad, torch.zeros(S, B, VOCAB - vocab_real)], dim=-1)

    # Huge logits in the padded columns must not receive probability.
    logits_full = logits_full.clone()
    logits_full[..., vocab_real:] = 1e4
    local = shard(logits_full, -1).clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, labels, vocab_size=vocab_real, label_smoothing=label_smoothing)
    (loss * weights).sum().backward()
    close(loss, ref_loss, f"cross entropy loss (smoothing {label_smoothing})")
    close(local.grad, shard(ref_grad, -1), f"cross entropy grad (smoothing {label_smoothing})")


def dropout_block(x, weight):
    y = torch.nn.functional.dropout(x @ weight, p=0.5, training=True)  # default (replicated) stream
    with get_rng_tracker().fork():
        y = torch.nn.functional.dropout(torch.tanh(y), p=0.3, training=True)  # per-TP-rank stream
    return y


def check_recompute():
    model_parallel_seed(1234)
    x = data(10, S, H).requires_grad_()
    w = data(11, H, H).requires_grad_()
    rng = (torch.get_rng_state(), get_rng_tracker().get_states())
    plain = dropout_block(x, w)
    plain.sum().backward()
    grads = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    torch.set_rng_state(rng[0])
    get_rng_tracker().set_states(rng[1])
    recomputed = checkpoint(dropout_block, x, w)
    after_forward = torch.get_rng_state()
    recomputed.sum().backward()
    assert torch.equal(torch.get_rng_state(), after_forward), "backward recomputation moved the RNG"
    assert torch.equal(plain, recomputed)
    assert torch.equal(x.grad, grads[0]) and torch.equal(w.grad, grads[1])
    # The tracker stream differs per TP rank; the default stream matches.
    with get_rng_tracker().fork():
        tp_draw = torch.rand(4)
    default_draw = torch.rand(4)
    return tp_draw, default_draw


def _layers_worker(rank):
    results = {}
    for tp in (4, 2, 1):
        state.initialize(tp, 1)
        for sp in (False, True):
            for gather_output in ((False, True) if not sp else (False,)):
                check_column(sp, gather_output)
            for input_is_parallel in ((True, False) if not sp else (True,)):
                check_row(sp, input_is_parallel)
            check_embedding(sp)
        for eps in (0.0, 0.1):
            check_cross_entropy(eps)
        tp_draw, default_draw = check_recompute()
        # Layout-independent initialization: gather full weights at this TP size.
        col = ColumnParallelLinear(H, F_OUT, init_method=seeded_normal_init(0.02, 77))
        row = RowParallelLinear(F_OUT, H, init_method=seeded_normal_init(0.02, 78))
        emb = VocabParallelEmbedding(VOCAB, H, init_method=seeded_normal_init(0.02, 79))
        results[tp] = dict(col=gather(col.weight.detach(), 0), row=gather(row.weight.detach(), 1),
                           emb=gather(emb.weight.detach(), 0), tp_rank=state.get_tensor_parallel_rank(),
                           tp_draw=tp_draw, default_draw=default_draw)
        state.destroy()
    return results


def test_layers_cross_entropy_recompute_and_init_at_tp_1_2_4():
    results = run_distributed(_layers_worker, 4)
    for name in ("col", "row", "emb"):
        for tp in (2, 4):
            assert torch.equal(results[0][tp][name], results[0][1][name]), f"{name} init differs at tp={tp}"
    # tracker: differs across TP ranks, default stream equal across TP ranks
    r4 = [r[4] for r in results]
    assert not torch.equal(r4[0]["tp_draw"], r4[1]["tp_draw"])
    assert all(torch.equal(r4[0]["default_draw"], r["default_draw"]) for r in r4)


def _comm_worker(rank):
    """Each autograd pair's backward is the adjoint of its forward: <f(x), g> == <x, f*(g)>.

    A replicated tensor ('rep') holds the same values on every TP rank and counts once in an
    inner product; a distinct one ('dist': a shard or a per-rank partial) counts on every rank.
    """
    tp_group = state.get_tensor_parallel_group()
    pairs = {  # name: (fn, kind of x, kind of y)
        "copy": (comm.copy_to_tensor_parallel, "rep", "dist"),
        "reduce": (comm.reduce_from_tensor_parallel, "dist", "rep"),
        "scatter": (comm.scatter_to_tensor_parallel, "rep", "dist"),
        "gather": (comm.gather_from_tensor_parallel, "dist", "rep"),
        "sp_scatter": (comm.scatter_to_sequence_parallel, "rep", "dist"),
        "sp_gather": (comm.gather_from_sequence_parallel, "dist", "dist"),
        "sp_reduce_scatter": (comm.reduce_scatter_to_sequence_parallel, "dist", "dist"),
    }

    def inner(a, b, kind):
        value = (a * b).sum().reshape(1)
        if kind == "dist":
            dist.all_reduce(value, group=tp_group)
        return value

    for name, (fn, x_kind, y_kind) in pairs.items():
        x = data(100 + (rank if x_kind == "dist" else 0), 8, 2, 8).requires_grad_()
        y = fn(x)
        g = data(200 + (rank if y_kind == "dist" else 0), *y.shape)
        y.backward(g)
        close(inner(y.detach(), g, y_kind), inner(x.detach(), x.grad, x_kind), f"{name} adjoint")
    return True


def test_collectives_are_adjoint_pairs():
    assert all(run_distributed(_comm_worker, 4, parallel=(4, 1)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cross_entropy_half_logits_with_padded_columns(dtype):
    """bf16/fp16 logits (the GPU case) take the in-place masking of the padded columns on the fp32
    copy: losses and gradient equal F.cross_entropy on the real columns, and the input is unchanged."""
    gen = torch.Generator().manual_seed(0)
    vocab, padded = 37, 48
    logits = (torch.randn(5, 3, padded, generator=gen) * 4).to(dtype).requires_grad_(True)
    before = logits.detach().clone()
    labels = torch.randint(0, vocab, (5, 3), generator=gen)
    losses = vocab_parallel_cross_entropy(logits, labels, vocab_size=vocab)
    ref_logits = logits.detach().float()[..., :vocab].requires_grad_(True)
    ref = F.cross_entropy(ref_logits.reshape(-1, vocab), labels.reshape(-1), reduction="none").view(5, 3)
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(5, 3, generator=gen)
    losses.backward(grad)
    ref.backward(grad)
    assert torch.equal(logits.detach(), before)
    torch.testing.assert_close(logits.grad[..., :vocab].float(), ref_logits.grad, rtol=1e-2, atol=1e-3)
    assert (logits.grad[..., vocab:] == 0).all()
