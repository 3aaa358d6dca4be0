"""Checkpoints carry their tokenizer and the HF export carries a complete one.

A tiny-test checkpoint whose vocabulary is a byte-level BPE trained on the bundled Korean sample,
with the tokenizer copied into the iteration directory and recorded relative to it (what training
saves), is moved with shutil.move and still generates, evaluates and exports without --tokenizer;
a checkpoint recording a path that is gone says so and names --tokenizer. The export's
tokenizer_config.json / special_tokens_map.json / config.json name the tokenizer's own special
tokens (pad <pad> = 0 < vocabulary), so AutoTokenizer encodes as megaglot does and a right-padded
batch through AutoModelForCausalLM gives the unpadded runs' logits.
"""

import json
import os
import shutil

import pytest
import torch

from checkpoint_fixtures import write_random_checkpoint
from dist_harness import free_port
from megaglot.checkpoint.convert import export_hf, import_hf
from megaglot.checkpoint.format import CheckpointError, CheckpointReader, model_config_of, resolve
from megaglot.checkpoint.hf import recorded_tokenizer
from megaglot.config import get_model_preset
from megaglot.data.tokenizer import load_tokenizer, train_tokenizer
from hf_models import random_gpt_neox
from test_eval import DATA, load_tool

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCE = "오늘 한빛시 버스 노선이 새로 바뀌었습니다. 출퇴근 시간이 줄어들까요?"


def _korean_lines():
    with open(os.path.join(REPO, "examples", "data", "ko_sample.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _self_contained(root, tok_path, tp=2):
    """A checkpoint as training now saves it: tokenizer.json in the iteration directory, recorded
    relative to it. Weights of a tiny-test-sized GPT-NeoX at a realistic scale (std 0.1), so that
    logits compare at fp32 round-off."""
    tok = load_tokenizer(tok_path)
    tiny = get_model_preset("tiny-test", vocab_size=tok.vocab_size)
    hf = random_gpt_neox(2, vocab_size=tok.vocab_size, max_position_embeddings=tiny.max_position_embeddings,
                         hidden_size=tiny.hidden_size, num_hidden_layers=tiny.num_layers,
                         intermediate_size=tiny.ffn_hidden_size, rotary_pct=tiny.rotary_pct, initializer_range=0.1)
    hf.save_pretrained(os.path.join(os.path.dirname(root), "hf"))
    directory = import_hf(os.path.join(os.path.dirname(root), "hf"), root, tp, 1)
    cfg = model_config_of(CheckpointReader(directory))
    shutil.copy2(tok_path, os.path.join(directory, "tokenizer.json"))
    meta_path = os.path.join(directory, "metadata.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["tokenizer"] = "tokenizer.json"
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return directory, cfg


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """(moved checkpoint root, its HF export made without --tokenizer, megaglot tokenizer, cfg)."""
    root = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(_korean_lines(), 512, str(root / "trained" / "tokenizer.json"), min_frequency=1)
    assert tok.vocab_size == 512 and tok.eod == 2 and tok.token_to_id("<pad>") == 0
    _, cfg = _self_contained(str(root / "run" / "ckpt"), tok.path)
    shutil.rmtree(root / "trained")  # nothing outside the checkpoint is left to find
    shutil.move(str(root / "run" / "ckpt"), str(root / "elsewhere"))
    shutil.rmtree(root / "run")
    export = str(root / "export")
    export_hf(str(root / "elsewhere"), export, quiet=True)  # no tokenizer given: the checkpoint's own
    return str(root / "elsewhere"), export, load_tokenizer(os.path.join(resolve(str(root / "elsewhere")),
                                                                        "tokenizer.json")), cfg


def test_recorded_tokenizer_resolution(tmp_path):
    it = tmp_path / "ckpt" / "iter_0000001"
    (it / "tok").mkdir(parents=True)
    (it / "tok" / "tokenizer.json").write_text("{}")
    assert recorded_tokenizer({"tokenizer": "tok/tokenizer.json"}, str(it)) == (str(it / "tok" / "tokenizer.json"),
                                                                                "tok/tokenizer.json")
    assert recorded_tokenizer({"tokenizer": "tok"}, str(it)) == (str(it / "tok"), "tok")
    old = tmp_path / "old" / "tokenizer.json"
    old.parent.mkdir()
    old.write_text("{}")
    assert recorded_tokenizer({"tokenizer": {"path": str(old)}}, str(it)) == (str(old), str(old))
    gone = str(tmp_path / "gone" / "tokenizer.json")
    assert recorded_tokenizer({"tokenizer": gone}, str(it)) == (None, gone)
    assert recorded_tokenizer({}, str(it)) == (None, None)
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")  # beside the iteration directories
    assert recorded_tokenizer({"tokenizer": gone}, str(it)) == (str(tmp_path / "ckpt" / "tokenizer.json"), gone)


def test_moved_checkpoint_generates_and_evaluates_with_its_own_tokenizer(moved, tmp_path, monkeypatch, capsys):
    ckpt, export, tok, _ = moved
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    prompt = "한빛시는 다음 달부터"
    assert load_tool("generate").main(["--load", ckpt, "--prompt", prompt, "--max-new-tokens", "5", "--greedy",
                                       "--quiet"]) == 0
    out = capsys.readouterr()
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ids = tok.encode(prompt)
    for _ in range(5):  # the export's greedy continuation, through megaglot's tokenizer
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        if ids[-1] == tok.eod:
            ids.pop()
            break
    assert out.out.rstrip("\n") == tok.decode(ids), out.err

    results = {}
    for flag, source in (("--load", ckpt), ("--hf-dir", export)):
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        path = str(tmp_path / f"{flag[2:]}.json")
        assert load_tool("evaluate").main([flag, source, "--data-dir", DATA, "--tasks", "kobest_copa",
                                           "--output", path, "--quiet"]) == 0, capsys.readouterr().err
        with open(path) as f:
            results[flag] = json.load(f)["tasks"][0]
    assert results["--load"]["acc"] == results["--hf-dir"]["acc"]
    assert "| kobest_copa" in capsys.readouterr().out


def test_a_recorded_tokenizer_that_is_gone_is_named(tmp_path, monkeypatch, capsys):
    tok = train_tokenizer(_korean_lines()[:10], 300, str(tmp_path / "tok" / "tokenizer.json"), min_frequency=1)
    cfg = get_model_preset("tiny-test", vocab_size=tok.vocab_size)
    directory = write_random_checkpoint(str(tmp_path / "ckpt"), cfg, 1, 1, optimizer=False)
    meta_path = os.path.join(directory, "metadata.json")
    with open(meta_path) as f:
        meta = json.load(f)
    gone = str(tmp_path / "gone" / "tokenizer.json")  # an older checkpoint's absolute path, since moved
    with open(meta_path, "w") as f:
        json.dump(dict(meta, tokenizer=gone), f)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert load_tool("generate").main(["--load", str(tmp_path / "ckpt"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {directory}: the checkpoint records tokenizer {gone}, which does not exist; pass "
                   f"--tokenizer PATH (tokenizer.json)\n")
    with pytest.raises(CheckpointError, match=r"records tokenizer .*gone/tokenizer.json, which does not exist; "
                                              r"pass --tokenizer"):
        export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), quiet=True)
    assert not os.path.exists(tmp_path / "out")
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "out"), str(tmp_path / "tok"), quiet=True)  # --tokenizer
    assert os.path.isfile(tmp_path / "out" / "tokenizer_config.json")


def test_export_writes_a_complete_tokenizer_that_pads_a_batch(moved):
    _, export, tok, cfg = moved
    assert sorted(os.listdir(export)) == ["config.json", "model.safetensors", "special_tokens_map.json",
                                          "tokenizer.json", "tokenizer_config.json"]
    with open(os.path.join(export, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == cfg.max_position_embeddings == 64
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<unk>", "pad_token": "<pad>"}
    assert {k: config[k] for k in special} == special
    with open(os.path.join(export, "special_tokens_map.json")) as f:
        assert json.load(f) == special
    with open(os.path.join(export, "config.json")) as f:
        hf_config = json.load(f)
    assert (hf_config["pad_token_id"], hf_config["bos_token_id"], hf_config["eos_token_id"]) == (0, 2, 2)

    auto = transformers.AutoTokenizer.from_pretrained(export)
    assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == (0, 2, 2, 1)
    assert auto.pad_token_id < hf_config["vocab_size"] == tok.vocab_size
    assert auto.encode(SENTENCE) == tok.encode(SENTENCE) and len(tok.encode(SENTENCE)) > 10
    assert auto.decode(tok.encode(SENTENCE)) == SENTENCE

    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    auto.padding_side = "right"
    texts = ["버스 노선", SENTENCE]
    batch = auto(texts, padding=True, return_tensors="pt")
    assert (batch["input_ids"][0] == 0).any() and batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()
    with torch.no_grad():
        padded = model(**batch).logits
        for i, text in enumerate(texts):
            ids = tok.encode(text)
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(padded[i, :len(ids)], alone, atol=1e-5, rtol=0)


def test_export_completes_a_tokenizer_directory_and_refuses_a_larger_vocabulary(moved, tmp_path):
    ckpt, _, tok, _ = moved
    src = tmp_path / "hf-tok"  # a Hugging Face tokenizer directory without a pad token
    src.mkdir()
    shutil.copy2(tok.path, src / "tokenizer.json")
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "add_prefix_space": False,
                                                           "model_max_length": 10 ** 30}))
    out = str(tmp_path / "out")
    export_hf(ckpt, out, str(src), quiet=True)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["add_prefix_space"] is False and config["pad_token"] == "<pad>"
    assert config["model_max_length"] == 64
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token_id == 0

    big = train_tokenizer(_korean_lines(), 600, str(tmp_path / "big" / "tokenizer.json"), min_frequency=1)
    with pytest.raises(CheckpointError, match=rf"^--tokenizer {big.path}: 600 tokens, but the model's vocabulary "
                                              rf"is 512; pass the tokenizer the model was trained with$"):
        export_hf(ckpt, str(tmp_path / "out2"), big.path, quiet=True)
    assert not os.path.exists(tmp_path / "out2")
