"""Evaluation: choice log-likelihoods against transformers at several layouts, KOBEST prompts,
metrics on known answers, tools/evaluate.py end to end (tasks and perplexity) and bad task files."""

import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from dist_harness import free_port, run_distributed
from hf_models import random_gpt_neox
from megaglot.eval.metrics import accuracy, macro_f1
from megaglot.eval.scoring import encode_pair, rolling_windows
from megaglot.eval.tasks import TaskFileError, build_examples, get_task, load_task, read_task_file

DATA = os.path.join(os.path.dirname(__file__), "data")
TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


def load_tool(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"megaglot_tool_{name}", os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
TASK_NAMES = ["kobest_copa", "kobest_hellaswag", "kobest_boolq", "kobest_sentineg", "kobest_wic"]


def make_hf_model(vocab_size, seed, max_positions=64, head_scale=20.0, std=0.02):
    return random_gpt_neox(seed, head_scale=head_scale, vocab_size=vocab_size, max_position_embeddings=max_positions,
                           rotary_pct=0.5, use_parallel_residual=True, hidden_act="gelu", bos_token_id=0,
                           eos_token_id=2, initializer_range=std)


def hf_loglikelihood(model, context, continuation, max_length):
    full = (list(context) + list(continuation))[-(max_length + 1):]
    inp, tgt = full[:-1], full[1:]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inp])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    n = len(continuation)
    picked = logprobs[-n:].gather(-1, torch.tensor(tgt[-n:]).unsqueeze(-1)).squeeze(-1)
    greedy = bool((logits[-n:].argmax(-1) == torch.tensor(tgt[-n:])).all())
    return float(picked.sum()), greedy


def _requests():
    g = torch.Generator().manual_seed(7)
    reqs = []
    for ctx_len, cont_len in [(5, 3), (12, 1), (1, 9), (30, 4), (60, 8), (3, 2), (17, 17)]:
        ctx = torch.randint(0, 1003, (ctx_len,), generator=g).tolist()
        cont = torch.randint(0, 1003, (cont_len,), generator=g).tolist()
        reqs.append((ctx, cont))
    return reqs


def _greedy_request(model):
    ctx = [5, 17, 300, 999]
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ctx, ids[len(ctx):]


def _loglikelihood_worker(rank):
    from megaglot.checkpoint.hf import lookup, model_config_from_hf, pad_vocab
    from megaglot.checkpoint.sharding import load_full_tensors
    from megaglot.eval.scoring import Scorer
    from megaglot.model import build_model_chunks
    from megaglot.parallel import state

    hf = make_hf_model(1003, seed=3)
    hf_state = hf.state_dict()
    requests = _requests() + [_greedy_request(hf)]
    out = {}
    for tp, pp in [(2, 1), (1, 2), (1, 1)]:  # (1, 1) on two ranks: two data-parallel replicas
        state.initialize(tp, pp)
        cfg = model_config_from_hf(hf.config.to_dict())
        chunks = build_model_chunks(cfg)
        load_full_tensors(chunks, lambda n: pad_vocab(lookup(hf_state, n), n, cfg))
        scorer = Scorer(chunks, cfg, batch_size=3)
        out[(tp, pp)] = scorer.loglikelihood_tokens(requests)
        state.destroy()
    return out


def test_choice_loglikelihoods_equal_transformers_at_tp2_pp2_dp2():
    pytest.importorskip("transformers")
    hf = make_hf_model(1003, seed=3)
    requests = _requests() + [_greedy_request(hf)]
    want = [hf_loglikelihood(hf, c, x, 64) for c, x in requests]
    assert want[-1][1] is True  # the greedy continuation is recognised as greedy
    results = run_distributed(_loglikelihood_worker, 2, timeout=200)
    for rank_result in results:
        for layout, got in rank_result.items():
            assert [g for _, g in got] == [g for _, g in want], layout
            np.testing.assert_allclose([lp for lp, _ in got], [lp for lp, _ in want], rtol=1e-5, atol=1e-4,
                                       err_msg=str(layout))


# ---- prompts ----------------------------------------------------------------------------------
def test_prompts_are_built_as_lm_evaluation_harness_builds_them():
    copa = get_task("kobest_copa")
    doc = {"premise": "비가 왔다.", "question": "결과", "alternative_1": "젖었다.", "alternative_2": "말랐다.", "label": 0}
    shot = {"premise": "배가 고팠다.", "question": "원인", "alternative_1": "굶었다.", "alternative_2": "먹었다.", "label": 0}
    (ex,) = build_examples(copa, [doc], 1, 0, [shot])
    assert ex.context == "배가 고팠다.  왜냐하면 굶었다.\n\n비가 왔다.  그래서"
    assert ex.continuations == [" 젖었다.", " 말랐다."] and ex.gold == 0
    boolq = get_task("boolq")
    (ex,) = build_examples(boolq, [{"paragraph": "P", "question": "Q?", "label": 1}])
    assert (ex.context, ex.continuations) == ("P 질문: Q? 답변: ", [" 아니오", " 예"])
    (ex,) = build_examples(get_task("kobest_sentineg"), [{"sentence": "좋다", "label": 1}])
    assert (ex.context, ex.continuations) == ("문장: 좋다 긍부정:", [" 부정", " 긍정"])
    (ex,) = build_examples(get_task("kobest_wic"), [{"word": "배", "context_1": "A", "context_2": "B", "label": 0}])
    assert ex.context == "문장1: A 문장2: B 두 문장에서 배가 같은 뜻으로 쓰였나?"
    hs = {"context": "C", "ending_1": "a", "ending_2": "b", "ending_3": "c", "ending_4": "d", "label": 3}
    (ex,) = build_examples(get_task("kobest_hellaswag"), [hs])
    assert (ex.context, ex.continuations, ex.gold) == ("문장: C", [" a", " b", " c", " d"], 3)


def test_fewshot_sampling_is_seeded_and_excludes_the_current_document():
    task, docs, _, shots, _ = load_task(DATA, "kobest_sentineg")
    assert shots is None
    a = build_examples(task, docs, 3, seed=5)
    b = build_examples(task, docs, 3, seed=5)
    c = build_examples(task, docs, 3, seed=6)
    assert [e.context for e in a] == [e.context for e in b] != [e.context for e in c]
    for doc, ex in zip(docs, a):
        blocks = ex.context.split("\n\n")
        assert len(blocks) == 4 and all(doc["sentence"] not in blk for blk in blocks[:3])
    task, docs, _, shots, train = load_task(DATA, "kobest_copa")
    assert train.endswith("kobest_copa_train.jsonl") and len(shots) == 4
    with pytest.raises(TaskFileError, match="only 4 examples"):
        build_examples(task, docs, 5, fewshot_docs=shots)


def test_encode_pair_moves_trailing_spaces_and_rolling_windows_cover_every_token():
    class Chars:  # a toy tokenizer: one id per character
        def encode(self, s):
            return [ord(ch) for ch in s]

    ctx, cont = encode_pair(Chars(), "답변: ", " 예")
    assert ctx == [ord(c) for c in "답변:"] and cont == [ord(c) for c in "  예"]
    assert encode_pair(Chars(), "", "ab", prefix_token=2) == ([2], [97, 98])
    tokens = list(range(10, 33))
    windows = rolling_windows(tokens, 2, 8)
    assert [t for _, c in windows for t in c] == tokens
    for ctx, cont in windows:
        assert len(ctx) + len(cont) - 1 <= 8
    assert windows[0][0] == [2] and windows[1][0] == [tokens[7]]


# ---- metrics on known answers -----------------------------------------------------------------
def test_accuracy_and_macro_f1_on_hand_labelled_predictions():
    # kobest_sentineg_test.jsonl labels, and a fixed answer sheet
    golds = [d["label"] for d in read_task_file(os.path.join(DATA, "kobest_sentineg_test.jsonl"),
                                                get_task("kobest_sentineg"))]
    assert golds == [1, 0, 1, 0, 0, 1]
    preds = [1, 0, 0, 0, 1, 1]
    assert accuracy(golds, preds) == pytest.approx(4 / 6)
    # class 0: TP 2, FP 1, FN 1 -> F1 2/3; class 1: TP 2, FP 1, FN 1 -> 2/3
    assert macro_f1(golds, preds) == pytest.approx(2 / 3)
    # three classes, one never predicted: F1 = mean(1, 2/3, 0)... class 2: TP 0 -> 0
    assert macro_f1([0, 1, 2, 2], [0, 1, 1, 1]) == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert macro_f1([1, 1], [1, 1]) == 1.0 and accuracy([1, 0], [0, 1]) == 0.0


# ---- bad task files -------------------------------------------------------------------------
@pytest.mark.parametrize("line, message", [
    ('{"sentence": "좋다"}', r"bad\.jsonl:2: missing field label"),
    ('{"sentence": "좋다", "label": 2}', r"bad\.jsonl:2: label 2 out of range \(0\.\.1"),
    ('{"label": 1}', r"bad\.jsonl:2: missing field sentence"),
    ('{"sentence": "좋다", "label": 1', r"bad\.jsonl:2: not valid JSON"),
    ('[1, 2]', r"bad\.jsonl:2: expected a JSON object"),
])
def test_bad_task_files_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence": "fine", "label": 0}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(TaskFileError, match=message):
        read_task_file(str(path), get_task("kobest_sentineg"))


def test_bad_copa_question_unknown_task_and_missing_files(tmp_path, monkeypatch):
    bad = dict(premise="p", question="이유", alternative_1="a", alternative_2="b", label=0)
    (tmp_path / "kobest_copa_test.jsonl").write_text(json.dumps(bad, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(TaskFileError, match=r"kobest_copa_test\.jsonl:1: question must be 원인 or 결과"):
        load_task(str(tmp_path), "kobest_copa")
    with pytest.raises(TaskFileError, match="unknown task 'kobest_nli'"):
        load_task(str(tmp_path), "kobest_nli")
    with pytest.raises(TaskFileError, match="no file for kobest_wic"):
        load_task(str(tmp_path), "kobest_wic")
    (tmp_path / "kobest_wic_test.parquet").write_bytes(b"PAR1")
    with pytest.raises(TaskFileError, match=r"kobest_wic_test\.parquet: cannot be read"):
        load_task(str(tmp_path), "kobest_wic")
    for module in ("pyarrow", "pyarrow.parquet", "pyarrow.feather", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, module, None)  # as on a machine without pyarrow
    with pytest.raises(TaskFileError, match=r"kobest_wic_test\.parquet: reading parquet/arrow files needs pyarrow"):
        load_task(str(tmp_path), "kobest_wic")


def test_parquet_task_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = read_task_file(os.path.join(DATA, "kobest_wic_test.jsonl"), get_task("kobest_wic"))
    pq.write_table(pa.Table.from_pylist(docs), str(tmp_path / "kobest_wic_test.parquet"))
    assert load_task(str(tmp_path), "kobest_wic")[1] == docs


def test_evaluate_cli_bad_task_file_is_one_line_exit_2(tmp_path, capsys):
    evaluate_tool = load_tool("evaluate")

    shutil.copy(os.path.join(DATA, "kobest_boolq_test.jsonl"), tmp_path)
    with open(tmp_path / "kobest_boolq_test.jsonl", "a", encoding="utf-8") as f:
        f.write('{"paragraph": "p", "question": "q", "label": 5}\n')
    code = evaluate_tool.main(["--load", str(tmp_path), "--data-dir", str(tmp_path), "--tasks", "kobest_boolq"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "kobest_boolq_test.jsonl:5: label 5 out of range" in err
    assert "Traceback" not in err and err.count("\n") == 1
    code = evaluate_tool.main(["--load", str(tmp_path / "nope"), "--data-dir", DATA, "--tasks", "kobest_boolq"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "nope" in err and "Traceback" not in err


# ---- end to end through tools/evaluate.py ------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir_with_tokenizer(tmp_path_factory):
    pytest.importorskip("transformers")
    from megaglot.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("hf_eval")
    texts = []
    for name in os.listdir(DATA):
        with open(os.path.join(DATA, name), encoding="utf-8") as f:
            texts += [" ".join(str(v) for v in json.loads(line).values()) for line in f if line.strip()]
    texts += ["문장: 질문: 답변: 예 아니오 부정 긍정 왜냐하면 그래서 두 문장에서 같은 뜻으로 쓰였나?"] * 3
    tok = train_tokenizer(texts, vocab_size=301, save_path=str(root / "tokenizer.json"), min_frequency=1)
    model = make_hf_model(tok.vocab_size, seed=11, max_positions=512)
    model.save_pretrained(str(root))
    return str(root), tok, model


def _expected(model, tok, task_name, num_fewshot, seed):
    """Scores computed independently: prompt strings by hand, transformers for the likelihoods."""
    task, docs, _, shots, _ = load_task(DATA, task_name)
    import random

    rng = random.Random(seed)
    golds, preds = [], []
    for i, doc in enumerate(docs):
        picked = []
        if num_fewshot:
            if shots is not None:
                picked = rng.sample(shots, num_fewshot)
            else:
                idx = rng.sample(range(len(docs)), num_fewshot + 1)
                picked = [docs[j] for j in idx if j != i][:num_fewshot]
        ctx = "".join(task.doc_to_text(s) + " " + task.doc_to_choices(s)[s["label"]] + "\n\n" for s in picked)
        ctx += task.doc_to_text(doc)
        lls = []
        for choice in task.doc_to_choices(doc):
            c, x = ctx.rstrip(" "), ctx[len(ctx.rstrip(" ")):] + " " + choice
            c_ids = tok.encode(c)
            x_ids = tok.encode(c + x)[len(c_ids):]
            lls.append(hf_loglikelihood(model, c_ids, x_ids, 512)[0])
        golds.append(doc["label"])
        preds.append(int(np.argmax(lls)))
    return golds, preds


def test_evaluate_cli_matches_transformers_on_every_task_and_perplexity(hf_dir_with_tokenizer, tmp_path,
                                                                        monkeypatch, capsys):
    evaluate_tool = load_tool("evaluate")
    from megaglot.data.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path

    hf_dir, tok, model = hf_dir_with_tokenizer
    prefix = str(tmp_path / "ppl")
    builder = IndexedDatasetBuilder(data_file_path(prefix), dtype=np.int32)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, tok.vocab_size, (n,), generator=g).tolist() + [2] for n in (40, 7, 90, 25)]
    for d in docs:
        builder.add_document(d)
    builder.finalize(index_file_path(prefix))

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out_json = tmp_path / "results.json"
    code = evaluate_tool.main(["--hf-dir", hf_dir, "--data-dir", DATA, "--tasks", ",".join(TASK_NAMES),
                               "--num-fewshot", "1", "--seed", "3", "--batch-size", "4", "--ppl-data", prefix,
                               "--seq-length", "32", "--output", str(out_json)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "| kobest_copa" in printed.out and "macro F1" in printed.out and "perplexity of" in printed.out
    results = json.loads(out_json.read_text(encoding="utf-8"))
    for r in results["tasks"]:
        golds, preds = _expected(model, tok, r["task"], 1, 3)
        assert r["golds"] == golds and r["preds"] == preds, r["task"]
        assert r["acc"] == pytest.approx(accuracy(golds, preds))
        assert r["f1"] == pytest.approx(macro_f1(golds, preds))
    assert [r["task"] for r in results["tasks"]] == TASK_NAMES
    # perplexity: windows of 33 tokens with stride 32 over the concatenated stream
    stream = [t for d in docs for t in d]
    nll, count = 0.0, 0
    for start in range(0, len(stream) - 1, 32):
        window = stream[start:start + 33]
        lp, _ = hf_loglikelihood(model, window[:1], window[1:], 512)
        nll -= lp
        count += len(window) - 1
    assert results["perplexity"]["tokens"] == count == len(stream) - 1
    assert results["perplexity"]["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


# ---- lm-evaluation-harness adapter --------------------------------------------------------------
def _stub_lm_eval(monkeypatch):
    """A stand-in for lm-eval's LM base class and registry (lm-eval itself is an optional extra)."""
    import sys
    import types

    registry = {}

    class CacheHook:
        def __init__(self):
            self.calls = []

        def add_partial(self, kind, args, result):
            self.calls.append(kind)

    class LM:
        def __init__(self):
            self._rank, self._world_size, self.cache_hook = 0, 1, CacheHook()

    def register_model(*names):
        def deco(cls):
            for n in names:
                registry[n] = cls
            return cls
        return deco

    lm_eval = types.ModuleType("lm_eval")
    api = types.ModuleType("lm_eval.api")
    model = types.ModuleType("lm_eval.api.model")
    reg = types.ModuleType("lm_eval.api.registry")
    model.LM, reg.register_model = LM, register_model
    lm_eval.api, api.model, api.registry = api, model, reg
    for name, module in [("lm_eval", lm_eval), ("lm_eval.api", api), ("lm_eval.api.model", model),
                         ("lm_eval.api.registry", reg)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "megaglot.eval.harness", raising=False)
    return registry, LM


class _Instance:  # the shape of lm-eval's Instance that adapters read
    def __init__(self, *args):
        self.args = args


def test_lm_eval_adapter_registers_and_answers_the_three_request_types(hf_dir_with_tokenizer, monkeypatch):
    hf_dir, tok, model = hf_dir_with_tokenizer
    registry, base = _stub_lm_eval(monkeypatch)
    import megaglot.eval.harness as harness

    assert harness.HAVE_LM_EVAL and registry["megaglot"] is harness.MegaglotLM
    assert issubclass(harness.MegaglotLM, base)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    try:
        lm = harness.MegaglotLM(hf_dir=hf_dir, batch_size="3", max_length="40", device="cpu")
        assert (lm.rank, lm.world_size, lm.eot_token_id, lm.max_length) == (0, 1, tok.eod, 40)
        pairs = [("문장: 이 영화 정말 재미있었어요. 긍부정:", " 긍정"), ("답변: ", " 예"), ("", "배가 고팠다.")]
        got = lm.loglikelihood([_Instance(c, x) for c, x in pairs])
        for (c, x), (lp, greedy) in zip(pairs, got):
            if c:
                stripped = c.rstrip(" ")
                c_ids = tok.encode(stripped)
                x_ids = tok.encode(stripped + c[len(stripped):] + x)[len(c_ids):]
            else:
                c_ids, x_ids = [tok.eod], tok.encode(x)
            want_lp, want_greedy = hf_loglikelihood(model, c_ids, x_ids, 40)
            assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4) and greedy == want_greedy
        # rolling: every token of a text longer than max_length, scored once
        text = " ".join(["서울은 대한민국의 수도이며 한강이 도시를 가로질러 흐른다."] * 4)
        ids = tok.encode(text)
        assert len(ids) > 40
        (rolled,) = lm.loglikelihood_rolling([_Instance(text)])
        want = sum(hf_loglikelihood(model, c, x, 40)[0] for c, x in rolling_windows(ids, tok.eod, 40))
        assert rolled == pytest.approx(want, rel=1e-5)
        # generate_until: greedy, cut at the stop string
        prompt = "문장: 학생들이 교실에 모여"
        p_ids = tok.encode(prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([p_ids]), max_new_tokens=6, do_sample=False, eos_token_id=tok.eod,
                                 pad_token_id=0, attention_mask=torch.ones(1, len(p_ids), dtype=torch.long))
        new = out[0, len(p_ids):].tolist()
        full = tok.decode(new[:new.index(tok.eod)] if tok.eod in new else new)
        (text_out,) = lm.generate_until([_Instance(prompt, {"until": [], "max_gen_toks": 6, "do_sample": False})])
        assert text_out == full
        if len(full) > 2:
            stop = full[1:3]
            (cut,) = lm.generate_until([_Instance(prompt, {"until": [stop], "max_gen_toks": 6})])
            assert cut == full.split(stop)[0]
        assert lm.cache_hook.calls.count("loglikelihood") == 3
    finally:
        from megaglot.parallel import state
        import torch.distributed as dist

        state.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()
        sys_modules_cleanup = __import__("sys").modules
        sys_modules_cleanup.pop("megaglot.eval.harness", None)


def test_harness_main_without_lm_eval_is_a_clear_error(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    monkeypatch.delitem(sys.modules, "megaglot.eval.harness", raising=False)
    import megaglot.eval.harness as harness

    assert not harness.HAVE_LM_EVAL
    assert harness.main([]) == 2
    assert capsys.readouterr().err.startswith("error: lm-evaluation-harness is not installed")
    sys.modules.pop("megaglot.eval.harness", None)
