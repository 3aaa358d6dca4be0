"""The pipeline schedules obey NCCL's point-to-point rules, checked on CPU (issue 18).

Each pipeline rank's `forward_backward` runs in this one process, one rank at a time, on torch's
fake process group, with `torch.distributed.batch_isend_irecv` replaced by a recorder: it records
every batch (kind, peer global rank, shape, dtype, communicator) and every wait on it, and fills
receive buffers with zeros. `nccl_model.replay` then runs all ranks' traces together under NCCL's
progress model (per-pair FIFO matching that ignores tags, batches in order on one stream, a send
completes once its receive runs) and must find no deadlock, mismatch or unmatched message.

What a message means is checked too: the toy chunks send marker tensors (an activation holds
("act", global chunk, microbatch), a gradient ("grad", global chunk, microbatch)), and every
received buffer is labelled with what the receiver uses it as (the input of chunk g for
microbatch i must be chunk g-1's activation of i; the gradient of chunk g's output must come from
chunk g+1). Two same-shaped messages swapped between a pair would otherwise pass unnoticed.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore

from megaglot.config import ConfigError
from megaglot.parallel import state
from megaglot.pipeline import check_schedule, forward_backward, p2p
from nccl_model import RECV, SEND, Op, Post, Wait, replay

S, B, H = 8, 2, 4
KINDS = {"act": 1, "grad": 2}


# ---- markers: what a sent tensor is -----------------------------------------------------------
def marker(kind: str, chunk: int, microbatch: int) -> float:
    return float(KINDS[kind] * 100000 + chunk * 1000 + microbatch)  # exact in float32


def decode(tensor: torch.Tensor):
    """The label a marker tensor carries; ("garbage",) for anything else."""
    flat = tensor.detach().reshape(-1)
    value = int(flat[0].item())
    kind = {v: k for k, v in KINDS.items()}.get(value // 100000)
    if kind is None or not bool((flat == flat[0]).all()) or float(flat[0]) != value:
        return ("garbage",)
    return (kind, value % 100000 // 1000, value % 1000)


class Stamp(torch.autograd.Function):
    """Identity forward; backward returns the marker of this chunk's input gradient."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, ctx.value), None


# ---- the recorder -----------------------------------------------------------------------------
class _FakeWork:
    def __init__(self, recorder, batch):
        self.recorder, self.batch = recorder, batch

    def wait(self, timeout=None):
        self.recorder.waited(self.batch)
        return True


class Recorder:
    """Stands in for dist.batch_isend_irecv on one rank and keeps that rank's program."""

    def __init__(self):
        self.events = []  # ("post", batch, [(kind, peer, shape, dtype, group, tensor)]) | ("wait", batch)
        self.batches = 0
        self.expected = {}  # receive buffer data_ptr -> label of what the receiver uses it as

    def batch_isend_irecv(self, ops):
        batch, self.batches = self.batches, self.batches + 1
        recorded = []
        for op in ops:
            kind = {"isend": SEND, "irecv": RECV}[op.op.__name__]
            peer = op.peer if op.peer is not None else dist.get_global_rank(op.group, op.group_peer)
            if kind == RECV:
                op.tensor.zero_()
            recorded.append((kind, peer, tuple(op.tensor.shape), str(op.tensor.dtype),
                             tuple(dist.get_process_group_ranks(op.group)), op.tensor))
        self.events.append(("post", batch, recorded))
        return [_FakeWork(self, batch) for _ in ops]

    def waited(self, batch):
        if self.events[-1] != ("wait", batch):  # one wait per work of the same batch is one wait
            self.events.append(("wait", batch))

    def expect(self, tensor, label):
        self.expected[tensor.data_ptr()] = label

    def trace(self):
        """The program as nccl_model events; sends labelled by content, receives by their use."""
        program = []
        for event in self.events:
            if event[0] == "wait":
                program.append(Wait(event[1]))
                continue
            ops = tuple(Op(kind, peer, shape, dtype, group,
                           decode(t) if kind == SEND else self.expected.get(t.data_ptr()))
                        for kind, peer, shape, dtype, group, t in event[2])
            program.append(Post(event[1], ops))
        return program


@contextlib.contextmanager
def recording(recorder):
    """Route batch_isend_irecv (as torch.distributed and its c10d module expose it) to the recorder."""
    with mock.patch.object(dist, "batch_isend_irecv", recorder.batch_isend_irecv), \
            mock.patch.object(c10d, "batch_isend_irecv", recorder.batch_isend_irecv):
        yield recorder


@contextlib.contextmanager
def fake_rank(rank, tp, pp, vp):
    """This process plays global rank `rank` of a tp x pp world (fake process group, no traffic)."""
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp * pp)
    try:
        state.initialize(tp, pp, vp)
        yield
    finally:
        state.destroy()
        dist.destroy_process_group()


# ---- toy model chunks -------------------------------------------------------------------------
def make_forward_step(recorder, s_local, chunks):
    """forward_step of a Linear chunk whose sent activations and gradients are markers."""
    p, r = state.get_pipeline_parallel_world_size(), state.get_pipeline_parallel_rank()

    def forward_step(chunk, input_tensor, mb):
        c = chunks.index(chunk)  # the chunk's virtual rank
        g = c * p + r
        i = mb["i"]
        if input_tensor is None:
            x = mb["x"]
        else:
            recorder.expect(input_tensor, ("act", g - 1, i))
            x = Stamp.apply(input_tensor, marker("grad", g, i))
        out = chunk(x)  # [s/tp, b, h]
        if state.is_pipeline_last_stage(virtual_rank=c):
            return out.square().mean()
        out = out * 0 + marker("act", g, i)
        if out.requires_grad:
            out.register_hook(lambda grad: recorder.expect(grad, ("grad", g + 1, i)))
        return out
    return forward_step


def microbatches(m, s_local):
    return [{"i": i, "x": torch.randn(s_local, B, H)} for i in range(m)]


def record(chunks, m, forward_only, s_local, dtype=torch.float32, forward_step=None):
    """Run this rank's schedule once; its recorder (trace and labels)."""
    recorder = Recorder()
    step = forward_step or make_forward_step(recorder, s_local, chunks)
    with recording(recorder):
        forward_backward(chunks, microbatches(m, s_local), step, tensor_shape=(s_local, B, H), dtype=dtype,
                         forward_only=forward_only)
    return recorder


def legal(m, p, v):
    """The rule stated in schedules' docstring: interleaving needs M >= p and M % p == 0."""
    return v == 1 or (m >= p and m % p == 0)


def record_layout(tp, pp, v, counts):
    """Every rank's recorders for each (M, forward_only) of one layout; illegal M must be refused."""
    vp = v if v > 1 else None
    s_local = S // tp  # sequence parallel: [s/tp, b, h] travels between stages
    runs = defaultdict(dict)
    for rank in range(tp * pp):
        with fake_rank(rank, tp, pp, vp):
            torch.manual_seed(rank)
            chunks = [nn.Linear(H, H) for _ in range(v)]
            for m in counts:
                for forward_only in (False, True):
                    if legal(m, pp, v):
                        runs[(m, forward_only)][rank] = record(chunks, m, forward_only, s_local)
                        continue
                    with pytest.raises(ConfigError):
                        check_schedule(m, pp, vp)
                    recorder = Recorder()
                    with pytest.raises(ConfigError), recording(recorder):
                        forward_backward(chunks, microbatches(m, s_local),
                                         make_forward_step(recorder, s_local, chunks),
                                         tensor_shape=(s_local, B, H), dtype=torch.float32, forward_only=forward_only)
                    assert recorder.events == [], "a refused schedule must not communicate"
    return runs


def check_replay(recorders, tp, pp, v, m, forward_only):
    what = f"tp={tp} pp={pp} v={v} M={m} forward_only={forward_only}"
    traces = {rank: rec.trace() for rank, rec in recorders.items()}
    for rank, program in traces.items():
        pipeline = tuple(range(rank % tp, tp * pp, tp))  # dp = 1: global = pp_rank * tp + tp_rank
        for event in program:
            if isinstance(event, Post):
                assert event.ops and all(op.group == pipeline for op in event.ops), (what, rank, event)
                # Every received buffer was used: as a chunk's input or as its output's gradient.
                assert all(op.label is not None for op in event.ops if op.kind == RECV), (what, rank, event)
    report = replay(traces)
    assert report.ok, f"{what}:\n{report}"
    # Activations cross p*v - 1 chunk boundaries per microbatch, gradients the same way back.
    assert report.messages == tp * m * (pp * v - 1) * (1 if forward_only else 2), (what, report.messages)
    return traces


GRID = [(tp, pp, v) for tp in (1, 2) for pp in (2, 4) for v in (1, 2, 4)]


@pytest.mark.parametrize("tp,pp,v", GRID)
def test_schedules_replay_under_nccl_rules(tp, pp, v):
    counts = sorted({1, 2, 3, pp, 2 * pp, 6, 12})
    runs = record_layout(tp, pp, v, counts)
    assert {m for m, _ in runs} == {m for m in counts if legal(m, pp, v)}
    for (m, forward_only), recorders in sorted(runs.items()):
        assert sorted(recorders) == list(range(tp * pp))
        check_replay(recorders, tp, pp, v, m, forward_only)


# ---- deliberately broken schedules are caught -------------------------------------------------
def record_broken(tp, pp, v, m, patches):
    """Every rank's trace with `patches[rank]` = [(attribute of p2p, replacement)] applied."""
    traces = {}
    for rank in range(tp * pp):
        with fake_rank(rank, tp, pp, v if v > 1 else None), contextlib.ExitStack() as stack:
            for name, replacement in patches.get(rank, []):
                stack.enter_context(mock.patch.object(p2p, name, replacement))
            torch.manual_seed(rank)
            traces[rank] = record([nn.Linear(H, H) for _ in range(v)], m, False, S // tp).trace()
    return traces


def replay_ready(tp, pp, v, m):
    """Unbroken training traces of one layout."""
    return record_broken(tp, pp, v, m, {})


def test_waiting_for_a_gradient_before_sending_its_activation_deadlocks():
    """Stage 1 of 4 posts a backward-direction exchange (receive the first gradient) before the
    forward-direction one it depends on (send microbatch 0's activation): every rank hangs."""
    send_forward, calls = p2p.send_forward, []

    def broken_send_forward(output, tensor_shape, dtype, device=None):
        if not calls:
            p2p.recv_backward(tensor_shape, dtype, device)
        calls.append(output)
        return send_forward(output, tensor_shape, dtype, device)

    report = replay(record_broken(1, 4, 1, 8, {1: [("send_forward", broken_send_forward)]}))
    assert calls, "the schedule no longer calls p2p.send_forward: the broken variant did not run"
    assert sorted(report.deadlock) == [0, 1, 2, 3], str(report)
    assert "recv<-2 [8, 2, 4] torch.float32 waits for rank 2 to post its batch" in report.deadlock[1]
    assert "recv<-1" in report.deadlock[2]  # stage 2 still waits for microbatch 0's activation


def test_unbatched_sends_first_deadlock_head_to_head():
    """Posting each send as its own blocking exchange before the receives (what batching both
    directions into one batch_isend_irecv avoids): neighbours block on each other's sends."""
    communicate = p2p.communicate

    def sends_first(send_next, send_prev, recv_prev, recv_next, tensor_shape, dtype, device=None, wait=True):
        for tensors in ((send_next, None), (None, send_prev)):
            if any(t is not None for t in tensors):
                communicate(*tensors, False, False, tensor_shape, dtype, device)
        from_prev = communicate(None, None, True, False, tensor_shape, dtype, device)[0] if recv_prev else None
        from_next = communicate(None, None, False, True, tensor_shape, dtype, device)[1] if recv_next else None
        return (from_prev, from_next) if wait else (from_prev, from_next, p2p.Pending.done())

    report = replay(record_broken(1, 4, 1, 8, {r: [("communicate", sends_first)] for r in range(4)}))
    assert not report.mismatches and not report.unmatched, str(report)
    assert report.deadlock and all("send->" in why for why in report.deadlock.values()), str(report)


def _first_send(trace, peer, after=-1):
    """(event index, op index) of the first post after `after` that sends to `peer`."""
    for k, event in enumerate(trace):
        if k > after and isinstance(event, Post):
            for j, op in enumerate(event.ops):
                if op.kind == SEND and op.peer == peer:
                    return k, j
    raise AssertionError(f"no send to {peer} after event {after}")


def _replace_op(trace, k, j, op):
    ops = list(trace[k].ops)
    ops[j] = op
    trace[k] = Post(trace[k].batch, tuple(ops))


def test_swapped_sends_are_reported_as_content_mismatch():
    """Interleaved p = 2: activations and gradients travel 0 -> 1 with the same shape, so a swap
    passes any shape check; the labels catch it."""
    traces = {r: list(t) for r, t in replay_ready(1, 2, 2, 4).items()}
    assert replay(traces).ok
    k1, j1 = _first_send(traces[0], 1)
    k2, j2 = _first_send(traces[0], 1, after=k1)
    first, second = traces[0][k1].ops[j1], traces[0][k2].ops[j2]
    assert first.label != second.label and first.shape == second.shape
    _replace_op(traces[0], k1, j1, second)
    _replace_op(traces[0], k2, j2, first)
    report = replay(traces)
    assert len(report.mismatches) == 2 and not report.deadlock, str(report)
    assert report.mismatches[0].startswith(f"content mismatch: message #0 from rank 0 (batch {traces[0][k1].batch}")
    assert f"sends {second.label!r}, the receiver expects {first.label!r}" in report.mismatches[0]


def test_wrong_shape_is_refused_before_posting_and_caught_in_a_trace():
    with fake_rank(0, 1, 2, None):
        recorder = Recorder()
        wrong = lambda chunk, x, mb: torch.zeros(S + 1, B, H)  # noqa: E731  the first stage's activation
        with pytest.raises(ValueError, match=r"shape \(9, 2, 4\) does not match the agreed tensor_shape"), \
                recording(recorder):
            forward_backward([nn.Linear(H, H)], microbatches(2, S), wrong, tensor_shape=(S, B, H), dtype=torch.float32)
        assert all(e[0] != "post" or all(op[0] != SEND for op in e[2]) for e in recorder.events)
    # p2p refuses it, so break a recorded trace instead: rank 1's third message to rank 0.
    # Two pipelines (tp = 2, ranks 0, 2 and 1, 3), sequence parallel: [s/tp, b, h] = [4, 2, 4].
    for change, text in (({"shape": (S // 2, B, H + 1)}, "sends [4, 2, 5] torch.float32, receives into [4, 2, 4] "
                          "torch.float32"), ({"dtype": "torch.bfloat16"}, "sends [4, 2, 4] torch.bfloat16")):
        traces = {r: list(t) for r, t in replay_ready(2, 2, 1, 4).items()}
        k = -1
        for _ in range(3):
            k, j = _first_send(traces[2], 0, after=k)
        op = traces[2][k].ops[j]
        _replace_op(traces[2], k, j, Op(op.kind, op.peer, change.get("shape", op.shape),
                                        change.get("dtype", op.dtype), op.group, op.label))
        report = replay(traces)
        assert len(report.mismatches) == 1, str(report)
        assert report.mismatches[0].startswith(f"shape/dtype mismatch: message #2 from rank 2 (batch "
                                               f"{traces[2][k].batch} op {j}) to rank 0 (batch "), report.mismatches
        assert text in report.mismatches[0]


# ---- the simulator on hand-written traces -----------------------------------------------------
def op(kind, peer, shape=(2,), dtype="f32", group=(0, 1), label=None):
    return Op(kind, peer, shape, dtype, group, label)


def test_model_matches_a_send_with_its_receive():
    report = replay({0: [Post(0, (op(SEND, 1),)), Wait(0)], 1: [Post(0, (op(RECV, 0),)), Wait(0)]})
    assert report.ok and report.messages == 1, str(report)


def test_model_head_to_head_blocking_sends_deadlock_and_batched_do_not():
    def program(peer):  # send, wait for it, only then post the receive
        return [Post(0, (op(SEND, peer),)), Wait(0), Post(1, (op(RECV, peer),)), Wait(1)]

    report = replay({0: program(1), 1: program(0)})
    assert report.deadlock == {
        0: "blocked at event 1: wait on batch 0: send->1 [2] f32 waits for rank 1 to post its batch 1",
        1: "blocked at event 1: wait on batch 0: send->0 [2] f32 waits for rank 0 to post its batch 1"}
    batched = {r: [Post(0, (op(SEND, 1 - r), op(RECV, 1 - r))), Wait(0)] for r in (0, 1)}
    assert replay(batched).ok
    # Receive first on one side breaks the cycle too.
    assert replay({0: program(1), 1: program(0)[2:] + [Post(0, (op(SEND, 0),)), Wait(0)]}).ok


def test_model_batches_run_in_order_on_the_stream():
    """Not waiting does not help: batch 1 (the send) only starts after batch 0 (the receive) ends."""
    program = {r: [Post(0, (op(RECV, 1 - r),)), Post(1, (op(SEND, 1 - r),)), Wait(1), Wait(0)] for r in (0, 1)}
    report = replay(program)
    assert set(report.deadlock) == {0, 1}
    assert "batch 1 is queued behind this rank's unfinished batch 0" in report.deadlock[0]
    # Streams are per communicator: with each message on its own group, nothing queues.
    groups = [(0, 1), (0, 1, 2)]  # rank 0 -> 1 travels on the first, 1 -> 0 on the second
    split = {r: [Post(0, (op(RECV, 1 - r, group=groups[1 - r]),)), Post(1, (op(SEND, 1 - r, group=groups[r]),)),
                 Wait(1), Wait(0)] for r in (0, 1)}
    assert replay(split).ok


def test_model_matches_in_posting_order_ignoring_meaning():
    """Per-pair FIFO: rank 1 receives the [3] message first, but rank 0 sent the [2] one first."""
    sends = [Post(0, (op(SEND, 1, (2,)),)), Post(1, (op(SEND, 1, (3,)),)), Wait(0), Wait(1)]
    recvs = [Post(0, (op(RECV, 0, (3,)),)), Post(1, (op(RECV, 0, (2,)),)), Wait(0), Wait(1)]
    report = replay({0: sends, 1: recvs})
    assert report.mismatches == [
        "shape/dtype mismatch: message #0 from rank 0 (batch 0 op 0) to rank 1 (batch 0 op 0): sends [2] f32, "
        "receives into [3] f32",
        "shape/dtype mismatch: message #1 from rank 0 (batch 1 op 0) to rank 1 (batch 1 op 0): sends [3] f32, "
        "receives into [2] f32"]
    labelled = replay({0: [Post(0, (op(SEND, 1, label="a"), op(SEND, 1, label="b"))), Wait(0)],
                       1: [Post(0, (op(RECV, 0, label="b"), op(RECV, 0, label="a"))), Wait(0)]})
    assert len(labelled.mismatches) == 2 and "sends 'a', the receiver expects 'b'" in labelled.mismatches[0]


def test_model_reports_unmatched_and_never_completing_batches():
    report = replay({0: [Post(0, (op(SEND, 1),))], 1: []})  # nobody waits, but the stream hangs
    assert not report.deadlock
    assert report.unmatched == ["unmatched: rank 0 batch 0 op 0 send->1 [2] f32 is message #0 from 0 to 1, "
                                "but only 0 are received"]
    assert report.hung == ["rank 0 batch 0: send->1 [2] f32 has no match"]
    other_group = replay({0: [Post(0, (op(SEND, 1),)), Wait(0)], 1: [Post(0, (op(RECV, 0, group=(0, 1, 2)),))]})
    assert len(other_group.unmatched) == 2 and set(other_group.deadlock) == {0}
    with pytest.raises(ValueError, match="waits on batch 0 before posting it"):
        replay({0: [Wait(0)]})
