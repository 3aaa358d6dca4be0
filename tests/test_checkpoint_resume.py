"""Checkpoints across optimizer implementations, ranks and nodes (docs/design.md "Running at scale").

1. Every optimizer implementation's step count survives a resume: an Adam that keeps `step` per
   param group (as apex's FusedAdam, chosen on CUDA) and torch's fused AdamW resume bit for bit.
2. At an unchanged TP size a rank reads only its own shards (counted at safetensors), and what it
   loads equals what was saved; at another layout the reshard-on-load path still loads it.
3. Files another rank wrote that rank 0 cannot see (node-local `--save`) stop the publish with one
   line; `latest` and the previous checkpoint stay as they were.
"""

import json
import os

import torch

from dist_harness import run_distributed
from test_training import SyntheticTokens, configs


class GroupStepAdamW(torch.optim.Optimizer):
    """AdamW that keeps `step` per param group and the moments per parameter, as apex's FusedAdam
    (adam_w_mode=True, bias correction on) does: the layout that made checkpoints record step 0."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, adam_w_mode=True):
        assert adam_w_mode
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            t, (b1, b2), lr = group["step"], group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


def group_step_adamw(groups, cfg, device_type):
    """What `_make_adamw` builds when apex is installed, with the stand-in in FusedAdam's place."""
    return GroupStepAdamW(groups, lr=0.0, adam_w_mode=True, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def torch_fused_adamw(groups, cfg, device_type):
    """torch's fused AdamW (the CUDA choice without apex; it also runs on CPU): `step` tensors."""
    return torch.optim.AdamW(groups, lr=0.0, fused=True, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def rank_state(run):
    """Every parameter and every optimizer piece of this rank, plus the step count it would save."""
    opt = run.optimizer
    params = {p.global_name: p.detach().clone() for c in run.chunks for p in c.parameters()}
    pieces = {(kind, pc.param.global_name, pc.flat_start): t.detach().clone()
              for kind, pc, t in opt.state_pieces()}
    return dict(params=params, pieces=pieces, step=opt.adam_step_count(), iteration=opt.iteration)


def assert_same_state(got, want, what):
    assert got["step"] == want["step"] and got["iteration"] == want["iteration"], what
    assert got["params"].keys() == want["params"].keys() and got["pieces"].keys() == want["pieces"].keys()
    for name, t in want["params"].items():
        assert torch.equal(got["params"][name], t), f"{what}: parameter {name} differs"
    for key, t in want["pieces"].items():
        assert torch.equal(got["pieces"][key], t), f"{what}: optimizer {key} differs"


# ---- 1. the step count of every optimizer implementation -------------------------------------
def _step_resume_worker(rank, root, variants):
    from megaglot.optim import optimizer as optimizer_module
    from megaglot.parallel import state
    from megaglot.training import pretrain

    original, out = optimizer_module._make_adamw, {}
    try:
        for name, make_adamw, tp, overrides in variants:
            optimizer_module._make_adamw = make_adamw
            runs = []
            for flags in (dict(save=os.path.join(root, name), save_interval=2),
                          dict(load=os.path.join(root, name, "iter_0000002"))):
                model, parallel, train = configs(tp, 1, None, False, train_iters=4, **overrides, **flags)
                result = pretrain(model, parallel, train, datasets=(SyntheticTokens(64, model.vocab_size), None, None))
                runs.append(dict(losses=result["losses"], **rank_state(result["run"])))
                state.destroy()
            out[name] = runs
    finally:
        optimizer_module._make_adamw = original
    return out


STEP_VARIANTS = [("group_step", group_step_adamw, 1, {}),
                 ("group_step_distributed", group_step_adamw, 1, {"use_distributed_optimizer": True}),
                 ("torch_fused_tp2", torch_fused_adamw, 2, {})]


def test_every_optimizer_implementation_resumes_exactly(tmp_path):
    """4 steps straight == 2 steps, save, load in a new run, 2 steps: losses, parameters, masters
    and both moments bit for bit (CPU, fp32), for a per-group-step Adam and torch's fused AdamW."""
    results = run_distributed(_step_resume_worker, 2, str(tmp_path), STEP_VARIANTS)
    for name, *_ in STEP_VARIANTS:
        with open(tmp_path / name / "iter_0000002" / "metadata.json") as f:
            assert json.load(f)["optimizer"]["step"] == 2, f"{name}: the saved Adam step count"
        for rank, by_variant in enumerate(results):
            full, resumed = by_variant[name]
            assert full["step"] == 4, f"{name}: Adam steps after 4 iterations"
            if full["losses"]:  # the last pipeline stage reports the loss
                assert resumed["losses"] == full["losses"][2:], f"{name}: resumed losses differ"
            assert_same_state(resumed, full, f"{name} rank {rank}")


# ---- 2. a rank reads only its own shards ------------------------------------------------------
class CountingHandle:
    """A safetensors handle that counts the values each read takes out of the file."""

    def __init__(self, handle, counter):
        self.handle, self.counter = handle, counter

    def get_tensor(self, key):
        t = self.handle.get_tensor(key)
        self.counter["values"] += t.numel()
        return t

    def get_slice(self, key):
        return CountingSlice(self.handle.get_slice(key), self.counter)

    def __getattr__(self, name):
        return getattr(self.handle, name)


class CountingSlice:
    def __init__(self, lazy, counter):
        self.lazy, self.counter = lazy, counter

    def __getitem__(self, index):
        t = self.lazy[index]
        self.counter["values"] += t.numel()
        return t

    def __getattr__(self, name):
        return getattr(self.lazy, name)


def _load_counting(directory, tp, pp, **overrides):
    """A fresh run at TP/PP loads `directory` while every value read from a file is counted."""
    from megaglot.checkpoint import format as format_module
    from megaglot.checkpoint.training_state import load_checkpoint
    from megaglot.training import build_run, init_distributed

    model, parallel, train = configs(tp, pp, None, False, train_iters=1, **overrides)
    run = build_run(model, parallel, train, init_distributed())
    counter, real = {"values": 0}, format_module.safe_open
    format_module.safe_open = lambda *a, **k: CountingHandle(real(*a, **k), counter)
    try:
        load_checkpoint(directory, chunks=run.chunks, optimizer=run.optimizer, model_cfg=model)
    finally:
        format_module.safe_open = real
    return run, counter["values"]


def _own_values(run):
    """What this rank holds: its parameters (TP-replicated ones once) and 3 x its optimizer ranges;
    and what assembling the full tensors of its parameters would read (the old path)."""
    params = list(p for c in run.chunks for p in c.parameters())
    own = sum(p.numel() for p in params) + 3 * sum(pc.flat_end - pc.flat_start for pc in run.optimizer.pieces)
    return own, 4 * sum(torch.Size(p.global_shape).numel() for p in params)


def _assert_matches_full_tensors(run, directory, what):
    """The loaded shards against slices of the reader's full tensors (the reshard-on-load path)."""
    from megaglot.checkpoint.format import MODEL, CheckpointReader
    from megaglot.parallel import state

    reader = CheckpointReader(directory)
    tp, rank = state.get_tensor_parallel_world_size(), state.get_tensor_parallel_rank()

    def expected(kind, p):
        full = reader.full_tensor(kind, p.global_name)
        return full if p.partition_dim is None else full.chunk(tp, dim=p.partition_dim)[rank]

    for p in (p for c in run.chunks for p in c.parameters()):
        assert torch.equal(p.detach(), expected(MODEL, p)), f"{what}: parameter {p.global_name}"
    for kind, pc, t in run.optimizer.state_pieces():
        want = expected(kind, pc.param).reshape(-1)[pc.flat_start:pc.flat_end]
        assert torch.equal(t.reshape(-1), want), f"{what}: {kind} of {pc.param.global_name}"
    assert run.optimizer.adam_step_count() == 1, what


def _shard_read_worker(rank, root):
    from megaglot.parallel import state
    from megaglot.training import pretrain

    out, layouts = {}, (("tp2pp2", 2, 2, {}), ("tp2dp2_distributed", 2, 1, {"use_distributed_optimizer": True}))
    for name, tp, pp, overrides in layouts:
        model, parallel, train = configs(tp, pp, None, False, train_iters=1, save=os.path.join(root, name), **overrides)
        data = (SyntheticTokens(64, model.vocab_size), None, None)
        saved = rank_state(pretrain(model, parallel, train, datasets=data)["run"])
        state.destroy()
        run, read = _load_counting(os.path.join(root, name), tp, pp, **overrides)
        out[name] = dict(read=read, own=_own_values(run))
        assert_same_state(rank_state(run), saved, f"{name} loaded at its own layout")
        state.destroy()
    directory = os.path.join(root, "tp2dp2_distributed", "iter_0000001")
    # Same TP, other DP and no distributed optimizer: ranges cut across the saved DP pieces.
    run, out["dp_changed_read"] = _load_counting(directory, 2, 2)
    _assert_matches_full_tensors(run, directory, "TP2 DP2 distributed -> TP2 PP2")
    out["dp_changed_own"] = _own_values(run)[0]
    state.destroy()
    run, _ = _load_counting(directory, 1, 2)  # another TP size: reshard on load
    _assert_matches_full_tensors(run, directory, "TP2 DP2 distributed -> TP1 PP2 DP2")
    state.destroy()
    return out


def test_each_rank_reads_only_its_own_shards(tmp_path):
    """4 ranks, TP2 x PP2 and TP2 x DP2 with the distributed optimizer: loading at the saved layout
    reads, per rank, exactly its parameters (replicated ones once) plus its optimizer ranges x 3,
    not the full model, and restores the saved state bit for bit; loading at another DP size or TP
    size gives the slices of the full tensors."""
    results = run_distributed(_shard_read_worker, 4, str(tmp_path), timeout=300)
    for rank, r in enumerate(results):
        for name in ("tp2pp2", "tp2dp2_distributed"):
            read, (own, full) = r[name]["read"], r[name]["own"]
            assert read == own, f"{name} rank {rank}: read {read} values from the files, holds {own}"
            # TP2 halves the split tensors (x 1/2 again for the distributed optimizer's ranges)
            assert own < 0.55 * full, f"{name} rank {rank}: full tensors of its parameters are {full} values"
        assert r["dp_changed_read"] == r["dp_changed_own"], f"rank {rank}: DP-changed load read more than its ranges"


# ---- 3. rank 0 publishes only what it can see -------------------------------------------------
def _node_local_worker(rank, root):
    """TP2 on 2 ranks: iteration 2 saves normally; for iteration 4 rank 1's model file lands on a
    disk only rank 1 sees (moved to a private directory after writing), as on node-local --save."""
    from megaglot.checkpoint import format as format_module
    from megaglot.checkpoint.format import CheckpointError
    from megaglot.checkpoint.training_state import load_checkpoint, save_checkpoint
    from megaglot.training import build_run, init_distributed

    model, parallel, train = configs(2, 1, None, False)
    run = build_run(model, parallel, train, init_distributed())
    save = dict(chunks=run.chunks, optimizer=run.optimizer, model_cfg=model)
    save_checkpoint(root, iteration=2, consumed_samples=16, **save)
    saved = rank_state(run)
    with torch.no_grad():
        for p in (p for c in run.chunks for p in c.parameters()):
            p.add_(1.0)  # what a published iteration 4 would hold
    real_write, error = format_module.PieceWriter.write, None

    def node_local_write(writer):
        written = real_write(writer)
        if writer.part.startswith("model_"):
            private = os.path.join(root, "rank1_local_disk")
            os.makedirs(private, exist_ok=True)
            os.replace(os.path.join(writer.directory, f"{writer.part}.safetensors"),
                       os.path.join(private, f"{writer.part}.safetensors"))
        return written

    if rank == 1:
        format_module.PieceWriter.write = node_local_write
    try:
        save_checkpoint(root, iteration=4, consumed_samples=32, **save)
    except CheckpointError as e:
        error = str(e)
    finally:
        format_module.PieceWriter.write = real_write
    fresh = build_run(model, parallel, train, init_distributed())
    meta = load_checkpoint(root, chunks=fresh.chunks, optimizer=fresh.optimizer, model_cfg=model)
    assert_same_state(rank_state(fresh), saved, "the previous checkpoint after the failed publish")
    return dict(error=error, iteration=meta["iteration"])


def test_files_rank_0_cannot_see_stop_the_publish(tmp_path):
    results = run_distributed(_node_local_worker, 2, str(tmp_path))
    staged = tmp_path / "iter_0000004.tmp" / "model_tp01_pp00.safetensors"
    for r in results:  # every rank fails, with one line naming the file, its writer and the fix
        assert r["error"] is not None and "\n" not in r["error"], r["error"]
        assert f"{staged}, written by rank 1, is missing" in r["error"], r["error"]
        assert "--save must be on a filesystem all nodes share" in r["error"], r["error"]
        assert r["iteration"] == 2
    assert (tmp_path / "latest").read_text().strip() == "iter_0000002"
    assert not (tmp_path / "iter_0000004").exists()
