"""The compiled extension builds and its first function agrees with a pure-numpy reference."""

import numpy as np

from megaglot.data.gpt_dataset import build_sample_idx_reference as reference_sample_idx
from megaglot.kernels import available, load_extension


def test_extension_is_built():
    info = available()
    assert info["extension"], "megaglot._C did not build"
    assert "build_sample_idx" in info["functions"]


def test_build_sample_idx_matches_reference():
    ext = load_extension()
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 50, size=200).astype(np.int32)
    doc_idx = np.concatenate([rng.permutation(200) for _ in range(3)]).astype(np.int64)
    seq_length = 17
    total = int(sizes.sum()) * 3
    num_samples = (total - 1) // seq_length
    got = ext.build_sample_idx(sizes, doc_idx, seq_length, num_samples)
    want = reference_sample_idx(sizes, doc_idx, seq_length, num_samples)
    np.testing.assert_array_equal(got, want)


def test_build_sample_idx_reports_exhausted_documents():
    import pytest

    ext = load_extension()
    sizes = np.array([5, 5], dtype=np.int32)
    with pytest.raises(IndexError, match="documents exhausted"):
        ext.build_sample_idx(sizes, np.array([0, 1], dtype=np.int64), 4, 10)
