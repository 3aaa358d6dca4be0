"""From full (TP = 1) tensors to this rank's shards and back.

Parameters carry `global_name`, `global_shape` and `partition_dim` (set by the model), so the
same two functions serve Hugging Face conversion, checkpoint loading at another layout and
export: no per-layer special cases.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from megaglot.parallel import state


def shard(full: torch.Tensor, partition_dim, tp: int, tp_rank: int) -> torch.Tensor:
    if partition_dim is None or tp == 1:
        return full
    return full.chunk(tp, dim=partition_dim)[tp_rank]


def named_global_parameters(chunks: Iterable[nn.Module]):
    """(global_name, parameter) for every parameter of this rank's chunks."""
    for chunk in chunks:
        for param in chunk.parameters():
            yield param.global_name, param


def load_full_tensors(chunks: Iterable[nn.Module], fetch: Callable[[str], torch.Tensor]) -> None:
    """Fill every parameter with its slice of `fetch(global_name)` (a full tensor)."""
    tp, rank = state.get_tensor_parallel_world_size(), state.get_tensor_parallel_rank()
    with torch.no_grad():
        for name, param in named_global_parameters(chunks):
            full = fetch(name)
            if tuple(full.shape) != tuple(param.global_shape):
                raise ValueError(f"tensor {name}: shape {tuple(full.shape)} does not match the model's "
                                 f"{tuple(param.global_shape)}; is it a checkpoint of another model?")
            param.copy_(shard(full, param.partition_dim, tp, rank))


def gather_full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter (collective over the TP group)."""
    if param.partition_dim is None or state.get_tensor_parallel_world_size() == 1:
        return param.detach()
    group = state.get_tensor_parallel_group()
    pieces = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, param.detach().contiguous(), group=group)
    return torch.cat(pieces, dim=param.partition_dim)
