"""Hand-written data parallelism: contiguous fp32 gradient buffers reduced bucket by bucket.

Each parameter gets `param.main_grad`, an fp32 view into one contiguous buffer, so gradients
accumulate over microbatches in fp32 whatever the parameter dtype, and the DP reduction works on
a few large buckets instead of hundreds of small tensors. Buckets are laid out in reverse
parameter order (backward produces gradients roughly in that order). A post-accumulate hook
counts each parameter's gradients; once every parameter of a bucket has received all
`num_microbatches` of them, the bucket's reduction starts asynchronously while backward goes on
(overlap), whatever pipeline schedule drives the backward passes.

With the distributed optimizer each bucket is padded to a multiple of the DP size and
reduce-scattered in place on every backend (gloo included, so CPU tests run NCCL's code): DP rank
r owns the r-th slice of every bucket, and only that slice holds the reduced gradient afterwards
(the rest of the bucket keeps this rank's own, unreduced values: the optimizer reads only its slice).
"""

from __future__ import annotations

import weakref

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.distributed as dist

from megaglot.parallel import comm


@dataclass
class Bucket:
    """A contiguous range of the buffer and the parameters that live in it."""

    start: int
    end: int
    params: List[torch.nn.Parameter] = field(default_factory=list)
    ready: int = 0
    handle: Optional[object] = None

    def shard_range(self, dp_rank: int, dp_size: int):
        size = (self.end - self.start) // dp_size
        return self.start + dp_rank * size, self.start + (dp_rank + 1) * size


class GradBuffer:
    def __init__(self, params: List[torch.nn.Parameter], *, dp_group, distributed_optimizer: bool = False,
                 bucket_size: int = 40_000_000, overlap: bool = True):
        """params in forward order; bucket_size in elements (Megatron's default is 40M)."""
        self.dp_group = dp_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.distributed = distributed_optimizer
        self.overlap = overlap
        self.params = [p for p in params if p.requires_grad]
        device = self.params[0].device if self.params else torch.device("cpu")

        # Lay out in reverse order, closing a bucket when it reaches bucket_size.
        self.buckets: List[Bucket] = []
        self.offsets = {}  # param -> (start, end) in the buffer
        offset, bucket = 0, Bucket(0, 0)
        pad_to = self.dp_size if distributed_optimizer else 1
        for p in reversed(self.params):
            self.offsets[p] = (offset, offset + p.numel())
            offset += p.numel()
            bucket.params.append(p)
            if offset - bucket.start >= bucket_size:
                offset = _round_up(offset, pad_to)
                bucket.end = offset
                self.buckets.append(bucket)
                bucket = Bucket(offset, offset)
        if bucket.params:
            offset = _round_up(offset, pad_to)
            bucket.end = offset
            self.buckets.append(bucket)
        self.numel = offset
        self.data = torch.zeros(self.numel, dtype=torch.float32, device=device)
        self.bucket_of = {}
        for b in self.buckets:
            for p in b.params:
                self.bucket_of[p] = b
        for p in self.params:
            start, end = self.offsets[p]
            p.main_grad = self.data[start:end].view_as(p)
            p.register_post_accumulate_grad_hook(self._make_hook())
        self.num_microbatches = 1
        self.grad_counts = {}

    # ---- per step ------------------------------------------------------------------------
    def start_step(self, num_microbatches: int) -> None:
        """Zero the gradients and expect `num_microbatches` backward passes before reducing."""
        self.data.zero_()
        self.num_microbatches = num_microbatches
        self.grad_counts = {p: 0 for p in self.params}
        for b in self.buckets:
            b.ready, b.handle = 0, None

    def _make_hook(self):
        # A weak reference: the hook lives on the parameter, and a strong one would make
        # buffer -> params -> hook -> buffer a cycle that keeps a freed model's memory alive.
        buffer_ref = weakref.ref(self)

        def hook(param: torch.nn.Parameter) -> None:
            # Accumulate in fp32 and free the (possibly bf16) autograd gradient, unless the
            # backward GEMM already added it into main_grad (parallel.layers.LinearIntoMainGrad).
            if getattr(param, "grad_added_to_main_grad", False):
                param.grad_added_to_main_grad = False
            else:
                param.main_grad.add_(param.grad)
            param.grad = None
            buffer = buffer_ref()
            if buffer is not None:
                buffer._gradient_ready(param)

        return hook

    def _gradient_ready(self, param: torch.nn.Parameter) -> None:
        """Count one microbatch's gradient of `param`; launch its bucket's reduction once all are in."""
        if not self.overlap or self.dp_size == 1:
            return
        self.grad_counts[param] = self.grad_counts.get(param, 0) + 1
        if self.grad_counts[param] == self.num_microbatches:
            bucket = self.bucket_of[param]
            bucket.ready += 1
            if bucket.ready == len(bucket.params):
                self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        if bucket.handle is not None or self.dp_size == 1:
            return
        view = self.data[bucket.start:bucket.end]
        view.div_(self.dp_size)  # average over DP: the global batch mean
        if self.distributed:  # in place: our slice of the bucket receives the reduced slice
            lo, hi = bucket.shard_range(self.dp_rank, self.dp_size)
            bucket.handle = comm.reduce_scatter_single(self.data[lo:hi], view, self.dp_group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(view, group=self.dp_group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket's reduction (starting those the hooks did not)."""
        if self.dp_size == 1:
            return
        for bucket in self.buckets:
            if bucket.handle is None:
                self._launch(bucket)
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.handle = None

    # ---- the distributed optimizer's view ----------------------------------------------------
    def owned_pieces(self):
        """(param, flat_start, flat_end, buffer_start) of every parameter range this DP rank owns."""
        pieces = []
        for bucket in self.buckets:
            lo, hi = bucket.shard_range(self.dp_rank, self.dp_size)
            for p in bucket.params:
                start, end = self.offsets[p]
                a, b = max(start, lo), min(end, hi)
                if a < b:
                    pieces.append((p, a - start, b - start, a))
        return pieces


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple
