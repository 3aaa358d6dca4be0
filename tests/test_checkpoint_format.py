"""The checkpoint reader assembles full tensors from pieces saved at any TP size and DP split."""

import json
import os

import pytest
import torch

from megaglot.checkpoint.format import (CheckpointError, CheckpointReader, PieceWriter, publish, resolve,
                                        staging_dir, write_metadata)


def test_full_tensor_from_tp_shards_and_dp_ranges(tmp_path):
    root = str(tmp_path)
    directory = staging_dir(root, 5)
    full = torch.randn(6, 4)
    # TP = 2 along dim 0; shard 1 split in two DP ranges written by different writers.
    writer_a, writer_b = PieceWriter(directory, "rank0"), PieceWriter(directory, "rank1")
    s0, s1 = full.chunk(2, dim=0)
    writer_a.add("model", "w", s0, global_shape=(6, 4), partition_dim=0, tp_size=2, tp_rank=0)
    writer_a.add("exp_avg", "w", s1.reshape(-1)[:5], global_shape=(6, 4), partition_dim=0, tp_size=2, tp_rank=1,
                 flat_range=(0, 5))
    writer_b.add("exp_avg", "w", s1.reshape(-1)[5:], global_shape=(6, 4), partition_dim=0, tp_size=2, tp_rank=1,
                 flat_range=(5, 12))
    writer_b.add("exp_avg", "w", s0, global_shape=(6, 4), partition_dim=0, tp_size=2, tp_rank=0)
    writer_b.add("model", "w", s1, global_shape=(6, 4), partition_dim=0, tp_size=2, tp_rank=1)
    writer_a.add("model", "bias", torch.arange(3.0), global_shape=(3,), partition_dim=None, tp_size=2, tp_rank=0)
    writer_a.write()
    writer_b.write()
    write_metadata(directory, iteration=5)
    final = publish(root, 5)
    assert open(os.path.join(root, "latest")).read().strip() == "iter_0000005"
    reader = CheckpointReader(resolve(root))
    assert reader.directory == final
    assert torch.equal(reader.full_tensor("model", "w"), full)
    assert torch.equal(reader.full_tensor("exp_avg", "w"), full)
    assert torch.equal(reader.full_tensor("model", "bias"), torch.arange(3.0))
    with pytest.raises(CheckpointError, match="no model tensor 'missing'"):
        reader.full_tensor("model", "missing")


def test_missing_pieces_and_files_are_named(tmp_path):
    directory = str(tmp_path / "iter_0000001")
    writer = PieceWriter(directory, "rank0")
    writer.add("model", "w", torch.ones(2, 2), global_shape=(4, 2), partition_dim=0, tp_size=2, tp_rank=0)
    writer.write()
    write_metadata(directory, iteration=1)
    with pytest.raises(CheckpointError, match="'w' TP shard 1 is incomplete"):
        CheckpointReader(directory).full_tensor("model", "w")
    os.remove(os.path.join(directory, "rank0.safetensors"))
    with pytest.raises(CheckpointError, match="refers to missing shard rank0.safetensors"):
        CheckpointReader(directory)
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        resolve(str(tmp_path))
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump({"format_version": 99}, f)
    with pytest.raises(CheckpointError, match="format version 99"):
        CheckpointReader(directory)


def test_shards_and_ranges_read_only_their_pieces(tmp_path):
    """`shard`/`shard_range` at the saved TP size read only the overlapping pieces (counted per
    piece read), equal slices of `full_tensor`, and fall back to it at another TP size."""
    directory = str(tmp_path / "iter_0000001")
    full, bias = torch.randn(6, 4), torch.arange(3.0)
    writers = [PieceWriter(directory, f"dp{r}") for r in range(2)]
    for tp_rank, s in enumerate(full.chunk(2, dim=0)):  # each TP shard split over 2 DP ranks at 5
        for dp, (a, b) in enumerate(((0, 5), (5, 12))):
            writers[dp].add("exp_avg", "w", s.reshape(-1)[a:b], global_shape=(6, 4), partition_dim=0, tp_size=2,
                            tp_rank=tp_rank, flat_range=(a, b))
    writers[0].add("model", "bias", bias, global_shape=(3,), partition_dim=None, tp_size=2, tp_rank=0)
    for w in writers:
        w.write()
    write_metadata(directory, iteration=1)
    reader, reads = CheckpointReader(directory), []
    real_read = reader._read
    reader._read = lambda p, lo=0, hi=None: reads.append((p.tp_rank, p.start, lo, hi)) or real_read(p, lo, hi)
    shard1 = full.chunk(2, dim=0)[1]
    assert torch.equal(reader.shard("exp_avg", "w", 2, 1), shard1)
    assert reads == [(1, 0, 0, 5), (1, 5, 0, 7)]  # TP shard 1's two pieces, nothing of shard 0
    reads.clear()
    assert torch.equal(reader.shard_range("exp_avg", "w", 2, 1, 3, 9), shard1.reshape(-1)[3:9])
    assert reads == [(1, 0, 3, 5), (1, 5, 0, 4)]  # parts of both, through lazy slices
    reads.clear()
    assert torch.equal(reader.shard_range("exp_avg", "w", 2, 0, 6, 11), full.chunk(2)[0].reshape(-1)[6:11])
    assert reads == [(0, 5, 1, 6)]
    assert torch.equal(reader.shard("model", "bias", 4, 3), bias)  # replicated: the one stored copy
    assert torch.equal(reader.shard("exp_avg", "w", 3, 2), full.chunk(3, dim=0)[2])  # another TP: reshard
    key = ("exp_avg", "w")  # DP rank 1's pieces gone: a range reaching into them names the gap
    reader.pieces[key] = [p for p in reader.pieces[key] if p.file != "dp1.safetensors"]
    assert torch.equal(reader.shard_range("exp_avg", "w", 2, 0, 1, 5), full.chunk(2)[0].reshape(-1)[1:5])
    with pytest.raises(CheckpointError, match=r"'w' TP shard 1 is incomplete \(values \[3, 9\) wanted, stored up to 5"):
        reader.shard_range("exp_avg", "w", 2, 1, 3, 9)
