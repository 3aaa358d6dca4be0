"""Stopping a run on a signal: SIGTERM saves and stops at the next step boundary, SIGINT interrupts.

SIGTERM is what SLURM (and torchrun, passing it on) sends before preemption: the run should keep
its progress. The handler only records it; at each step boundary `RunSignals.stop_requested` agrees
over every rank (one all-reduce MAX of a 0/1 flag), because the signal reaches the ranks at
different steps and every rank must save the same iteration (saving is collective). This is
Megatron's --exit-signal-handler, always on.

SIGINT (Ctrl-C) stops at once, as KeyboardInterrupt does, but `pretrain` turns it into `Interrupted`
carrying the iteration, so the script prints one line instead of a traceback per rank.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

from megaglot.checkpoint.format import iteration_dir_name
from megaglot.checkpoint.retention import latest_iteration
from megaglot.training.metrics import log0


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `pretrain`: a KeyboardInterrupt that says where the run was."""

    def __init__(self, iteration: int, checkpoint: Optional[str]):
        super().__init__(f"interrupted at iteration {iteration}; last checkpoint: {checkpoint or 'none'}")
        self.iteration, self.checkpoint = iteration, checkpoint


def last_checkpoint(checkpoint_cfg) -> Optional[str]:
    """The iteration directory a rerun with --load would resume from: `latest` of --save, else of
    --load (a run that saves nothing still started from there); None when neither has one."""
    for root in (checkpoint_cfg.save, checkpoint_cfg.load):
        try:
            iteration = latest_iteration(root) if root else None
        except ValueError:  # an unreadable `latest` is no checkpoint to point at
            iteration = None
        if iteration is not None:
            return os.path.join(root, iteration_dir_name(iteration))
    return None


class _Sigint:
    """Ctrl-C raises KeyboardInterrupt as usual, and is remembered (`seen`; one per process, as the
    signal handler itself is): under torchrun every
    rank gets it, and a rank whose collective then fails because a peer has already exited was
    interrupted too, not failing with that peer error. The script calls `watch_sigint()` once."""

    seen = False

    def _raise(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt


SIGINT = _Sigint()


def watch_sigint() -> _Sigint:
    """Install the Ctrl-C recorder (main thread only, Python's rule); SIGINT.seen then tells."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, SIGINT._raise)
    return SIGINT


class RunSignals:
    """SIGTERM and Ctrl-C while a run trains; a context manager around the training loop.

    Entering installs a SIGTERM handler that only records the signal (the previous handler comes
    back on exit); leaving on a KeyboardInterrupt raises `Interrupted` with the last step boundary
    seen. The handler is installed only in the main thread (Python's rule); every rank of a job
    runs `pretrain` the same way, so all of them take part in `stop_requested`'s all-reduce or none.
    """

    def __init__(self, device: torch.device, checkpoint_cfg, iteration: int):
        self.device, self.cfg, self.iteration = device, checkpoint_cfg, iteration
        self.received, self._previous = False, None

    def __enter__(self) -> "RunSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._record)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if isinstance(exc, Interrupted) or exc_type is None:
            return
        if issubclass(exc_type, KeyboardInterrupt) or SIGINT.seen:  # SIGINT.seen: a peer's exit broke a collective
            raise Interrupted(self.iteration, last_checkpoint(self.cfg)) from None

    def _record(self, signum, frame) -> None:
        self.received = True  # acted on at the next step boundary, on every rank together

    def stop_requested(self, iteration: int) -> bool:
        """Collective at the boundary after step `iteration`: True on every rank when any rank has
        received SIGTERM (one all-reduce of one integer; the step's loss is fetched anyway)."""
        self.iteration = iteration
        if self._previous is None:
            return False
        flag = torch.tensor([int(self.received)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, checkpointer, consumed: int) -> str:
        """Save (collective) when --save is set and log the one line; the result's 'stopped_by_signal'."""
        if self.cfg.save:
            checkpointer.save(self.iteration, consumed)
            log0(f"SIGTERM at iteration {self.iteration}: saved checkpoint {last_checkpoint(self.cfg)}; exiting")
        else:
            log0(f"SIGTERM at iteration {self.iteration}: no --save, nothing saved; exiting")
        return "SIGTERM"
