"""Training equivalences: every parallel layout trains like one process, and one process trains like
transformers' GPT-NeoX stepped by torch.optim.AdamW from the same weights (the last test).

Synthetic token data, the tiny-test model (4 layers, h 64), fp32, 3 steps of AdamW with clipping.
Losses and the clipped global norm must match to 1e-5 relative; parameters after 3 steps to
rtol 1e-4 / atol 2e-5. Each step moves a parameter by up to ~lr = 2e-3, and Adam's m/sqrt(v)
amplifies the round-off of near-zero gradients (a bias starting at 0), so the tolerance is 1% of one
update (on an AVX2 machine one element of a TP=2 run differed by 1.12e-5); a wrong reduction or a
missed gradient is off by a whole update or more.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dist_harness import run_distributed
from megaglot.config import ParallelConfig, TrainConfig, get_model_preset
from megaglot.config.cli import with_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 16


class SyntheticTokens:
    """A deterministic map-style dataset of the same items the GPT dataset yields."""

    def __init__(self, n, vocab, seed=0):
        rng = np.random.default_rng(seed)
        self.tokens = rng.integers(0, vocab, size=(n, SEQ + 1))

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        t = self.tokens[i]
        return {"tokens": t[:-1].astype(np.int64), "labels": t[1:].astype(np.int64),
                "loss_mask": np.ones(SEQ, dtype=np.float32), "position_ids": np.arange(SEQ, dtype=np.int64)}


def configs(tp=1, pp=1, vp_layers=None, sp=False, **train_overrides):
    model = get_model_preset("tiny-test")
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              num_layers_per_virtual_pipeline_stage=vp_layers, sequence_parallel=sp)
    train = with_fields(TrainConfig(), micro_batch_size=2, global_batch_size=8, seq_length=SEQ, train_iters=3,
                        eval_interval=0, log_interval=100, lr=2e-3, min_lr=2e-4, lr_warmup_iters=1, clip_grad=0.5,
                        seed=7)
    return model, parallel, with_fields(train, **train_overrides)


def local_state(run):
    """(global name) -> (tp_rank, partition_dim, tensor) for DP rank 0's parameters."""
    from megaglot.parallel import state

    if state.get_data_parallel_rank() != 0:
        return {}
    return {p.global_name: (state.get_tensor_parallel_rank(), p.partition_dim, p.detach().float().clone())
            for c in run.chunks for p in c.parameters()}


def full_state(results):
    pieces = {}
    for res in results:
        for name, (tp_rank, dim, t) in res["params"].items():
            pieces.setdefault(name, {})[tp_rank] = (dim, t)
    full = {}
    for name, by_rank in pieces.items():
        dim = by_rank[0][0]
        full[name] = by_rank[0][1] if dim is None else torch.cat([by_rank[r][1] for r in sorted(by_rank)], dim=dim)
    return full


def _train_worker(rank, layouts):
    """Train each (tp, pp, vp_layers, sp, overrides) layout in turn inside one spawn."""
    from megaglot.parallel import state
    from megaglot.training import pretrain

    out = []
    for tp, pp, vp_layers, sp, overrides in layouts:
        model, parallel, train = configs(tp, pp, vp_layers, sp, **overrides)
        data = (SyntheticTokens(64, model.vocab_size), None, None)
        result = pretrain(model, parallel, train, datasets=data)
        out.append({"losses": result["losses"], "params": local_state(result["run"]),
                    "grad_norm": result["run"].optimizer.last_grad_norm})
        state.destroy()
    return out


def assert_same_training(got, want, what):
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-5, err_msg=f"{what}: losses")
    assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), f"{what}: clipped global norm"
    g, w = full_state(got["ranks"]), full_state(want["ranks"])
    assert g.keys() == w.keys()
    for name in w:
        torch.testing.assert_close(g[name], w[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{what}: {name}: {m}")


def _collect(results, index):
    per_rank = [r[index] for r in results]
    last = [r for r in per_rank if r["losses"]][-1]
    return {"losses": last["losses"], "grad_norm": last["grad_norm"], "ranks": per_rank}


@pytest.fixture(scope="module")
def reference():
    results = run_distributed(_train_worker, 1, [(1, 1, None, False, {})])
    return _collect(results, 0)


def test_dp2_distributed_optimizer_and_recomputation_equal_one_process(reference):
    layouts = [(1, 1, None, False, {}), (1, 1, None, False, {"use_distributed_optimizer": True}),
               (1, 1, None, False, {"use_distributed_optimizer": True, "bucket_size": 3000}),
               (2, 1, None, True, {"recompute_granularity": "full"}),
               (2, 1, None, False, {"recompute_granularity": "selective", "overlap_grad_reduce": False})]
    results = run_distributed(_train_worker, 2, layouts)
    assert_same_training(_collect(results, 0), reference, "DP=2")
    assert_same_training(_collect(results, 1), reference, "DP=2 distributed optimizer")
    assert_same_training(_collect(results, 2), reference, "DP=2 distributed optimizer, small buckets")
    assert_same_training(_collect(results, 3), reference, "TP=2 SP, full recomputation")
    assert_same_training(_collect(results, 4), reference, "TP=2, selective recomputation, no overlap")


def test_tp2_pp2_dp2_on_8_ranks_equals_one_process(reference):
    layouts = [(2, 2, None, False, {}), (2, 2, 1, True, {"use_distributed_optimizer": True})]
    results = run_distributed(_train_worker, 8, layouts, timeout=300)
    assert_same_training(_collect(results, 0), reference, "TP2 PP2 DP2")
    assert_same_training(_collect(results, 1), reference, "TP2 PP2(VP2) DP2 SP distributed optimizer")


def _fp16_worker(rank):
    """An inf in one rank's gradient: every rank skips the step and the scale halves."""
    from megaglot.parallel import state
    from megaglot.training import build_run, init_distributed, train_step
    from megaglot.data.gpt_dataset import make_batches

    model, parallel, train = configs(precision="fp16", initial_loss_scale=1024.0)
    run = build_run(model, parallel, train, init_distributed())
    data = SyntheticTokens(64, model.vocab_size)
    batches = list(make_batches(data, 0, 2, state.get_data_parallel_rank(), 2))
    before = {n: p.detach().clone() for c in run.chunks for n, p in c.named_parameters()}
    if rank == 1:  # poison one gradient on one rank only
        p = next(run.chunks[0].parameters())
        p.register_hook(lambda g: torch.full_like(g, float("inf")))
    stats = train_step(run, batches[:2])
    unchanged = all(torch.equal(before[n], p) for c in run.chunks for n, p in c.named_parameters())
    return dict(skipped=stats["skipped"], scale=run.optimizer.loss_scale, unchanged=unchanged,
                num_skipped=run.optimizer.num_skipped, loss=stats["loss"])


def test_fp16_overflow_skips_the_step_everywhere_and_lowers_the_scale():
    results = run_distributed(_fp16_worker, 2)
    for r in results:
        assert r["skipped"] and r["unchanged"] and r["num_skipped"] == 1
        assert r["scale"] == 512.0
        assert np.isfinite(r["loss"])


def _train_resume(root, mode, tp=2, pp=1):
    """mode 'full': 4 steps saving at 2 and 4; 'resume': load `root` and run to 4;
    'kill': like 'full', but every rank dies inside the second save, after the shards are written
    and before the checkpoint is published."""
    from megaglot.checkpoint import training_state
    from megaglot.parallel import state
    from megaglot.training import pretrain

    if mode == "resume":
        model, parallel, train = configs(tp, pp, None, False, train_iters=4, load=root)
    else:
        model, parallel, train = configs(2, 1, None, False, train_iters=4, save=root, save_interval=2)
    data = (SyntheticTokens(64, model.vocab_size), None, None)
    original = training_state.write_json
    if mode == "kill":
        calls = {"n": 0}

        def dying_write_json(path, obj):
            calls["n"] += 1
            if calls["n"] > 1:  # the first save's RNG file passes, the second save dies here
                raise KeyboardInterrupt("killed mid-save")
            original(path, obj)

        training_state.write_json = dying_write_json
    try:
        result = pretrain(model, parallel, train, datasets=data)
    except KeyboardInterrupt:
        return None
    finally:
        training_state.write_json = original
        state.destroy()
    return {"losses": result["losses"], "params": local_state(result["run"])}


def _resume_worker(rank, root):
    full = _train_resume(os.path.join(root, "a"), "full")
    resumed = _train_resume(os.path.join(root, "a", "iter_0000002"), "resume")
    killed = _train_resume(os.path.join(root, "k"), "kill")
    after_kill = _train_resume(os.path.join(root, "k"), "resume")
    # Reshard on load: the TP=2 x DP=2 checkpoint resumed at TP=1 x PP=2 x DP=2.
    other_layout = _train_resume(os.path.join(root, "a", "iter_0000002"), "resume", tp=1, pp=2)
    return full, resumed, killed, after_kill, other_layout


def test_resume_is_exact_and_a_killed_save_leaves_the_previous_checkpoint(tmp_path):
    """TP=2 x DP=2: stop at 2, resume to 4 == 4 uninterrupted steps, bit for bit (CPU, fp32)."""
    from megaglot.checkpoint.format import resolve

    results = run_distributed(_resume_worker, 4, str(tmp_path))
    full, resumed, killed, after_kill, other_layout = results[0]
    assert len(full["losses"]) == 4
    assert resumed["losses"] == full["losses"][2:], "resumed losses differ from the uninterrupted run"
    for rank_result in results:
        f, r = rank_result[0], rank_result[1]
        for name, (_, _, t) in f["params"].items():
            assert torch.equal(t, r["params"][name][2]), f"{name} differs after resuming"
    killed_root = str(tmp_path / "k")
    assert killed is None
    assert os.path.isdir(os.path.join(killed_root, "iter_0000004.tmp")), "the killed save should have started"
    assert resolve(killed_root).endswith("iter_0000002")
    assert after_kill["losses"] == full["losses"][2:]
    np.testing.assert_allclose(other_layout["losses"], full["losses"][2:], rtol=1e-5,
                               err_msg="resuming at TP=1 x PP=2 from a TP=2 checkpoint")


def test_a_checkpoint_of_another_model_fails_clearly(tmp_path):
    from megaglot.checkpoint.format import CheckpointError, CheckpointReader, PieceWriter, write_metadata
    from megaglot.checkpoint.model_state import add_model_pieces, load_model
    from megaglot.model import build_model_chunks

    model, _, _ = configs()
    chunks = build_model_chunks(model)  # no process groups: TP = PP = 1
    directory = str(tmp_path / "iter_0000001")
    writer = PieceWriter(directory, "model_tp00_pp00")
    add_model_pieces(writer, chunks)
    writer.write()
    write_metadata(directory, iteration=1, model=model.to_dict())
    wider = dataclasses.replace(model, hidden_size=128, ffn_hidden_size=256)
    with pytest.raises(CheckpointError, match="checkpoint of another model .*hidden_size: checkpoint 64 vs run 128"):
        load_model(build_model_chunks(wider), CheckpointReader(directory), wider)
    load_model(chunks, CheckpointReader(directory), model)  # the same model loads


@pytest.mark.parametrize("flags,message", [
    (["--tensor-model-parallel-size", "3"], "world size 1 is not divisible by TP x PP = 3 x 1"),
    (["--model", "tiny", "--global-batch-size", "6", "--micro-batch-size", "4"],
     "--global-batch-size 6 is not divisible by --micro-batch-size x data-parallel size = 4 x 1 = 4"),
    (["--model", "tiny", "--data-path", "/nonexistent/prefix"], "/nonexistent/prefix"),
    (["--model", "tiny", "--num-layers", "2", "--hidden-size", "64", "--data-path", "WIDE"],
     "was tokenized with a 5000-token vocabulary"),
])
def test_bad_flags_fail_with_one_line(flags, message, tmp_path):
    if "WIDE" in flags:  # a dataset whose recorded tokenizer is larger than the model's vocabulary
        from megaglot.data.indexed_dataset import IndexedDatasetBuilder

        prefix = str(tmp_path / "wide_text_document")
        builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
        builder.add_document(np.arange(4000, 4100))
        builder.finalize(prefix + ".idx")
        with open(prefix + ".json", "w") as f:
            f.write('{"tokenizer": {"vocab_size": 5000, "path": "big/tokenizer.json"}}')
        flags = [prefix if f == "WIDE" else f for f in flags]
    env = dict(os.environ, MASTER_PORT=str(__import__("dist_harness").free_port()))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain_ko.py"), *flags],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- against an independent reference

# Weight decay 0.5 so that decaying the wrong group shows: it moves a 0.02 weight by 3e-5 per step.
# Parameters to atol 3e-5, 1% of one step's largest update (lr 3e-3); see the module docstring for
# why Adam makes exact agreement impossible for near-zero gradients.
HF_STEPS, HF_LR, HF_MIN_LR, HF_WARMUP, HF_CLIP, HF_DECAY = 4, 3e-3, 3e-4, 1, 0.5, 0.5


def reference_lr(iteration: int) -> float:
    """Linear warm-up then cosine decay to min_lr over HF_STEPS, written out independently."""
    import math

    if iteration < HF_WARMUP:
        return HF_LR * (iteration + 1) / HF_WARMUP
    progress = (iteration - HF_WARMUP) / (HF_STEPS - HF_WARMUP)
    return HF_MIN_LR + (HF_LR - HF_MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def _hf_trajectory_worker(rank):
    """megaglot's whole training step (fused attention, GradBuffer, its AdamW, clipping, schedule)
    against transformers' GPT-NeoX trained by torch.optim.AdamW from the same initial weights."""
    import torch.nn.functional as F

    from hf_models import random_gpt_neox
    from megaglot.checkpoint.hf import hf_name, model_config_from_hf, unpad_vocab
    from megaglot.checkpoint.sharding import named_global_parameters
    from megaglot.config import ParallelConfig, TrainConfig
    from megaglot.config.cli import with_fields
    from megaglot.training import build_run, init_distributed, train_step

    hf_model = random_gpt_neox(3).train()
    cfg = model_config_from_hf(hf_model.config.to_dict(), attention_backend="fused")
    train = with_fields(TrainConfig(), micro_batch_size=2, global_batch_size=6, seq_length=SEQ, train_iters=HF_STEPS,
                        eval_interval=0, log_interval=100, lr=HF_LR, min_lr=HF_MIN_LR, lr_warmup_iters=HF_WARMUP,
                        clip_grad=HF_CLIP, weight_decay=HF_DECAY, seed=11)
    run = build_run(cfg, ParallelConfig(), train, init_distributed())
    # HF starts from megaglot's initial weights (vocabulary padding rows dropped).
    with torch.no_grad():
        hf_state = {hf_name(n): unpad_vocab(p.detach().clone(), n, cfg)
                    for n, p in named_global_parameters(run.chunks)}
    missing, unexpected = hf_model.load_state_dict(
        {("lm_head.weight" if k == "embed_out.weight" and not hasattr(hf_model, "embed_out") else k): v
         for k, v in hf_state.items()}, strict=False)
    assert not unexpected and all("rotary_emb" in m or m.endswith(".attention.bias") or
                                  m.endswith(".attention.masked_bias") for m in missing), (missing, unexpected)

    params = list(hf_model.parameters())
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": HF_DECAY},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    adam = torch.optim.AdamW(groups, lr=HF_LR, betas=(train.optimizer.adam_beta1, train.optimizer.adam_beta2),
                             eps=train.optimizer.adam_eps)
    data = SyntheticTokens(HF_STEPS * 3 * 2, cfg.vocab_size, seed=5)
    losses, hf_losses, norms, hf_norms = [], [], [], []
    for it in range(HF_STEPS):
        items = [data[it * 6 + i] for i in range(6)]
        microbatches = [{k: torch.as_tensor(np.stack([x[k] for x in items[m:m + 2]])) for k in items[0]}
                        for m in range(0, 6, 2)]
        stats = train_step(run, microbatches)
        losses.append(stats["loss"])
        norms.append(stats["grad_norm"])
        # The reference: mean token loss over the global batch, clip, AdamW at the schedule's LR.
        adam.zero_grad(set_to_none=True)
        total = 0.0
        for mb in microbatches:
            logits = hf_model(input_ids=mb["tokens"]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb["labels"].reshape(-1)) / 3
            loss.backward()
            total += loss.item()
        hf_losses.append(total)
        hf_norms.append(float(torch.nn.utils.clip_grad_norm_(params, HF_CLIP)))
        for group in adam.param_groups:
            group["lr"] = reference_lr(it)
        adam.step()
    finals = {hf_name(n): unpad_vocab(p.detach().clone(), n, cfg) for n, p in named_global_parameters(run.chunks)}
    hf_finals = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    return dict(losses=losses, hf_losses=hf_losses, norms=norms, hf_norms=hf_norms, finals=finals,
                hf_finals=hf_finals, start=hf_state)


def test_training_steps_equal_hugging_face_trained_by_torch_adamw():
    pytest.importorskip("transformers")
    (res,) = run_distributed(_hf_trajectory_worker, 1)
    np.testing.assert_allclose(res["losses"], res["hf_losses"], rtol=1e-5, err_msg="per-step losses")
    np.testing.assert_allclose(res["norms"], res["hf_norms"], rtol=1e-5, err_msg="unclipped global grad norms")
    assert max(res["hf_norms"]) > HF_CLIP  # clipping took part
    for name, want in res["hf_finals"].items():
        key = name if name in res["finals"] else "embed_out.weight"
        if name.endswith((".attention.bias", ".attention.masked_bias", "inv_freq")):
            continue
        got = res["finals"][key]
        assert not torch.equal(got, res["start"][key]), f"{name} never moved"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=3e-5, msg=lambda m: f"{name} after {HF_STEPS} steps: {m}")
