"""GPT samples, splits, index cache, blending proportions and the DP batch order."""

import numpy as np
import pytest

from megaglot.data.blending import (BlendingError, balance_weights, blending_indices_reference, parse_balance,
                                    parse_data_paths)
from megaglot.data.gpt_dataset import (DatasetError, build_sample_idx_reference, build_train_valid_test_datasets,
                                       make_batches, micro_batch_indices, split_document_ranges)
from megaglot.data.indexed_dataset import IndexedDatasetBuilder
from megaglot.kernels import load_extension


def loop_reference(sizes, doc_idx, seq_length, num_samples):
    """The C++ loop transcribed literally (independent of the vectorized reference)."""
    out = np.zeros((num_samples + 1, 2), dtype=np.int64)
    index, offset = 0, 0
    for sample in range(1, num_samples + 1):
        remaining = seq_length + 1
        while remaining != 0:
            length = int(sizes[doc_idx[index]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - 1
                remaining = 0
            else:
                index += 1
                offset = 0
        out[sample] = (index, offset)
    return out


@pytest.mark.parametrize("seed,seq_length", [(0, 1), (1, 7), (2, 64), (3, 333)])
def test_cpp_sample_index_equals_numpy_reference(seed, seq_length):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 120, size=500).astype(np.int32)
    sizes[rng.integers(0, 500, size=20)] = 0  # empty sequences are stepped over
    doc_idx = np.concatenate([rng.permutation(500) for _ in range(2)]).astype(np.int64)
    num_samples = (int(sizes[doc_idx].sum()) - 1) // seq_length
    want = build_sample_idx_reference(sizes, doc_idx, seq_length, num_samples)
    got = load_extension().build_sample_idx(sizes, doc_idx, seq_length, num_samples)
    np.testing.assert_array_equal(got, want)
    small = min(num_samples, 300)
    np.testing.assert_array_equal(want[: small + 1], loop_reference(sizes, doc_idx, seq_length, small))


def test_reference_reports_exhaustion():
    with pytest.raises(IndexError, match="documents exhausted"):
        build_sample_idx_reference(np.array([5, 5], np.int32), np.array([0, 1]), 4, 3)


def test_cpp_blending_equals_reference():
    for weights, size in (([0.7, 0.3], 1000), ([0.5, 0.25, 0.125, 0.125], 997), ([1 / 3] * 3, 300), ([1.0], 5)):
        want = blending_indices_reference(weights, size)
        got = load_extension().build_blending_indices(np.array(weights), size)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_blending_prefix_proportions_are_tight():
    dataset_index, sample_index = blending_indices_reference([0.6, 0.3, 0.1], 2000)
    for n in (10, 100, 1000, 2000):
        counts = np.bincount(dataset_index[:n], minlength=3)
        assert np.all(np.abs(counts - np.array([0.6, 0.3, 0.1]) * n) <= 1.0), (n, counts)
    for d in range(3):  # within a dataset, sample indices run 0, 1, 2, ... in order
        np.testing.assert_array_equal(sample_index[dataset_index == d], np.arange((dataset_index == d).sum()))


def test_split_ranges_match_megatron_rounding():
    assert split_document_ranges("969,30,1", 1000) == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges("969,30,1", 100) == [(0, 97), (97, 100), (100, 100)]
    assert split_document_ranges("1", 10) == [(0, 10), (10, 10), (10, 10)]
    assert split_document_ranges("8,1,1", 7) == [(0, 5), (5, 6), (6, 7)]  # Megatron shifts the rounding surplus
    for bad in ("a,b", "-1,2", "0,0,0", "1,2,3,4"):
        with pytest.raises(DatasetError, match="--split"):
            split_document_ranges(bad, 10)


def test_parse_data_paths_and_balance():
    assert parse_data_paths("0.7 ko 0.3 en") == (["ko", "en"], [0.7, 0.3])
    assert parse_data_paths(["ko", "en"]) == (["ko", "en"], None)
    assert parse_data_paths([(2, "a"), (1, "b")]) == (["a", "b"], [2.0, 1.0])
    for bad in ("0.7 ko en", "ko 0.3", "0.5 a 0.5", "-1 a 2 b", ""):
        with pytest.raises(BlendingError, match="--data-path"):
            parse_data_paths(bad)
    assert parse_balance("temperature:0.3") == 0.3
    assert parse_balance("natural") == 1.0 and parse_balance("uniform") == 0.0 and parse_balance(None) is None
    for bad in ("temperature", "temp:0.5", "temperature:-1", "temperature:x"):
        with pytest.raises(BlendingError, match="--data-balance"):
            parse_balance(bad)
    np.testing.assert_allclose(balance_weights([900, 100], 1.0), [0.9, 0.1])
    np.testing.assert_allclose(balance_weights([900, 100], 0.0), [0.5, 0.5])
    np.testing.assert_allclose(balance_weights([900, 100], 0.5), [0.75, 0.25])


# ---- datasets on real files ---------------------------------------------------------------------

def write_dataset(prefix, num_docs, seed, base):
    """Documents whose tokens encode (base + document, position) so samples can be checked exactly."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    docs = []
    for d in range(num_docs):
        length = int(rng.integers(3, 40))
        doc = (base + d) * 1000 + np.arange(length)
        doc[-1] = 2  # EOD
        builder.add_document(doc)
        docs.append(doc)
    builder.finalize(prefix + ".idx")
    return docs


@pytest.fixture
def corpus(tmp_path):
    big = str(tmp_path / "big")
    small = str(tmp_path / "small")
    big_docs = write_dataset(big, 300, 0, 1)
    small_docs = write_dataset(small, 40, 1, 5000)
    return tmp_path, big, small, big_docs, small_docs


def test_samples_are_contiguous_stream_of_split_documents(corpus):
    tmp, big, _, docs, _ = corpus
    lines = []
    train, valid, test = build_train_valid_test_datasets([big], "8,2,0", seq_length=16, seed=3,
                                                         num_samples=(200, 30, 0), cache_dir=str(tmp / "c"),
                                                         log=lines.append)
    assert test is None and len(train) == 200 and len(valid) == 30
    train_docs = {int(d[0]) // 1000 - 1 for d in docs[:240]}
    valid_docs = {int(d[0]) // 1000 - 1 for d in docs[240:]}
    for dataset, allowed in ((train, train_docs), (valid, valid_docs)):
        stream = np.concatenate([docs[i] for i in dataset.doc_idx])
        starts = dataset.sample_idx
        for k in range(len(dataset)):
            item = dataset[k]
            i = int(dataset.shuffle_idx[k])
            # the sample is the doc stream from token i*16, shifted labels, ones mask, positions
            np.testing.assert_array_equal(item["tokens"], stream[i * 16:i * 16 + 16])
            np.testing.assert_array_equal(item["labels"], stream[i * 16 + 1:i * 16 + 17])
            assert item["tokens"].dtype == np.int64 and item["loss_mask"].dtype == np.float32
            assert item["loss_mask"].sum() == 16
            np.testing.assert_array_equal(item["position_ids"], np.arange(16))
        assert starts.shape == (len(dataset) + 1, 2)
        assert {int(t) // 1000 - 1 for t in np.concatenate([dataset.tokens_of(k) for k in range(len(dataset))])
                if t != 2} <= allowed
    # each epoch is one permutation of the split's documents
    per_epoch = train.doc_idx[:240]
    assert sorted(per_epoch.tolist()) == list(range(240))
    assert len(lines) == 2 and all("epochs" in line for line in lines)
    assert lines[0].startswith("data (train): 200 samples") and lines[1].startswith("data (valid): 30 samples")


def test_cache_is_reused_and_deterministic(corpus):
    tmp, big, _, _, _ = corpus
    cache = tmp / "cache"
    a, _, _ = build_train_valid_test_datasets([big], "1", 8, 11, (50, 0, 0), cache_dir=str(cache), log=lambda s: None)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 4 and isinstance(a.sample_idx, np.memmap)
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    b, _, _ = build_train_valid_test_datasets([big], "1", 8, 11, (50, 0, 0), cache_dir=str(cache), log=lambda s: None)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes  # mapped, not rebuilt
    c, _, _ = build_train_valid_test_datasets([big], "1", 8, 12, (50, 0, 0), cache_dir=str(cache), log=lambda s: None)
    assert len(list(cache.iterdir())) == 8  # another seed, another hash
    np.testing.assert_array_equal(a[7]["tokens"], b[7]["tokens"])
    assert any(not np.array_equal(a[k]["tokens"], c[k]["tokens"]) for k in range(10))


def test_eod_mask_loss(corpus):
    tmp, big, _, _, _ = corpus
    train, _, _ = build_train_valid_test_datasets([big], "1", 32, 0, (20, 0, 0), cache_dir=str(tmp / "c"),
                                                  eod_mask_loss=True, log=lambda s: None)
    item = train[0]
    np.testing.assert_array_equal(item["loss_mask"], (item["tokens"] != 2).astype(np.float32))
    assert (item["tokens"] == 2).any()


def test_blend_proportions_and_epochs_table(corpus):
    tmp, big, small, big_docs, small_docs = corpus
    lines = []
    train, _, _ = build_train_valid_test_datasets(f"0.75 {big} 0.25 {small}", "1", 16, 5, (400, 0, 0),
                                                  cache_dir=str(tmp / "c"), log=lines.append)
    origin = [int(train[k]["tokens"][train[k]["tokens"] != 2].min() >= 5000 * 1000) for k in range(400)]
    np.testing.assert_array_equal(origin, train.dataset_index)  # items really come from the named dataset
    counts = np.bincount(train.dataset_index, minlength=2)
    assert counts.tolist() == [300, 100]
    big_tokens = sum(len(d) for d in big_docs)
    small_tokens = sum(len(d) for d in small_docs)
    rows = train.table
    assert [r.samples for r in rows] == [300, 100]
    assert [r.tokens for r in rows] == [big_tokens, small_tokens]
    assert rows[0].epochs == pytest.approx(300 * 16 / big_tokens)
    assert rows[1].epochs == pytest.approx(100 * 16 / small_tokens)
    text = "\n".join(lines)
    assert "samples" in text and "epochs" in text and f"{small_tokens:,}" in text
    assert f"{100 * 16 / small_tokens:.3f}" in text


def test_temperature_balance(corpus):
    tmp, big, small, big_docs, small_docs = corpus
    t = np.array([sum(map(len, big_docs)), sum(map(len, small_docs))], dtype=float)
    for alpha in (1.0, 0.0, 0.3):
        train, _, _ = build_train_valid_test_datasets([big, small], "1", 16, 5, (1000, 0, 0),
                                                      cache_dir=str(tmp / "c"), balance=f"temperature:{alpha}",
                                                      log=lambda s: None)
        want = t ** alpha / (t ** alpha).sum()
        np.testing.assert_allclose(train.weights, want)
        counts = np.bincount(train.dataset_index, minlength=2)
        assert np.all(np.abs(counts - want * 1000) <= 1)
    with pytest.raises(BlendingError, match="cannot be combined"):
        build_train_valid_test_datasets(f"0.5 {big} 0.5 {small}", "1", 16, 5, (10, 0, 0), balance="natural",
                                        cache_dir=str(tmp / "c"), log=lambda s: None)


def test_empty_split_is_a_clear_error(corpus):
    tmp, big, _, _, _ = corpus
    with pytest.raises(DatasetError, match="--split 1,0,0: the valid split has no documents"):
        build_train_valid_test_datasets([big], "1,0,0", 16, 0, (10, 10, 0), cache_dir=str(tmp / "c"),
                                        log=lambda s: None)


# ---- DP batching ----------------------------------------------------------------------------------

def test_micro_batch_order_is_megatrons_and_dp_independent():
    assert list(micro_batch_indices(16, 0, 2, 1, 2)) == [[2, 3], [6, 7], [10, 11], [14, 15]]
    assert list(micro_batch_indices(16, 8, 2, 0, 2)) == [[8, 9], [12, 13]]
    for dp in (1, 2, 4):
        mbs, gbs = 2, 8
        per_rank = [list(micro_batch_indices(32, 0, mbs, r, dp)) for r in range(dp)]
        steps = []
        for step in range(32 // gbs):
            per_step = gbs // (mbs * dp)
            batch = []
            for r in range(dp):
                for m in per_rank[r][step * per_step:(step + 1) * per_step]:
                    batch.extend(m)
            steps.append(sorted(batch))
            for r in range(dp):
                for m in per_rank[r][step * per_step:(step + 1) * per_step]:
                    assert all((i // mbs) % dp == r for i in m)
        assert steps == [list(range(s * gbs, (s + 1) * gbs)) for s in range(32 // gbs)]
    with pytest.raises(DatasetError, match="consumed_samples 3 is not a multiple"):
        list(micro_batch_indices(16, 3, 2, 0, 2))
    with pytest.raises(DatasetError, match="data-parallel rank 2"):
        list(micro_batch_indices(16, 0, 2, 2, 2))
    with pytest.raises(DatasetError, match="exceeds"):
        list(micro_batch_indices(16, 20, 2, 0, 2))


def test_make_batches_resumes_exactly(corpus):
    tmp, big, _, _, _ = corpus
    train, _, _ = build_train_valid_test_datasets([big], "1", 8, 0, (48, 0, 0), cache_dir=str(tmp / "c"),
                                                  log=lambda s: None)
    full = list(make_batches(train, 0, 3, 1, 2))
    resumed = list(make_batches(train, 24, 3, 1, 2))
    assert len(full) == 8 and len(resumed) == 4
    for a, b in zip(full[4:], resumed):
        for key in a:
            assert a[key].shape == (3, 8)
            assert (a[key] == b[key]).all()
    assert str(full[0]["tokens"].dtype) == "torch.int64" and str(full[0]["loss_mask"].dtype) == "torch.float32"
    np.testing.assert_array_equal(full[0]["tokens"][0].numpy(), train[3]["tokens"])
