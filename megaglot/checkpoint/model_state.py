"""Model parameters in and out of the checkpoint format, at whatever layout the chunks have."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from megaglot.checkpoint.format import MODEL, CheckpointError, CheckpointReader, PieceWriter
from megaglot.checkpoint.sharding import named_global_parameters
from megaglot.config import ModelConfig
from megaglot.parallel import state

# Fields that change a tensor's shape or the computation; the rest (dropout, backend) may differ.
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                "make_vocab_size_divisible_by", "rotary_pct", "use_parallel_residual", "hidden_act",
                "tie_word_embeddings")


def check_same_model(saved: dict, cfg: ModelConfig, source: str) -> None:
    diffs = [f"{f}: checkpoint {saved.get(f)!r} vs run {getattr(cfg, f)!r}" for f in SHAPE_FIELDS
             if saved.get(f) != getattr(cfg, f)]
    if diffs:
        raise CheckpointError(f"{source}: checkpoint of another model ({'; '.join(diffs)}); "
                              f"pass the matching --model / shape flags or another --load")


def add_model_pieces(writer: PieceWriter, chunks: Iterable[nn.Module]) -> None:
    tp, rank = state.get_tensor_parallel_world_size(), state.get_tensor_parallel_rank()
    for name, param in named_global_parameters(chunks):
        writer.add(MODEL, name, param, global_shape=param.global_shape, partition_dim=param.partition_dim,
                   tp_size=tp, tp_rank=rank)


def load_model(chunks: Iterable[nn.Module], reader: CheckpointReader, cfg: ModelConfig) -> None:
    """Fill this rank's parameters. At the TP size the checkpoint was saved at a rank reads only
    its own shards (`CheckpointReader.shard`): reading every full tensor on every rank would move
    the whole model (tens of GB at 12.8B) through each rank."""
    check_same_model(reader.metadata.get("model", {}), cfg, reader.directory)
    tp, rank = state.get_tensor_parallel_world_size(), state.get_tensor_parallel_rank()
    with torch.no_grad():
        for name, param in named_global_parameters(chunks):
            values = reader.shard(MODEL, name, tp, rank)
            if tuple(values.shape) != tuple(param.shape):
                raise CheckpointError(f"{reader.directory}: tensor {name} loads as {tuple(values.shape)} at TP {tp}, "
                                      f"the model's shard is {tuple(param.shape)}; is it a checkpoint of another "
                                      f"model?")
            param.copy_(values)
