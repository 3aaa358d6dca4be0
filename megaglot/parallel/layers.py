"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

Every parameter carries the metadata checkpointing and resharding need: `partition_dim` (the
dimension split over TP, or None when replicated) and `global_shape` (its shape at TP = 1).
Initialization draws the full (TP = 1) master weight from the caller's seeded `init_method` and
keeps this rank's slice, so the gathered weights are bit-identical at every TP size.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megaglot.parallel import comm, state

InitMethod = Callable[[torch.Tensor], None]


def seeded_normal_init(std: float, seed: int) -> InitMethod:
    """Fill a (full, unsharded) tensor from N(0, std) with its own generator: layout independent."""

    def init(tensor: torch.Tensor) -> None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed) % (2 ** 63))
        with torch.no_grad():
            tensor.normal_(0.0, std, generator=generator)

    return init


def zeros_init(tensor: torch.Tensor) -> None:
    with torch.no_grad():
        tensor.zero_()


def set_parallel_attributes(param: nn.Parameter, partition_dim: Optional[int], global_shape,
                            sequence_parallel: bool = False) -> None:
    """`sequence_parallel`: replicated over TP but fed only a sequence slice, so its gradient is
    partial on each TP rank and must be all-reduced over TP before the optimizer step."""
    param.partition_dim = partition_dim
    param.global_shape = tuple(global_shape)
    param.sequence_parallel = sequence_parallel


def _sharded_parameter(global_shape, partition_dim: Optional[int], init_method: InitMethod,
                       dtype, device) -> nn.Parameter:
    """Draw the master on CPU in float32 (one layer at a time), keep our slice, move it."""
    if device is not None and torch.device(device).type == "meta":  # shapes only (counting, planning)
        shape = list(global_shape)
        if partition_dim is not None:
            shape[partition_dim] //= state.get_tensor_parallel_world_size()
        param = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))
        set_parallel_attributes(param, partition_dim, global_shape)
        return param
    master = torch.empty(global_shape, dtype=torch.float32, device="cpu")
    init_method(master)
    if partition_dim is not None:
        tp, rank = state.get_tensor_parallel_world_size(), state.get_tensor_parallel_rank()
        if global_shape[partition_dim] % tp:
            raise ValueError(f"dimension {partition_dim} of a {tuple(global_shape)} weight is not divisible "
                             f"by tensor-parallel size {tp}")
        master = master.chunk(tp, dim=partition_dim)[rank]
    param = nn.Parameter(master.to(device=device, dtype=dtype).contiguous())
    set_parallel_attributes(param, partition_dim, global_shape)
    return param


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split by columns: weight `[out/tp, in]`, output `[s, b, out/tp]`.

    Under sequence parallel the input is `[s/tp, b, in]` and is all-gathered along the sequence
    here (its gradient reduce-scattered), replacing the identity/all-reduce pair.
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, gather_output: bool = False,
                 skip_bias_add: bool = False, sequence_parallel: bool = False,
                 init_method: InitMethod = None, bias_init_method: InitMethod = zeros_init,
                 params_dtype=torch.float32, device=None):
        super().__init__()
        tp = state.get_tensor_parallel_world_size()
        if output_size % tp:
            raise ValueError(f"ColumnParallelLinear: output size {output_size} is not divisible by "
                             f"tensor-parallel size {tp}")
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: gather_output cannot be combined with sequence_parallel")
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = output_size // tp
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.sequence_parallel = sequence_parallel and tp > 1
        init_method = init_method or seeded_normal_init(0.02, 0)
        self.weight = _sharded_parameter((output_size, input_size), 0, init_method, params_dtype, device)
        self.bias = _sharded_parameter((output_size,), 0, bias_init_method, params_dtype, device) if bias else None

    def forward(self, x: torch.Tensor):
        # x: [s, b, in] (or [s/tp, b, in] under sequence parallel)
        if self.sequence_parallel:
            x = comm.gather_from_sequence_parallel(x)
        else:
            x = comm.copy_to_tensor_parallel(x)
        bias = None if self.skip_bias_add else self.bias
        out = F.linear(x, self.weight, bias)  # [s, b, out/tp]
        if self.gather_output:
            out = comm.gather_from_tensor_parallel(out)  # [s, b, out]
        return out, (self.bias if self.skip_bias_add else None)


class RowParallelLinear(nn.Module):
    """Y = X A + b with A split by rows: weight `[out, in/tp]`; partial sums reduced over TP.

    The bias is replicated and added once, after the reduction (adding it per rank before the
    sum would count it tp times). Under sequence parallel the reduction is a reduce-scatter to
    `[s/tp, b, out]`, and the bias gradient becomes partial per rank (marked for a TP all-reduce).
    """

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True, input_is_parallel: bool = True,
                 skip_bias_add: bool = False, sequence_parallel: bool = False,
                 init_method: InitMethod = None, bias_init_method: InitMethod = zeros_init,
                 params_dtype=torch.float32, device=None):
        super().__init__()
        tp = state.get_tensor_parallel_world_size()
        if input_size % tp:
            raise ValueError(f"RowParallelLinear: input size {input_size} is not divisible by "
                             f"tensor-parallel size {tp}")
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel requires input_is_parallel=True")
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size // tp
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.sequence_parallel = sequence_parallel and tp > 1
        init_method = init_method or seeded_normal_init(0.02, 0)
        self.weight = _sharded_parameter((output_size, input_size), 1, init_method, params_dtype, device)
        if bias:
            self.bias = _sharded_parameter((output_size,), None, bias_init_method, params_dtype, device)
            self.bias.sequence_parallel = self.sequence_parallel
        else:
            self.bias = None

    def forward(self, x: torch.Tensor):
        # x: [s, b, in/tp] when input_is_parallel, else [s, b, in]
        if not self.input_is_parallel:
            x = comm.scatter_to_tensor_parallel(x)
        partial = F.linear(x, self.weight)  # [s, b, out], a partial sum per TP rank
        if self.sequence_parallel:
            out = comm.reduce_scatter_to_sequence_parallel(partial)  # [s/tp, b, out]
        else:
            out = comm.reduce_from_tensor_parallel(partial)  # [s, b, out]
        if self.skip_bias_add or self.bias is None:
            return out, self.bias
        return out + self.bias, None


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the (padded) vocabulary: weight `[V/tp, h]`.

    Each rank looks up the ids in its range, zeros the rest and the partial rows are summed over
    TP (reduce-scattered along the sequence under sequence parallel).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, init_method: InitMethod = None,
                 sequence_parallel: bool = False, params_dtype=torch.float32, device=None):
        super().__init__()
        tp, rank = state.get_tensor_parallel_world_size(), state.get_tensor_parallel_rank()
        if num_embeddings % tp:
            raise ValueError(f"VocabParallelEmbedding: padded vocabulary {num_embeddings} is not divisible by "
                             f"tensor-parallel size {tp}; pad it with make_vocab_size_divisible_by")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.per_partition = num_embeddings // tp
        self.vocab_start, self.vocab_end = rank * self.per_partition, (rank + 1) * self.per_partition
        self.tp = tp
        self.sequence_parallel = sequence_parallel and tp > 1
        init_method = init_method or seeded_normal_init(0.02, 0)
        self.weight = _sharded_parameter((num_embeddings, embedding_dim), 0, init_method, params_dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [s, b] -> [s, b, h] (or [s/tp, b, h] under sequence parallel)
        if self.tp > 1:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            partial = F.embedding(local_ids, self.weight)
            partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            partial = F.embedding(ids, self.weight)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sequence_parallel(partial)
        return comm.reduce_from_tensor_parallel(partial)


def reduce_sequence_parallel_gradients(parameters) -> None:
    """All-reduce over TP the gradients of replicated parameters that saw only a sequence slice.

    Call after backward, before clipping or the optimizer step. Uses `param.main_grad` when the
    data-parallel buffers provide it, else `param.grad`.
    """
    if state.get_tensor_parallel_world_size() == 1:
        return
    grads = []
    for p in parameters:
        if getattr(p, "sequence_parallel", False):
            g = getattr(p, "main_grad", None)
            g = p.grad if g is None else g
            if g is not None:
                grads.append(g)
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=state.get_tensor_parallel_group())
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
