"""Data hygiene: token ids at or past the model's vocabulary are refused before training (from the
preprocessing sidecar, else from a cached C++ scan), --train-tokenizer never overwrites a different
tokenizer, and a preprocessing run that writes no document fails with one line and loses nothing."""

import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megaglot.config import ConfigError, get_model_preset
from megaglot.data import indexed_dataset
from megaglot.data.indexed_dataset import (DTYPE_CODES, IndexedDataset, IndexedDatasetBuilder, max_token_id_cache_path,
                                           max_token_id_reference, scan_max_token_id)
from megaglot.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from megaglot.data.tokenizer import load_tokenizer, train_tokenizer
from megaglot.kernels import load_extension
from megaglot.training import data as training_data
from megaglot.training.data import check_data_fits_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KO = os.path.join(ROOT, "examples", "data", "ko_sample.jsonl")
EN = os.path.join(ROOT, "examples", "data", "en_sample.jsonl")
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
TINY = get_model_preset("tiny-test")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_tokenizer([json.loads(line)["text"] for line in open(KO, encoding="utf-8")], 600, path)
    return path


def write_dataset(prefix, documents, dtype=np.int32):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for document in documents:
        builder.add_document(np.asarray(document))
    builder.finalize(prefix + ".idx")


def all_tokens(prefix):
    ds = IndexedDataset(prefix)
    return np.concatenate([ds[i] for i in range(len(ds))])


# ---- the largest token id ------------------------------------------------------------------------

def test_sidecar_records_the_largest_token_id_of_each_key(tok_path, tmp_path):
    src = tmp_path / "qa.jsonl"
    rows = [{"q": "주민번호 900101-1234567 확인 부탁드립니다", "a": "네 알겠습니다"}, {"q": "안녕", "a": "반갑습니다 여러분"}]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    preprocess(PreprocessConfig(input=[str(src)], output_prefix=str(tmp_path / "qa"), json_keys=["q", "a"],
                                tokenizer=tok_path, append_eod=True), log=io.StringIO())
    tok = load_tokenizer(tok_path)
    sidecars = {}
    for key in ("q", "a"):
        prefix = str(tmp_path / f"qa_{key}_document")
        sidecars[key] = json.load(open(prefix + ".json"))
        tokens = all_tokens(prefix)
        assert sidecars[key]["max_token_id"] == int(tokens.max())
        assert sidecars[key]["tokens"] == tokens.size and sidecars[key]["json_key"] == key
    assert sidecars["q"]["max_token_id"] == tok.token_to_id("<|rrn|>") == tok.vocab_size - 1  # the masked number
    assert sidecars["a"]["max_token_id"] < tok.vocab_size - 3  # no mask token in the answers


def test_trainer_uses_the_sidecar_and_refuses_ids_past_the_vocabulary(tok_path, tmp_path, monkeypatch):
    preprocess(PreprocessConfig(input=[KO], output_prefix=str(tmp_path / "ko"), tokenizer=tok_path), log=io.StringIO())
    prefix = str(tmp_path / "ko_text_document")
    largest = json.load(open(prefix + ".json"))["max_token_id"]
    assert largest == int(all_tokens(prefix).max())
    monkeypatch.setattr(training_data, "cached_max_token_id", lambda *a, **k: pytest.fail("scanned a sidecar's data"))
    check_data_fits_model([prefix], dataclasses.replace(TINY, vocab_size=largest + 1))
    with pytest.raises(ConfigError) as error:
        check_data_fits_model(f"1.0 {prefix}", dataclasses.replace(TINY, vocab_size=largest))
    assert str(error.value) == (
        f"--data-path {prefix}: token id {largest} (recorded in {prefix}.json) is not below the model's vocabulary "
        f"of {largest} - it was tokenized with a 600-token vocabulary ({tok_path}); set --vocab-size "
        f"{largest + 1} or more (or a --model whose vocabulary covers the data), or preprocess the data again "
        f"with the model's tokenizer")


def test_data_without_sidecar_is_scanned_once_in_cpp_and_cached(tmp_path, monkeypatch):
    prefix = str(tmp_path / "megatron_text_document")
    write_dataset(prefix, [[5, 17, 3], [1200, 4], [999]])
    ext = load_extension()
    assert ext is not None and hasattr(ext, "max_token_id")
    calls = []
    real = ext.max_token_id
    monkeypatch.setattr(ext, "max_token_id", lambda tokens, *a: calls.append(tokens.dtype) or real(tokens, *a))
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=rf"^--data-path {prefix}: token id 1200 \(found by scanning {prefix}\.bin\) "
                                          rf"is not below the model's vocabulary of 1000; set --vocab-size 1201"):
        check_data_fits_model([prefix], TINY, cache_dir=str(cache))
    assert calls == [np.dtype(np.int32)]
    cached = json.load(open(max_token_id_cache_path(prefix, str(cache))))
    assert cached["max_token_id"] == 1200 and cached["bin_bytes"] == 6 * 4
    check_data_fits_model([prefix], dataclasses.replace(TINY, vocab_size=1201), cache_dir=str(cache))
    assert len(calls) == 1  # the second check read the cache

    write_dataset(prefix, [[5, 17, 3], [40, 4], [999, 7]])  # the .bin changes: the cache no longer holds
    check_data_fits_model([prefix], TINY, cache_dir=str(cache))
    assert len(calls) == 2 and json.load(open(max_token_id_cache_path(prefix, str(cache))))["max_token_id"] == 999
    # a sidecar that does not describe this .bin (another token count) is not trusted either
    with open(prefix + ".json", "w") as f:
        json.dump({"max_token_id": 3, "tokens": 2, "dtype": "int32"}, f)
    assert training_data.largest_token_id(prefix, json.load(open(prefix + ".json")), str(cache)) == \
        (999, f"found by scanning {prefix}.bin")
    assert not [p for p in os.listdir(cache) if ".tmp" in p]


def test_cpp_scan_equals_numpy_for_every_index_dtype(monkeypatch, tmp_path):
    ext = load_extension()
    rng = np.random.default_rng(0)
    for dtype in DTYPE_CODES:
        for n in (1, 2, 7, 1000, 4099):
            if dtype.kind == "f":
                array = rng.standard_normal(n).astype(dtype) * 1000
            else:
                info = np.iinfo(dtype)
                array = rng.integers(info.min, info.max, size=n, endpoint=True, dtype=dtype)
            array[rng.integers(n)] = array.max()  # ties
            want = array.max()
            for threads in (0, 1, 3, 8):
                got = ext.max_token_id(array, threads)
                assert got == want and type(got) is (float if dtype.kind == "f" else int), (dtype, n, threads)
            assert max_token_id_reference(array, chunk=3) == want
    assert ext.max_token_id(np.zeros(0, dtype=np.uint16)) is None
    assert ext.max_token_id(np.arange(10, dtype=np.int64)[::-1].copy(), 4) == 9  # the maximum first
    with pytest.raises(ValueError, match="contiguous"):
        ext.max_token_id(np.arange(10, dtype=np.int32)[::2])
    with pytest.raises(ValueError, match="1-D"):
        ext.max_token_id(np.zeros((2, 2), dtype=np.int32))
    # the .bin path, with the extension and with the numpy fallback
    prefix = str(tmp_path / "u16")
    write_dataset(prefix, [rng.integers(0, 65535, size=300, dtype=np.uint16) for _ in range(5)], np.uint16)
    want = int(all_tokens(prefix).max())
    assert scan_max_token_id(prefix) == want
    monkeypatch.setattr(indexed_dataset, "load_extension", lambda: None)
    assert scan_max_token_id(prefix) == want


# ---- tokenizer hygiene ---------------------------------------------------------------------------

def test_train_tokenizer_never_overwrites_another_tokenizer(tmp_path):
    out = tmp_path / "shared"
    common = dict(train_tokenizer=True, vocab_size=400, quiet=True)
    preprocess(PreprocessConfig(input=[KO], output_prefix=str(out / "ko"), **common), log=io.StringIO())
    shared = out / "tokenizer.json"
    before = shared.read_bytes()
    with pytest.raises(PreprocessError) as error:
        preprocess(PreprocessConfig(input=[EN], output_prefix=str(out / "en"), **common), log=io.StringIO())
    assert str(error.value) == (f"--train-tokenizer: {shared} already exists and holds a different tokenizer "
                                f"(another dataset in that directory may use it); not overwriting it; pass "
                                f"--tokenizer {shared} to reuse it, or give an --output-prefix in another directory")
    assert shared.read_bytes() == before
    assert sorted(os.listdir(out)) == ["ko_text_document.bin", "ko_text_document.idx", "ko_text_document.json",
                                       "tokenizer.json"]
    data = (out / "ko_text_document.bin").read_bytes()
    preprocess(PreprocessConfig(input=[KO], output_prefix=str(out / "ko"), **common), log=io.StringIO())  # a rerun
    assert shared.read_bytes() == before and (out / "ko_text_document.bin").read_bytes() == data


def test_tokenizer_mismatch_says_what_differs(tmp_path):
    out = tmp_path / "d"
    preprocess(PreprocessConfig(input=[KO], output_prefix=str(out / "ko"), train_tokenizer=True, vocab_size=400),
               log=io.StringIO())
    prefix, path = str(out / "ko_text_document"), str(out / "tokenizer.json")
    old = load_tokenizer(path)
    other = str(tmp_path / "other.json")
    train_tokenizer([json.loads(line)["text"] for line in open(EN, encoding="utf-8")], 350, other)
    new = load_tokenizer(other)
    model = dataclasses.replace(TINY, vocab_size=400)
    with pytest.raises(ConfigError) as error:
        check_data_fits_model([prefix], model, new)
    assert str(error.value) == (
        f"--data-path {prefix} was tokenized with {path} (sha256 {old.sha256[:12]}, 400 tokens), not with "
        f"--tokenizer {other} (sha256 {new.sha256[:12]}, {new.vocab_size} tokens); pass the tokenizer the data was "
        f"made with, or preprocess the data again with --tokenizer {other}")
    with open(other, "rb") as src, open(path, "wb") as dst:  # the shared file replaced behind the data's back
        dst.write(src.read())
    with pytest.raises(ConfigError) as error:
        check_data_fits_model([prefix], model, load_tokenizer(path))
    message = str(error.value)
    assert message.count(path) == 1 and old.sha256[:12] in message and new.sha256[:12] in message
    assert "it was overwritten since" in message


def test_a_small_corpus_states_the_learned_vocabulary(tmp_path):
    log = io.StringIO()
    side = preprocess(PreprocessConfig(input=[EN], output_prefix=str(tmp_path / "en"), train_tokenizer=True,
                                       vocab_size=30000), log=log)
    learned = side["tokenizer"]["vocab_size"]
    assert learned < 30000 and learned == load_tokenizer(str(tmp_path / "tokenizer.json")).vocab_size
    assert f"preprocess: tokenizer: learned {learned} tokens, fewer than --vocab-size 30000 (the corpus is small)\n" \
        in log.getvalue()
    log = io.StringIO()
    preprocess(PreprocessConfig(input=[KO], output_prefix=str(tmp_path / "ko" / "ko"), train_tokenizer=True,
                                vocab_size=300), log=log)
    assert "learned" not in log.getvalue()  # the corpus filled the vocabulary


# ---- runs that write nothing ---------------------------------------------------------------------

def test_runs_that_write_nothing_fail_with_one_line(tok_path, tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    (tmp_path / "skipped.jsonl").write_bytes(b'{"text": "  "}\n{"text": broken\n{"text": "\xff\xfe"}\n')
    (tmp_path / "keys.jsonl").write_text('{"text": "a", "meta": 1}\n{"text": "b", "meta": 2}\n', encoding="utf-8")
    (tmp_path / "plain").write_text("not a directory", encoding="utf-8")
    kept = str(tmp_path / "kept")
    preprocess(PreprocessConfig(input=[KO], output_prefix=kept, tokenizer=tok_path), log=io.StringIO())
    before = {s: open(f"{kept}_text_document{s}", "rb").read() for s in (".bin", ".idx", ".json")}
    cases = {  # flags -> the one line on stderr
        "empty": (["--input", str(tmp_path / "empty.jsonl"), "--output-prefix", str(tmp_path / "e" / "e")],
                  f"no documents written: the input ({tmp_path / 'empty.jsonl'}) holds no text (0 non-blank lines "
                  f"read)"),
        "skipped": (["--input", str(tmp_path / "skipped.jsonl"), "--output-prefix", str(tmp_path / "s")],
                    "no documents written: 3 lines read, 3 skipped (malformed json 1, undecodable 1, empty 1)"),
        "keys": (["--input", str(tmp_path / "keys.jsonl"), "--output-prefix", kept, "--json-keys", "txt"],
                 "no documents written: 2 lines read, 2 skipped (key 'txt' missing in 2) - check --json-keys "
                 "(the first such record has keys: text, meta)"),
        "under a file": (["--input", KO, "--output-prefix", str(tmp_path / "plain" / "out")],
                         f"--output-prefix {tmp_path / 'plain' / 'out'}: cannot create the directory "
                         f"{tmp_path / 'plain'} ({tmp_path / 'plain'} is a file, not a directory); choose a prefix "
                         f"inside a directory"),
    }
    runs = {name: subprocess.Popen([sys.executable, TOOL, "--tokenizer", tok_path, "--quiet", *flags],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, (flags, _) in cases.items()}
    for name, run in runs.items():
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 2 and stderr == f"preprocess_data.py: error: {cases[name][1]}\n", (name, stderr)
    assert not os.path.exists(tmp_path / "e")  # not even the directory it made
    assert not [p for p in os.listdir(tmp_path) if p.startswith("s_")]
    assert {s: open(f"{kept}_text_document{s}", "rb").read() for s in before} == before  # nothing lost
    assert sorted(os.listdir(tmp_path)) == sorted(["empty.jsonl", "keys.jsonl", "kept_text_document.bin",
                                                   "kept_text_document.idx", "kept_text_document.json", "plain",
                                                   "skipped.jsonl"])


def test_train_tokenizer_saves_nothing_when_no_document_was_read(tmp_path):
    (tmp_path / "keys.jsonl").write_text('{"body": "가나다"}\n', encoding="utf-8")
    with pytest.raises(PreprocessError, match=r"^no documents written: 1 lines read, 1 skipped \(key 'text' missing"):
        preprocess(PreprocessConfig(input=[str(tmp_path / "keys.jsonl")], output_prefix=str(tmp_path / "o" / "o"),
                                    train_tokenizer=True, vocab_size=300), log=io.StringIO())
    assert not os.path.exists(tmp_path / "o")


def _check_on_two_ranks(rank, prefix, cache):
    """check_data_fits_model on each rank, counting the scans this rank made."""
    scans = []
    real = indexed_dataset.scan_max_token_id
    indexed_dataset.scan_max_token_id = lambda p: scans.append(p) or real(p)
    result = {}
    try:
        check_data_fits_model([prefix], TINY, cache_dir=cache)
    except ConfigError as error:
        result["error"] = str(error)
    check_data_fits_model([prefix], dataclasses.replace(TINY, vocab_size=1201), cache_dir=cache)
    result["scans"] = len(scans)
    return result


def test_only_rank_0_scans_and_every_rank_raises_the_same_error(tmp_path):
    from dist_harness import run_distributed

    prefix = str(tmp_path / "megatron_text_document")
    write_dataset(prefix, [[5, 17, 3], [1200, 4]])
    results = run_distributed(_check_on_two_ranks, 2, prefix, str(tmp_path / "cache"))
    message = (f"--data-path {prefix}: token id 1200 (found by scanning {prefix}.bin) is not below the model's "
               f"vocabulary of 1000; set --vocab-size 1201 or more (or a --model whose vocabulary covers the data), "
               f"or preprocess the data again with the model's tokenizer")
    assert results == [{"error": message, "scans": 1}, {"error": message, "scans": 0}]
