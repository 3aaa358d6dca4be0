"""tools/convert_hf.py and megaglot.checkpoint.convert against transformers.GPTNeoXForCausalLM.

A random small GPT-NeoX (odd vocabulary 1003, rotary_pct 0.25, 4 layers) saved as one safetensors
file (transformers >= 5 config), as sharded safetensors, and as sharded pytorch_model.bin with the
older config form (rotary_pct / rotary_emb_base) and the buffers old checkpoints carry; imported at
TP=2 x PP=2 (with and without virtual stages) and TP=1; exported back: every tensor bit-identical,
the exported directory loads in transformers with no missing/unexpected keys and gives the same
logits; the imported checkpoint loaded into megaglot at TP=2 gives HF's logits. Bad inputs fail
with one clear line, and nothing partial is left behind.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_harness import run_distributed
from hf_models import random_gpt_neox
from megaglot.checkpoint import streaming
from megaglot.checkpoint.convert import export_hf, import_hf
from megaglot.checkpoint.format import CheckpointError, CheckpointReader, read_json, resolve
from megaglot.checkpoint.hf import global_name, pad_vocab
from megaglot.config import ConfigError, ModelConfig
from megaglot.model.gpt import layers_of_chunk

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, LAYERS = 1003, 4
TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))


def make_hf_model(seed=0, dtype=torch.float32):
    return random_gpt_neox(seed, vocab_size=VOCAB, num_hidden_layers=LAYERS, rotary_pct=0.25, rotary_emb_base=10000,
                           use_parallel_residual=True).to(dtype)


def global_state(state):
    """{global name: tensor} whatever HF names the checkpoint used (lm_head / embed_out)."""
    return {global_name(k): v for k, v in state.items()}


def old_form_config(model):
    """config.json as Polyglot-Ko's files have it: rotary_pct / rotary_emb_base, no rope_parameters."""
    c = model.config
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
            "hidden_act": "gelu", "rotary_pct": 0.25, "rotary_emb_base": 10000,
            "max_position_embeddings": 64, "initializer_range": 0.02, "layer_norm_eps": 1e-5,
            "use_parallel_residual": True, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 2,
            "torch_dtype": "float32", "use_cache": True}


def save_sharded_bin(model, directory, shards=3):
    """pytorch_model-0000i-of-0000n.bin + index, `embed_out.weight` naming, plus old buffers."""
    os.makedirs(directory, exist_ok=True)
    state = {}
    for k, v in global_state(model.state_dict()).items():
        state["embed_out.weight" if k == "embed_out.weight" else "gpt_neox." + k] = v.clone()
    for i in range(LAYERS):  # buffers older GPT-NeoX checkpoints carry
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None]
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[s * per:(s + 1) * per]}
        torch.save(part, os.path.join(directory, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(old_form_config(model), f)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model = make_hf_model()
    dirs = {"safetensors": str(root / "st"), "sharded-safetensors": str(root / "st-sharded"),
            "sharded-bin": str(root / "bin-sharded")}
    model.save_pretrained(dirs["safetensors"])
    model.save_pretrained(dirs["sharded-safetensors"], max_shard_size="100KB")
    save_sharded_bin(model, dirs["sharded-bin"])
    assert os.path.isfile(os.path.join(dirs["sharded-safetensors"], "model.safetensors.index.json"))
    with torch.no_grad():
        logits = model(input_ids=TOKENS).logits
    tokenizer = root / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"version": "1.0"}')
    (tokenizer / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    return dict(dirs=dirs, state=global_state(model.state_dict()), logits=logits, root=root,
                tokenizer=str(tokenizer))


def load_exported(directory):
    from transformers import GPTNeoXForCausalLM

    model, info = GPTNeoXForCausalLM.from_pretrained(directory, output_loading_info=True, dtype=torch.float32)
    model.eval()
    return model, info


LAYOUTS = [("safetensors", 2, 2, None), ("sharded-bin", 2, 2, 1), ("sharded-safetensors", 1, 1, None)]


@pytest.mark.parametrize("source,tp,pp,k", LAYOUTS)
def test_import_export_round_trip_is_bit_identical_and_loads_in_transformers(hf, tmp_path, source, tp, pp, k):
    save, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    directory = import_hf(hf["dirs"][source], save, tp, pp, k)
    assert resolve(save) == directory == os.path.join(save, "iter_0000000")
    assert not os.path.exists(directory + ".tmp")
    reader = CheckpointReader(directory)
    meta = reader.metadata
    assert meta["iteration"] == 0 and meta["consumed_samples"] == 0
    assert meta["parallel"]["tensor_model_parallel_size"] == tp
    assert meta["parallel"]["pipeline_model_parallel_size"] == pp
    assert meta["parallel"]["num_layers_per_virtual_pipeline_stage"] == k
    cfg = ModelConfig.from_dict(meta["model"])
    assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.rotary_pct) == (VOCAB, 1024, 0.25)
    # one part per (tp, pp) shard, holding that stage's layers (over its virtual chunks)
    vp = LAYERS // (pp * k) if k else 1
    parts = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    assert parts == [f"model_tp{t:02d}_pp{p:02d}.safetensors" for t in range(tp) for p in range(pp)]
    for p in range(pp):
        pieces = read_json(os.path.join(directory, f"model_tp00_pp{p:02d}.index.json"))["pieces"]
        layers = {int(e["name"].split(".")[1]) for e in pieces if e["name"].startswith("layers.")}
        want = {i for v in range(vp) for i in layers_of_chunk(LAYERS, pp, vp, p, v)}
        assert layers == want
        assert any(e["name"] == "embed_in.weight" for e in pieces) == (p == 0)
        assert any(e["name"] == "embed_out.weight" for e in pieces) == (p == pp - 1)
    # the checkpoint holds the HF tensors, vocabulary padded with zero rows, none of the buffers
    assert len(reader.names()) == len(hf["state"])
    for name, want in hf["state"].items():
        assert torch.equal(reader.full_tensor("model", name), pad_vocab(want, name, cfg)), name

    export_hf(save, out, hf["tokenizer"])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    exported = global_state(load_file(os.path.join(out, "model.safetensors")))
    assert "embed_out.weight" in load_file(os.path.join(out, "model.safetensors"))
    assert sorted(exported) == sorted(hf["state"])
    for name, want in hf["state"].items():
        assert exported[name].dtype == want.dtype and torch.equal(exported[name], want), name
    model, info = load_exported(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TOKENS).logits, hf["logits"], rtol=1e-6, atol=1e-6)


def test_float16_sharded_export_keeps_dtype_and_bits(hf, tmp_path):
    model = make_hf_model(seed=1, dtype=torch.float16)
    src = str(tmp_path / "fp16")
    model.save_pretrained(src)
    want = global_state(model.state_dict())
    import_hf(src, str(tmp_path / "ckpt"), 2, 2)
    export_hf(str(tmp_path / "ckpt" / "iter_0000000"), str(tmp_path / "out"), max_shard_bytes=40_000)
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and sorted(index["weight_map"]) == sorted(
        "embed_out.weight" if n == "embed_out.weight" else "gpt_neox." + n for n in want)
    got = {}
    for f in files:
        got.update(global_state(load_file(str(tmp_path / "out" / f))))
    for name in want:
        assert got[name].dtype == torch.float16 and torch.equal(got[name], want[name]), name
    assert json.load(open(tmp_path / "out" / "config.json"))["torch_dtype"] == "float16"
    _, info = load_exported(str(tmp_path / "out"))
    assert not info["missing_keys"] and not info["unexpected_keys"]


def _megaglot_logits_worker(rank, directory):
    from megaglot.checkpoint.model_state import load_model
    from megaglot.checkpoint.sharding import gather_full_tensor
    from megaglot.model import build_model_chunks

    reader = CheckpointReader(directory)
    cfg = ModelConfig.from_dict(reader.metadata["model"])
    (chunk,) = build_model_chunks(cfg)
    load_model([chunk], reader, cfg)
    with torch.no_grad():
        logits = chunk(None, {"tokens": TOKENS})  # [s, b, V/tp]
    logits.partition_dim = logits.dim() - 1
    return gather_full_tensor(logits)[..., :cfg.vocab_size].transpose(0, 1)


def test_imported_checkpoint_in_megaglot_at_tp2_gives_hf_logits(hf, tmp_path):
    directory = import_hf(hf["dirs"]["sharded-bin"], str(tmp_path / "ckpt"), 2, 2, 1)  # loaded at TP=2, PP=1
    results = run_distributed(_megaglot_logits_worker, 2, directory, parallel=(2, 1), timeout=120)
    for logits in results:
        torch.testing.assert_close(logits, hf["logits"], rtol=1e-5, atol=1e-5)


def test_vocab_size_override_keeps_padded_rows(hf, tmp_path):
    # Polyglot-Ko's config.json says 30080 (padded); --vocab-size 30003 gives the tokenizer's size
    directory = import_hf(hf["dirs"]["safetensors"], str(tmp_path / "ckpt"), 2, 1, vocab_size=1000)
    reader = CheckpointReader(directory)
    assert reader.metadata["model"]["vocab_size"] == 1000
    assert torch.equal(reader.full_tensor("model", "embed_in.weight")[:VOCAB], hf["state"]["embed_in.weight"])
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert got["embed_out.weight"].shape[0] == 1000
    assert json.load(open(tmp_path / "out" / "config.json"))["vocab_size"] == 1000


# ---- bad input: one clear line, nothing written ------------------------------------------------
def copy_hf(hf, tmp_path, source="safetensors"):
    import shutil

    dst = str(tmp_path / "src")
    shutil.copytree(hf["dirs"][source], dst)
    return dst


def edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    cfg = json.load(open(path))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(path, "w"))


def expect_error(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return err


def test_bad_configs_and_layouts(hf, tmp_path):
    src = copy_hf(hf, tmp_path)
    save = str(tmp_path / "ckpt")
    expect_error(ConfigError, r"does not divide --num-attention-heads 4", import_hf, src, save, 3, 1)
    expect_error(ConfigError, r"--num-layers 4 is not divisible by --pipeline-model-parallel-size x "
                              r"--num-layers-per-virtual-pipeline-stage = 2 x 3", import_hf, src, save, 1, 2, 3)
    expect_error(ConfigError, r"--pipeline-model-parallel-size 3 does not divide --num-layers 4",
                 import_hf, src, save, 1, 3)
    edit_config(src, model_type="llama")
    expect_error(ConfigError, r"config.json: model_type is 'llama', not 'gpt_neox'", import_hf, src, save, 1, 1)
    edit_config(src, model_type="gpt_neox", hidden_size=None)
    expect_error(ConfigError, r"config.json: missing field 'hidden_size'", import_hf, src, save, 1, 1)
    with open(os.path.join(src, "config.json"), "w") as f:
        f.write("{not json")
    expect_error(ConfigError, r"config.json: not valid JSON", import_hf, src, save, 1, 1)
    assert not os.path.exists(save)


def test_bad_weights(hf, tmp_path):
    save = str(tmp_path / "ckpt")
    src = copy_hf(hf, tmp_path)
    edit_config(src, intermediate_size=128)
    expect_error(CheckpointError, r"tensor gpt_neox\.layers\.0\.mlp\.dense_h_to_4h\.weight \(model.safetensors\) "
                                  r"has shape \(160, 64\), config.json implies \(128, 64\)", import_hf, src, save, 2, 2)
    edit_config(src, intermediate_size=160, num_hidden_layers=2)
    expect_error(CheckpointError, r"unexpected tensor gpt_neox\.layers\.2\.", import_hf, src, save, 2, 2)
    edit_config(src, num_hidden_layers=LAYERS, vocab_size=999)
    expect_error(CheckpointError, r"gpt_neox\.embed_in\.weight .* has shape \(1003, 64\), config.json implies "
                                  r"\(999 or 1024, 64\)", import_hf, src, save, 1, 1)
    edit_config(src, vocab_size=VOCAB)
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    del tensors["gpt_neox.layers.3.mlp.dense_4h_to_h.bias"]
    save_file(tensors, path, metadata={"format": "pt"})
    expect_error(CheckpointError, r"missing tensor gpt_neox\.layers\.3\.mlp\.dense_4h_to_h\.bias",
                 import_hf, src, save, 2, 2)
    os.remove(path)
    expect_error(CheckpointError, r"src: no weights \(model.safetensors, pytorch_model.bin", import_hf, src, save, 1, 1)
    os.remove(os.path.join(src, "config.json"))
    expect_error(CheckpointError, r"config.json: missing; --hf-dir must be", import_hf, src, save, 1, 1)
    expect_error(CheckpointError, r"nope: no such directory", import_hf, str(tmp_path / "nope"), save, 1, 1)
    src = copy_hf(hf, tmp_path / "b", "sharded-bin")
    os.remove(os.path.join(src, "pytorch_model-00002-of-00003.bin"))
    expect_error(CheckpointError, r"pytorch_model.bin.index.json: refers to missing shard "
                                  r"pytorch_model-00002-of-00003.bin", import_hf, src, save, 1, 1)
    with open(os.path.join(src, "pytorch_model-00002-of-00003.bin"), "wb") as f:
        f.write(b"not a pickle\n" * 10)
    expect_error(CheckpointError, r"pytorch_model-00002-of-00003.bin: cannot be read as a PyTorch state dict",
                 import_hf, src, save, 1, 1)
    assert not os.path.exists(save)


def test_failure_midway_leaves_no_checkpoint_and_existing_one_is_kept(hf, tmp_path, monkeypatch):
    save = str(tmp_path / "ckpt")
    calls = {"n": 0}
    real_write = streaming.StreamingPart.write

    def failing_write(self, *args):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full (simulated)")
        return real_write(self, *args)

    monkeypatch.setattr(streaming.StreamingPart, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        import_hf(hf["dirs"]["safetensors"], save, 2, 2)
    assert os.listdir(save) == []  # no iter dir, no staging dir, no latest
    monkeypatch.setattr(streaming.StreamingPart, "write", real_write)
    import_hf(hf["dirs"]["safetensors"], save, 2, 2)
    expect_error(CheckpointError, r"ckpt: already holds a checkpoint", import_hf, hf["dirs"]["safetensors"], save, 1, 1)
    CheckpointReader(resolve(save))  # still complete


def test_export_errors(hf, tmp_path):
    save, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    expect_error(CheckpointError, r"ckpt: no such checkpoint directory", export_hf, save, out)
    directory = import_hf(hf["dirs"]["safetensors"], save, 2, 2)
    os.makedirs(out)
    open(os.path.join(out, "x"), "w").close()
    expect_error(CheckpointError, r"out: exists and is not an empty directory", export_hf, save, out)
    out2 = str(tmp_path / "out2")
    expect_error(CheckpointError, r"missing-tok: no such tokenizer", export_hf, save, out2, str(tmp_path / "missing-tok"))
    expect_error(CheckpointError, r"no tokenizer files", export_hf, save, out2, str(tmp_path))
    os.remove(os.path.join(directory, "model_tp01_pp01.safetensors"))
    expect_error(CheckpointError, r"model_tp01_pp01.index.json: refers to missing shard model_tp01_pp01.safetensors",
                 export_hf, save, out2)
    assert not os.path.exists(out2) and os.listdir(tmp_path).count(".out2.export-tmp") == 0


def run_cli(*args):
    return subprocess.run([sys.executable, "tools/convert_hf.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_round_trip_and_clean_error(hf, tmp_path):
    save, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    r = run_cli("import", "--hf-dir", hf["dirs"]["sharded-bin"], "--save", save, "--tensor-model-parallel-size", "2",
                "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1")
    assert r.returncode == 0, r.stderr
    r = run_cli("export", "--load", save, "--hf-dir", out, "--tokenizer",
                os.path.join(hf["tokenizer"], "tokenizer.json"))
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    got = global_state(load_file(os.path.join(out, "model.safetensors")))
    assert all(torch.equal(got[n], hf["state"][n]) for n in hf["state"])
    r = run_cli("import", "--hf-dir", hf["dirs"]["safetensors"], "--save", str(tmp_path / "c2"),
                "--tensor-model-parallel-size", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("error: --tensor-model-parallel-size 3 does not divide --num-attention-heads 4")
