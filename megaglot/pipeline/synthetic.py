"""Stages of fixed synthetic cost, for drawing schedules and measuring their bubbles.

Each chunk sleeps `forward_s / v` in forward and twice that in backward (the usual backward = 2 x
forward), so a stage's work per microbatch is the same at every v and the measured bubble can be
set beside the theory `(p - 1) / (v * m)`. Sleeping leaves the CPU free, so p ranks on a 2-core
machine still overlap the way p GPUs would; what remains on top of the theory is communication
and Python overhead.

`measure(p, runs, forward_s)` spawns p gloo ranks once (one pipeline, TP = DP = 1), runs every
`(v, m)` of `runs` in it and returns one `{rank: events}` timeline per run. Used by
`tools/plot_schedule.py` and `benchmarks/bench_pipeline.py`; the library never calls it.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HIDDEN = 8


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad, None


class SleepChunk(nn.Module):
    """x * w, then `seconds` of sleep forward (2x backward). `post_process`: the model's last chunk."""

    def __init__(self, seconds: float, post_process: bool):
        super().__init__()
        self.seconds, self.post_process = seconds, post_process
        self.weight = nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x):
        return _Sleep.apply(x * self.weight, self.seconds)


def _forward_step(chunk, input_tensor, microbatch):
    x = microbatch if input_tensor is None else input_tensor
    out = chunk(x)
    return out.mean() if chunk.post_process else out


def _run_all(pipeline: int, runs: Sequence[Tuple[Optional[int], int]], forward_s: float) -> List[Dict[int, list]]:
    from megaglot.parallel import state
    from megaglot.pipeline.schedules import forward_backward
    from megaglot.pipeline.timeline import Timeline

    results = []
    for virtual, m in runs:
        state.initialize(1, pipeline, virtual if (virtual or 1) > 1 else None)
        v = virtual or 1
        chunks = [SleepChunk(forward_s / v, post_process=state.is_pipeline_last_stage(virtual_rank=c))
                  for c in range(v)]
        mbs = [torch.randn(1, 1, HIDDEN) for _ in range(m)]
        # One untimed warm-up (first gloo connections), then the timed run.
        warm = [torch.randn(1, 1, HIDDEN) for _ in range(pipeline)]
        forward_backward(chunks, warm, _forward_step, tensor_shape=(1, 1, HIDDEN), dtype=torch.float32)
        dist.barrier()
        timeline = Timeline()
        forward_backward(chunks, mbs, _forward_step, tensor_shape=(1, 1, HIDDEN), dtype=torch.float32,
                         timeline=timeline)
        results.append(timeline.gather())
        state.destroy()
    return results


def _worker(rank, world, port, runs, forward_s, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
        out = _run_all(world, runs, forward_s)
        queue.put((rank, None, out if rank == 0 else None))
    except BaseException as e:  # report to the parent instead of hanging it
        import traceback

        queue.put((rank, traceback.format_exc(), None))
        raise SystemExit(1) from e
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(pipeline: int, runs: Sequence[Tuple[Optional[int], int]], forward_s: float = 0.02,
            timeout: float = 600.0) -> List[Dict[int, list]]:
    """One timeline `{rank: [(op, mb, chunk, start, end), ...]}` per `(virtual, microbatches)` run."""
    from megaglot.pipeline.schedules import check_schedule

    for virtual, m in runs:
        check_schedule(m, pipeline, virtual)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, pipeline, port, list(runs), forward_s, queue), daemon=True)
             for r in range(pipeline)]
    for p in procs:
        p.start()
    result, deadline = None, time.monotonic() + timeout
    try:
        for _ in range(pipeline):
            rank, error, out = queue.get(timeout=max(1.0, deadline - time.monotonic()))
            if error:
                raise RuntimeError(f"pipeline rank {rank} failed:\n{error}")
            if rank == 0:
                result = out
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return result
