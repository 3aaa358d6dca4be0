"""Start torch.distributed from torchrun's environment (NCCL on CUDA, gloo on CPU), tear it down, and
leave a failing worker's one-line error where torchrun's failure summary reads it (`record_error`).

A process started without torchrun's variables (RANK, WORLD_SIZE, ...) is a world of one, so
`python examples/pretrain_ko.py` works on its own. A process started that way by a multi-task
launcher (`srun`, `mpirun`) is refused: every task would silently train alone as rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from megaglot.config import ConfigError
from megaglot.parallel import state

# Variables by which multi-task launchers announce how many processes they started. SLURM_NTASKS
# is not one of them: a batch script (one process) sees it too; srun sets SLURM_STEP_NUM_TASKS.
LAUNCHER_SIZE_VARIABLES = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
TORCHRUN_HINT = ("launch one torchrun per node instead, e.g. srun --ntasks-per-node 1 torchrun --nnodes $SLURM_NNODES "
                 "--nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint $MASTER:29500 SCRIPT ARGS...")


def local_device(local_rank: int, device_count: int) -> int:
    """CUDA device index of a process: LOCAL_RANK modulo the devices it sees, so a launcher that gives
    each process one GPU (CUDA_VISIBLE_DEVICES per task) and one that shows all 8 both work."""
    if device_count <= 0:
        raise ConfigError("CUDA is available but no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    return local_rank % device_count


def check_launcher(environ: Mapping[str, str]) -> None:
    """ConfigError when a multi-task launcher started this process without torchrun's RANK/WORLD_SIZE:
    otherwise every task would become rank 0 of its own world of one and train alone."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return
    for name in LAUNCHER_SIZE_VARIABLES:
        value = environ.get(name, "")
        if value.strip().isdigit() and int(value) > 1:
            raise ConfigError(f"{name}={value}: this process was started by a multi-task launcher without torchrun's "
                              f"RANK/WORLD_SIZE, so every task would train alone as rank 0; {TORCHRUN_HINT}")


def init_distributed(timeout_minutes: float = 10.0) -> torch.device:
    """torch.distributed from torchrun's environment (a world of one when run directly); the device.

    timeout_minutes (--distributed-timeout-minutes): how long a collective may wait for its peers
    before the run fails, e.g. while rank 0 loads a large checkpoint or builds the data indices.
    On CUDA the process uses GPU LOCAL_RANK % visible devices, given to NCCL as device_id (the
    communicator forms at once and sub-groups are split from it).
    """
    if not dist.is_initialized():
        check_launcher(os.environ)
        if not timeout_minutes > 0:
            raise ConfigError(f"--distributed-timeout-minutes must be positive, got {timeout_minutes}")
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        kwargs = {"timeout": timedelta(minutes=timeout_minutes)}
        if torch.cuda.is_available():
            index = local_device(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
            torch.cuda.set_device(index)
            kwargs["device_id"] = torch.device("cuda", index)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", **kwargs)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown() -> None:
    """Forget megaglot's process groups, then the default group, so a tool or test can exit (or start
    another world) cleanly; each only if it exists."""
    if state.is_initialized():
        state.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()


def record_error(message: str, callstack: str = "") -> None:
    """Write this worker's failure into torchrun's elastic error file (TORCHELASTIC_ERROR_FILE, one
    per worker; nothing without torchrun), so that the ChildFailedError summary torchrun prints
    shows `message` for this rank (the first failure's as its root cause) instead of
    "To enable traceback see ...". The layout is torch's ErrorHandler.record_exception's; torchrun
    shows py_callstack, so a known error passes no callstack and reads as its one line."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message,
                        "extraInfo": {"py_callstack": callstack or message, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:  # the summary then says <N/A>; the error itself is on stderr already
        pass


__all__ = ["init_distributed", "shutdown", "local_device", "check_launcher", "record_error",
           "LAUNCHER_SIZE_VARIABLES"]
