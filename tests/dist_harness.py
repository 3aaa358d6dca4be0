"""Run a function on N spawned gloo ranks and collect every rank's result.

Spawning costs a second or more per rank (each imports torch), so tests run many checks inside
one spawn. A failing rank fails the test with its own traceback; a hang fails it after
`timeout` seconds instead of blocking the suite.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serialize(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _worker(rank, world_size, port, fn, args, parallel, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
        if parallel is not None:
            from megaglot.parallel import state

            state.initialize(*parallel)
        result = fn(rank, *args)
        queue.put((rank, True, _serialize(result)))
    except BaseException:  # report everything, including assertion failures, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megaglot.parallel import state

            state.destroy()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, parallel=None, timeout: float = 240.0) -> list:
    """fn(rank, *args) on `world_size` gloo ranks; returns results by rank.

    `parallel=(tp, pp[, vp])` also initializes megaglot's process groups before fn runs.
    fn must be a module-level function (it is pickled to the spawned processes).
    """
    import queue as queue_module
    import time

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, parallel, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"distributed test timed out after {timeout:.0f}s; "
                                   f"ranks that finished: {sorted(results)}")
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died with exit codes "
                                       f"{[procs[i].exitcode for i in dead]} before reporting")
                continue
            if not ok:
                raise AssertionError(f"rank {rank} failed:\n{payload}")
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if len(results) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
    return [results[r] for r in range(world_size)]
