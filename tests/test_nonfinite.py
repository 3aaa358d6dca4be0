"""A non-finite loss or gradient skips the step in every precision, on every rank, and too many
skips in a row stop the run (issue 17, "NaN, inf and corruption").

A gradient hook turns one parameter's gradient into nan on chosen steps (on one rank only in the
2-rank runs). A skipped step must leave parameters, fp32 masters, Adam's moments and step count
bit for bit unchanged, count the skip, and keep every rank identical; the next clean step must
update exactly as if the skipped batch had never been seen (constant LR, so the advanced schedule
clock does not change the LR). --max-skipped-steps skips in a row raise TrainingDiverged with one
line; fp16 counts only the skips a lower loss scale cannot fix.
"""

import re

import numpy as np
import pytest
import torch

from dist_harness import run_distributed
from megaglot.config import ParallelConfig, TrainConfig, get_model_preset
from megaglot.config.cli import with_fields
from test_training import SEQ, SyntheticTokens


def _build(precision, tp=1, pp=1, **overrides):
    from megaglot.training import build_run, init_distributed

    model = get_model_preset("tiny-test")
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    fields = dict(micro_batch_size=2, global_batch_size=4, seq_length=SEQ, train_iters=100, eval_interval=0,
                  log_interval=100, lr=1e-3, lr_warmup_iters=0, lr_decay_style="constant", clip_grad=1.0, seed=5,
                  precision=precision)
    train = with_fields(TrainConfig(), **{**fields, **overrides})
    return build_run(model, parallel, train, init_distributed())


def _batches(run, step):
    """This DP rank's microbatches of global batch `step`."""
    from megaglot.parallel import state

    data = SyntheticTokens(64, run.model_cfg.vocab_size, seed=step)
    dp, rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
    items = [data[i] for i in range(rank, run.train_cfg.global_batch_size, dp)]
    mb = run.train_cfg.micro_batch_size
    return [{k: torch.as_tensor(np.stack([x[k] for x in items[i:i + mb]])) for k in items[0]}
            for i in range(0, len(items), mb)]


def _poisoner(param):
    """A switch: while on, `param`'s gradient is nan."""
    switch = {"on": False}
    param.register_hook(lambda g: torch.full_like(g, float("nan")) if switch["on"] else g)
    return switch


def snapshot(run):
    """Everything a step may change: parameters, masters, Adam state, counters."""
    opt = run.optimizer
    out = {f"param {n}": p.detach().clone() for c in run.chunks for n, p in c.named_parameters()}
    for i, pc in enumerate(opt.pieces):
        out[f"master {i}"] = pc.master.detach().clone()
        for key, value in opt.adam.state.get(pc.master, {}).items():
            out[f"adam {i} {key}"] = value.detach().clone() if torch.is_tensor(value) else value
    out["adam_steps"], out["iteration"], out["num_skipped"] = opt.adam_steps, opt.iteration, opt.num_skipped
    return out


def changed(before, after):
    return sorted(k for k in before if not (torch.equal(before[k], after[k]) if torch.is_tensor(before[k])
                                            else before[k] == after[k]))


def _one_precision(precision):
    """Clean, poisoned, clean against clean, clean; then a nan loss alone; then divergence."""
    from megaglot.training import run as run_module
    from megaglot.training.run import TrainingDiverged, train_step

    out = {}
    run = _build(precision, max_skipped_steps=3, initial_loss_scale=1.0)
    switch = _poisoner(next(run.chunks[0].parameters()))
    train_step(run, _batches(run, 0))
    before = snapshot(run)
    switch["on"] = True
    stats = train_step(run, _batches(run, 1))
    switch["on"] = False
    after = snapshot(run)
    out["skip"] = dict(stats=stats, changed=changed(before, after), num_skipped=run.optimizer.num_skipped,
                       in_a_row=run.optimizer.skipped_in_a_row)
    stats = train_step(run, _batches(run, 2))
    out["next"] = dict(skipped=stats["skipped"], in_a_row=run.optimizer.skipped_in_a_row,
                       adam_steps=run.optimizer.adam_steps, params=snapshot(run))
    reference = _build(precision, initial_loss_scale=1.0)  # never sees batch 1
    train_step(reference, _batches(reference, 0))
    train_step(reference, _batches(reference, 2))
    out["reference"] = snapshot(reference)

    # A non-finite loss alone (clean gradients) skips too: the loss is reduced before the step.
    real = run_module.loss_everywhere
    run_module.loss_everywhere = lambda loss, device: real(loss, device) * float("inf")
    before = snapshot(run)
    try:
        stats = train_step(run, _batches(run, 3))
    finally:
        run_module.loss_everywhere = real
    out["loss_only"] = dict(stats=stats, changed=changed(before, snapshot(run)))

    # Three in a row stop the run; the weights are untouched.
    train_step(run, _batches(run, 4))
    before = snapshot(run)
    switch["on"] = True
    for step in (5, 6):
        train_step(run, _batches(run, step))
    with pytest.raises(TrainingDiverged) as info:
        train_step(run, _batches(run, 7))
    out["diverged"] = dict(message=str(info.value), changed=changed(before, snapshot(run)))
    return out


def _fp16_floor():
    """fp16 from loss scale 4 down to --min-loss-scale 1: the two back-offs do not count, the
    overflows at the floor do."""
    from megaglot.training.run import TrainingDiverged, train_step

    run = _build("fp16", max_skipped_steps=2, initial_loss_scale=4.0, min_loss_scale=1.0)
    switch = _poisoner(next(run.chunks[0].parameters()))
    train_step(run, _batches(run, 0))
    before, scales = snapshot(run), []
    switch["on"] = True
    for step in (1, 2, 3):
        train_step(run, _batches(run, step))
        scales.append((run.optimizer.loss_scale, run.optimizer.hopeless_in_a_row))
    with pytest.raises(TrainingDiverged) as info:
        train_step(run, _batches(run, 4))
    return dict(scales=scales, message=str(info.value), changed=changed(before, snapshot(run)))


COUNTERS = ["iteration", "num_skipped"]


@pytest.fixture(scope="module")
def results():
    """Every check in one 2-rank spawn (a spawn costs seconds of imports)."""
    return run_distributed(_worker, 2)


def by_rank(results, key):
    return [(rank, res[key]) for rank, res in enumerate(results)]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_nan_gradient_skips_the_step_and_the_next_step_is_exact(results, precision):
    for rank, res in by_rank(results, precision):
        skip = res["skip"]
        assert skip["stats"]["skipped"] and skip["num_skipped"] == 1 and skip["in_a_row"] == 1, rank
        assert np.isnan(skip["stats"]["grad_norm"]) and np.isfinite(skip["stats"]["loss"]), skip["stats"]
        assert skip["changed"] == COUNTERS, f"rank {rank}: a skipped step changed {skip['changed']}"
        nxt = res["next"]
        assert not nxt["skipped"] and nxt["in_a_row"] == 0 and nxt["adam_steps"] == 2, rank
        got, want = nxt["params"], res["reference"]
        # Only the clock and the skip count differ from a run that never saw the batch: every
        # parameter, master and Adam moment is bit-identical.
        assert changed(want, got) == COUNTERS, f"rank {rank}: {changed(want, got)}"
        assert (got["iteration"], got["num_skipped"], want["iteration"]) == (3, 1, 2)
    a, b = (res[precision]["next"]["params"] for res in results)
    assert not changed(a, b), "the DP replicas differ"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_non_finite_loss_alone_skips_the_step(results, precision):
    for rank, res in by_rank(results, precision):
        res = res["loss_only"]
        assert res["stats"]["skipped"] and res["stats"]["loss"] == float("inf"), res["stats"]
        assert np.isfinite(res["stats"]["grad_norm"]), "the gradients were clean: the loss alone skipped"
        assert res["changed"] == COUNTERS, f"rank {rank}: {res['changed']}"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_max_skipped_steps_in_a_row_stops_the_run_with_one_line(results, precision):
    fp16 = " (fp16: at --min-loss-scale)" if precision == "fp16" else ""
    want = re.escape(
        f"iteration 8: 3 consecutive steps skipped for a non-finite loss or gradient norm{fp16} "
        "(--max-skipped-steps 3; last loss @, grad norm nan); the weights are those of iteration 5 and no "
        "checkpoint holds a non-finite value; lower --lr, or resume from an earlier checkpoint with --load")
    for rank, res in by_rank(results, precision):
        res = res["diverged"]
        assert re.fullmatch(want.replace("@", r"\d+\.\d+"), res["message"]), res["message"]
        assert res["changed"] == COUNTERS, f"rank {rank}: {res['changed']}"


def test_fp16_counts_only_the_overflows_at_the_minimum_loss_scale(results):
    for rank, res in by_rank(results, "fp16 floor"):
        assert res["scales"] == [(2.0, 0), (1.0, 0), (1.0, 1)]  # (scale after the step, counted in a row)
        assert res["message"].startswith("iteration 5: 2 consecutive steps skipped for a non-finite loss or "
                                         "gradient norm (fp16: at --min-loss-scale) (--max-skipped-steps 2;")
        assert "the weights are those of iteration 1 " in res["message"]
        assert res["changed"] == COUNTERS, f"rank {rank}: {res['changed']}"


# ---------------------------------------------------------------------- two ranks, nan on one of them

LAYOUTS = {  # name: (tp, pp, precision, overrides, which parameter rank 1 poisons)
    "DP=2 distributed optimizer": (1, 1, "bf16", {"use_distributed_optimizer": True}, "first"),
    "DP=2": (1, 1, "fp32", {}, "first"),
    # A TP-replicated LayerNorm weight: counted in the norm by TP rank 0 only, poisoned on rank 1.
    "TP=2": (2, 1, "bf16", {}, "replicated"),
    "PP=2": (1, 2, "fp32", {}, "first"),
}


def _one_rank_poisoned(rank):
    from megaglot.parallel import state
    from megaglot.training.run import train_step

    out = {}
    for name, (tp, pp, precision, overrides, which) in LAYOUTS.items():
        run = _build(precision, tp, pp, global_batch_size=8 if tp * pp == 1 else 4, **overrides)
        params = [p for c in run.chunks for p in c.parameters()]
        victim = params[0] if which == "first" else next(p for p in params if p.partition_dim is None)
        switch = _poisoner(victim)
        train_step(run, _batches(run, 0))
        before = snapshot(run)
        switch["on"] = rank == 1
        stats = train_step(run, _batches(run, 1))
        switch["on"] = False
        after = snapshot(run)
        stats2 = train_step(run, _batches(run, 2))
        out[name] = dict(skipped=(stats["skipped"], stats2["skipped"]), changed=changed(before, after),
                         params={n: p.detach().clone() for c in run.chunks for n, p in c.named_parameters()},
                         moved=changed(after, snapshot(run)))
        state.destroy()
    return out


def _worker(rank):
    """DP=2 runs of each precision (the nan on both ranks), then layouts with the nan on rank 1 only."""
    from megaglot.parallel import state

    out = {}
    for precision in ("fp32", "bf16", "fp16"):
        out[precision] = _one_precision(precision)
        state.destroy()
    out["fp16 floor"] = _fp16_floor()
    state.destroy()
    out["one rank"] = _one_rank_poisoned(rank)
    return out


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(results):
    results = [res["one rank"] for res in results]
    for name, (tp, pp, *_rest) in LAYOUTS.items():
        for rank, res in enumerate(results):
            r = res[name]
            assert r["skipped"] == (True, False), f"{name}, rank {rank}: skipped {r['skipped']}"
            assert r["changed"] == ["iteration", "num_skipped"], f"{name}, rank {rank}: {r['changed']}"
            assert any(k.startswith("param ") for k in r["moved"]), f"{name}, rank {rank}: the clean step did not move"
        a, b = results[0][name]["params"], results[1][name]["params"]
        if tp * pp == 1:  # DP replicas stay identical
            assert all(torch.equal(a[n], b[n]) for n in a), f"{name}: the DP replicas differ"
