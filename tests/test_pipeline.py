"""Pipeline schedules against a single-process reference on a toy tensor-parallel MLP stack.

One 8-rank spawn loops over layouts (destroy/initialize): (tp, pp, vp) = (1,1,-), (1,2,-), (1,4,-),
(1,2,2), (1,4,2) and (2,2,2) with sequence parallel; the data-parallel replicas run the same data.
Every layer draws its full weights from its own seed, so every layout holds the same model. The
loss and every parameter gradient must equal one step over the whole global batch (float32,
rtol 1e-5, atol 1e-6), and the stored activations must reach exactly the schedule's bound.
"""

import importlib.util
import os
import struct
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_harness import run_distributed
from megaglot.config import ConfigError
from megaglot.parallel import comm, state
from megaglot.parallel.layers import ColumnParallelLinear, RowParallelLinear, seeded_normal_init
from megaglot.pipeline import ScheduleStats, Timeline, activation_bound, check_schedule, forward_backward
from megaglot.pipeline.timeline import bubble_fraction, load_json, save_json

TOL = dict(rtol=1e-5, atol=1e-6)
S, B, H, FFN, LAYERS = 8, 2, 16, 32, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seeds(layer):
    return [1000 * layer + k for k in range(4)]


class Block(nn.Module):
    def __init__(self, layer, sp):
        super().__init__()
        w1, b1, w2, b2 = seeds(layer)
        self.fc1 = ColumnParallelLinear(H, FFN, sequence_parallel=sp, init_method=seeded_normal_init(0.2, w1),
                                        bias_init_method=seeded_normal_init(0.1, b1))
        self.fc2 = RowParallelLinear(FFN, H, sequence_parallel=sp, init_method=seeded_normal_init(0.2, w2),
                                     bias_init_method=seeded_normal_init(0.1, b2))

    def forward(self, x):
        hidden, _ = self.fc1(x)
        out, _ = self.fc2(F.gelu(hidden))
        return x + out


class Chunk(nn.Module):
    def __init__(self, layers, sp, virtual_rank):
        super().__init__()
        self.layers = list(layers)
        self.virtual_rank = virtual_rank  # its place in the model, for the forward step to ask
        self.blocks = nn.ModuleList(Block(i, sp) for i in layers)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def build_chunks(sp):
    p, r = state.get_pipeline_parallel_world_size(), state.get_pipeline_parallel_rank()
    v = state.get_virtual_pipeline_world_size() or 1
    per = LAYERS // (p * v)
    return [Chunk(range((c * p + r) * per, (c * p + r + 1) * per), sp, c) for c in range(v)]


def seq_shard(x, sp):
    if not sp:
        return x
    return x.chunk(state.get_tensor_parallel_world_size(), dim=0)[state.get_tensor_parallel_rank()]


def make_forward_step(sp, grad_modes=None, sent=None):
    def forward_step(chunk, input_tensor, mb):
        if grad_modes is not None:
            grad_modes.append(torch.is_grad_enabled())
        x = input_tensor if input_tensor is not None else seq_shard(mb["x"], sp)
        if state.is_pipeline_first_stage(virtual_rank=chunk.virtual_rank):
            assert input_tensor is None
        out = chunk(x)
        if not state.is_pipeline_last_stage(virtual_rank=chunk.virtual_rank):
            if sent is not None:
                sent.append(out)
            return out
        local = ((out - seq_shard(mb["y"], sp)) ** 2).sum()
        if sp:
            local = comm.reduce_from_tensor_parallel(local)
        return local / mb["y"].numel()
    return forward_step


def microbatches(m):
    def rnd(seed):
        return torch.randn(S, B, H, generator=torch.Generator().manual_seed(seed))
    return [{"x": rnd(100 + i), "y": rnd(200 + i)} for i in range(m)]


def reference(mbs):
    """The whole global batch in one process: loss and full gradients per layer (computed in float64,
    so the float32 pipeline's own round-off is what the tolerance measures)."""
    params = {}
    for layer in range(LAYERS):
        w1, b1, w2, b2 = seeds(layer)
        shapes = ((FFN, H, 0.2, w1), (FFN, 0.1, b1), (H, FFN, 0.2, w2), (H, 0.1, b2))
        tensors = []
        for spec in shapes:
            *shape, std, seed = spec
            t = torch.empty(shape)
            seeded_normal_init(std, seed)(t)
            tensors.append(t.double().requires_grad_())
        params[layer] = tensors
    x = torch.cat([mb["x"] for mb in mbs], dim=1).double()
    y = torch.cat([mb["y"] for mb in mbs], dim=1).double()
    for layer in range(LAYERS):
        w1, b1, w2, b2 = params[layer]
        x = x + F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    loss = ((x - y) ** 2).mean()
    loss.backward()
    return loss.detach().float(), {k: [t.grad.float() for t in v] for k, v in params.items()}


def tp_shard(t, dim):
    return t.chunk(state.get_tensor_parallel_world_size(), dim=dim)[state.get_tensor_parallel_rank()]


def check_grads(chunks, ref_grads, sp, what):
    for chunk in chunks:
        for layer, block in zip(chunk.layers, chunk.blocks):
            gw1, gb1, gw2, gb2 = ref_grads[layer]
            bias2 = block.fc2.bias.grad.clone()
            if sp and state.get_tensor_parallel_world_size() > 1:
                dist.all_reduce(bias2, group=state.get_tensor_parallel_group())
            for got, want, name in ((block.fc1.weight.grad, tp_shard(gw1, 0), "fc1.weight"),
                                    (block.fc1.bias.grad, tp_shard(gb1, 0), "fc1.bias"),
                                    (block.fc2.weight.grad, tp_shard(gw2, 1), "fc2.weight"),
                                    (bias2, gb2, "fc2.bias")):
                torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what} layer {layer} {name}: {m}")


LAYOUTS = [  # (tp, pp, vp, sequence parallel, microbatch counts)
    (1, 1, None, False, [3]),
    (1, 2, None, False, [1, 4]),
    (1, 4, None, False, [2, 8]),
    (1, 2, 2, False, [2, 6]),
    (1, 4, 2, False, [4, 8]),
    (2, 2, 2, True, [4]),
]


def run_layouts(rank):
    report = []
    timeline_events = None
    for tp, pp, vp, sp, counts in LAYOUTS:
        state.initialize(tp, pp, vp)
        torch.manual_seed(0)
        chunks = build_chunks(sp)
        s_local = S // tp if sp else S
        for m in counts:
            what = f"tp={tp} pp={pp} vp={vp} sp={sp} M={m}"
            mbs = microbatches(m)
            ref_loss, ref_grads = reference(mbs)
            for chunk in chunks:
                chunk.zero_grad(set_to_none=True)
            sent = []
            stats = ScheduleStats()
            loss = forward_backward(chunks, mbs, make_forward_step(sp, sent=sent), tensor_shape=(s_local, B, H),
                                    dtype=torch.float32, stats=stats)
            # Every activation sent downstream was released (storage swapped for one element).
            assert all(out.numel() == 1 for out in sent), (what, [tuple(o.shape) for o in sent])
            if state.is_pipeline_last_stage():
                torch.testing.assert_close(loss, ref_loss, **TOL, msg=lambda msg: f"{what} loss: {msg}")
            else:
                assert loss is None
            check_grads(chunks, ref_grads, sp, what)
            assert stats.bound == activation_bound(pp, state.get_pipeline_parallel_rank(), m, vp)
            assert stats.max_live_total == stats.bound, (what, stats)
            assert stats.live_total == 0 and all(n == 0 for n in stats.live), (what, stats)
            report.append((what, stats.schedule, stats.max_live_total))

        # Evaluation: the same loss, no graph, no gradients.
        m = counts[-1]
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        modes = []
        loss = forward_backward(chunks, microbatches(m), make_forward_step(sp, modes), tensor_shape=(s_local, B, H),
                                dtype=torch.float32, forward_only=True)
        assert modes and not any(modes)
        if state.is_pipeline_last_stage():
            torch.testing.assert_close(loss, reference(microbatches(m))[0], **TOL)
        assert all(p.grad is None for c in chunks for p in c.parameters())

        if (tp, pp, vp) == (1, 4, 2):
            # Clear errors for schedules that cannot run, raised before any communication.
            with pytest.raises(ConfigError, match=r"M = 6 is not divisible by .* p = 4"):
                forward_backward(chunks, microbatches(6), make_forward_step(sp), tensor_shape=(S, B, H),
                                 dtype=torch.float32)
            with pytest.raises(ConfigError, match=r"M = 2 < p = 4"):
                forward_backward(chunks, microbatches(2), make_forward_step(sp), tensor_shape=(S, B, H),
                                 dtype=torch.float32)
            with pytest.raises(ConfigError, match=r"1 model chunks .* virtual pipeline size is 2"):
                forward_backward(chunks[:1], microbatches(4), make_forward_step(sp), tensor_shape=(S, B, H),
                                 dtype=torch.float32)
            # A recorded timeline: every chunk runs microbatches 0..M-1 in order, forwards and backwards.
            timeline = Timeline()
            forward_backward(chunks, microbatches(8), make_forward_step(sp), tensor_shape=(S, B, H),
                             dtype=torch.float32, timeline=timeline)
            events = timeline.gather()
            if dist.get_rank(state.get_pipeline_parallel_group()) == 0 and state.get_data_parallel_rank() == 0:
                timeline_events = events
            for op in "FB":
                for c in range(2):
                    order = [e[1] for e in timeline.events if e[0] == op and e[2] == c]
                    assert order == list(range(8)), (op, c, order)
        state.destroy()
    return report, timeline_events


def test_pipeline_schedules_match_single_process(tmp_path):
    results = run_distributed(run_layouts, 8, timeout=300)
    report, _ = results[0]
    assert {r[1] for r in report} == {"no-pipelining", "1f1b", "interleaved-1f1b"}
    events = results[0][1]
    assert events is not None and sorted(events) == [0, 1, 2, 3]

    # The recorded timeline goes through JSON and the plot tool.
    path = tmp_path / "timeline.json"
    save_json(str(path), events, pipeline=4, virtual=2, microbatches=8)
    loaded, meta = load_json(str(path))
    assert loaded == events and meta["virtual"] == 2
    assert 0 <= bubble_fraction(loaded)
    plot = _load_plot_tool()
    png = tmp_path / "schedule.png"
    summary = plot.main(["--timeline", str(path), "--out", str(png)])
    assert "bubble" in summary
    _check_png(png.read_bytes())


def _load_plot_tool():
    spec = importlib.util.spec_from_file_location("plot_schedule", os.path.join(ROOT, "tools", "plot_schedule.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_png(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 20
    idat = b""
    pos = 8
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)


def test_invalid_schedules_raise_clear_errors():
    with pytest.raises(ConfigError, match="virtual pipeline size 2 needs --pipeline-model-parallel-size > 1"):
        check_schedule(4, 1, 2)
    with pytest.raises(ConfigError, match=r"M = 6 is not divisible by --pipeline-model-parallel-size p = 4"):
        check_schedule(6, 4, 2)
    with pytest.raises(ConfigError, match=r"M = 3 < p = 4"):
        check_schedule(3, 4, 2)
    with pytest.raises(ConfigError, match=r"--num-layers 12 is not divisible by pipeline x virtual size = 4 x 2"):
        check_schedule(8, 4, 2, num_layers=12)
    with pytest.raises(ConfigError, match="positive integer"):
        check_schedule(0, 2)
    check_schedule(3, 4)  # 1F1B runs any M (warm-up is capped at M)
    check_schedule(8, 4, 2, num_layers=16)


def test_activation_bounds():
    assert [activation_bound(4, r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert [activation_bound(4, r, 2) for r in range(4)] == [2, 2, 2, 1]
    # Interleaved: (p - r - 1) * 2 + (v - 1) * p + 1, all M * v when M == p.
    assert [activation_bound(4, r, 8, 2) for r in range(4)] == [11, 9, 7, 5]
    assert activation_bound(2, 0, 2, 2) == 4
    assert activation_bound(1, 0, 8) == 1
