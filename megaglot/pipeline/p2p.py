"""Point-to-point exchange between adjacent pipeline stages.

Activations travel forward (stage i -> i+1), their gradients backward (i+1 -> i). Every exchange
is one `torch.distributed.batch_isend_irecv` over the pipeline group's *global* ranks, so a stage
that sends downstream while receiving from downstream (1F1B's steady state) posts both halves at
once and cannot deadlock with its neighbour doing the mirror image. 1F1B waits on each exchange
before going on; interleaved 1F1B posts with `wait=False` and waits on the returned `Pending`
right before it needs what arrives (Megatron's overlap_p2p_comm).

Shapes are known ahead (`[s/tp if sequence parallel else s, micro batch, h]`), so receive buffers
are allocated from `tensor_shape`/`dtype`; a send whose shape or dtype differs raises a clear
error instead of letting the peer read garbage.

Ordering. NCCL ignores tags and matches the messages from one rank to another in posting order
(the k-th send from a to b meets b's k-th receive from a). Every message here carries the same
tag, so gloo matches them the same way and the CPU tests exercise NCCL's pairing. With p = 2 (or
interleaving's ring wrap) both directions of traffic can run between the same two ranks in one
batch, so every batch posts forward-direction traffic (send to next, receive from previous)
before backward-direction traffic (send to previous, receive from next): on both ends of a pair
the activation is posted, and therefore matched, before the gradient. Across batches, the
schedules post in the same order on both peers. A mismatch would not raise (the buffers have the
same shape and dtype), which is why tests check what arrives in which buffer.

Waiting is stream-ordered: `Pending.wait()` waits on the work handles only. On NCCL that makes the
current CUDA stream wait for the transfer without blocking the host, so compute queued meanwhile
keeps overlapping; a device-wide synchronize would stall it.

The neighbours come from `state.get_pipeline_next_rank/prev_rank`, which wrap around: under
interleaving, the last stage's chunk v feeds the first stage's chunk v+1 through that wrap.
On NCCL the caller must have set the CUDA device (torch.cuda.set_device) before the first call.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megaglot.parallel import state

_TAG = 0  # one tag for every message: matching by posting order, as on NCCL (module docstring)


def _has_own_cuda_backend(group) -> bool:
    """True when the group reaches CUDA tensors through a backend that does not also serve the
    CPU (NCCL, alone or as in "cpu:gloo,cuda:nccl"). Gloo registers for CUDA too, but as the very
    backend object that serves the CPU; it is used here for CPU tensors."""
    try:
        cuda_backend = group._get_backend(torch.device("cuda"))
    except RuntimeError:  # no backend for CUDA
        return False
    try:
        return cuda_backend is not group._get_backend(torch.device("cpu"))
    except RuntimeError:  # CUDA only
        return True


def _default_device(group) -> torch.device:
    """Where receive buffers go when nothing is sent and the caller named no device: the current
    CUDA device if the pipeline group has a CUDA backend of its own, else the CPU. Asks the group,
    never compares backend names (a name like "cpu:gloo,cuda:nccl" is valid)."""
    if torch.cuda.is_available() and _has_own_cuda_backend(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_send(tensor: torch.Tensor, tensor_shape, dtype, what: str) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(tensor_shape):
        raise ValueError(f"pipeline {what}: tensor of shape {tuple(tensor.shape)} does not match the agreed "
                         f"tensor_shape {tuple(tensor_shape)} (expected [s/tp if sequence parallel else s, "
                         f"micro batch, hidden])")
    if tensor.dtype != dtype:
        raise ValueError(f"pipeline {what}: tensor of dtype {tensor.dtype} does not match the agreed dtype {dtype}")
    return tensor.detach().contiguous()


class Pending:
    """An exchange that was posted but not waited on (`communicate(..., wait=False)`).

    `wait()` before reading what it receives. Until wait() has returned, the Pending holds every
    tensor of the batch (sent and received), so none is freed while a transfer may still use it.
    Received activations get `requires_grad` only once they have arrived.
    """

    def __init__(self, requests, keep_alive, activation: Optional[torch.Tensor]):
        self._requests, self._keep_alive, self._activation = requests, keep_alive, activation

    @staticmethod
    def done() -> "Pending":
        """Nothing outstanding: a start value for schedules that wait before each use."""
        return Pending(None, None, None)

    def wait(self) -> None:
        """Wait on the work handles (stream-ordered on NCCL, see the module docstring); no device
        synchronize. A second call returns at once."""
        if self._requests is None:
            return
        for request in self._requests:
            request.wait()
        if self._activation is not None:
            self._activation.requires_grad_()
        self._requests = self._keep_alive = self._activation = None  # the transfers are done: release


def communicate(tensor_send_next: Optional[torch.Tensor], tensor_send_prev: Optional[torch.Tensor],
                recv_prev: bool, recv_next: bool, tensor_shape: Sequence[int], dtype: torch.dtype,
                device: Optional[torch.device] = None, wait: bool = True):
    """Send/receive in both directions at once; returns (from previous stage, from next stage).

    No stage logic here: a tensor that is given is sent, a receive that is asked for is posted
    (the schedules decide, so that the interleaved ring wrap works). Received activations are
    returned with `requires_grad` set (they are the next chunk's leaf inputs).

    wait=False returns `(from_prev, from_next, Pending)` right after posting: the caller computes
    meanwhile and calls `Pending.wait()` before touching the received buffers, so the message
    latency hides behind compute (Megatron's overlap_p2p_comm).
    """
    group = state.get_pipeline_parallel_group()
    if device is None:
        sent = tensor_send_next if tensor_send_next is not None else tensor_send_prev
        device = sent.device if sent is not None else _default_device(group)
    next_rank, prev_rank = state.get_pipeline_next_rank(), state.get_pipeline_prev_rank()
    from_prev = torch.empty(tuple(tensor_shape), dtype=dtype, device=device) if recv_prev else None
    from_next = torch.empty(tuple(tensor_shape), dtype=dtype, device=device) if recv_next else None
    ops = []
    # Forward-direction traffic first, then backward-direction (see the module docstring).
    if tensor_send_next is not None:
        ops.append(dist.P2POp(dist.isend, _check_send(tensor_send_next, tensor_shape, dtype, "send forward"),
                              next_rank, group, _TAG))
    if from_prev is not None:
        ops.append(dist.P2POp(dist.irecv, from_prev, prev_rank, group, _TAG))
    if tensor_send_prev is not None:
        ops.append(dist.P2POp(dist.isend, _check_send(tensor_send_prev, tensor_shape, dtype, "send backward"),
                              prev_rank, group, _TAG))
    if from_next is not None:
        ops.append(dist.P2POp(dist.irecv, from_next, next_rank, group, _TAG))
    # An empty batch posts nothing and has nothing to wait on.
    pending = Pending(dist.batch_isend_irecv(ops), [op.tensor for op in ops], from_prev) if ops else Pending.done()
    if not wait:
        return from_prev, from_next, pending
    pending.wait()
    return from_prev, from_next


# ---- 1F1B helpers: they know which physical stages have no neighbour ---------------------------
def _first() -> bool:
    return state.is_pipeline_first_stage()


def _last() -> bool:
    return state.is_pipeline_last_stage()


def recv_forward(tensor_shape, dtype, device=None) -> Optional[torch.Tensor]:
    """Activation from the previous stage (None on the first stage)."""
    if _first():
        return None
    return communicate(None, None, True, False, tensor_shape, dtype, device)[0]


def recv_backward(tensor_shape, dtype, device=None) -> Optional[torch.Tensor]:
    """Gradient of our output from the next stage (None on the last stage)."""
    if _last():
        return None
    return communicate(None, None, False, True, tensor_shape, dtype, device)[1]


def send_forward(output: Optional[torch.Tensor], tensor_shape, dtype, device=None) -> None:
    if _last() or output is None:
        return
    communicate(output, None, False, False, tensor_shape, dtype, device)


def send_backward(input_grad: Optional[torch.Tensor], tensor_shape, dtype, device=None) -> None:
    if _first() or input_grad is None:
        return
    communicate(None, input_grad, False, False, tensor_shape, dtype, device)


def send_forward_recv_backward(output, tensor_shape, dtype, device=None) -> Optional[torch.Tensor]:
    """Send our activation downstream and receive its gradient, in one batch (1F1B steady state)."""
    if _last():
        return None
    return communicate(output, None, False, True, tensor_shape, dtype, device)[1]


def send_backward_recv_forward(input_grad, tensor_shape, dtype, device=None) -> Optional[torch.Tensor]:
    """Send a gradient upstream and receive the next activation from upstream, in one batch."""
    if _first():
        return None
    return communicate(None, input_grad, True, False, tensor_shape, dtype, device)[0]


# ---- interleaved helpers: the schedule decides everything (ring wrap included) ------------------
def send_forward_recv_forward(output, recv_prev: bool, tensor_shape, dtype, device=None, wait: bool = True):
    """Forward-direction traffic only. wait=False: returns (activation buffer, Pending)."""
    result = communicate(output, None, recv_prev, False, tensor_shape, dtype, device, wait=wait)
    return result[0] if wait else (result[0], result[2])


def send_backward_recv_backward(input_grad, recv_next: bool, tensor_shape, dtype, device=None, wait: bool = True):
    """Backward-direction traffic only. wait=False: returns (gradient buffer, Pending)."""
    result = communicate(None, input_grad, False, recv_next, tensor_shape, dtype, device, wait=wait)
    return result[1] if wait else (result[1], result[2])
