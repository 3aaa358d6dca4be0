"""Pipeline schedules: no pipelining, 1F1B, and interleaved 1F1B (Narayanan et al., 2021); the
whole story, with the rules the point-to-point traffic obeys, is docs/pipeline.md.

One entry point, `forward_backward`, picks the schedule from `megaglot.parallel.state`:

* pp == 1: gradient accumulation over the M microbatches (each backpropagates loss / M).
* pp > 1, no virtual stages: 1F1B. Stage r runs `min(p - r - 1, M)` warm-up forwards, then
  alternates one forward and one backward, then drains the remaining backwards.
* pp > 1, v > 1 virtual stages: Megatron's interleaved 1F1B. Chunk c of stage r holds global chunk
  `c * p + r`; microbatches go through the chunks in groups of p. Needs M % p == 0 and M >= p.

Memory. After an activation is sent downstream its storage is replaced by a 1-element tensor
(Megatron's `deallocate_output_tensor`): the autograd node stays alive, the next stage holds the
data. Backward then runs through the autograd engine directly (`_backward_through`), which checks
the incoming gradient against the node's recorded shape rather than the emptied tensor's.
The stored (input, output) pairs, i.e. forwards whose backward has not run, are counted per chunk
into the `ScheduleStats` the caller passes, against the schedule's bound (`activation_bound`):

* 1F1B: `min(p - r, M)` on stage r (the warm-up forwards plus the one of the steady state);
* interleaved: `min((p - r - 1) * 2 + (v - 1) * p + 1, M * v)` chunk activations on stage r
  (each 1/v of a stage's layers), or all `M * v` when M == p (Megatron then runs every forward
  first). In units of a full stage that is about `p * (1 + 1/v)` on stage 0, against 1F1B's p.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

from megaglot.config import ConfigError, check_pipeline_split
from megaglot.parallel import state
from megaglot.pipeline import p2p
from megaglot.pipeline.timeline import Timeline

ForwardStep = Callable[[nn.Module, Optional[torch.Tensor], object], torch.Tensor]


# ---- checks and bounds ------------------------------------------------------------------------
def check_schedule(num_microbatches: int, pipeline_size: int, virtual_size: Optional[int] = None,
                   num_layers: Optional[int] = None, num_chunks: Optional[int] = None) -> None:
    """Raise ConfigError, naming the numbers, for a combination no schedule can run."""
    m, p, v = num_microbatches, pipeline_size, virtual_size
    if not isinstance(m, int) or m < 1:
        raise ConfigError(f"the number of microbatches must be a positive integer, got {m!r} "
                          f"(global batch / (micro batch x data-parallel size))")
    if v is not None and v > 1:
        if p == 1:
            raise ConfigError(f"virtual pipeline size {v} needs --pipeline-model-parallel-size > 1, got {p}")
        if m < p:
            raise ConfigError(f"interleaved 1F1B needs at least as many microbatches as pipeline stages: "
                              f"M = {m} < p = {p}")
        if m % p:
            raise ConfigError(f"interleaved 1F1B runs microbatches in groups of p: M = {m} is not divisible "
                              f"by --pipeline-model-parallel-size p = {p}")
    if num_layers is not None:
        check_pipeline_split(num_layers, p, v)
    if num_chunks is not None and num_chunks != (v or 1):
        raise ConfigError(f"got {num_chunks} model chunks on this rank but the virtual pipeline size is {v or 1}")


def activation_bound(pipeline_size: int, pipeline_rank: int, num_microbatches: int,
                     virtual_size: Optional[int] = None) -> int:
    """Most (input, output) pairs the schedule stores at once on this stage (over all its chunks)."""
    p, r, m, v = pipeline_size, pipeline_rank, num_microbatches, virtual_size or 1
    if p == 1:
        return 1
    if v == 1:
        return min(p - r, m)
    if m == p:
        return m * v
    return min((p - r - 1) * 2 + (v - 1) * p + 1, m * v)


@dataclass
class ScheduleStats:
    """Stored (input, output) pairs of one call: live now and the maximum seen. The caller makes one
    and passes it to `forward_backward(stats=...)`, which resets and fills it (no module state)."""

    schedule: str = ""
    live: List[int] = field(default_factory=list)
    max_live: List[int] = field(default_factory=list)
    live_total: int = 0
    max_live_total: int = 0
    bound: int = 0

    def reset(self, schedule: str, num_chunks: int, bound: int) -> None:
        self.schedule, self.bound = schedule, bound
        self.live, self.max_live = [0] * num_chunks, [0] * num_chunks
        self.live_total = self.max_live_total = 0

    def store(self, chunk: int) -> None:
        self.live[chunk] += 1
        self.live_total += 1
        self.max_live[chunk] = max(self.max_live[chunk], self.live[chunk])
        self.max_live_total = max(self.max_live_total, self.live_total)

    def release(self, chunk: int) -> None:
        self.live[chunk] -= 1
        self.live_total -= 1


# ---- the pieces every schedule shares ---------------------------------------------------------
def deallocate_output_tensor(output: Optional[torch.Tensor]) -> None:
    """Free an output's storage once sent, keeping its autograd node (and so the graph) alive."""
    if output is None or output._base is not None or output.grad_fn is None:
        return  # views share storage with something still needed; leaves have no graph to keep
    output.data = torch.empty((1,), device=output.device, dtype=output.dtype)


def _backward_through(output: torch.Tensor, grad: Optional[torch.Tensor]) -> None:
    """backward(output, grad) without the shape check against the (deallocated) output tensor."""
    if grad is None:
        torch.autograd.backward(output)
        return
    torch.autograd.Variable._execution_engine.run_backward(
        (output,), (grad,), False, False, (), True, True)  # keep_graph, create_graph, inputs, unreachable, accumulate


class _Runner:
    """Holds one call's arguments and runs single forward/backward steps of one chunk."""

    def __init__(self, chunks, microbatches, forward_step, *, tensor_shape, dtype, forward_only, timeline,
                 stats: ScheduleStats, device=None):
        self.chunks, self.microbatches, self.forward_step = chunks, microbatches, forward_step
        self.tensor_shape, self.dtype, self.device = tuple(tensor_shape), dtype, device
        self.forward_only, self.timeline, self.stats = forward_only, timeline, stats
        self.num_microbatches = len(microbatches)
        self.loss_sum: Optional[torch.Tensor] = None

    def forward(self, chunk: int, microbatch: int, input_tensor: Optional[torch.Tensor]) -> torch.Tensor:
        last = state.is_pipeline_last_stage(virtual_rank=chunk)  # the model's last chunk returns the loss
        if self.timeline is not None:
            with self.timeline.span("F", microbatch, chunk):
                output = self.forward_step(self.chunks[chunk], input_tensor, self.microbatches[microbatch])
        else:
            output = self.forward_step(self.chunks[chunk], input_tensor, self.microbatches[microbatch])
        if last:
            if not isinstance(output, torch.Tensor) or output.numel() != 1:
                raise ValueError("forward_step must return the microbatch's scalar loss on the last pipeline "
                                 f"stage, got {type(output).__name__}"
                                 f"{' of shape ' + str(tuple(output.shape)) if isinstance(output, torch.Tensor) else ''}")
            loss = output.detach().reshape(())
            self.loss_sum = loss.clone() if self.loss_sum is None else self.loss_sum + loss
            output = output.reshape(()) / self.num_microbatches
        if not self.forward_only:
            self.stats.store(chunk)
        return output

    def backward(self, chunk: int, microbatch: int, input_tensor, output_tensor, output_grad):
        span = self.timeline.span("B", microbatch, chunk) if self.timeline is not None else contextlib.nullcontext()
        with span:
            if output_tensor.requires_grad:
                _backward_through(output_tensor, output_grad)
        self.stats.release(chunk)
        return None if input_tensor is None else input_tensor.grad

    def result(self) -> Optional[torch.Tensor]:
        if self.loss_sum is None:
            return None
        return (self.loss_sum / self.num_microbatches).detach()


# ---- schedules --------------------------------------------------------------------------------
def _no_pipelining(run: _Runner) -> None:
    for i in range(run.num_microbatches):
        output = run.forward(0, i, None)
        if not run.forward_only:
            run.backward(0, i, None, output, None)


def _one_f_one_b(run: _Runner) -> None:
    p, r, m = state.get_pipeline_parallel_world_size(), state.get_pipeline_parallel_rank(), run.num_microbatches
    shape, dtype, dev = run.tensor_shape, run.dtype, run.device
    last = state.is_pipeline_last_stage()
    warmup = min(p - r - 1, m)
    remaining = m - warmup
    inputs: List[Optional[torch.Tensor]] = []
    outputs: List[torch.Tensor] = []
    fwd_i = bwd_i = 0

    def send(output):
        return None if last else output

    for _ in range(warmup):
        input_tensor = p2p.recv_forward(shape, dtype, dev)
        output = run.forward(0, fwd_i, input_tensor)
        fwd_i += 1
        p2p.send_forward(send(output), shape, dtype, dev)
        if not run.forward_only:
            inputs.append(input_tensor)
            outputs.append(output)
            deallocate_output_tensor(send(output))

    input_tensor = p2p.recv_forward(shape, dtype, dev) if remaining > 0 else None
    for i in range(remaining):
        last_iteration = i == remaining - 1
        output = run.forward(0, fwd_i, input_tensor)
        fwd_i += 1
        if run.forward_only:
            p2p.send_forward(send(output), shape, dtype, dev)
            if not last_iteration:
                input_tensor = p2p.recv_forward(shape, dtype, dev)
            continue
        output_grad = p2p.send_forward_recv_backward(send(output), shape, dtype, dev)
        inputs.append(input_tensor)
        outputs.append(output)
        deallocate_output_tensor(send(output))
        input_grad = run.backward(0, bwd_i, inputs.pop(0), outputs.pop(0), output_grad)
        bwd_i += 1
        if last_iteration:
            input_tensor = None
            p2p.send_backward(input_grad, shape, dtype, dev)
        else:
            input_tensor = p2p.send_backward_recv_forward(input_grad, shape, dtype, dev)

    if not run.forward_only:
        for _ in range(warmup):
            output_grad = p2p.recv_backward(shape, dtype, dev)
            input_grad = run.backward(0, bwd_i, inputs.pop(0), outputs.pop(0), output_grad)
            bwd_i += 1
            p2p.send_backward(input_grad, shape, dtype, dev)


class _Interleaved:
    """Megatron-LM's forward_backward_pipelining_with_interleaving with overlap_p2p_comm, step for step.

    Every exchange is posted without waiting (p2p.Pending) and waited on right before its buffers
    are needed: the activation for the next forward before that forward, the gradient for the next
    backward before that backward. A forward therefore never waits for a gradient it does not use
    (one combined exchange per step would make a stage wait for the first gradient before its next
    forward at the end of the warm-up), and message latency can hide behind compute.
    """

    def __init__(self, run: _Runner):
        self.run, self.comm = run, (run.tensor_shape, run.dtype, run.device)
        p, r = self.p, self.r = state.get_pipeline_parallel_world_size(), state.get_pipeline_parallel_rank()
        v, m = self.v, self.m = len(run.chunks), run.num_microbatches
        self.total = total = m * v
        self.inputs: List[list] = [[] for _ in range(v)]
        self.outputs: List[list] = [[] for _ in range(v)]
        self.output_grads: List[list] = [[] for _ in range(v)]
        self.all_warmup = not run.forward_only and m == p  # Megatron then runs every forward first
        if run.forward_only or self.all_warmup:
            self.warmup = total
        else:
            self.warmup = min((p - r - 1) * 2 + (v - 1) * p, total)
        self.remaining = total - self.warmup
        self.first_physical, self.last_physical = r == 0, r == p - 1
        self.fwd_pending = self.bwd_pending = p2p.Pending.done()

    def chunk_of(self, k: int, forward: bool) -> int:
        c = (k % (self.p * self.v)) // self.p
        return c if forward else self.v - c - 1

    def microbatch_of(self, k: int) -> int:
        return (k // (self.p * self.v)) * self.p + k % self.p

    def first_stage_of(self, chunk: int) -> bool:  # virtual first stage (chunk 0 on stage 0)
        return self.r == 0 and chunk == 0

    def last_stage_of(self, chunk: int) -> bool:
        return self.r == self.p - 1 and chunk == self.v - 1

    def forward_k(self, k: int):
        c = self.chunk_of(k, True)
        inputs, outputs = self.inputs[c], self.outputs[c]
        if self.first_stage_of(c) and len(inputs) == len(outputs):
            inputs.append(None)
        output = self.run.forward(c, self.microbatch_of(k), inputs[-1])
        outputs.append(output)
        if self.run.forward_only:
            inputs.pop()
            outputs.pop()
        return output

    def backward_k(self, k: int):
        c = self.chunk_of(k, False)
        if self.last_stage_of(c) and len(self.output_grads[c]) == 0:
            self.output_grads[c].append(None)
        return self.run.backward(c, self.microbatch_of(k), self.inputs[c].pop(0), self.outputs[c].pop(0),
                                 self.output_grads[c].pop(0))

    def __call__(self) -> None:
        self.inputs[0].append(p2p.recv_forward(*self.comm))  # None on the first stage
        for k in range(self.warmup):
            self.warmup_step(k)
        for k in range(self.remaining):
            self.steady_step(k)
        self.fwd_pending.wait()  # the last forward's send
        if not self.run.forward_only:
            self.cooldown()

    def warmup_step(self, k: int) -> None:
        self.fwd_pending.wait()
        output = self.forward_k(k)
        next_c = self.chunk_of(k + 1, True)
        recv_prev = not (self.first_physical and next_c == 0) and k != self.total - 1
        if self.last_stage_of(self.chunk_of(k, True)):
            output = None
        input_tensor, self.fwd_pending = p2p.send_forward_recv_forward(output, recv_prev, *self.comm, wait=False)
        if k == self.warmup - 1 and not self.run.forward_only and not self.all_warmup:
            output_grad, self.bwd_pending = p2p.send_backward_recv_backward(
                None, not self.last_physical, *self.comm, wait=False)
            self.output_grads[self.v - 1].append(output_grad)
        self.inputs[next_c].append(input_tensor)
        if not self.run.forward_only:
            deallocate_output_tensor(output)

    def steady_step(self, k: int) -> None:
        p, v = self.p, self.v
        fk, bk = k + self.warmup, k
        self.fwd_pending.wait()
        output = self.forward_k(fk)
        if self.last_stage_of(self.chunk_of(fk, True)):
            output = None
        recv_prev = k != self.remaining - 1
        if self.first_physical:  # the first stage is p - 1 forwards ahead of the last one
            next_fc = self.chunk_of(fk - (p - 1), True)
            recv_prev = recv_prev and next_fc != v - 1
            next_fc += 1
        else:
            next_fc = self.chunk_of(fk + 1, True)
        input_tensor, self.fwd_pending = p2p.send_forward_recv_forward(output, recv_prev, *self.comm, wait=False)
        deallocate_output_tensor(output)
        self.bwd_pending.wait()
        input_grad = self.backward_k(bk)
        if self.first_stage_of(self.chunk_of(bk, False)):
            input_grad = None
        recv_next = True
        if self.last_physical:
            next_bc = self.chunk_of(bk - (p - 1), False)
            recv_next = next_bc != 0
            next_bc -= 1
        else:
            next_bc = self.chunk_of(bk + 1, False)
        output_grad, self.bwd_pending = p2p.send_backward_recv_backward(input_grad, recv_next, *self.comm,
                                                                        wait=False)
        if recv_prev:
            self.inputs[next_fc].append(input_tensor)
        if recv_next:
            self.output_grads[next_bc].append(output_grad)

    def cooldown(self) -> None:
        self.bwd_pending.wait()
        if self.all_warmup:
            self.output_grads[self.v - 1].append(p2p.recv_backward(*self.comm))  # None on the last stage
        for k in range(self.remaining, self.total):
            input_grad = self.backward_k(k)
            next_bc = self.chunk_of(k + 1, False)
            recv_next = not (self.last_physical and next_bc == self.v - 1) and k != self.total - 1
            if self.first_stage_of(self.chunk_of(k, False)):
                input_grad = None
            self.output_grads[next_bc].append(p2p.send_backward_recv_backward(input_grad, recv_next, *self.comm))


# ---- entry point ------------------------------------------------------------------------------
def forward_backward(chunks: Sequence[nn.Module], microbatches: Sequence, forward_step: ForwardStep, *,
                     tensor_shape: Sequence[int], dtype: torch.dtype, forward_only: bool = False,
                     timeline: Optional[Timeline] = None, device: Optional[torch.device] = None,
                     stats: Optional[ScheduleStats] = None) -> Optional[torch.Tensor]:
    """Run forward (and backward) of all microbatches through this rank's chunks.

    chunks: this rank's model chunks, `len == virtual pipeline size` (1 when not interleaved);
        chunk c is virtual rank c (`state.is_pipeline_last_stage(virtual_rank=c)`).
    microbatches: the same M microbatch objects on every stage (the first stage feeds them to the
        model, the last reads labels from them).
    forward_step(chunk, input_tensor_or_None, microbatch) -> Tensor: the scalar loss of the
        microbatch for the model's last chunk (chunk v - 1 of the last stage; a GPTChunk knows it
        as `post_process`), the activation to send (`tensor_shape`, `dtype`) for any other chunk.
        `input_tensor` is None for the model's first chunk; a received activation (requires_grad)
        otherwise.
    forward_only: evaluation; no graphs are built (torch.no_grad) and nothing is stored.
    timeline: records (op, microbatch, chunk, start, end) of every forward and backward.
    stats: a ScheduleStats to reset and fill with this call's stored-activation counts.
    Returns the mean loss over microbatches (detached) on the last stage, None elsewhere: one
    single-process step over the global batch when every microbatch loss is a mean over as many
    tokens (with unequal counts, weight the microbatch losses inside `forward_step`).
    Gradients accumulate into the parameters' .grad (data-parallel reduction is the caller's).
    """
    p = state.get_pipeline_parallel_world_size()
    v = state.get_virtual_pipeline_world_size()
    interleaved = v is not None and v > 1
    check_schedule(len(microbatches), p, v, num_chunks=len(chunks))
    name = "no-pipelining" if p == 1 else "interleaved-1f1b" if interleaved else "1f1b"
    stats = stats if stats is not None else ScheduleStats()
    stats.reset(name, len(chunks), activation_bound(p, state.get_pipeline_parallel_rank(), len(microbatches), v))
    run = _Runner(list(chunks), list(microbatches), forward_step, tensor_shape=tensor_shape, dtype=dtype,
                  forward_only=forward_only, timeline=timeline, stats=stats, device=device)
    schedule = {"no-pipelining": _no_pipelining, "1f1b": _one_f_one_b, "interleaved-1f1b": lambda r: _Interleaved(r)()}[name]
    with torch.no_grad() if forward_only else contextlib.nullcontext():
        schedule(run)
    return run.result() if state.is_pipeline_last_stage() else None
