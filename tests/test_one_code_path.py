"""docs/design.md "One code path": gloo runs the calls NCCL runs, and nothing in the hot path
synchronizes the device.

One 2-rank gloo spawn (tp=1, pp=2) checks, on a plain "gloo" group and on a
"cpu:gloo,cuda:<GPU-only backend>" group (the shape of "cpu:gloo,cuda:nccl", which a CPU-only
torch cannot build: it has no NCCL, so a second backend registered for CUDA alone stands in):
- all_gather_dim0 / reduce_scatter_dim0 and the distributed optimizer's GradBuffer give the
  reference numbers in float32 and bfloat16 (integer-valued data: every sum is exact, so results
  are compared bit for bit) and call the single-tensor collectives, never all_reduce, without
  deprecation warnings;
- p2p posts every message with one tag, a p = 2 batch carrying both directions between the same
  pair delivers the activation and the gradient to the right buffers, and the receive device
  comes from the group, not from its backend's name.
Pending.wait and empty batches are checked in-process with fake work handles.
"""

from __future__ import annotations

import warnings
import weakref
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_distributed
from megaglot.optim.grad_buffer import GradBuffer
from megaglot.parallel import comm, state
from megaglot.pipeline import p2p

WORLD = 2
MIXED = "cpu:gloo,cuda:cudaonly"  # "cudaonly": a gloo backend registered for CUDA alone (stands in for NCCL)
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor",
               "all_reduce", "all_gather", "reduce_scatter", "_all_gather_base", "_reduce_scatter_base")
SINGLE_TENSOR = {"all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor"}
PARAM_SHAPES = [(3, 5), (7,), (2, 3), (5,)]  # 33 elements; bucket_size 10 -> two padded buckets
SHAPE = (4, 2, 3)  # [s, b, h] of a pipeline message


def ints(seed, *shape, dtype=torch.float32):
    """Small integers: sums of a few of them are exact in bf16 and fp32, in any order."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, shape, generator=gen).to(dtype)


class Spy:
    """Wraps torch.distributed functions (looked up by name at call time) and logs the calls."""

    def __init__(self, names):
        self.names, self.calls = [n for n in names if hasattr(dist, n)], []

    def __enter__(self):
        self._patches = [mock.patch.object(dist, n, self._wrap(n, getattr(dist, n))) for n in self.names]
        for patch in self._patches:
            patch.start()
        return self

    def _wrap(self, name, fn):
        def spy(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return fn(*args, **kwargs)
        return spy

    def __exit__(self, *exc):
        for patch in reversed(self._patches):
            patch.stop()

    def names_called(self):
        return [c[0] for c in self.calls]


def _cuda_only_gloo(store, rank, size, timeout):
    return dist.ProcessGroupGloo(store, rank, size, timeout)


# ---- collectives and the gradient buffer -----------------------------------------------------
def _check_collectives(rank, group, dtype):
    """all_gather_dim0 / reduce_scatter_dim0 against the concatenation / sum of every rank's input."""
    world = dist.get_world_size(group)
    with Spy(COLLECTIVES) as spy, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gathered = comm.all_gather_dim0(ints(rank, 2, 3, dtype=dtype), group)  # [world * 2, 3]
        scattered = comm.reduce_scatter_dim0(ints(100 + rank, world * 2, 3, dtype=dtype), group)  # [2, 3]
    want_gathered = torch.cat([ints(r, 2, 3, dtype=dtype) for r in range(world)])
    total = sum(ints(100 + r, world * 2, 3, dtype=dtype) for r in range(world))
    assert gathered.dtype == scattered.dtype == dtype
    assert torch.equal(gathered, want_gathered), f"all_gather_dim0 {dtype}"
    assert torch.equal(scattered, total.chunk(world)[rank]), f"reduce_scatter_dim0 {dtype}"
    assert [w for w in caught if issubclass(w.category, FutureWarning)] == [], [str(w.message) for w in caught]
    return spy.names_called()


def _check_grad_buffer(rank, group, dtype, overlap):
    """Distributed optimizer: every owned slice holds the DP mean of two microbatches' gradients."""
    params = [torch.nn.Parameter(ints(10 + i, *s, dtype=dtype)) for i, s in enumerate(PARAM_SHAPES)]
    buffer = GradBuffer(params, dp_group=group, distributed_optimizer=True, bucket_size=10, overlap=overlap)
    world = dist.get_world_size(group)

    def grad(r, m, i):
        return ints(1000 * r + 10 * m + i, *PARAM_SHAPES[i], dtype=dtype)

    with Spy(COLLECTIVES) as spy:
        buffer.start_step(num_microbatches=2)
        for m in range(2):
            sum((p * grad(rank, m, i)).sum() for i, p in enumerate(params)).backward()
        buffer.finish()
    owned = []
    for p, a, b, off in buffer.owned_pieces():
        i = next(k for k, q in enumerate(params) if q is p)
        want = sum(grad(r, m, i).float() for r in range(world) for m in range(2)) / world
        assert torch.equal(buffer.data[off:off + b - a], want.reshape(-1)[a:b]), f"param {i} [{a}:{b}] {dtype}"
        owned.append((i, a, b))
    return dict(calls=spy.names_called(), buckets=len(buffer.buckets), owned=owned)


# ---- pipeline p2p ------------------------------------------------------------------------------
def _check_p2p(rank, pp_group):
    """p = 2: next and previous are the same peer, so both directions share one pair of ranks."""
    peer = state.get_pipeline_next_rank()
    assert peer == state.get_pipeline_prev_rank() and peer != rank
    act, grad = torch.full(SHAPE, 100.0 + rank), torch.full(SHAPE, 200.0 + rank)
    first = state.is_pipeline_first_stage()
    with mock.patch.object(state, "get_pipeline_parallel_group", lambda: pp_group), \
            Spy(["batch_isend_irecv"]) as spy:
        from_prev, from_next = p2p.communicate(act, grad, True, True, SHAPE, torch.float32)
        assert torch.equal(from_prev, torch.full(SHAPE, 100.0 + peer)), "activation in the gradient's buffer"
        assert torch.equal(from_next, torch.full(SHAPE, 200.0 + peer)), "gradient in the activation's buffer"
        from_prev, from_next, pending = p2p.communicate(act + 1, grad + 1, True, True, SHAPE, torch.float32,
                                                        wait=False)
        pending.wait()
        pending.wait()  # idempotent
        assert from_prev.requires_grad and not from_next.requires_grad
        assert torch.equal(from_prev, torch.full(SHAPE, 101.0 + peer))
        assert torch.equal(from_next, torch.full(SHAPE, 201.0 + peer))
        for step in range(2):  # 1F1B steady state: each side sends one direction, receives the other
            if first:
                got = p2p.send_forward_recv_backward(act + 10 * step, SHAPE, torch.float32)
                assert torch.equal(got, grad.new_full(SHAPE, 200.0 + peer + 10 * step))
            else:
                got = p2p.send_backward_recv_forward(grad + 10 * step, SHAPE, torch.float32)
                assert torch.equal(got, act.new_full(SHAPE, 100.0 + peer + 10 * step)) and got.device.type == "cpu"
    tags = [op.tag for call in spy.calls for op in call[1][0]]
    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "current_device", lambda: 3):
        as_if_cuda = p2p._default_device(pp_group)
    return dict(tags=tags, default=p2p._default_device(pp_group), as_if_cuda=as_if_cuda)


def _pp_group_with_backend(backend):
    """The pipeline groups again, with another backend (new_group is collective: every rank
    creates every group, in the same order)."""
    pp, per_stage = state.get_pipeline_parallel_world_size(), WORLD // state.get_pipeline_parallel_world_size()
    mine = None
    for first in range(per_stage):
        ranks = [first + k * per_stage for k in range(pp)]
        group = dist.new_group(ranks, backend=backend)
        if dist.get_rank() in ranks:
            mine = group
    return mine


def _worker(rank):
    dist.Backend.register_backend("cudaonly", _cuda_only_gloo, devices=["cuda"])
    mixed_world = dist.new_group(list(range(WORLD)), backend=MIXED)
    out = {}
    for name, group in (("gloo", dist.group.WORLD), ("mixed", mixed_world)):
        for dtype in (torch.float32, torch.bfloat16):
            key = f"{name}/{str(dtype)[6:]}"
            out[key + "/collectives"] = _check_collectives(rank, group, dtype)
            out[key + "/grad_buffer"] = _check_grad_buffer(rank, group, dtype, overlap=dtype == torch.float32)
    out["gloo/p2p"] = _check_p2p(rank, state.get_pipeline_parallel_group())
    out["mixed/p2p"] = _check_p2p(rank, _pp_group_with_backend(MIXED))
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, WORLD, parallel=(1, 2), timeout=180)


CASES = [f"{g}/{d}" for g in ("gloo", "mixed") for d in ("float32", "bfloat16")]


@pytest.mark.parametrize("case", CASES)
def test_collectives_are_single_tensor_calls(results, case):
    for res in results:
        calls = res[case + "/collectives"]
        assert len(calls) == 2 and set(calls) <= SINGLE_TENSOR, calls  # one all-gather, one reduce-scatter


@pytest.mark.parametrize("case", CASES)
def test_distributed_optimizer_always_reduce_scatters(results, case):
    for res in results:
        got = res[case + "/grad_buffer"]
        assert got["buckets"] == 2
        assert len(got["calls"]) == got["buckets"] and set(got["calls"]) <= SINGLE_TENSOR, got["calls"]
    for i, shape in enumerate(PARAM_SHAPES):  # the owned slices of all ranks tile every parameter
        ranges = sorted((a, b) for res in results for j, a, b in res[case + "/grad_buffer"]["owned"] if j == i)
        numel = torch.Size(shape).numel()
        assert ranges[0][0] == 0 and ranges[-1][1] == numel
        assert all(prev[1] == nxt[0] for prev, nxt in zip(ranges, ranges[1:])), ranges


@pytest.mark.parametrize("name", ["gloo", "mixed"])
def test_p2p_one_tag_and_device_from_the_group(results, name):
    tags = [t for res in results for t in res[name + "/p2p"]["tags"]]
    assert len(tags) == WORLD * (4 + 4 + 2 * 2) and len(set(tags)) == 1, tags
    for res in results:
        assert res[name + "/p2p"]["default"] == torch.device("cpu")  # no CUDA here
    # With CUDA present, receive buffers go to CUDA only when the group has a CUDA backend of its own.
    want = torch.device("cuda", 3) if name == "mixed" else torch.device("cpu")
    assert all(res[name + "/p2p"]["as_if_cuda"] == want for res in results)


# ---- in-process: Pending and the receive device ---------------------------------------------------
class FakeWork:
    def __init__(self):
        self.waits = 0

    def wait(self):
        self.waits += 1
        return True


@pytest.fixture
def no_device_sync(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize in the p2p hot path")
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)


@pytest.fixture
def fake_pipeline(monkeypatch):
    """A stage whose neighbours are rank 1, with batch_isend_irecv returning fake work handles."""
    posted = []
    monkeypatch.setattr(state, "get_pipeline_parallel_group", lambda: object())
    monkeypatch.setattr(state, "get_pipeline_next_rank", lambda: 1)
    monkeypatch.setattr(state, "get_pipeline_prev_rank", lambda: 1)
    monkeypatch.setattr(dist, "P2POp", lambda op, tensor, peer, group, tag: SimpleNamespace(tensor=tensor, tag=tag))

    def batch(ops):
        posted.append(ops)
        return [FakeWork() for _ in ops]
    monkeypatch.setattr(dist, "batch_isend_irecv", batch)
    return posted


def test_pending_waits_on_handles_only_and_once(no_device_sync):
    works, sent, received = [FakeWork(), FakeWork()], torch.ones(3), torch.zeros(3)
    alive = weakref.ref(sent)
    pending = p2p.Pending(works, [sent, received], received)
    del sent
    assert alive() is not None, "the send buffer must live until wait()"
    assert not received.requires_grad, "an activation must not need grad before it arrived"
    pending.wait()
    pending.wait()
    assert [w.waits for w in works] == [1, 1]
    assert received.requires_grad and alive() is None  # released once the transfers are done
    p2p.Pending.done().wait()


def test_cuda_sends_and_empty_batches_never_synchronize(no_device_sync, fake_pipeline):
    cuda = torch.device("cuda", 0)  # constructible without CUDA; only sends, so nothing is allocated there
    act, grad = torch.ones(SHAPE), torch.full(SHAPE, 2.0)
    _, _, pending = p2p.communicate(act, grad, False, False, SHAPE, torch.float32, device=cuda, wait=False)
    assert [[op.tensor.data_ptr() for op in ops] for ops in fake_pipeline] == [[act.data_ptr(), grad.data_ptr()]]
    pending.wait()
    assert p2p.communicate(act, grad, False, False, SHAPE, torch.float32, device=cuda) == (None, None)
    assert p2p.communicate(None, None, False, False, SHAPE, torch.float32, device=cuda) == (None, None)
    _, _, empty = p2p.communicate(None, None, False, False, SHAPE, torch.float32, device=cuda, wait=False)
    empty.wait()
    assert len(fake_pipeline) == 2, "an empty batch must post nothing"


class FakeGroup:
    """A process group's backend lookup: device type -> backend object (missing: no backend)."""

    def __init__(self, **backends):
        self.backends = backends

    def _get_backend(self, device):
        if device.type not in self.backends:
            raise RuntimeError(f"No backend type associated with device type {device.type}")
        return self.backends[device.type]


def test_default_device_asks_the_group_not_its_name(monkeypatch):
    gloo, nccl = object(), object()
    cases = [(FakeGroup(cpu=gloo, cuda=gloo), "cpu"),  # "gloo": one backend serves CPU and CUDA
             (FakeGroup(cpu=gloo), "cpu"),  # "cpu:gloo"
             (FakeGroup(cpu=gloo, cuda=nccl), "cuda"),  # "cpu:gloo,cuda:nccl"
             (FakeGroup(cuda=nccl), "cuda")]  # "nccl"
    assert all(p2p._default_device(group) == torch.device("cpu") for group, _ in cases)  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for group, want in cases:
        assert p2p._default_device(group) == (torch.device("cuda", 1) if want == "cuda" else torch.device("cpu"))
