"""tools/preprocess_data.py and the library behind it, on the bundled corpus and on bad input."""

import gzip
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megaglot.data.indexed_dataset import IndexedDataset
from megaglot.data.preprocess import PreprocessConfig, PreprocessError, ensure_preprocessed, preprocess
from megaglot.data.tokenizer import TokenizerError, load_tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KO = os.path.join(ROOT, "examples", "data", "ko_sample.jsonl")
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The bundled Korean corpus through the command-line tool with a trained tokenizer."""
    out = tmp_path_factory.mktemp("ko")
    run = subprocess.run([sys.executable, TOOL, "--input", KO, "--output-prefix", str(out / "ko"),
                          "--train-tokenizer", "--vocab-size", "2000", "--append-eod", "--lang", "ko"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return out, run.stderr


def texts_of(path):
    return [json.loads(line)["text"] for line in open(path, encoding="utf-8")]


def test_bundled_corpus_is_large_and_varied():
    assert os.path.getsize(KO) >= 40 * 1024
    records = [json.loads(line) for line in open(KO, encoding="utf-8")]
    assert {r["register"] for r in records} >= {"news", "encyclopedia", "conversation", "howto"}
    for name in ("en_sample.jsonl", "ja_sample.jsonl"):
        assert len(texts_of(os.path.join(ROOT, "examples", "data", name))) >= 4


def test_trained_tokenizer_has_polyglot_special_ids(trained):
    out, _ = trained
    tok = load_tokenizer(str(out / "tokenizer.json"))
    assert [tok.token_to_id(t) for t in ("<pad>", "<unk>", "<|endoftext|>", "<|sep|>")] == [0, 1, 2, 3]
    assert [tok.token_to_id(t) for t in ("<|acc|>", "<|tel|>", "<|rrn|>")] == [tok.vocab_size - 3,
                                                                            tok.vocab_size - 2, tok.vocab_size - 1]
    assert tok.eod == 2
    text = "안녕하세요, 한국어 토크나이저입니다."
    assert tok.decode(tok.encode(text)) == text


def test_cli_output_round_trips_with_masks_and_eod(trained):
    out, log = trained
    prefix = str(out / "ko_text_document")
    ds = IndexedDataset(prefix)
    tok = load_tokenizer(str(out / "tokenizer.json"))
    texts = texts_of(KO)
    assert len(ds) == len(texts) == ds.num_documents and ds.dtype == np.uint16
    sidecar = json.load(open(prefix + ".json"))
    assert sidecar["masks"] == {"rrn": 1, "tel": 7, "acc": 4}  # the fake numbers planted in the corpus
    assert sidecar["lang"] == "ko" and sidecar["documents"] == len(texts) and sidecar["tokens"] == ds.num_tokens
    assert sidecar["tokenizer"]["sha256"] == tok.sha256
    assert "PII masked: rrn 1, tel 7, acc 4" in log
    for i in (0, 5, 25):
        tokens = ds[i]
        assert tokens[-1] == 2 and (tokens[:-1] != 2).all()
        decoded = tok.decode(tokens[:-1])
        assert "010-" not in decoded
    masked = tok.decode(ds[5])
    assert "<|acc|>" in masked and "<|tel|>" in masked and "2046" not in masked
    assert tok.decode(ds[0]).startswith(texts[0][:30])


def test_workers_give_identical_output(trained, tmp_path):
    out, _ = trained
    common = dict(input=[KO], tokenizer=str(out / "tokenizer.json"), append_eod=True, batch_size=7)
    preprocess(PreprocessConfig(output_prefix=str(tmp_path / "one"), workers=1, **common), log=io.StringIO())
    preprocess(PreprocessConfig(output_prefix=str(tmp_path / "two"), workers=2, **common), log=io.StringIO())
    for ext in (".bin", ".idx"):
        a = open(str(tmp_path / "one_text_document") + ext, "rb").read()
        assert a == open(str(tmp_path / "two_text_document") + ext, "rb").read()
        assert a == open(str(out / "ko_text_document") + ext, "rb").read()


def test_malformed_lines_are_counted_and_strict_fails(trained, tmp_path):
    out, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "first"}\n{"text": broken\n\n{"other": "x"}\n{"text": "   "}\n'
                    b'{"text": "\xff\xfe bad"}\n[1, 2]\n{"text": "last"}\n')
    log = io.StringIO()
    side = preprocess(PreprocessConfig(input=[str(bad)], output_prefix=str(tmp_path / "b"),
                                       tokenizer=str(out / "tokenizer.json")), log=log)
    assert side["documents"] == 2
    assert side["skipped"] == {"malformed_json": 1, "missing_key": 2, "undecodable": 1, "empty": 1}
    assert side["skipped_first_lines"]["missing_key"] == [f"{bad}:4", f"{bad}:7"]
    assert f"first malformed_json: {bad}:2" in log.getvalue()
    with pytest.raises(PreprocessError, match=rf"{bad}:2: malformed JSON .*--strict"):
        preprocess(PreprocessConfig(input=[str(bad)], output_prefix=str(tmp_path / "s"), strict=True,
                                    tokenizer=str(out / "tokenizer.json")), log=io.StringIO())
    assert not any(name.startswith("s_") for name in os.listdir(tmp_path))  # nothing left behind


def test_text_gzip_and_globs(trained, tmp_path):
    out, _ = trained
    (tmp_path / "lines.txt").write_text("첫째 문서\n둘째 문서\n\n셋째 문서\n", encoding="utf-8")
    with gzip.open(tmp_path / "paras.txt.gz", "wt", encoding="utf-8") as f:
        f.write("문단 하나\n이어지는 줄\n\n문단 둘\n")
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "압축 문서"}, ensure_ascii=False) + "\n")
    tok = load_tokenizer(str(out / "tokenizer.json"))
    side = preprocess(PreprocessConfig(input=[str(tmp_path / "*.gz")], output_prefix=str(tmp_path / "g"),
                                       tokenizer=str(out / "tokenizer.json")), log=io.StringIO())
    ds = IndexedDataset(str(tmp_path / "g_text_document"))
    assert [tok.decode(ds[i]) for i in range(len(ds))] == ["압축 문서", "문단 하나\n이어지는 줄", "문단 둘"]
    assert side["documents"] == 3
    preprocess(PreprocessConfig(input=[str(tmp_path / "lines.txt")], output_prefix=str(tmp_path / "l"),
                                tokenizer=str(out / "tokenizer.json"), text_split="line"), log=io.StringIO())
    ds = IndexedDataset(str(tmp_path / "l_text_document"))
    assert [tok.decode(ds[i]) for i in range(len(ds))] == ["첫째 문서", "둘째 문서", "셋째 문서"]


def test_several_json_keys(trained, tmp_path):
    out, _ = trained
    src = tmp_path / "qa.jsonl"
    src.write_text(json.dumps({"q": "질문입니다", "a": "답입니다"}, ensure_ascii=False) + "\n", encoding="utf-8")
    preprocess(PreprocessConfig(input=[str(src)], output_prefix=str(tmp_path / "qa"), json_keys=["q", "a"],
                                tokenizer=str(out / "tokenizer.json")), log=io.StringIO())
    tok = load_tokenizer(str(out / "tokenizer.json"))
    assert tok.decode(IndexedDataset(str(tmp_path / "qa_q_document"))[0]) == "질문입니다"
    assert tok.decode(IndexedDataset(str(tmp_path / "qa_a_document"))[0]) == "답입니다"


def test_tokenizer_errors(tmp_path):
    plain = train_tokenizer(["가나다 라마바 사아자"] * 20, 300)
    plain.backend.save(str(tmp_path / "x.json"))
    # a tokenizer.json without the PII tokens
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    bare = Backend(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bare.decoder = decoders.ByteLevel()
    bare.train_from_iterator(["가나다 라마바"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bare.save(str(tmp_path / "bare.json"))
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "전화 010-1234-5678"}\n', encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"bare\.json has no <\|rrn\|>, <\|tel\|>/<\|tell\|>, <\|acc\|> token.*"
                                             r"--no-mask-pii"):
        preprocess(PreprocessConfig(input=[str(src)], output_prefix=str(tmp_path / "o"),
                                    tokenizer=str(tmp_path / "bare.json")), log=io.StringIO())
    side = preprocess(PreprocessConfig(input=[str(src)], output_prefix=str(tmp_path / "o"), mask_pii=False,
                                       tokenizer=str(tmp_path / "bare.json")), log=io.StringIO())
    assert side["masks"] is None
    with pytest.raises(TokenizerError, match=r"--tokenizer .*missing: no tokenizer\.json"):
        preprocess(PreprocessConfig(input=[str(src)], output_prefix=str(tmp_path / "m"),
                                    tokenizer=str(tmp_path / "missing")), log=io.StringIO())
    (tmp_path / "junk.json").write_text("{not a tokenizer", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"junk\.json: not a Hugging Face tokenizer\.json"):
        load_tokenizer(str(tmp_path / "junk.json"))
    with pytest.raises(PreprocessError, match="no tokenizer"):
        preprocess(PreprocessConfig(input=[str(src)], output_prefix=str(tmp_path / "n")), log=io.StringIO())
    with pytest.raises(PreprocessError, match="--input .*nothing\\*.jsonl: matches no file"):
        preprocess(PreprocessConfig(input=[str(tmp_path / "nothing*.jsonl")], output_prefix=str(tmp_path / "n"),
                                    tokenizer=str(tmp_path / "x.json")), log=io.StringIO())


def test_tell_spelling_is_used_when_tel_is_absent(tmp_path):
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["연락 주세요"] * 10, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<|endoftext|>", "<|acc|>", "<|tell|>", "<|rrn|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.save(str(tmp_path / "tell.json"))
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "연락 010-1234-5678 주세요"}\n', encoding="utf-8")
    preprocess(PreprocessConfig(input=[str(src)], output_prefix=str(tmp_path / "t"),
                                tokenizer=str(tmp_path / "tell.json")), log=io.StringIO())
    ids = IndexedDataset(str(tmp_path / "t_text_document"))[0].tolist()
    assert ids.count(2) == 1 and 1 not in ids  # <|tell|> is id 2 here, <|acc|> id 1


def test_cli_errors_are_one_line(tmp_path):
    run = subprocess.run([sys.executable, TOOL, "--input", str(tmp_path / "none.jsonl"), "--output-prefix",
                          str(tmp_path / "o"), "--train-tokenizer", "--vocab-size", "500"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip() == f"preprocess_data.py: error: --input {tmp_path / 'none.jsonl'}: no such file"
    run = subprocess.run([sys.executable, TOOL, "--input", KO, "--output-prefix", str(tmp_path / "o"),
                          "--train-tokenizer"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--train-tokenizer needs --vocab-size N" in run.stderr
    assert not os.path.exists(tmp_path / "o_text_document.bin")


def test_ensure_preprocessed_builds_once(tmp_path):
    log = io.StringIO()
    prefix, tok = ensure_preprocessed(KO, str(tmp_path / "demo" / "ko"), vocab_size=1000, lang="ko", log=log)
    assert prefix == str(tmp_path / "demo" / "ko_text_document") and os.path.exists(tok)
    mtime = os.path.getmtime(prefix + ".bin")
    again = ensure_preprocessed(KO, str(tmp_path / "demo" / "ko"), vocab_size=1000, log=log)
    assert again == (prefix, tok) and os.path.getmtime(prefix + ".bin") == mtime
    assert IndexedDataset(prefix)[0][-1] == 2
