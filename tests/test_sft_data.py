"""Instruction-tuning data (tools/preprocess_sft.py, megaglot.data.sft): templates, loss masks, PII, errors."""

import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megaglot.config import EOD_TOKEN_ID
from megaglot.data.indexed_dataset import IndexedDataset
from megaglot.data.input_reader import PreprocessError
from megaglot.data.pii import find_pii, mask_text
from megaglot.data.sft import SFTConfig, preprocess_sft, read_records, text_and_mask_prefixes
from megaglot.data.sft_templates import load_template
from megaglot.data.tokenizer import load_tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "examples", "data", "ko_instruct.jsonl")
TOOL = os.path.join(ROOT, "tools", "preprocess_sft.py")
EOD = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """A small byte-level BPE with Polyglot-Ko's special tokens, trained on the bundled Korean corpus."""
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    with open(os.path.join(ROOT, "examples", "data", "ko_sample.jsonl"), encoding="utf-8") as f:
        train_tokenizer([json.loads(line)["text"] for line in f], 1000, path)
    return path


def build(tmp_path, tok_path, records, template="koalpaca", name="d", **kw):
    """Write records as JSONL, preprocess them; (token arrays, mask arrays, sidecar)."""
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    side = preprocess_sft(SFTConfig(input=[str(src)], output_prefix=str(tmp_path / name), tokenizer=tok_path,
                                    template=template, **kw), log=io.StringIO())
    text, mask = IndexedDataset(str(tmp_path / f"{name}_text_document")), \
        IndexedDataset(str(tmp_path / f"{name}_loss_mask_document"))
    return [text[i].tolist() for i in range(len(text))], [mask[i].tolist() for i in range(len(mask))], side


def runs(tok, ids, mask):
    """[(mask value, decoded text)] of the sample's contiguous prompt and response runs."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            out.append((mask[start], tok.decode(ids[start:i])))
            start = i
    return out


def test_koalpaca_mask_is_exactly_the_response_and_eod(tmp_path, tok_path):
    tok = load_tokenizer(tok_path)
    ids, masks, side = build(tmp_path, tok_path, [{"instruction": "한국의 수도는?", "output": "서울입니다."}])
    prompt = "### 질문: 한국의 수도는?\n\n### 답변:"
    assert runs(tok, ids[0], masks[0]) == [(0, prompt), (1, " 서울입니다." + EOD)]
    # prompt and response are tokenized separately: the prompt ids are what a generator encodes
    assert ids[0] == tok.encode(prompt) + tok.encode(" 서울입니다.") + [EOD_TOKEN_ID]
    assert load_template("koalpaca").render_prompt("한국의 수도는?") == prompt
    assert side["sft"]["template"] == "koalpaca"
    assert side["sft"]["loss_mask"] == str(tmp_path / "d_loss_mask_document")
    assert side["sft"]["response_tokens"] == sum(masks[0]) and side["documents"] == 1


def test_koalpaca_with_input(tmp_path, tok_path):
    tok = load_tokenizer(tok_path)
    ids, masks, _ = build(tmp_path, tok_path, [
        {"instruction": "다음 문장을 반말로 바꿔 주세요.", "input": "어디 가세요?", "output": "어디 가?"},
        {"instruction": "인사말은?", "input": "", "output": "안녕하세요."}])
    assert runs(tok, ids[0], masks[0]) == [
        (0, "### 질문: 다음 문장을 반말로 바꿔 주세요.\n\n### 맥락: 어디 가세요?\n\n### 답변:"), (1, " 어디 가?" + EOD)]
    assert runs(tok, ids[1], masks[1]) == [(0, "### 질문: 인사말은?\n\n### 답변:"), (1, " 안녕하세요." + EOD)]


DIALOGUE = {"messages": [
    {"role": "system", "content": "친절하게 답하세요."},
    {"role": "user", "content": "김치찌개에 무엇을 넣나요?"}, {"role": "assistant", "content": "김치와 돼지고기를 넣습니다."},
    {"role": "user", "content": "두부도 넣나요?"}, {"role": "assistant", "content": "네, 마지막에 넣습니다."}]}


def test_chat_multi_turn_has_loss_on_every_assistant_turn(tmp_path, tok_path):
    tok = load_tokenizer(tok_path)
    ids, masks, side = build(tmp_path, tok_path, [DIALOGUE, {"instruction": "질문", "input": "덧붙임", "output": "답"}],
                             template="chat")
    assert runs(tok, ids[0], masks[0]) == [
        (0, "### 시스템: 친절하게 답하세요.\n\n### 질문: 김치찌개에 무엇을 넣나요?\n\n### 답변:"),
        (1, " 김치와 돼지고기를 넣습니다."),
        (0, "\n\n### 질문: 두부도 넣나요?\n\n### 답변:"),
        (1, " 네, 마지막에 넣습니다." + EOD)]
    assert runs(tok, ids[1], masks[1]) == [(0, "### 질문: 질문\n\n덧붙임\n\n### 답변:"), (1, " 답" + EOD)]
    assert side["sft"]["exchanges"] == 3
    # under koalpaca the system message is the first question's context
    ids, masks, _ = build(tmp_path, tok_path, [DIALOGUE], name="k")
    assert runs(tok, ids[0], masks[0])[0] == (
        0, "### 질문: 김치찌개에 무엇을 넣나요?\n\n### 맥락: 친절하게 답하세요.\n\n### 답변:")


def test_file_template(tmp_path, tok_path):
    tok = load_tokenizer(tok_path)
    path = tmp_path / "t.txt"
    path.write_text("질문 - {instruction}\n참고 - {input}\n답 - {output} (끝)\n", encoding="utf-8")
    ids, masks, side = build(tmp_path, tok_path, [{"instruction": "가", "input": "나", "output": "다"},
                                                  {"instruction": "라", "output": "마"}], template=str(path))
    assert runs(tok, ids[0], masks[0]) == [(0, "질문 - 가\n참고 - 나\n답 -"), (1, " 다 (끝)" + EOD)]
    assert runs(tok, ids[1], masks[1]) == [(0, "질문 - 라\n답 -"), (1, " 마 (끝)" + EOD)]
    assert side["sft"]["template"] == str(path)


def test_pii_is_masked_in_prompt_and_response(tmp_path, tok_path):
    tok = load_tokenizer(tok_path)
    record = {"instruction": "제 번호 010-1234-5678로 연락 주세요.", "input": "주민번호 900101-1234567",
              "output": "신한 110-123-456789 계좌로 보내겠습니다."}
    ids, masks, side = build(tmp_path, tok_path, [record])
    pii = tok.pii_token_ids()
    assert [t for t in ids[0] if t in pii.values()] == [pii["tel"], pii["rrn"], pii["acc"]]
    prompt = load_template("koalpaca").render_prompt(record["instruction"], record["input"])
    assert runs(tok, ids[0], masks[0]) == [(0, mask_text(prompt)[0]), (1, " " + mask_text(record["output"])[0] + EOD)]
    assert "5678" not in tok.decode(ids[0]) and side["masks"] == {"rrn": 1, "tel": 1, "acc": 1}
    ids, _, side = build(tmp_path, tok_path, [record], name="raw", mask_pii=False)
    assert "010-1234-5678" in tok.decode(ids[0]) and side["masks"] is None


BAD = [
    ('{"instruction": "질문", "output": "답"', "malformed JSON (Expecting ',' delimiter at column 36); "
                                              "each line must be one JSON object"),
    ('{"instruction": "질문", "output": "답", "answer": "x"}',
     "unknown field 'answer' (records have instruction, input, output or messages; id, category, source, url "
     "are ignored)"),
    ('{"instruction": "질문"}', "no response: 'output' is missing or empty"),
    ('{"instruction": "질문", "output": "  "}', "no response: 'output' is missing or empty"),
    ('{"messages": [{"role": "user", "content": "안녕"}]}', "no response: 'messages' has no assistant message"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}', "the last message is from the user; a dialogue must end with the assistant"),
    ('{"messages": [{"role": "bot", "content": "a"}]}', "message 1: unknown role 'bot' (use system, user, assistant)"),
    ('{"instruction": "질문", "output": 3}', "field 'output' must be a string, got int"),
    ('["질문", "답"]', "expected a JSON object, got list"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_bad_records_name_file_and_line(tmp_path, tok_path, line, message):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "좋은 질문", "output": "좋은 답", "id": 7, "category": "x"}\n\n' + line + "\n",
                   encoding="utf-8")
    with pytest.raises(PreprocessError) as error:
        preprocess_sft(SFTConfig(input=[str(src)], output_prefix=str(tmp_path / "o"), tokenizer=tok_path), log=io.StringIO())
    assert str(error.value) == f"{src}:3: {message}"
    assert not any(name.startswith("o_") for name in os.listdir(tmp_path))  # nothing half-written is left


def test_bad_record_stops_a_run_with_workers(tmp_path, tok_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"instruction": "a", "output": "b"}\n' * 40 + '{"instruction": "a", "outptu": "b"}\n',
                   encoding="utf-8")
    with pytest.raises(PreprocessError, match=rf"^{src}:41: unknown field 'outptu' \(records have"):
        preprocess_sft(SFTConfig(input=[str(src)], output_prefix=str(tmp_path / "o"), tokenizer=tok_path,
                                 workers=2, batch_size=4), log=io.StringIO())
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_number_split_by_the_template_is_masked_once(tmp_path, tok_path):
    tok = load_tokenizer(tok_path)
    path = tmp_path / "t.txt"
    path.write_text("{instruction}\n전화 010-{output}", encoding="utf-8")
    ids, masks, side = build(tmp_path, tok_path, [{"instruction": "번호", "output": "1234-5678 입니다"}],
                             template=str(path))
    assert runs(tok, ids[0], masks[0]) == [(0, "번호\n전화 <|tel|>"), (1, " 입니다" + EOD)]
    assert side["masks"]["tel"] == 1


def test_bad_templates_and_tokenizer(tmp_path, tok_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"instruction": "질문", "input": "덧", "output": "답"}\n', encoding="utf-8")

    def run(**kw):
        with pytest.raises(PreprocessError) as error:
            preprocess_sft(SFTConfig(input=[str(src)], output_prefix=str(tmp_path / "o"), **kw), log=io.StringIO())
        return str(error.value)

    no_output = tmp_path / "no_output.txt"
    no_output.write_text("### 질문: {instruction}\n\n### 답변:\n", encoding="utf-8")
    assert run(tokenizer=tok_path, template=str(no_output)) == (
        f"--template {no_output}: no {{output}} placeholder; mark where the response goes, e.g. '### 답변: {{output}}'")
    inline = tmp_path / "inline.txt"
    inline.write_text("Q: {instruction} {input}\nA: {output}", encoding="utf-8")
    assert "{input} must be on a line of its own" in run(tokenizer=tok_path, template=str(inline))
    no_input = tmp_path / "no_input.txt"
    no_input.write_text("Q: {instruction}\nA: {output}", encoding="utf-8")
    assert run(tokenizer=tok_path, template=str(no_input)) == (
        f"{src}:1: the record has an 'input' but template {no_input} has no {{input}}")
    assert run(tokenizer=tok_path, template="alpaca") == (
        "--template alpaca: neither a built-in template (koalpaca, chat) nor a file")
    assert run().startswith("--tokenizer is required: give the tokenizer.json of the model to fine-tune")
    assert run(tokenizer=str(tmp_path / "nope.json")) == (
        f"--tokenizer {tmp_path / 'nope.json'}: no tokenizer.json there (give the file or its directory)")


def test_cli_one_line_errors_and_zero_samples(tmp_path, tok_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    run = subprocess.run([sys.executable, TOOL, "--input", str(empty), "--output-prefix", str(tmp_path / "o"),
                          "--tokenizer", tok_path], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == f"preprocess_sft.py: error: no samples: {empty} hold no records"
    assert os.listdir(tmp_path) == ["empty.jsonl"]
    spec = importlib.util.spec_from_file_location("preprocess_sft_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--input", SAMPLE, "--output-prefix", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("preprocess_sft.py: error: --tokenizer is required")
    assert tool.main(["--input", SAMPLE, "--output-prefix", str(tmp_path / "o"), "--tokenizer", tok_path,
                      "--no-mask-pii", "--template", "chat", "--quiet"]) == 0
    with open(tmp_path / "o_text_document.json", encoding="utf-8") as f:
        side = json.load(f)
    assert side["mask_pii"] is False and side["sft"]["template"] == "chat" and capsys.readouterr().err == ""


def test_bundled_sample_and_workers_are_byte_identical(tmp_path, tok_path):
    template = load_template("koalpaca")
    records = list(read_records([SAMPLE], template))  # raises on the first bad line
    assert len(records) >= 100
    raw = [json.loads(line) for line in open(SAMPLE, encoding="utf-8")]
    assert {"instruction": "대한민국의 수도는 어디인가요?"}.items() <= raw[0].items()
    assert sum("input" in r for r in raw) >= 8 and sum("messages" in r for r in raw) >= 8
    assert sum(any(find_pii(v) for v in r.values() if isinstance(v, str)) for r in raw) >= 6
    outputs = {}
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        side = preprocess_sft(SFTConfig(input=[SAMPLE], output_prefix=prefix, tokenizer=tok_path, workers=workers,
                                        batch_size=16, lang="ko"), log=io.StringIO())
        outputs[workers] = {s: open(f"{prefix}_{s}", "rb").read() for s in (
            "text_document.bin", "text_document.idx", "loss_mask_document.bin", "loss_mask_document.idx")}
    assert outputs[1] == outputs[2]
    assert side["documents"] == len(records) and side["masks"]["tel"] >= 4 and side["lang"] == "ko"
    text_prefix, mask_prefix = text_and_mask_prefixes(str(tmp_path / "w2_text_document"))
    assert mask_prefix == str(tmp_path / "w2_loss_mask_document")
    text, mask = IndexedDataset(text_prefix), IndexedDataset(mask_prefix)
    assert text.num_documents == mask.num_documents == len(records) and mask.dtype == np.uint8
    assert np.array_equal(text.sizes, mask.sizes) and text.dtype == np.uint16
    for i in range(len(text)):
        assert text[i][-1] == EOD_TOKEN_ID and mask[i][-1] == 1 and mask[i][0] == 0
        assert set(np.unique(mask[i]).tolist()) == {0, 1}
    with open(text_prefix + ".json", encoding="utf-8") as f:
        assert json.load(f)["sft"]["loss_mask"] == mask_prefix
