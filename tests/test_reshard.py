"""Offline resharding (megaglot.checkpoint.reshard, tools/reshard_checkpoint.py).

One 4-rank spawn trains the tiny-test model 4 steps at TP2 x PP2 (VP2) and at TP1 x PP2 x DP2 with
the distributed optimizer, saving at step 2. The step-2 checkpoints are resharded offline
(tp2,pp2,vp2) -> (tp1,pp1) -> (tp4,pp1) -> (tp1,pp4), bit-identical in every kind of tensor, and
the distributed-optimizer one to DP 1 and to another TP/PP with DP 2. A second 4-rank spawn loads
them at their new layouts: logits equal the source model's, and steps 3-4 equal the uninterrupted
run's (fp32; losses to rtol 1e-5, parameters to the tolerances of test_training). Bad inputs are
checked on small random checkpoints, without spawning.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoint_fixtures import write_random_checkpoint
from dist_harness import run_distributed
from megaglot.checkpoint import reshard as reshard_module
from megaglot.checkpoint.format import CheckpointError, CheckpointReader, resolve
from megaglot.checkpoint.reshard import plan_reshard, reshard, verify_same
from megaglot.config import ConfigError, ModelConfig, get_model_preset
from test_training import SEQ, SyntheticTokens, configs, full_state, local_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "reshard_checkpoint.py")

# (tp, pp, vp_layers, overrides): the layouts trained uninterrupted, saving at step 2
SOURCES = {"vp": (2, 2, 1, {}), "dist": (1, 2, None, {"use_distributed_optimizer": True})}


def _train_sources(rank, root):
    from megaglot.parallel import state
    from megaglot.training import pretrain

    out = {}
    for key, (tp, pp, vp_layers, overrides) in SOURCES.items():
        model, parallel, train = configs(tp, pp, vp_layers, train_iters=4, save=os.path.join(root, key),
                                         save_interval=2, **overrides)
        result = pretrain(model, parallel, train, datasets=(SyntheticTokens(64, model.vocab_size), None, None))
        out[key] = {"losses": result["losses"], "params": local_state(result["run"])}
        state.destroy()
    return out


def _tokens():
    return torch.from_numpy(SyntheticTokens(4, 1000, seed=3).tokens[:, :SEQ].astype(np.int64))


def _logits_at(path, tp):
    """Full logits [s, b, V] of the checkpoint's model loaded at TP=tp, PP=1 (every rank)."""
    import torch.distributed as dist

    from megaglot.checkpoint.training_state import load_checkpoint
    from megaglot.parallel import state
    from megaglot.training import build_run, init_distributed

    model, parallel, train = configs(tp, 1)
    run = build_run(model, parallel, train, init_distributed())
    load_checkpoint(path, chunks=run.chunks, optimizer=run.optimizer, model_cfg=model)
    run.chunks[0].eval()
    with torch.no_grad():
        local = run.chunks[0](None, {"tokens": _tokens()})
    pieces = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(pieces, local.contiguous(), group=state.get_tensor_parallel_group())
    state.destroy()
    return torch.cat(pieces, dim=-1)


def _resume_targets(rank, targets):
    """Logits at TP 4 from the (tp4, pp1) checkpoint; then steps 3-4 from each resharded checkpoint."""
    from megaglot.parallel import state
    from megaglot.training import pretrain

    out = {"logits": _logits_at(targets["tp4"][0], 4)}
    for key, (path, tp, pp, overrides) in targets.items():
        model, parallel, train = configs(tp, pp, train_iters=4, load=path, **overrides)
        result = pretrain(model, parallel, train, datasets=(SyntheticTokens(64, model.vocab_size), None, None))
        out[key] = {"losses": result["losses"], "params": local_state(result["run"])}
        state.destroy()
    return out


def _collect(results, key):
    per_rank = [r[key] for r in results]
    return {"losses": [r for r in per_rank if r["losses"]][-1]["losses"], "params": full_state(per_rank)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reshard"))
    results = run_distributed(_train_sources, 4, root, timeout=300)
    return root, {key: _collect(results, key) for key in SOURCES}


def _all_full_tensors(path):
    reader = CheckpointReader(resolve(path))
    return {key: reader.full_tensor(*key) for key in reader.pieces}


def _assert_bit_identical(a, b):
    ta, tb = _all_full_tensors(a), _all_full_tensors(b)
    assert ta.keys() == tb.keys()
    assert {kind for kind, _ in ta} == {"model", "master", "exp_avg", "exp_avg_sq"}
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


def test_reshard_round_trip_logits_and_training_continue(trained, tmp_path):
    root, runs = trained
    source = os.path.join(root, "vp", "iter_0000002")
    out = str(tmp_path)
    tp1 = reshard(source, os.path.join(out, "tp1pp1"), 1, 1, verify=True)
    tp4 = reshard(tp1, os.path.join(out, "tp4pp1"), 4, 1, verify=True)
    pp4 = reshard(tp4, os.path.join(out, "tp1pp4"), 1, 4, verify=True)
    _assert_bit_identical(source, pp4)
    assert verify_same(source, pp4) == 4 * 52
    meta = CheckpointReader(pp4).metadata
    src_meta = CheckpointReader(source).metadata
    assert meta["parallel"] == dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=4,
                                    virtual_pipeline_size=None, data_parallel_size=1, world_size=4)
    for key in ("iteration", "consumed_samples", "scheduler", "optimizer", "grad_scaler", "model", "train"):
        assert meta[key] == src_meta[key], key
    assert not os.path.exists(os.path.join(pp4, "rng")), "RNG states of another layout must not be copied"
    assert sorted(f for f in os.listdir(pp4) if f.endswith(".safetensors")) == \
        [f"model_tp00_pp{p:02d}.safetensors" for p in range(4)] + [f"optim_tp00_pp{p:02d}_dp000.safetensors"
                                                                    for p in range(4)]
    # the same layout again: RNG states and the parallel section carry over unchanged
    same = reshard(source, os.path.join(out, "same"), 2, 2, 1)
    assert sorted(os.listdir(os.path.join(same, "rng"))) == sorted(os.listdir(os.path.join(source, "rng")))
    assert CheckpointReader(same).metadata["parallel"] == src_meta["parallel"]

    # distributed optimizer at DP 2: to DP 1 (TP2 x PP2), and to TP2 x PP1 still split over DP 2
    dist_source = os.path.join(root, "dist", "iter_0000002")
    dp1 = reshard(dist_source, os.path.join(out, "dist_dp1"), 2, 2, dp=1, verify=True)
    dp2 = reshard(dist_source, os.path.join(out, "dist_tp2dp2"), 2, 1, dp=2, verify=True)
    assert not any("_dp001" in f for f in os.listdir(dp1))
    for tp_rank in range(2):
        for d in range(2):
            index = json.load(open(os.path.join(dp2, f"optim_tp{tp_rank:02d}_pp00_dp{d:03d}.index.json")))
            assert index["pieces"], "every DP rank owns a range"

    # reference logits: the source model at TP 1 in this process (no process groups)
    from megaglot.checkpoint.sharding import load_full_tensors
    from megaglot.model.gpt import build_model_chunks

    cfg = get_model_preset("tiny-test")
    chunk = build_model_chunks(cfg)[0].eval()
    reader = CheckpointReader(source)
    load_full_tensors([chunk], lambda name: reader.full_tensor("model", name))
    with torch.no_grad():
        want_logits = chunk(None, {"tokens": _tokens()})

    targets = {"tp4": (tp4, 4, 1, {}), "pp4": (pp4, 1, 4, {}),
               "dist_dp1": (dp1, 2, 2, {"use_distributed_optimizer": True}),
               "dist_tp2dp2": (dp2, 2, 1, {"use_distributed_optimizer": True})}
    results = run_distributed(_resume_targets, 4, targets, timeout=300)
    torch.testing.assert_close(results[0]["logits"], want_logits, rtol=1e-5, atol=1e-5)
    for key, source_key in (("tp4", "vp"), ("pp4", "vp"), ("dist_dp1", "dist"), ("dist_tp2dp2", "dist")):
        got, want = _collect(results, key), runs[source_key]
        assert len(got["losses"]) == 2
        np.testing.assert_allclose(got["losses"], want["losses"][2:], rtol=1e-5, err_msg=f"{key}: losses")
        assert got["params"].keys() == want["params"].keys()
        for name, w in want["params"].items():
            torch.testing.assert_close(got["params"][name], w, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{key}: {name}: {m}")


# ---- bad inputs (small random checkpoints, no spawn) -----------------------------------------
@pytest.fixture
def small(tmp_path):
    cfg = get_model_preset("tiny-test")
    return write_random_checkpoint(str(tmp_path / "src"), cfg, 2, 2, dp=2, distributed=True)


def _fails(source, save, message, exc=CheckpointError, published=False, **kwargs):
    kwargs.setdefault("tp", 1)
    kwargs.setdefault("pp", 1)
    with pytest.raises(exc) as info:
        reshard(source, save, **kwargs)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    if not published:
        assert not os.path.exists(os.path.join(save, "latest")), "nothing is published after an error"
    return str(info.value)


def test_missing_shards(small, tmp_path):
    save = str(tmp_path / "out")
    os.remove(os.path.join(small, "optim_tp01_pp00_dp001.safetensors"))
    _fails(small, save, "refers to missing shard optim_tp01_pp00_dp001.safetensors")
    os.remove(os.path.join(small, "optim_tp01_pp00_dp001.index.json"))  # now a DP range is missing
    _fails(small, save, "TP shard 1 of 2 is incomplete")
    for f in ("model_tp00_pp01.safetensors", "model_tp00_pp01.index.json", "model_tp01_pp01.safetensors",
              "model_tp01_pp01.index.json"):
        os.remove(os.path.join(small, f))  # a whole pipeline stage
    _fails(small, save, "missing model tensor layers.2.")


def test_metadata_that_disagrees_with_the_tensors(small, tmp_path):
    path = os.path.join(small, "metadata.json")
    meta = json.load(open(path))
    meta["model"]["ffn_hidden_size"] = 512
    json.dump(meta, open(path, "w"))
    _fails(small, str(tmp_path / "out"), "model tensor layers.0.mlp.dense_4h_to_h.weight (model_tp00_pp00"
                                         ".safetensors) has global shape (64, 256), but metadata.json's model "
                                         "config implies (64, 512)")
    meta["model"]["ffn_hidden_size"] = 256
    meta["model"]["num_layers"] = 2
    json.dump(meta, open(path, "w"))
    _fails(small, str(tmp_path / "out"), "unexpected model tensor layers.2.")
    # an index that lies about a piece's size
    meta["model"]["num_layers"] = 4
    json.dump(meta, open(path, "w"))
    index_path = os.path.join(small, "model_tp00_pp00.index.json")
    index = json.load(open(index_path))
    index["pieces"][0]["end"] += 1
    json.dump(index, open(index_path, "w"))
    _fails(small, str(tmp_path / "out"), "embed_in.weight/tp0/0 holds 32000 values, its index says [0, 32001)")


def test_target_layouts_that_do_not_divide_the_model(tmp_path):
    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, vocab_size=1002,
                      make_vocab_size_divisible_by=2, max_position_embeddings=64)
    src = write_random_checkpoint(str(tmp_path / "src"), cfg, 2, 1, optimizer=False)
    save = str(tmp_path / "out")
    msg = _fails(src, save, "--target-tensor-parallel-size 4 does not divide the padded vocabulary 1002", ConfigError,
                 tp=4)
    assert "make-vocab-size-divisible-by" not in msg
    _fails(src, save, "--target-tensor-parallel-size 3 does not divide --num-attention-heads 4", ConfigError, tp=3)
    _fails(src, save, "--target-pipeline-parallel-size 3 does not divide --num-layers 4", ConfigError, pp=3)
    _fails(src, save, "--num-layers 4 is not divisible by --target-pipeline-parallel-size x "
                      "--target-num-layers-per-virtual-pipeline-stage = 2 x 3", ConfigError, pp=2,
           layers_per_virtual_stage=3)
    _fails(src, save, "--target-data-parallel-size must be positive", ConfigError, dp=0)
    assert not os.path.exists(save)
    # a model-only checkpoint reshards too (a converted one, say)
    out = reshard(src, save, 1, 2, verify=True)
    assert {kind for kind, _ in CheckpointReader(out).pieces} == {"model"}


def test_plan_step_checks_the_target_and_writes_nothing(small, tmp_path):
    """The plan step alone: a bad target fails before anything exists at --save; a good plan covers
    every tensor of every kind exactly once, writes nothing, and the write step produces exactly
    its files, bit-identical to the source."""
    save = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="--target-tensor-parallel-size 3 does not divide --num-attention-heads 4"):
        plan_reshard(small, save, 3, 1)
    with pytest.raises(ConfigError, match="--target-pipeline-parallel-size 3 does not divide --num-layers 4"):
        plan_reshard(small, save, 1, 3)
    assert not os.path.exists(save)
    plan = plan_reshard(small, save, 4, 2, dp=3)
    assert not os.path.exists(save), "planning writes nothing"
    covered, planned = {}, set()
    for stage in plan.stages:
        for position in stage.positions:
            for part, entries in position.items():
                planned.add(part)
                for e in entries:
                    covered[(e["kind"], e["name"])] = covered.get((e["kind"], e["name"]), 0) + e["end"] - e["start"]
    assert set(covered) == {(kind, name) for kind in ("model", "master", "exp_avg", "exp_avg_sq")
                            for name in plan.specs}
    for (kind, name), n in covered.items():  # TP-split: all TP shards; TP-replicated: one copy
        assert n == torch.Size(plan.specs[name][0]).numel(), (kind, name)
    assert len(planned) == 4 * 2 * (1 + 3)  # TP x PP positions, each a model part and 3 DP optimizer parts
    out = reshard_module.write_reshard(plan)
    assert {f[:-len(".safetensors")] for f in os.listdir(out) if f.endswith(".safetensors")} == planned
    assert verify_same(small, out) == 4 * len(plan.specs)


def test_save_paths_that_would_touch_the_source_or_another_checkpoint(small, tmp_path):
    root = os.path.dirname(small)
    before = sorted(os.listdir(small))
    _fails(root, root, "is the source checkpoint", published=True)
    _fails(small, small, "is the source checkpoint", published=True)
    _fails(root, os.path.join(root, "resharded"), "is the source checkpoint")
    _fails(small, os.path.join(small, "x"), "is the source checkpoint")
    _fails(small, str(tmp_path), "holds the source checkpoint", published=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "latest").write_text("iter_0000001\n")
    _fails(small, str(other), "already exists and is not empty (latest)", published=True)
    assert sorted(os.listdir(small)) == before and (other / "latest").read_text() == "iter_0000001\n"
    _fails(str(tmp_path / "nowhere"), str(tmp_path / "out"), "no such checkpoint directory")


def test_a_failure_mid_write_leaves_nothing(small, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = reshard_module.StreamingPart.write

    def dying_write(self, *args):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt("killed mid-write")
        original(self, *args)

    monkeypatch.setattr(reshard_module.StreamingPart, "write", dying_write)
    save = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        reshard(small, save, 1, 2)
    assert os.listdir(save) == [], "the staging directory is removed"
    monkeypatch.setattr(reshard_module.StreamingPart, "write", original)
    out = reshard(small, save, 1, 2, verify=True)  # the same (empty) root works afterwards
    assert resolve(save) == out


def test_cli_reshards_and_reports_errors_in_one_line(small, tmp_path):
    save = str(tmp_path / "out")
    args = [sys.executable, TOOL, "--load", os.path.dirname(small), "--save", save,
            "--target-tensor-parallel-size", "4", "--target-pipeline-parallel-size", "2",
            "--target-num-layers-per-virtual-pipeline-stage", "1", "--target-data-parallel-size", "3", "--verify"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "bit-identical" in proc.stdout
    out = resolve(save)
    assert os.path.isfile(os.path.join(out, "optim_tp03_pp01_dp002.safetensors"))
    assert CheckpointReader(out).metadata["parallel"]["virtual_pipeline_size"] == 2
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --save") and "already exists" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    shutil.rmtree(save)
