"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

Every parameter carries the metadata checkpointing and resharding need: `partition_dim` (the
dimension split over TP, or None when replicated) and `global_shape` (its shape at TP = 1).
Initialization draws the full (TP = 1) master weight from the caller's seeded `init_method` and
keeps this rank's slice, so the gathered weights are bit-identical at every TP size.
"""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=None)
def _mixed_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch adds a `dtype` x `dtype` product into an fp32 tensor in one GEMM
    (torch.addmm with out_dtype=float32, CUDA only), checked once per device against a reference."""
    try:
        a = torch.randn(64, 48, device=device).to(dtype)
        b = torch.randn(48, 32, device=device).to(dtype)
        acc = torch.randn(64, 32, device=device)
        want = acc + a.float() @ b.float()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, want, rtol=1e-2, atol=1e-2))
    except (RuntimeError, TypeError):
        return False


def accumulates_into_main_grad(weight: torch.Tensor) -> bool:
    """True when `weight`'s gradient can go straight into its fp32 `main_grad` from the GEMM."""
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is None or not weight.requires_grad or not torch.is_grad_enabled():
        return False
    if main_grad.dtype == weight.dtype:
        return True
    return weight.is_cuda and _mixed_addmm_works(weight.device, weight.dtype)


class LinearIntoMainGrad(torch.autograd.Function):
    """y = x W^T + b whose weight gradient the backward GEMM adds straight into `W.main_grad`.

    Megatron's gradient-accumulation fusion: no bf16 weight gradient is materialized and the
    separate fp32 add of the gradient buffer's hook disappears (one pass over every weight per
    microbatch). The placeholder returned as W's gradient is never read: `W.grad_added_to_main_grad`
    tells the buffer's hook to skip its add and only count the gradient as ready. This needs each
    weight to feed one linear per backward pass, as in megaglot (no tied or shared weights): a second
    gradient path into W would be summed with the placeholder and skipped.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_in = grad_out.matmul(weight) if ctx.needs_input_grad[0] else None  # [..., in]
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # [tokens, out]
        x2d = x.reshape(-1, x.shape[-1])  # [tokens, in]
        main_grad = weight.main_grad
        if main_grad.dtype == weight.dtype:
            main_grad.addmm_(g2d.t(), x2d)
        else:
            torch.addmm(main_grad, g2d.t(), x2d, out_dtype=main_grad.dtype, out=main_grad)
        weight.grad_added_to_main_grad = True
        grad_bias = g2d.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_in, torch.empty_like(weight), grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, with the weight gradient fused into `weight.main_grad` when a gradient buffer set one."""
    if accumulates_into_main_grad(weight):
        return LinearIntoMainGrad.apply(x, weight, bias)
    return F.linear(x, weight, bias)


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
        out = linear(x, self.weight, bias)  # [s, b, out/tp]
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
        partial = linear(x, self.weight)  # [s, b, out], a partial sum per TP rank
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
