"""Tensor-parallel collectives that autograd can differentiate.

Each forward collective is paired with its adjoint in backward (all-reduce <-> identity,
split <-> all-gather, all-gather <-> reduce-scatter), so parallel layers compose with plain
autograd. Activations are `[s, b, h]`: the tensor-parallel pairs work on the last dim, the
sequence-parallel trio on dim 0.

The raw primitives call the single-tensor collectives (all-gather into one tensor, reduce-scatter
of one tensor) on every backend: gloo has them too (checked on torch 2.13: fp32, bf16, fp16), so the
CPU tests run exactly the calls NCCL runs. There is no per-backend branch to drift apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaglot.parallel import state

# ---- single-tensor collectives -------------------------------------------------------------
# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor to *_single and deprecates the
# old names (a FutureWarning per call); older torch (the GPU machines' 2.11) has only the old ones.
# Looked up at call time, so a test can spy on `torch.distributed.<name>`.
def all_gather_single(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """out [world * n, ...] <- every rank's x [n, ...] in rank order (torch's all_gather_single)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, x, group=group, async_op=async_op)


def reduce_scatter_single(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """out [n, ...] <- this rank's slice of the sum of every rank's x [world * n, ...].

    `out` may be this rank's slice of `x` itself (GradBuffer reduces a bucket in place): NCCL and
    gloo both accept that aliasing.
    """
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(out, x, group=group, async_op=async_op)


# ---- raw primitives (no autograd) ----------------------------------------------------------
def all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group, in place: callers pass a tensor they own (a clone where autograd owns it)."""
    if dist.get_world_size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's x along dim 0, in rank order."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, x, group)
    return out


def reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group and keep this rank's slice of dim 0."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.shape[0] % world:
        raise ValueError(f"reduce-scatter: dim 0 of size {x.shape[0]} is not divisible by the group size {world}")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, x, group)
    return out


def split_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {world} tensor-parallel ranks")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    # Gather along dim 0 (contiguous chunks), then move the rank axis next to the last dim.
    gathered = all_gather_dim0(x.unsqueeze(0), group)  # [world, ..., h/world]
    return torch.cat(gathered.unbind(0), dim=-1).contiguous()


# ---- autograd pairs --------------------------------------------------------------------------
class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient (each TP rank used the same input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), ctx.group), None  # never modify autograd's grad in place


class _ReduceFromTensorParallel(torch.autograd.Function):
    """All-reduce forward (partial sums of a row-parallel matmul); identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTensorParallel(torch.autograd.Function):
    """Keep this rank's slice of the last dim; all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_last_dim(grad, ctx.group), None


class _GatherFromTensorParallel(torch.autograd.Function):
    """All-gather along the last dim; the gradient keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        return split_along_dim(grad, -1, ctx.group), None


class _ScatterToSequenceParallel(torch.autograd.Function):
    """Keep this rank's slice of the sequence (dim 0); all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_along_dim(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group), None


class _GatherFromSequenceParallel(torch.autograd.Function):
    """All-gather the sequence; the gradient is reduce-scattered (every rank used the whole sequence)."""

    @staticmethod
    def forward(ctx, x, group, reduce_grad=True):
        ctx.group, ctx.reduce_grad = group, reduce_grad
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduce_grad:
            return reduce_scatter_dim0(grad, ctx.group), None, None
        return split_along_dim(grad, 0, ctx.group), None, None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    """Reduce-scatter along the sequence (row-parallel output); all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group), None


def _tp_group(group):
    return state.get_tensor_parallel_group() if group is None else group


def _tp_trivial(group) -> bool:
    return group is None and state.get_tensor_parallel_world_size() == 1


def copy_to_tensor_parallel(x, group=None):
    return x if _tp_trivial(group) else _CopyToTensorParallel.apply(x, _tp_group(group))


def reduce_from_tensor_parallel(x, group=None):
    return x if _tp_trivial(group) else _ReduceFromTensorParallel.apply(x, _tp_group(group))


def scatter_to_tensor_parallel(x, group=None):
    return x if _tp_trivial(group) else _ScatterToTensorParallel.apply(x, _tp_group(group))


def gather_from_tensor_parallel(x, group=None):
    return x if _tp_trivial(group) else _GatherFromTensorParallel.apply(x, _tp_group(group))


def scatter_to_sequence_parallel(x, group=None):
    return x if _tp_trivial(group) else _ScatterToSequenceParallel.apply(x, _tp_group(group))


def gather_from_sequence_parallel(x, group=None, reduce_grad=True):
    """`reduce_grad=False` when the consumer is itself replicated over TP (e.g. the final
    logits' input under a gathered output), so the gradient is only split, not summed."""
    return x if _tp_trivial(group) else _GatherFromSequenceParallel.apply(x, _tp_group(group), reduce_grad)


def reduce_scatter_to_sequence_parallel(x, group=None):
    return x if _tp_trivial(group) else _ReduceScatterToSequenceParallel.apply(x, _tp_group(group))
