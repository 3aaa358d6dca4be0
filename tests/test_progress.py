"""Progress reporting (issue 21): bars go to stderr only, never into stdout results; --quiet silences
them; rank 0 only; a log file gets a bounded number of lines; generated Korean text never shows
U+FFFD; the example's banner never states a DP size that does not exist."""

import io
import json
import os
import re
import subprocess
import sys

import pytest

from dist_harness import free_port, run_distributed
from test_eval import DATA, load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KO_TEXT = ["대한민국의 수도는 서울이다. 한국어 모델은 문장을 이어 쓴다.",
           "옛날 옛적에 호랑이가 살았다. 서울의 봄은 따뜻하다.",
           "한글은 세종대왕이 만들었다. 김치와 불고기는 한국 음식이다."] * 4


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


# ---- the wrapper itself ----------------------------------------------------------------------------
def test_log_file_gets_few_lines_terminal_gets_a_bar_quiet_gets_nothing():
    from megaglot.progress import StepLog, progress

    log = io.StringIO()
    with progress(200_000, "scoring", unit="req", stream=log) as bar:
        for _ in range(200_000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert 1 <= len(lines) <= 3, lines  # the first and the last (and one per 5 s), never one per item
    assert lines[-1].startswith("scoring: 100% 200000/200000") and "\r" not in log.getvalue()

    tty = FakeTTY()
    with progress(10, "writing", unit="B", unit_scale=True, stream=tty, items=2, item_unit="tensors") as bar:
        bar.advance(4)
        bar.advance(6)
    assert "\r" in tty.getvalue() and "100%" in tty.getvalue() and "2/2 tensors" in tty.getvalue()

    quiet = io.StringIO()
    with progress(10, "x", stream=quiet, quiet=True) as bar:
        bar.advance(10)
    StepLog("start-up", quiet=True, stream=quiet)("model built")
    assert quiet.getvalue() == ""
    steps = io.StringIO()
    StepLog("start-up", stream=steps)("model built")
    assert steps.getvalue().startswith("start-up: model built (") and steps.getvalue().endswith(" s)\n")


def _rank_worker(rank):
    from megaglot.progress import StepLog, is_rank0, progress

    stream = io.StringIO()
    with progress(1000, "work", stream=stream) as bar:
        for _ in range(1000):
            bar.update(1)
    StepLog("start-up", stream=stream)("first step done")
    return is_rank0(), stream.getvalue()


def test_progress_on_rank_0_only():
    (first, text0), (second, text1) = run_distributed(_rank_worker, 2, timeout=120)
    assert first and not second
    assert "work: 100% 1000/1000" in text0 and "start-up: first step done" in text0
    assert text1 == ""


# ---- generated text --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A byte-level BPE too small to hold Korean syllables whole, and a random checkpoint for it."""
    from checkpoint_fixtures import write_random_checkpoint
    from megaglot.config import get_model_preset
    from megaglot.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("progress")
    tok_path = str(root / "tokenizer.json")
    tok = train_tokenizer(KO_TEXT, vocab_size=300, save_path=tok_path)
    cfg = get_model_preset("tiny-test", vocab_size=tok.vocab_size)
    write_random_checkpoint(str(root / "ckpt"), cfg, 1, 1, optimizer=True)
    return str(root / "ckpt"), tok_path, tok


def test_split_korean_characters_decode_whole(small_model):
    from megaglot.data.text import byte_decoder, decode_new_tokens

    _, _, tok = small_model
    text = "대한민국의 수도는 서울"
    ids = tok.encode(text)
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # token by token: split syllables
    assert decode_new_tokens(tok, ids) == text == tok.decode(ids)
    for cut in range(len(ids)):  # stopping anywhere: whole characters only, a prefix of the text
        part = decode_new_tokens(tok, ids[:cut])
        assert "\ufffd" not in part and text.startswith(part)
    char_of = {b: c for c, b in byte_decoder().items()}
    stray = tok.backend.token_to_id(char_of[0x80])  # a continuation byte with no leading byte
    assert "\ufffd" in tok.decode([stray] + ids)
    assert decode_new_tokens(tok, [stray] + ids) == text  # bytes that never form UTF-8 are dropped


def test_generate_prints_whole_korean_text_and_progress_on_stderr(small_model, monkeypatch, capsys):
    ckpt, tok_path, _ = small_model
    generate_tool = load_tool("generate")
    args = ["--load", ckpt, "--tokenizer", tok_path, "--prompt", "대한민국의 수도는", "--max-new-tokens", "40",
            "--seed", "3"]
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert generate_tool.main(args) == 0
    loud = capsys.readouterr()
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert generate_tool.main(args + ["--quiet"]) == 0
    quiet = capsys.readouterr()
    assert loud.out == quiet.out and loud.out.startswith("대한민국의 수도는") and "\ufffd" not in loud.out
    assert "generating" not in loud.out and "generating:" in loud.err
    assert quiet.err == ""


# ---- the tools' stdout carries results only ---------------------------------------------------------
def test_evaluate_output_json_and_stdout_free_of_progress(small_model, tmp_path, monkeypatch, capsys):
    ckpt, tok_path, _ = small_model
    evaluate_tool = load_tool("evaluate")
    results = []
    for extra in ([], ["--quiet"]):
        out = tmp_path / f"r{len(extra)}.json"
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        code = evaluate_tool.main(["--load", ckpt, "--tokenizer", tok_path, "--data-dir", DATA, "--tasks",
                                   "kobest_copa", "--batch-size", "4", "--output", str(out)] + extra)
        printed = capsys.readouterr()
        assert code == 0, printed.err
        results.append((printed, json.loads(out.read_text(encoding="utf-8"))))
    (loud, a), (quiet, b) = results
    assert a == b and a["tasks"][0]["n"] > 0
    assert "scoring" not in loud.out and "| kobest_copa" in loud.out and loud.out == quiet.out
    assert "scoring kobest_copa: 100%" in loud.err and quiet.err == ""


def test_reshard_and_export_show_bytes_and_tensors(small_model, tmp_path, capsys):
    ckpt, _, _ = small_model
    reshard_tool, convert_tool = load_tool("reshard_checkpoint"), load_tool("convert_hf")
    base = ["--load", ckpt, "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]
    assert reshard_tool.main(base + ["--save", str(tmp_path / "a")]) == 0
    loud = capsys.readouterr()
    assert "reshard: 100%" in loud.err and "tensors" in loud.err and "reshard:" not in loud.out
    assert reshard_tool.main(base + ["--save", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert convert_tool.main(["export", "--load", str(tmp_path / "a"), "--hf-dir", str(tmp_path / "hf")]) == 0
    loud = capsys.readouterr()
    assert "export: 100%" in loud.err and "export:" in loud.out  # the summary line on stdout, the bar on stderr
    assert convert_tool.main(["--quiet", "export", "--load", ckpt, "--hf-dir", str(tmp_path / "hf2")]) == 0
    assert capsys.readouterr() == ("", "")


def test_preprocess_stdout_empty_progress_on_stderr(tmp_path, capsys):
    tool = load_tool("preprocess_data")
    src = tmp_path / "ko.jsonl"
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in KO_TEXT), encoding="utf-8")
    base = ["--input", str(src), "--train-tokenizer", "--vocab-size", "300"]
    assert tool.main(base + ["--output-prefix", str(tmp_path / "a")]) == 0
    loud = capsys.readouterr()
    assert loud.out == "" and "preprocess: 100%" in loud.err and f"{len(KO_TEXT)} docs" in loud.err
    assert tool.main(base + ["--output-prefix", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


# ---- the example's banner ----------------------------------------------------------------------------
def test_layout_error_before_banner_names_the_flag():
    env = dict(os.environ, MASTER_PORT=str(free_port()))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "pretrain_ko.py"),
                          "--tensor-model-parallel-size", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2
    assert "DP=0" not in run.stdout + run.stderr and "megaglot:" not in run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--tensor-model-parallel-size 2" in lines[0]


@pytest.mark.parametrize("name", ["evaluate", "convert_hf", "reshard_checkpoint", "preprocess_data", "generate",
                                  "plot_schedule"])
def test_help_keeps_the_example_line_breaks(name, capsys):
    tool = load_tool(name)
    doc_lines = [line for line in tool.__doc__.splitlines() if line.lstrip().startswith(("python ", "torchrun "))]
    with pytest.raises(SystemExit):
        (getattr(tool, "parse_args", None) or tool.main)(["--help"])
    printed = capsys.readouterr().out
    assert doc_lines and all(line in printed.splitlines() for line in doc_lines), printed
    # a backslash-newline in a plain docstring joins two example lines with a run of spaces
    assert not any(re.search(r"\S {4,}-", line) for line in printed.splitlines()), printed
