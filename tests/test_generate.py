"""Generation: KV-cache greedy decoding equals decoding without the cache and transformers'
greedy generate() at TP = 1 and 2; sampling options; tools/generate.py end to end and its errors."""


import pytest
import torch

from dist_harness import free_port, run_distributed
from test_eval import load_tool, make_hf_model

PROMPTS = [[5, 17, 300, 999, 42, 7], [1000, 3, 64, 64, 8, 120]]
NEW = 12


def _hf_greedy(model, prompts, max_new, eos=None):
    with torch.no_grad():
        out = model.generate(torch.tensor(prompts), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, attention_mask=torch.ones(len(prompts), len(prompts[0]),
                                                                        dtype=torch.long))
    return [row[len(prompts[0]):].tolist() for row in out]


def _generate_worker(rank, eos):
    from megaglot.checkpoint.hf import lookup, model_config_from_hf, pad_vocab
    from megaglot.checkpoint.sharding import load_full_tensors
    from megaglot.eval.generation import generate
    from megaglot.model import build_model_chunks
    from megaglot.parallel import state

    hf = make_hf_model(1003, seed=0, std=0.1, head_scale=1.0)
    hf_state = hf.state_dict()
    out = {}
    for tp in (2, 1):
        state.initialize(tp, 1)
        for backend in ("torch", "sdpa"):
            cfg = model_config_from_hf(hf.config.to_dict(), attention_backend=backend)
            chunks = build_model_chunks(cfg)
            load_full_tensors(chunks, lambda n: pad_vocab(lookup(hf_state, n), n, cfg))
            cached = generate(chunks, cfg, PROMPTS, NEW, use_cache=True)
            plain = generate(chunks, cfg, PROMPTS, NEW, use_cache=False)
            stopped = generate(chunks, cfg, PROMPTS, NEW, eod=eos)
            uneven = generate(chunks, cfg, [PROMPTS[0][:4], PROMPTS[1]], 5)
            sampled = [generate(chunks, cfg, PROMPTS, 6, greedy=False, temperature=0.8, top_k=20, top_p=0.9,
                                seed=s) for s in (1, 1, 2)]
            out[(tp, backend)] = dict(cached=cached, plain=plain, stopped=stopped, uneven=uneven, sampled=sampled)
        state.destroy()
    return out


def test_kv_cache_greedy_equals_no_cache_and_transformers_generate_at_tp_1_and_2():
    pytest.importorskip("transformers")
    hf = make_hf_model(1003, seed=0, std=0.1, head_scale=1.0)
    want = _hf_greedy(hf, PROMPTS, NEW)
    assert len(set(want[0])) > 2  # a non-degenerate continuation
    eos = want[0][4]  # stop the first sequence at its 5th token
    want_stopped = _hf_greedy(hf, PROMPTS, NEW, eos=eos)
    cut = want[1].index(eos) + 1 if eos in want[1] else NEW
    want_uneven = [_hf_greedy(hf, [PROMPTS[0][:4]], 5)[0], _hf_greedy(hf, [PROMPTS[1]], 5)[0]]
    results = run_distributed(_generate_worker, 2, eos, timeout=200)
    for rank_result in results:
        for layout, got in rank_result.items():
            assert got["cached"] == want, layout
            assert got["plain"] == want, layout
            assert got["stopped"][0] == want[0][:5] == [t for t in want_stopped[0] if t != 0][:5], layout
            assert got["stopped"][1] == want[1][:cut], layout
            assert got["uneven"] == want_uneven, layout
            a, b, c = got["sampled"]
            assert a == b and len(a[0]) == 6, layout  # seeded sampling is reproducible
    assert results[0] == results[1]  # every rank saw the same tokens


def _reference_greedy(chunk, prompt, max_new, eod=None):
    """Greedy decoding the plain way: the whole model in one process, argmax of the last position."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            logits = chunk(None, {"tokens": torch.tensor([ids])})  # [s, 1, V]
            ids.append(int(logits[-1, 0, :chunk.config.vocab_size].argmax()))
            if ids[-1] == eod:
                break
    return ids[len(prompt):]


def _pipeline_generate_worker(rank):
    from megaglot.config import ConfigError, get_model_preset
    from megaglot.eval.generation import generate
    from megaglot.model import build_model_chunks
    from megaglot.parallel import state

    cfg = get_model_preset("tiny-test", init_method_std=0.1)  # large enough weights for clear argmaxes
    prompts = [[5, 17, 300, 999, 42], [7, 3, 64, 64, 120]]  # odd length: sequence parallelism pads
    state.initialize(1, 1)
    (whole,) = build_model_chunks(cfg, seed=11)
    want = [_reference_greedy(whole, p, NEW) for p in prompts]
    eod = want[0][3]
    want_stopped = [_reference_greedy(whole, p, NEW, eod=eod) for p in prompts]
    out = dict(want=want, want_stopped=want_stopped, want_one=_reference_greedy(whole, prompts[1][:4], 3))
    state.destroy()
    state.initialize(2, 2)
    for sp in (False, True):
        chunks = build_model_chunks(cfg, seed=11, sequence_parallel=sp)
        out[sp] = dict(plain=generate(chunks, cfg, prompts, NEW, use_cache=False),
                       stopped=generate(chunks, cfg, prompts, NEW, eod=eod, use_cache=False),
                       one=generate(chunks, cfg, [prompts[1][:4]], 3, use_cache=False))
        with pytest.raises(ValueError, match="KV cache needs the whole model"):
            generate(chunks, cfg, prompts, NEW)
    state.destroy()
    state.initialize(1, 2, 2)
    with pytest.raises(ConfigError, match="interleaved"):
        generate(build_model_chunks(cfg, seed=11), cfg, prompts, NEW, use_cache=False)
    state.destroy()
    return out


def test_greedy_through_tp2_pp2_equals_a_single_process_argmax_loop():
    """The demo's --generate-prompt path: without the cache every step runs the pipeline schedule."""
    results = run_distributed(_pipeline_generate_worker, 4, timeout=200)
    want, want_stopped = results[0]["want"], results[0]["want_stopped"]
    assert all(len(set(w)) > 2 for w in want)  # non-degenerate continuations
    assert want_stopped[0] == want[0][:4]  # the end token stops that sequence (and is included)
    for rank_result in results:
        for sp in (False, True):
            got = rank_result[sp]
            assert got["plain"] == want, sp
            assert got["stopped"][0] == want_stopped[0], sp
            assert got["stopped"][1] == want_stopped[1], sp
            assert got["one"] == [results[0]["want_one"]], sp
    assert all(r[sp] == results[0][sp] for r in results for sp in (False, True))  # every rank, same tokens


def test_sampling_filters():
    from megaglot.eval.generation import sample_next

    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0, -3.0]])
    assert sample_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next(logits, greedy=False, top_k=2, generator=g)) for _ in range(200)}
    assert seen == {1, 2}
    # probabilities ~ [.005, .72, .26, .013, .0002]: top-p .5 keeps the first token only, .9 keeps two
    assert {int(sample_next(logits, greedy=False, top_p=0.5, generator=g)) for _ in range(100)} == {1}
    assert {int(sample_next(logits, greedy=False, top_p=0.9, generator=g)) for _ in range(300)} == {1, 2}
    flat = {int(sample_next(logits, greedy=False, temperature=100.0, generator=g)) for _ in range(400)}
    assert flat == {0, 1, 2, 3, 4}


def test_sampling_generator_follows_the_logits_device(monkeypatch):
    from megaglot.eval import generation
    from megaglot.eval.generation import SeededGenerator, make_generator, sample_next

    g = make_generator(7, "cpu")
    assert g.device == torch.device("cpu") and g.initial_seed() == 7
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    ref = torch.Generator().manual_seed(7)  # what generate() used before: CPU results must not change
    want = [sample_next(logits, greedy=False, top_k=10, generator=ref).tolist() for _ in range(4)]
    made = []
    monkeypatch.setattr(generation, "make_generator",
                        lambda seed, device: made.append((seed, device)) or make_generator(seed, device))
    seeded = SeededGenerator(7)
    assert [sample_next(logits, greedy=False, top_k=10, generator=seeded).tolist() for _ in range(4)] == want
    assert made == [(7, logits.device)]  # made once, on the logits' device, then one stream reused
    assert seeded.generator.device == logits.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_seeded_sampling_on_cuda():
    from megaglot.eval.generation import SeededGenerator, sample_next

    logits = torch.randn(2, 1000, device="cuda")
    with pytest.raises(RuntimeError):  # the bug: a CPU generator with CUDA probabilities
        torch.multinomial(torch.softmax(logits, -1), 1, generator=torch.Generator().manual_seed(3))
    seeded = SeededGenerator(3)
    a = [sample_next(logits, greedy=False, top_p=0.9, generator=seeded) for _ in range(3)]
    assert a[0].device.type == "cuda" and seeded.generator.device.type == "cuda"
    other = SeededGenerator(3)
    b = [sample_next(logits, greedy=False, top_p=0.9, generator=other) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # reproducible from the seed


def test_generate_cli_from_a_checkpoint_and_its_errors(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    from megaglot.checkpoint.convert import import_hf
    from megaglot.data.tokenizer import train_tokenizer

    texts = ["안녕하세요 반갑습니다 오늘 날씨가 좋네요", "한국어 언어 모델이 문장을 이어서 씁니다"] * 5
    tok = train_tokenizer(texts, vocab_size=280, save_path=str(tmp_path / "tok" / "tokenizer.json"), min_frequency=1)
    hf = make_hf_model(tok.vocab_size, seed=2, max_positions=128, std=0.1, head_scale=1.0)
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), tp=2, pp=1)  # saved at TP=2, loaded at TP=1
    tool = load_tool("generate")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    prompt = "안녕하세요 오늘"
    code = tool.main(["--load", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok"), "--prompt", prompt,
                      "--max-new-tokens", "8", "--greedy"])
    out = capsys.readouterr()
    assert code == 0, out.err
    ids = tok.encode(prompt)
    new = _hf_greedy(hf, [ids], 8, eos=tok.eod)[0]
    new = new[:new.index(tok.eod)] if tok.eod in new else new
    from megaglot.data.text import decode_new_tokens

    assert "\ufffd" in tok.decode(new)  # this continuation splits characters across byte-level tokens...
    assert out.out.rstrip("\n").endswith(prompt + decode_new_tokens(tok, new))  # ...printed whole (issue 21)
    assert "\ufffd" not in out.out and "generating:" in out.err and "generating" not in out.out

    def fails(argv, message):
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err

    fails(["--load", str(tmp_path / "ckpt"), "--prompt", "x"], "records no tokenizer")
    fails(["--load", str(tmp_path / "ckpt"), "--prompt", "x", "--pipeline-model-parallel-size", "2"],
          "--pipeline-model-parallel-size 1")
    fails(["--load", str(tmp_path / "missing"), "--prompt", "x"], "missing")
    fails(["--load", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok"), "--prompt", "x", "--top-p", "0"],
          "--top-p")
