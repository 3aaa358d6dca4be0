"""Self-checking checkpoints (issue 17): checksums, non-finite values, optional optimizer files, tokenizer.

One 1-rank gloo spawn trains the tiny-test model one step (distributed optimizer, so the fp32
masters are tensors of their own), saves it at iteration 40 with a tokenizer, and loads damaged
copies of it:
- a flipped byte in a model or optimizer shard: one line naming the file, both CRCs, what to do;
- a NaN/inf written into a model or optimizer tensor (its checksum rewritten to match, so the
  value check is what fires): one line naming the tensor, its kind and the shard;
- indexes without a checksum (older checkpoints) load, unverified;
- every optimizer file gone (or its index unreadable): load_optimizer=False, load_inference_model
  and export_hf work and read none of them; load_optimizer=False returns the saved iteration and
  consumed samples, restores the schedule's clock, and the masters equal the loaded weights;
- the tokenizer is copied in, recorded relatively, and found after the root is moved.
Resharding is checked in this process: a corrupt source or target fails `--verify` in one line.
"""

import importlib.util
import io
import json
import os
import shutil
import zlib
from contextlib import redirect_stderr

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_harness import run_distributed
from megaglot.checkpoint.format import CheckpointError, CheckpointReader
from megaglot.checkpoint.reshard import reshard, verify_same
from test_training import SEQ, configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_PART, OPTIM_PART = "model_tp00_pp00", "optim_tp00_pp00_dp000"
NAN_TENSOR = "layers.1.mlp.dense_h_to_4h.weight"
TOKENIZER = b'{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}'


# ---- damaging a checkpoint (on linked copies: a file to be changed is copied first) ----------
def clone(src, dst):
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def own(path):
    """Break the hard link before changing a file in place."""
    data = open(path, "rb").read()
    os.remove(path)
    open(path, "wb").write(data)


def flip_byte(directory, part):
    path = os.path.join(directory, f"{part}.safetensors")
    own(path)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 100)  # in the tensor data
        byte = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([byte ^ 0x10]))
    return path


def crc_of(path):
    return f"{zlib.crc32(open(path, 'rb').read()):08x}"


def recorded_crc(directory, part):
    return json.load(open(os.path.join(directory, f"{part}.index.json")))["checksum"]["value"]


def corrupt_message(path, expected):
    return (f"{path}: checksum mismatch (crc32 expected {expected}, actual {crc_of(path)}); the file is corrupt: "
            f"restore it from a copy, or load an earlier iteration")


def write_non_finite(directory, part, key):
    """Two values of tensor `key` become nan and inf; the part file is rewritten and its index's
    checksum (and size) updated, so only the value check can catch it."""
    path = os.path.join(directory, f"{part}.safetensors")
    tensors = load_file(path)
    tensors[key][3], tensors[key][5] = float("nan"), float("inf")
    os.remove(path)
    save_file(tensors, path)
    index_path = os.path.join(directory, f"{part}.index.json")
    index = json.load(open(index_path))
    index["checksum"] = dict(algorithm="crc32", value=crc_of(path), bytes=os.path.getsize(path))
    os.remove(index_path)
    json.dump(index, open(index_path, "w"))
    return path


def drop_checksums(directory):
    for f in os.listdir(directory):
        if f.endswith(".index.json"):
            path = os.path.join(directory, f)
            index = json.load(open(path))
            del index["checksum"]
            os.remove(path)
            json.dump(index, open(path, "w"))


# ---- the spawned rank ---------------------------------------------------------------------------
def _microbatches(vocab):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(4):  # global batch 8 = 4 microbatches of 2 at DP 1
        t = torch.as_tensor(rng.integers(0, vocab, size=(2, SEQ + 1)), dtype=torch.long)
        out.append({"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
                    "loss_mask": torch.ones(2, SEQ), "position_ids": torch.arange(SEQ).repeat(2, 1)})
    return out


def _params(run):
    return {p.global_name: p.detach().clone() for c in run.chunks for p in c.parameters()}


def _load(make_run, path, **kwargs):
    """(run, metadata) or (run, the error's message)."""
    from megaglot.checkpoint.training_state import load_checkpoint

    run, model = make_run()
    try:
        return run, load_checkpoint(path, chunks=run.chunks, optimizer=run.optimizer, model_cfg=model, **kwargs)
    except CheckpointError as e:
        return run, str(e)


def _save(rank, root, make_run):
    """The trained checkpoint at iteration 40 (and the missing-tokenizer attempt before it)."""
    from megaglot.checkpoint.training_state import save_checkpoint
    from megaglot.training.run import train_step

    run, model = make_run()
    train_step(run, _microbatches(model.vocab_size))
    run.optimizer.iteration, run.optimizer.num_skipped = 40, 3
    os.makedirs(os.path.join(root, "tok"))
    open(os.path.join(root, "tok", "tokenizer.json"), "wb").write(TOKENIZER)
    save = dict(iteration=40, consumed_samples=320, chunks=run.chunks, optimizer=run.optimizer, model_cfg=model)
    try:
        save_checkpoint(os.path.join(root, "never"), tokenizer=os.path.join(root, "nowhere.json"), **save)
        missing_tokenizer = None
    except CheckpointError as e:
        missing_tokenizer = str(e)
    path = save_checkpoint(os.path.join(root, "ckpt"), tokenizer=os.path.join(root, "tok"), **save)
    return path, dict(missing_tokenizer=missing_tokenizer, never_exists=os.path.exists(os.path.join(root, "never")),
                      params=_params(run), masters={pc.param.global_name: pc.master.detach().clone()
                                                    for pc in run.optimizer.pieces})


def _damaged_loads(path, root, make_run):
    """The error (or metadata) of loading each damaged copy."""
    out = {}
    d = clone(path, os.path.join(root, "flip_model"))
    out["flip_model"] = (flip_byte(d, MODEL_PART), recorded_crc(d, MODEL_PART), _load(make_run, d)[1])
    d = clone(path, os.path.join(root, "flip_optim"))
    out["flip_optim"] = (flip_byte(d, OPTIM_PART), recorded_crc(d, OPTIM_PART), _load(make_run, d)[1],
                         _load(make_run, d, load_optimizer=False)[1]["iteration"])
    d = clone(path, os.path.join(root, "nan_model"))
    out["nan_model"] = (write_non_finite(d, MODEL_PART, f"model/{NAN_TENSOR}/tp0/0"), _load(make_run, d)[1])
    d = clone(path, os.path.join(root, "nan_optim"))
    out["nan_optim"] = (write_non_finite(d, OPTIM_PART, f"exp_avg/{NAN_TENSOR}/tp0/0"), _load(make_run, d)[1])
    d = clone(path, os.path.join(root, "old_style"))
    drop_checksums(d)
    run, meta = _load(make_run, d)
    out["old_style"] = (meta["iteration"], _params(run))
    return out


def _without_optimizer(path, root, make_run):
    """Loads of copies whose optimizer files are gone or unreadable."""
    from megaglot.eval.loading import load_inference_model

    out = {}
    d = clone(path, os.path.join(root, "no_optim"))
    for f in (f"{OPTIM_PART}.safetensors", f"{OPTIM_PART}.index.json"):
        os.remove(os.path.join(d, f))
    run, meta = _load(make_run, d, load_optimizer=False)
    opt = run.optimizer
    out["weights_only"] = dict(
        iteration=meta["iteration"], consumed=meta["consumed_samples"], opt_iteration=opt.iteration,
        num_skipped=opt.num_skipped, step=opt.adam_step_count(), params=_params(run),
        masters_equal_weights=all(torch.equal(pc.master.reshape(-1), pc.param.detach().reshape(-1)
                                              [pc.flat_start:pc.flat_end].float()) for pc in opt.pieces),
        moments_zero=all(not t.any() for kind, _, t in opt.state_pieces() if kind != "master"))
    out["no_optim_but_asked"] = _load(make_run, d)[1]
    inference = load_inference_model(d)
    out["inference_params"] = {p.global_name: p.detach().clone() for c in inference.chunks for p in c.parameters()}
    d = clone(path, os.path.join(root, "optim_file_gone"))
    os.remove(os.path.join(d, f"{OPTIM_PART}.safetensors"))
    out["optim_file_gone"] = (_load(make_run, d)[1], _load(make_run, d, load_optimizer=False)[1]["iteration"])
    d = clone(path, os.path.join(root, "optim_index_garbage"))
    os.remove(os.path.join(d, f"{OPTIM_PART}.index.json"))
    open(os.path.join(d, f"{OPTIM_PART}.index.json"), "w").write("{not json")
    out["optim_index_garbage"] = (_load(make_run, d, load_optimizer=False)[1]["iteration"], _load(make_run, d)[1])
    return out


def _worker(rank, root):
    from megaglot.eval.loading import load_inference_model
    from megaglot.training import build_run, init_distributed

    def make_run():
        model, parallel, train = configs(1, 1, use_distributed_optimizer=True)
        return build_run(model, parallel, train, init_distributed()), model

    path, out = _save(rank, root, make_run)
    out.update(_damaged_loads(path, root, make_run))
    out.update(_without_optimizer(path, root, make_run))
    run, meta = _load(make_run, path)  # the intact checkpoint, with its optimizer
    out["resumed"] = dict(iteration=meta["iteration"], opt_iteration=run.optimizer.iteration,
                          masters={pc.param.global_name: pc.master.detach().clone() for pc in run.optimizer.pieces})
    shutil.move(os.path.join(root, "ckpt"), os.path.join(root, "moved"))
    out["moved_tokenizer"] = load_inference_model(os.path.join(root, "moved")).tokenizer_path
    return out


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("integrity"))
    return root, run_distributed(_worker, 1, root)[0]


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_flipped_byte_is_one_line_naming_the_file(spawned):
    _, r = spawned
    path, expected, error = r["flip_model"]
    assert error == corrupt_message(path, expected)
    path, expected, error, iteration = r["flip_optim"]
    assert error == corrupt_message(path, expected)
    assert iteration == 40, "without the optimizer, its corrupt shard is never opened"


def test_a_non_finite_value_names_the_tensor_and_the_shard(spawned):
    _, r = spawned
    for key, kind in (("nan_model", "model"), ("nan_optim", "exp_avg")):
        path, error = r[key]
        assert error == (f"{path}: {kind} tensor '{NAN_TENSOR}' has 2 non-finite values (nan/inf); the run that "
                         f"saved it diverged: load an earlier iteration")


def test_indexes_without_checksum_load_unverified(spawned):
    _, r = spawned
    iteration, params = r["old_style"]
    assert iteration == 40
    _same(params, r["params"])


def test_weights_load_without_any_optimizer_file(spawned):
    root, r = spawned
    w = r["weights_only"]
    assert (w["iteration"], w["consumed"]) == (40, 320), "the metadata as saved, never zeroed"
    assert (w["opt_iteration"], w["num_skipped"]) == (40, 3), "the schedule's clock is restored"
    assert w["step"] == 0 and w["moments_zero"], "a fresh Adam"
    assert w["masters_equal_weights"]
    _same(w["params"], r["params"])
    _same(r["inference_params"], r["params"])
    assert r["no_optim_but_asked"] == (
        f"{root}/no_optim: metadata.json records optimizer state, but there are no optimizer shards "
        f"(optim_*.index.json); restore them, or load the weights alone (--no-load-optim)")
    error, iteration = r["optim_file_gone"]
    assert error == (f"{root}/optim_file_gone/{OPTIM_PART}.index.json: refers to missing shard {OPTIM_PART}"
                     f".safetensors; restore it from a copy (the weights alone load without it, e.g. with "
                     f"--no-load-optim)")
    assert iteration == 40
    iteration, error = r["optim_index_garbage"]
    assert iteration == 40, "the optimizer's index is not even read"
    assert error.startswith(f"{root}/optim_index_garbage/{OPTIM_PART}.index.json: not valid JSON"), error


def test_export_needs_no_optimizer_file(spawned, tmp_path):
    from megaglot.checkpoint.convert import export_hf

    root, r = spawned
    out = export_hf(os.path.join(root, "no_optim"), str(tmp_path / "hf"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    name = NAN_TENSOR.replace("layers.", "gpt_neox.layers.")
    assert torch.equal(exported[name], r["params"][NAN_TENSOR])


def test_resume_restores_the_optimizer(spawned):
    _, r = spawned
    assert r["resumed"]["iteration"] == 40 and r["resumed"]["opt_iteration"] == 40
    _same(r["resumed"]["masters"], r["masters"])


def test_the_tokenizer_travels_with_the_checkpoint(spawned):
    root, r = spawned
    assert r["missing_tokenizer"] == (f"{root}/nowhere.json: no such tokenizer file to copy into the checkpoint "
                                      f"(iteration 40 was not saved); fix --tokenizer")
    assert not r["never_exists"], "nothing is written when the tokenizer is missing"
    moved = os.path.join(root, "moved", "iter_0000040")
    assert open(os.path.join(moved, "tokenizer.json"), "rb").read() == TOKENIZER
    assert CheckpointReader(moved).metadata["tokenizer"] == "tokenizer.json"
    assert r["moved_tokenizer"] == os.path.join(moved, "tokenizer.json")


# ---- resharding (in this process) ---------------------------------------------------------------
def _cli(*args):
    spec = importlib.util.spec_from_file_location("reshard_tool", os.path.join(ROOT, "tools", "reshard_checkpoint.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    err = io.StringIO()
    with redirect_stderr(err):
        rc = tool.main(list(args) + ["--quiet"])
    return rc, err.getvalue()


def test_reshard_verify_catches_corrupt_source_and_target(spawned, tmp_path):
    root, r = spawned
    for key in ("flip_model", "flip_optim"):  # the source's files are checked as they are read
        path, expected, _ = r[key][:3]
        rc, err = _cli("--load", os.path.join(root, key), "--save", str(tmp_path / key), "--verify",
                       "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")
        assert (rc, err) == (2, f"error: {corrupt_message(path, expected)}\n")
        assert not os.path.exists(tmp_path / key / "latest")
    good = os.path.join(root, "moved")
    target = reshard(good, str(tmp_path / "tp2"), 2, 1, verify=True)
    assert open(os.path.join(target, "tokenizer.json"), "rb").read() == TOKENIZER, "the tokenizer is carried along"
    part = "optim_tp01_pp00_dp000"
    expected = recorded_crc(target, part)
    path = flip_byte(target, part)
    with pytest.raises(CheckpointError) as info:
        verify_same(good, target)
    assert str(info.value) == corrupt_message(path, expected)
