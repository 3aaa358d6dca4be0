"""The MMIDIDX builder and reader: round trips, merge, exact bytes and every malformed file."""

import os
import struct

import numpy as np
import pytest

from megaglot.data.indexed_dataset import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError,
                                           best_dtype)


def build(prefix, documents, dtype=np.uint16):
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for doc in documents:
        if isinstance(doc[0], list):  # several sequences in one document
            for seq in doc:
                builder.add_item(seq)
            builder.end_document()
        else:
            builder.add_document(doc)
    builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix)


def test_hand_computed_bytes(tmp_path):
    prefix = str(tmp_path / "tiny")
    build(prefix, [[5, 6, 7], [[8], [9, 10]]], dtype=np.uint16)
    want_idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + bytes([8]) + struct.pack("<Q", 3)
                + struct.pack("<Q", 3)
                + bytes.fromhex("03000000" "01000000" "02000000")  # int32 lengths 3, 1, 2
                + bytes.fromhex("0000000000000000" "0600000000000000" "0800000000000000")  # byte pointers
                + bytes.fromhex("0000000000000000" "0100000000000000" "0300000000000000"))  # doc bounds
    assert open(prefix + ".idx", "rb").read() == want_idx
    assert open(prefix + ".bin", "rb").read() == bytes.fromhex("0500" "0600" "0700" "0800" "0900" "0a00")


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32,
                                   np.uint16])
def test_round_trip_every_dtype(tmp_path, dtype):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 100, size=rng.integers(1, 30)).astype(dtype) for _ in range(20)]
    ds = build(str(tmp_path / "rt"), [d.tolist() for d in docs], dtype=dtype)
    assert len(ds) == 20 and ds.num_documents == 20 and ds.dtype == np.dtype(dtype)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.sizes, [len(d) for d in docs])
    np.testing.assert_array_equal(ds.get(3, offset=1, length=len(docs[3]) - 1), docs[3][1:])
    np.testing.assert_array_equal(ds.document_indices, np.arange(21))


def test_get_offsets_and_documents(tmp_path):
    ds = build(str(tmp_path / "g"), [[1, 2, 3, 4, 5], [[6, 7], [8]]])
    np.testing.assert_array_equal(ds.get(0, 2, 2), [3, 4])
    np.testing.assert_array_equal(ds.get(0, 3), [4, 5])
    assert [a.tolist() for a in ds.document(1)] == [[6, 7], [8]]
    assert ds.num_tokens == 8
    with pytest.raises(IndexError, match="outside sequence 0"):
        ds.get(0, 4, 2)
    with pytest.raises(IndexError, match="out of range"):
        ds.get(3)


def test_merge(tmp_path):
    a = build(str(tmp_path / "a"), [[1, 2], [[3], [4, 5]]])
    b = build(str(tmp_path / "b"), [[6], [7, 8, 9]])
    del a, b
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.uint16)
    builder.add_document([100])
    builder.merge(str(tmp_path / "a"))
    builder.merge(str(tmp_path / "b"))
    builder.finalize(str(tmp_path / "m.idx"))
    m = IndexedDataset(str(tmp_path / "m"))
    assert [m[i].tolist() for i in range(len(m))] == [[100], [1, 2], [3], [4, 5], [6], [7, 8, 9]]
    np.testing.assert_array_equal(m.document_indices, [0, 1, 2, 4, 5, 6])
    c = build(str(tmp_path / "c"), [[1]], dtype=np.int32)
    del c
    builder = IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match="c.idx: dtype int32 differs"):
        builder.merge(str(tmp_path / "c"))
    builder.close()


def test_empty_dataset(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "e.bin"), np.uint16)
    builder.finalize(str(tmp_path / "e.idx"))
    ds = IndexedDataset(str(tmp_path / "e"))
    assert len(ds) == 0 and ds.num_documents == 0


def test_token_out_of_dtype_range(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "o.bin"), np.uint16)
    with pytest.raises(IndexedDatasetError, match="token id 70000 does not fit dtype uint16"):
        builder.add_document(np.array([1, 70000], dtype=np.int64))
    builder.close()


def test_best_dtype():
    assert best_dtype(30003) == np.uint16 and best_dtype(65499) == np.uint16
    assert best_dtype(65500) == np.int32 and best_dtype(None) == np.int32


# ---- malformed files -------------------------------------------------------------------------

@pytest.fixture
def good(tmp_path):
    prefix = str(tmp_path / "good")
    build(prefix, [[1, 2, 3], [4, 5]])
    return prefix


def rewrite(path, fn):
    data = bytearray(open(path, "rb").read())
    data = fn(data)
    open(path, "wb").write(bytes(data))


def test_bad_magic(good):
    rewrite(good + ".idx", lambda d: b"TNTIDX\x00\x00\x00" + d[9:])
    with pytest.raises(IndexedDatasetError, match=r"good\.idx: bad magic"):
        IndexedDataset(good)


def test_wrong_version(good):
    rewrite(good + ".idx", lambda d: d[:9] + struct.pack("<Q", 2) + d[17:])
    with pytest.raises(IndexedDatasetError, match=r"good\.idx: index version 2, only version 1"):
        IndexedDataset(good)


def test_unknown_dtype_code(good):
    rewrite(good + ".idx", lambda d: d[:17] + bytes([9]) + d[18:])
    with pytest.raises(IndexedDatasetError, match=r"good\.idx: unknown dtype code 9"):
        IndexedDataset(good)


@pytest.mark.parametrize("keep", [5, 20, 40, 60])
def test_truncated_index(good, keep):
    rewrite(good + ".idx", lambda d: d[:keep])
    with pytest.raises(IndexedDatasetError, match=r"good\.idx: truncated index"):
        IndexedDataset(good)


def test_trailing_bytes_in_index(good):
    rewrite(good + ".idx", lambda d: d + b"\x00")
    with pytest.raises(IndexedDatasetError, match="unexpected trailing bytes"):
        IndexedDataset(good)


def test_truncated_bin(good):
    rewrite(good + ".bin", lambda d: d[:-2])
    with pytest.raises(IndexedDatasetError, match=r"good\.bin: 8 bytes but .*good\.idx lists 5 tokens"):
        IndexedDataset(good)


def test_bin_longer_than_index(good):
    rewrite(good + ".bin", lambda d: d + b"\x01\x00")
    with pytest.raises(IndexedDatasetError, match=r"good\.bin: 12 bytes"):
        IndexedDataset(good)


def test_missing_files(good):
    os.remove(good + ".bin")
    with pytest.raises(IndexedDatasetError, match=r"good\.bin: data file not found"):
        IndexedDataset(good)
    os.remove(good + ".idx")
    with pytest.raises(IndexedDatasetError, match=r"good\.idx: index file not found"):
        IndexedDataset(good)


def test_inconsistent_pointers(good):
    # second pointer (after header 34 bytes and two int32 lengths) set to a wrong byte offset
    rewrite(good + ".idx", lambda d: d[:34 + 8 + 8] + struct.pack("<q", 4) + d[34 + 8 + 16:])
    with pytest.raises(IndexedDatasetError, match="pointers disagree"):
        IndexedDataset(good)


def test_bad_document_boundaries(good):
    rewrite(good + ".idx", lambda d: d[:-8] + struct.pack("<q", 5))
    with pytest.raises(IndexedDatasetError, match="document boundaries must run from 0"):
        IndexedDataset(good)
