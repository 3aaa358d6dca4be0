"""Instruction tuning through the trainer (megaglot.training.sft, examples/finetune_ko.py, tools/generate.py).

- One process, the real trainer (pretrain with --sft-data's datasets), padded and packed: the first
  step's loss is the global batch's response-token mean of the per-token losses of a direct forward
  of the same model on the same microbatches, every gradient that mean's gradient, the iteration-0
  validation loss the same mean over the held-out split, and the log line reports response tokens/s.
- Two DP ranks, two microbatches each with different response-token counts: every rank's loss and
  gradients equal the one-process global mean (not the mean of per-microbatch means, also checked
  to differ).
- TP=2 x PP=2 x DP=2 on 8 ranks with sequence parallel, the distributed optimizer and selective
  recomputation, packed rows: two steps' losses, clipped norm, validation losses and every parameter
  equal a one-process run over the same global batches.
- tools/generate.py --template wraps exactly Template.render_prompt, stops at the end-of-text token
  and prints only the answer; a bad template is one line.
- finetune_ko.py: --sft-data without its loss-mask files, and --pack-sequences without --sft-data,
  each end with one `error:` line naming the file or the flag.
float32 throughout; losses to 1e-5 relative, gradients to rtol 1e-4 / atol 1e-6 (sums in another order).
"""

import contextlib
import importlib.util
import io
import os
import signal

import numpy as np
import pytest
import torch

from dist_harness import free_port, run_distributed
from megaglot.config import EOD_TOKEN_ID, ParallelConfig, TrainConfig, get_model_preset
from megaglot.config.cli import with_fields
from test_sft_packing import random_samples, write_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
SEQ = 24
# Prompt and response lengths: rows of 4-15 positions with 2-12 response tokens each (unequal counts).
SHAPES = [(3, 9), (8, 2), (2, 5), (6, 7), (4, 3), (9, 4), (2, 11), (5, 2), (3, 3), (7, 5)] * 2


def configs(prefix, pack, **overrides):
    model = get_model_preset("tiny-test", init_method_std=0.1)
    train = with_fields(TrainConfig(), micro_batch_size=2, global_batch_size=4, seq_length=SEQ, train_iters=1,
                        eval_interval=1, eval_iters=1, log_interval=1, lr=1e-3, clip_grad=0.0, seed=11,
                        sft_data=prefix, pack_sequences=pack, split="16,4,0")
    return model, ParallelConfig(), with_fields(train, **overrides)


def reference(model, train, microbatches, backward=True):
    """(loss, {name: grad}) of the global response-token mean, from a freshly built model of the run's
    seed (the same initial weights: docs/design.md's layout-independent models)."""
    from megaglot.model import build_model_chunks

    (chunk,) = build_model_chunks(model, seed=train.seed)
    total = sum(mb["loss_mask"].sum() for mb in microbatches)
    loss = sum((chunk(None, mb) * mb["loss_mask"]).sum() for mb in microbatches) / total
    if not backward:
        return loss.detach(), {}
    loss.backward()
    return loss.detach(), {p.global_name: p.grad.clone() for p in chunk.parameters()}


def first_batches(dataset, train, dp_rank=0, dp=1):
    from megaglot.data.gpt_dataset import make_batches

    it = make_batches(dataset, 0, train.micro_batch_size, dp_rank, dp)
    return [next(it) for _ in range(train.global_batch_size // (train.micro_batch_size * dp))]


def _one_process_worker(rank, prefix):
    from megaglot.parallel import state
    from megaglot.training import pretrain
    from megaglot.training.sft import build_sft_training_datasets

    out = {}
    for pack in (False, True):
        model, parallel, train = configs(prefix, pack)
        datasets = build_sft_training_datasets(train, model)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            result = pretrain(model, parallel, train, datasets=datasets)
        run = result["run"]
        batches = first_batches(datasets[0], train)
        loss, grads = reference(model, train, batches)
        valid_loss, _ = reference(model, train, first_batches(datasets[1], train), backward=False)
        torch.testing.assert_close(torch.tensor(result["losses"][0]), loss, **LOSS_TOL)
        torch.testing.assert_close(torch.tensor(result["valid_losses"][0]), valid_loss, **LOSS_TOL)
        for chunk in run.chunks:
            for p in chunk.parameters():
                torch.testing.assert_close(p.main_grad, grads[p.global_name], **GRAD_TOL,
                                           msg=lambda m: f"pack={pack} {p.global_name}: {m}")
        counts = [int(mb["loss_mask"].sum()) for mb in batches]
        assert run.response_tokens == sum(counts) and counts[0] != counts[1]
        assert ("segment_ids" in batches[0]) == pack
        out[pack] = log.getvalue()
        state.destroy()
    return out


@pytest.fixture(scope="module")
def sft_prefix(tmp_path_factory):
    return write_sft(tmp_path_factory.mktemp("sft") / "qa", random_samples(5, SHAPES, 1000))


def test_one_process_step_equals_the_global_response_token_mean_by_hand(sft_prefix):
    (logs,) = run_distributed(_one_process_worker, 1, sft_prefix, timeout=120)
    for pack, log in logs.items():
        line = next(x for x in log.splitlines() if x.startswith("iter "))
        assert " response tokens/s | " in line, line
        assert "validation at iter 0" in log and "validation at iter 1" in log


def _dp_worker(rank, prefix):
    from megaglot.model import masked_mean
    from megaglot.training import pretrain
    from megaglot.training.sft import build_sft_training_datasets

    model, parallel, train = configs(prefix, False, micro_batch_size=1, eval_interval=0)
    datasets = build_sft_training_datasets(train, model)
    with contextlib.redirect_stdout(io.StringIO()):
        result = pretrain(model, parallel, train, datasets=datasets)
    everything = first_batches(datasets[0], train)  # the whole global batch, as one process reads it
    mine = first_batches(datasets[0], train, dp_rank=rank, dp=2)
    loss, grads = reference(model, train, everything)
    torch.testing.assert_close(torch.tensor(result["losses"][0]), loss, **LOSS_TOL)
    for p in result["run"].chunks[0].parameters():
        torch.testing.assert_close(p.main_grad, grads[p.global_name], **GRAD_TOL, msg=lambda m: f"{p.global_name}: {m}")
    from megaglot.model import build_model_chunks

    (chunk,) = build_model_chunks(model, seed=train.seed)
    with torch.no_grad():
        naive = sum(masked_mean(chunk(None, mb), mb["loss_mask"]) for mb in everything) / len(everything)
    return {"counts": [int(mb["loss_mask"].sum()) for mb in mine], "loss": float(loss), "naive": float(naive)}


def test_two_dp_ranks_with_unequal_microbatches_equal_the_one_process_global_mean(sft_prefix):
    results = run_distributed(_dp_worker, 2, sft_prefix, timeout=120)
    counts = results[0]["counts"] + results[1]["counts"]
    assert len(set(counts)) == 4, counts  # four microbatches, four different response-token counts
    assert abs(results[0]["naive"] - results[0]["loss"]) > 1e-3  # the weighting matters on this batch


# ---- TP=2 x PP=2 x DP=2 on 8 ranks, the real trainer, packed rows --------------------------------

def layout_configs(prefix, tp=1, pp=1, sp=False, **overrides):
    """Packed SFT rows, two steps of AdamW (lr 5e-4, clipped at 0.5), validation at iterations 0 and 2;
    microbatches of one row, so the two of each DP rank hold their own response-token counts."""
    model, _, train = configs(prefix, True, micro_batch_size=1, train_iters=2, eval_interval=2, log_interval=100,
                              lr=5e-4, min_lr=5e-5, lr_warmup_iters=1, clip_grad=0.5, **overrides)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp)
    return model, parallel, train


def _layout_worker(rank, prefix, tp, pp, sp, overrides):
    from megaglot.training import pretrain
    from megaglot.training.sft import build_sft_training_datasets
    from test_training import local_state

    model, parallel, train = layout_configs(prefix, tp, pp, sp, **overrides)
    datasets = build_sft_training_datasets(train, model)
    with contextlib.redirect_stdout(io.StringIO()):
        result = pretrain(model, parallel, train, datasets=datasets)
    run = result["run"]
    return {"losses": result["losses"], "valid_losses": result["valid_losses"], "params": local_state(run),
            "grad_norm": run.optimizer.last_grad_norm, "response_tokens": run.response_tokens,
            "dp_counts": [sum(int(mb["loss_mask"].sum()) for mb in first_batches(datasets[0], train, d, 2))
                          for d in range(2)]}


def gradient_free_key_bias(model):
    """Indices, in the full query_key_value bias (heads in order, each [q | k | v]), of the key bias
    past the rotary dimensions. A constant added to every key of a query's row leaves its softmax
    unchanged, so their gradient is 0 in exact arithmetic; Adam divides the round-off left there by
    a sqrt(v) + eps of the same size, which moves them by ~lr/50 of arbitrary sign: noise that differs
    between any two summation orders. Elsewhere a parameter moves by ~lr = 5e-4 per step."""
    hn = model.hidden_size // model.num_attention_heads
    return torch.tensor([h * 3 * hn + hn + d for h in range(model.num_attention_heads)
                         for d in range(model.rotary_ndims, hn)])


def test_tp2_pp2_dp2_sp_distributed_optimizer_on_8_ranks_equals_one_process(sft_prefix):
    """The real trainer on packed rows at TP=2 x PP=2 x DP=2 with sequence parallel, the distributed
    optimizer and selective recomputation: two steps' losses, the clipped global norm, the validation
    losses and every parameter (TP shards concatenated) equal one process over the same global batches.
    Parameters to test_training.py's rtol 1e-4 / atol 2e-5, here 4% of one update (lr 5e-4): with few
    response tokens per step, a few elements' Adam ratio m/sqrt(v) sits on a cancellation between the
    two steps' gradients and amplifies round-off (at lr 2e-3 one of 330k elements differed by 3.5e-5,
    the difference scales with lr); a missed all-reduce of the response-token count is off by ~2e-3."""
    from test_training import full_state

    (one,) = run_distributed(_layout_worker, 1, sft_prefix, 1, 1, False, {}, timeout=120)
    overrides = {"use_distributed_optimizer": True, "recompute_granularity": "selective"}
    ranks = run_distributed(_layout_worker, 8, sft_prefix, 2, 2, True, overrides, timeout=300)
    assert ranks[0]["dp_counts"][0] != ranks[0]["dp_counts"][1], ranks[0]["dp_counts"]  # the weighting matters
    assert len(one["losses"]) == 2 and len(one["valid_losses"]) == 2
    for r in ranks:  # every rank reports the same global values
        np.testing.assert_allclose(r["losses"], one["losses"], rtol=1e-5, err_msg="training losses")
        np.testing.assert_allclose(r["valid_losses"], one["valid_losses"], rtol=1e-5, err_msg="validation losses")
        assert r["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5) and one["grad_norm"] > 0.5  # clipped
        assert r["response_tokens"] == one["response_tokens"]
    got, want = full_state(ranks), full_state([one])
    assert got.keys() == want.keys()
    noise = gradient_free_key_bias(get_model_preset("tiny-test"))
    for name, w in want.items():
        g = got[name]
        if name.endswith("attention.query_key_value.bias"):
            assert g[noise].abs().max() < 5e-5 and w[noise].abs().max() < 5e-5, name  # never moved by a gradient
            g, w = g.clone(), w.clone()
            g[noise] = w[noise] = 0.0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")


# ---- tools/generate.py --template ---------------------------------------------------------------

def load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_template_wraps_the_prompt_and_stops_at_eod(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    import megaglot.eval.generation as generation
    from megaglot.checkpoint.convert import import_hf
    from megaglot.data.sft_templates import load_template
    from megaglot.data.text import decode_new_tokens
    from megaglot.data.tokenizer import train_tokenizer
    from test_eval import make_hf_model
    from test_generate import _hf_greedy

    texts = ["한국의 수도는 서울입니다 오늘 날씨가 좋네요", "질문에 답변을 합니다 한국어 모델"] * 5
    tok = train_tokenizer(texts, vocab_size=280, save_path=str(tmp_path / "tok" / "tokenizer.json"), min_frequency=1)
    assert tok.eod == EOD_TOKEN_ID
    question = "한국의 수도는?"
    ids = tok.encode(load_template("koalpaca").render_prompt(question))
    hf = make_hf_model(tok.vocab_size, seed=3, max_positions=128, std=0.1, head_scale=1.0)
    free = _hf_greedy(hf, [ids], 8)[0]
    k = next(i for i in range(2, 8) if free[i] > EOD_TOKEN_ID and free[i] not in free[:i] and EOD_TOKEN_ID not in free[:i])
    with torch.no_grad():  # swap the output rows of EOD and free[k]: greedy now says EOD where it said free[k]
        w = hf.get_output_embeddings().weight
        w[[EOD_TOKEN_ID, free[k]]] = w[[free[k], EOD_TOKEN_ID]]
    assert _hf_greedy(hf, [ids], 8)[0][:k + 1] == free[:k] + [EOD_TOKEN_ID]
    hf.save_pretrained(str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), tp=1, pp=1)

    seen = []
    real = generation.generate

    def spy(chunks, cfg, prompts, *args, **kwargs):
        new = real(chunks, cfg, prompts, *args, **kwargs)
        seen.append((list(map(list, prompts)), new, kwargs.get("eod")))
        return new

    monkeypatch.setattr(generation, "generate", spy)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    tool = load_script(os.path.join(ROOT, "tools", "generate.py"), "megaglot_tool_generate_sft")
    base = ["--load", str(tmp_path / "ckpt"), "--tokenizer", str(tmp_path / "tok"), "--max-new-tokens", "8",
            "--greedy", "--quiet"]
    assert tool.main(base + ["--template", "koalpaca", "--prompt", question]) == 0
    assert seen[-1] == ([ids], [free[:k] + [EOD_TOKEN_ID]], EOD_TOKEN_ID)  # stopped at EOD, before 8 tokens
    assert capsys.readouterr().out == decode_new_tokens(tok, free[:k]).strip() + "\n"  # the answer alone

    custom = tmp_path / "qa.txt"
    custom.write_text("Q: {instruction}\nA: {output}", encoding="utf-8")
    assert tool.main(base + ["--template", str(custom), "--prompt", question]) == 0
    assert seen[-1][0] == [tok.encode(f"Q: {question}\nA:")]
    capsys.readouterr()
    assert tool.main(base + ["--template", "nope", "--prompt", question]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --template nope: neither a built-in template") and err.count("\n") == 1, err


# ---- finetune_ko.py: bad input --------------------------------------------------------------------

@pytest.mark.parametrize("case", ["no_mask", "pack_without_sft"])
def test_finetune_bad_input_is_one_line(case, tmp_path, monkeypatch, capsys, sft_prefix):
    if case == "no_mask":
        prefix = write_sft(tmp_path / "half", [([5, 6], [7])])
        for ext in (".bin", ".idx"):
            os.remove(f"{prefix}_loss_mask_document{ext}")
        flags, message = ["--model", "tiny", "--sft-data", prefix], f"{prefix}_loss_mask_document.bin/.idx not found"
    else:
        flags, message = ["--model", "tiny", "--pack-sequences"], "--pack-sequences packs instruction samples: it needs --sft-data"
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    script = load_script(os.path.join(ROOT, "examples", "finetune_ko.py"), "megaglot_finetune_ko")
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert script.main(flags) == 2
    finally:
        signal.signal(signal.SIGINT, previous)  # main() installs the scripts' Ctrl-C handler
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
