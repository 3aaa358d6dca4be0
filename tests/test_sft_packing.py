"""Instruction tuning: SFT rows (padded and packed) and packed attention, against references.

(iii) The dataset gives exact tokens/labels/loss_mask/position_ids/segment_ids on a hand-made
3-sample dataset, padded and packed, with truncation, subsets, epochs and the bad-input errors.
(i) Attention reset is real: a packed row of samples A, B, C gives every token the loss it gets
alone and the same gradients, for each attention backend and with full/selective recomputation;
resetting positions without the segment mask changes B's losses.
(ii) The response-masked mean loss and every gradient equal transformers' GPT-NeoX with
labels = -100 on the prompt (and padding): one process on a padded batch, and 4 gloo ranks at
TP=2 x PP=2 with sequence parallel and recomputation on both the padded and the packed batch.
float32; losses to 1e-5, gradients to rtol 1e-4 / atol 1e-6 (sums in another order).
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from hf_models import random_gpt_neox
from megaglot.checkpoint.hf import global_name, lookup, model_config_from_hf, pad_vocab
from megaglot.checkpoint.sharding import load_full_tensors
from megaglot.config import EOD_TOKEN_ID, get_model_preset
from megaglot.data.gpt_dataset import DatasetError, collate
from megaglot.data.indexed_dataset import IndexedDatasetBuilder
from megaglot.data.sft_dataset import SFTDataset, build_sft_datasets
from megaglot.model import build_model_chunks, masked_mean

LOSS_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def write_sft(prefix, samples, vocab=None):
    """`samples`: (prompt, response) token lists -> the preprocessing contract's two .bin/.idx pairs."""
    text = IndexedDatasetBuilder(f"{prefix}_text_document.bin", np.uint16)
    mask = IndexedDatasetBuilder(f"{prefix}_loss_mask_document.bin", np.uint8)
    for prompt, response in samples:
        text.add_document(list(prompt) + list(response) + [EOD_TOKEN_ID])
        mask.add_document([0] * len(prompt) + [1] * (len(response) + 1))
    text.finalize(f"{prefix}_text_document.idx")
    mask.finalize(f"{prefix}_loss_mask_document.idx")
    return str(prefix)


def random_samples(seed, shapes, vocab):
    gen = np.random.default_rng(seed)
    return [(gen.integers(4, vocab, p).tolist(), gen.integers(4, vocab, r).tolist()) for p, r in shapes]


# ---- (iii) the dataset ---------------------------------------------------------------------------

HAND = [([5, 6], [7]), ([8], [9, 10]), ([11, 12, 13], [14])]


def rows(dataset):
    return [{k: v.tolist() for k, v in dataset[i].items()} for i in range(len(dataset))]


def test_padded_rows_are_exact_and_truncation_is_counted(tmp_path):
    prefix = write_sft(tmp_path / "hand", HAND)
    got = rows(SFTDataset(prefix, 4))
    assert got == [
        dict(tokens=[5, 6, 7, 0], labels=[6, 7, 2, 0], loss_mask=[0, 1, 1, 0], position_ids=[0, 1, 2, 3]),
        dict(tokens=[8, 9, 10, 0], labels=[9, 10, 2, 0], loss_mask=[1, 1, 1, 0], position_ids=[0, 1, 2, 3]),
        dict(tokens=[11, 12, 13, 14], labels=[12, 13, 14, 2], loss_mask=[0, 0, 1, 1], position_ids=[0, 1, 2, 3]),
    ]
    short = SFTDataset(prefix + "_text_document", 3)  # either file's prefix names the dataset
    assert short.truncated == 1 and rows(short)[2] == dict(tokens=[11, 12, 13], labels=[12, 13, 14],
                                                           loss_mask=[0, 0, 1], position_ids=[0, 1, 2])
    batch = collate([short[0], short[1]])
    assert batch["tokens"].shape == (2, 3) and batch["loss_mask"].dtype == torch.float32


def test_packed_rows_are_exact_greedy_and_in_order(tmp_path):
    prefix = write_sft(tmp_path / "hand", HAND)
    packed = SFTDataset(prefix, 8, pack=True)
    assert rows(packed) == [
        dict(tokens=[5, 6, 7, 8, 9, 10, 0, 0], labels=[6, 7, 2, 9, 10, 2, 0, 0], loss_mask=[0, 1, 1, 1, 1, 1, 0, 0],
             position_ids=[0, 1, 2, 0, 1, 2, 0, 1], segment_ids=[0, 0, 0, 1, 1, 1, -1, -1]),
        dict(tokens=[11, 12, 13, 14, 0, 0, 0, 0], labels=[12, 13, 14, 2, 0, 0, 0, 0],
             loss_mask=[0, 0, 1, 1, 0, 0, 0, 0], position_ids=[0, 1, 2, 3, 0, 1, 2, 3],
             segment_ids=[0, 0, 0, 0, -1, -1, -1, -1]),
    ]
    subset = SFTDataset(prefix, 7, [2, 0], pack=True)  # C (4 positions) + A (3) fill a row exactly
    assert rows(subset) == [dict(tokens=[11, 12, 13, 14, 5, 6, 7], labels=[12, 13, 14, 2, 6, 7, 2],
                                 loss_mask=[0, 0, 1, 1, 0, 1, 1], position_ids=[0, 1, 2, 3, 0, 1, 2],
                                 segment_ids=[0, 0, 0, 0, 1, 1, 1])]
    assert subset.stats() == dict(documents=2, skipped=0, truncated=0, samples_per_epoch=1, fill=1.0)


def test_epochs_are_deterministic_permutations(tmp_path):
    prefix = write_sft(tmp_path / "many", random_samples(0, [(2, 2)] * 7, 50))
    a, b = (SFTDataset(prefix, 8, seed=5, num_samples=20) for _ in range(2))
    assert len(a) == 20 and rows(a) == rows(b)
    first = [tuple(r["tokens"]) for r in rows(a)]
    assert sorted(first[:7]) == sorted(first[7:14]) and len(set(first[:7])) == 7 and first[:7] != first[7:14]
    fixed = SFTDataset(prefix, 8, num_samples=9)
    assert [r["tokens"] for r in rows(fixed)][7:] == [r["tokens"] for r in rows(fixed)][:2]
    train, valid, test = build_sft_datasets(prefix, 8, "5,2,0", pack=True)
    assert (list(train.documents), list(valid.documents), test) == ([0, 1, 2, 3, 4], [5, 6], None)


def test_bad_sft_data_fails_with_one_line_naming_the_file(tmp_path):
    prefix = write_sft(tmp_path / "hand", HAND)
    write_sft(tmp_path / "other", HAND[:2] + [([1], [2, 3])])  # the last document one token shorter
    for name, source in (("mixed_text_document", "hand_text_document"),
                         ("mixed_loss_mask_document", "other_loss_mask_document")):
        for ext in (".bin", ".idx"):
            (tmp_path / (name + ext)).write_bytes((tmp_path / (source + ext)).read_bytes())
    with pytest.raises(DatasetError, match=r"mixed_loss_mask_document\.idx: document lengths differ from .*"
                                           r"mixed_text_document\.idx"):
        SFTDataset(str(tmp_path / "mixed"), 8)
    (tmp_path / "other_loss_mask_document.idx").unlink()
    with pytest.raises(DatasetError, match=r"other_loss_mask_document\.bin/\.idx not found"):
        SFTDataset(str(tmp_path / "other"), 8)
    with pytest.raises(DatasetError, match=r"hand_text_document: document id 3 is outside \[0, 3\)"):
        SFTDataset(prefix, 8, [0, 3])


# ---- (i) attention reset is real -----------------------------------------------------------------

SHAPES = [(3, 4), (5, 3), (2, 5)]  # A, B, C: 7, 8 and 7 row positions; packed in one row of 24


def packed_and_alone(tmp_path, vocab):
    prefix = write_sft(tmp_path / "abc", random_samples(1, SHAPES, vocab))
    packed = SFTDataset(prefix, 24, pack=True)
    alone = SFTDataset(prefix, 24)
    assert len(packed) == 1 and len(alone) == 3
    return collate([packed[0]]), collate([alone[i] for i in range(3)])


def losses_and_grads(chunk, batch, weights):
    chunk.zero_grad()
    losses = chunk(None, batch)
    (losses * weights).sum().backward()
    return losses.detach(), {p.global_name: p.grad.clone() for p in chunk.parameters()}


@pytest.mark.parametrize("backend,recompute", [("torch", None), ("sdpa", None), ("fused", None),
                                               ("sdpa", "full"), ("torch", "selective")])
def test_packed_row_gives_every_sample_its_alone_loss_and_gradients(tmp_path, backend, recompute):
    cfg = get_model_preset("tiny-test", attention_backend=backend, init_method_std=0.2)
    (chunk,) = build_model_chunks(cfg, seed=3, recompute_granularity=recompute)
    chunk.train(recompute is not None)  # recomputation runs only in training (dropout is 0)
    packed, alone = packed_and_alone(tmp_path, cfg.vocab_size)
    seg = packed["segment_ids"][0]
    real = (seg >= 0).float()[None]  # every sample token counts, not only the response
    got, got_grads = losses_and_grads(chunk, packed, real)
    n = [int((seg == k).sum()) for k in range(3)]
    alone_weights = torch.zeros(3, 24)
    for k in range(3):
        alone_weights[k, :n[k]] = 1
    want, want_grads = losses_and_grads(chunk, alone, alone_weights)
    for k in range(3):
        torch.testing.assert_close(got[0, seg == k], want[k, :n[k]], **LOSS_TOL, msg=lambda m: f"sample {k}: {m}")
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **GRAD_TOL, msg=lambda m: f"{name}: {m}")

    # Counter-example: positions restart but every token sees the whole prefix of the row.
    positions_only = dict(packed, segment_ids=torch.zeros_like(packed["segment_ids"]))
    with torch.no_grad():
        leaky = chunk(None, positions_only)
    torch.testing.assert_close(leaky[0, seg == 0], got[0, seg == 0], **LOSS_TOL)  # A has nothing before it
    assert (leaky[0, seg == 1] - want[1, :n[1]]).abs().max() > 1e-2  # B sees A without the mask


# ---- (ii) equal to transformers' GPT-NeoX with labels = -100 ------------------------------------

HF_FIELDS = dict(vocab_size=1003, num_hidden_layers=2, rotary_pct=0.25, max_position_embeddings=64)
SFT_SHAPES = [(6, 5), (3, 9), (9, 2), (4, 4), (2, 7), (7, 3), (5, 6), (3, 3)]  # 8 samples of 6-12 positions
S = 24  # packed: two samples in each of 4 rows


def hf_padded_reference(hf, samples):
    """HF loss (mean over response tokens) and gradients for the samples right-padded in one batch."""
    width = max(len(p) + len(r) + 1 for p, r in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(samples):
        doc = torch.tensor(p + r + [EOD_TOKEN_ID])
        ids[i, :len(doc)] = doc
        labels[i, len(p):len(doc)] = doc[len(p):]  # the response and its EOD; -100 on prompt and padding
    hf.zero_grad()
    out = hf(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {global_name(n): p.grad.clone() for n, p in hf.named_parameters()}


@pytest.fixture(scope="module")
def sft_case(tmp_path_factory):
    pytest.importorskip("transformers")
    hf = random_gpt_neox(21, **HF_FIELDS)
    samples = random_samples(2, SFT_SHAPES, HF_FIELDS["vocab_size"])
    prefix = write_sft(tmp_path_factory.mktemp("sft") / "qa", samples)
    loss, grads = hf_padded_reference(hf, samples)
    padded = SFTDataset(prefix, S)
    packed = SFTDataset(prefix, S, pack=True)
    assert len(packed) == 4 and all(packed[i]["segment_ids"].max() == 1 for i in range(4))
    return dict(config=hf.config.to_dict(), state=hf.state_dict(), loss=loss, grads=grads,
                padded=[padded[i] for i in range(len(padded))], packed=[packed[i] for i in range(len(packed))])


def megaglot_model(case, backend, **build):
    cfg = model_config_from_hf(case["config"], attention_backend=backend)
    chunks = build_model_chunks(cfg, **build)
    load_full_tensors(chunks, lambda n: pad_vocab(lookup(case["state"], n), n, cfg))
    return cfg, chunks


def test_masked_loss_and_gradients_equal_transformers_one_process(sft_case):
    cfg, (chunk,) = megaglot_model(sft_case, "sdpa")
    batch = collate(sft_case["padded"])
    loss = masked_mean(chunk(None, batch), batch["loss_mask"])
    loss.backward()
    torch.testing.assert_close(loss.detach(), sft_case["loss"], **LOSS_TOL)
    for p in chunk.parameters():
        want = pad_vocab(sft_case["grads"][p.global_name], p.global_name, cfg)
        torch.testing.assert_close(p.grad, want, **GRAD_TOL, msg=lambda m: f"{p.global_name}: {m}")


def _parallel_worker(rank, case):
    from megaglot.parallel import state
    from megaglot.pipeline import forward_backward

    tp, checked = state.get_tensor_parallel_world_size(), {}
    for form, backend, recompute in (("packed", "sdpa", "full"), ("padded", "fused", "selective")):
        cfg, chunks = megaglot_model(case, backend, sequence_parallel=True, recompute_granularity=recompute)
        for c in chunks:
            c.train()
        rows = case[form]
        microbatches = [collate(rows[i:i + 2]) for i in range(0, len(rows), 2)]
        total = sum(float(mb["loss_mask"].sum()) for mb in microbatches)

        def step(chunk, input_tensor, mb, m=len(microbatches), total=total):
            out = chunk(input_tensor, mb)  # the global response-token mean, split over microbatches
            return (out * mb["loss_mask"]).sum() * (m / total) if chunk.post_process else out

        loss = forward_backward(chunks, microbatches, step, tensor_shape=(S // tp, 2, cfg.hidden_size),
                                dtype=torch.float32)
        if state.is_pipeline_last_stage():
            torch.testing.assert_close(loss, case["loss"], **LOSS_TOL)
        for p in chunks[0].parameters():
            grad = p.grad.clone()
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(grad, group=state.get_tensor_parallel_group())
            want = pad_vocab(case["grads"][p.global_name], p.global_name, cfg)
            if p.partition_dim is not None:
                want = want.chunk(tp, dim=p.partition_dim)[state.get_tensor_parallel_rank()]
            torch.testing.assert_close(grad, want, **GRAD_TOL, msg=lambda m: f"{form} {p.global_name}: {m}")
            checked.setdefault(form, []).append(p.global_name)
    return checked


def test_packed_and_padded_equal_transformers_at_tp2_pp2_sp(sft_case):
    results = run_distributed(_parallel_worker, 4, sft_case, parallel=(2, 2), timeout=200)
    for form in ("packed", "padded"):
        names = set().union(*(r[form] for r in results))
        assert names == set(sft_case["grads"]), form
