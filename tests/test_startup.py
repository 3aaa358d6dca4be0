"""Start-up: torch.distributed initialization (launcher check, timeout, CUDA device choice) and the
demo data prepared once per node when ranks run on several nodes."""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from dist_harness import free_port, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "pretrain_ko.py")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE",
                    "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def load_example():
    spec = importlib.util.spec_from_file_location("pretrain_ko_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unset(monkeypatch, names) -> None:
    """Unset now, and unset again afterwards even if the code under test sets them (setdefault)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES and k != "MASTER_PORT"}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_srun_without_torchrun_fails_with_one_line():
    # What srun -n 4 python examples/pretrain_ko.py gives each task: Slurm's variables, no RANK/WORLD_SIZE.
    env = clean_env(SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4", SLURM_PROCID="1", SLURM_NNODES="1")
    proc = subprocess.run([sys.executable, EXAMPLE, "--train-iters", "1"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: SLURM_STEP_NUM_TASKS=4"), proc.stderr
    assert "torchrun --nnodes $SLURM_NNODES" in lines[0] and "rank 0" in lines[0], lines[0]
    assert proc.stdout == ""  # nothing started: no banner, no training


def test_check_launcher_names_the_variable_and_allows_a_single_process():
    from megaglot.config import ConfigError
    from megaglot.parallel.launch import check_launcher

    for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        with pytest.raises(ConfigError, match=f"^{name}=8: .*torchrun"):
            check_launcher({name: "8"})
        check_launcher({name: "1"})  # a launcher that started one task: a world of one is right
        check_launcher({name: "8", "RANK": "3", "WORLD_SIZE": "8"})  # torchrun under the launcher
    check_launcher({})  # plain `python examples/pretrain_ko.py`
    check_launcher({"SLURM_NTASKS": "4"})  # one process inside an sbatch --ntasks 4 batch script
    check_launcher({"PMI_SIZE": "not a number"})


def test_local_device_is_local_rank_modulo_visible_devices():
    from megaglot.config import ConfigError
    from megaglot.parallel.launch import local_device

    assert [local_device(r, 8) for r in range(10)] == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    assert [local_device(r, 1) for r in range(4)] == [0, 0, 0, 0]  # one GPU per task (CUDA_VISIBLE_DEVICES)
    assert local_device(5, 4) == 1
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        local_device(0, 0)


def test_init_distributed_passes_timeout_and_cuda_device_id(monkeypatch):
    from megaglot.config import ConfigError
    from megaglot.parallel import launch

    calls, current = [], []
    monkeypatch.setattr(launch.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(launch.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    unset(monkeypatch, LAUNCH_VARIABLES + ("MASTER_ADDR", "MASTER_PORT"))
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)
    assert launch.init_distributed(25) == torch.device("cpu")
    assert calls[-1] == ("gloo", {"timeout": timedelta(minutes=25)})
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1")  # run directly: a world of one

    # On CUDA: GPU LOCAL_RANK % visible devices, set current and given to NCCL as device_id
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(launch.torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(launch.torch.cuda, "set_device", current.append)
    monkeypatch.setattr(launch.torch.cuda, "current_device", lambda: current[-1])
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert launch.init_distributed(2.5) == torch.device("cuda", 2)
    assert current == [2]
    assert calls[-1] == ("nccl", {"timeout": timedelta(minutes=2.5), "device_id": torch.device("cuda", 2)})

    for bad in (0, -1):
        with pytest.raises(ConfigError, match="--distributed-timeout-minutes"):
            launch.init_distributed(bad)
    assert len(calls) == 2


def test_init_distributed_really_starts_a_world_of_one(monkeypatch):
    from megaglot.parallel.launch import init_distributed
    from megaglot.training import init_distributed as reexported

    assert reexported is init_distributed  # tools import it from megaglot.training
    unset(monkeypatch, LAUNCH_VARIABLES + ("MASTER_ADDR",))
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert not dist.is_initialized()
    try:
        assert init_distributed(0.5) == torch.device("cpu")
        assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_distributed_timeout_flag_reaches_the_train_config():
    from megaglot.config import ConfigError, TrainConfig

    example = load_example()
    _, _, train, _ = example.build_configs(example.parse_args(["--distributed-timeout-minutes", "45"]), 1)
    assert train.distributed_timeout_minutes == 45.0
    _, _, train, _ = example.build_configs(example.parse_args([]), 1)
    assert train.distributed_timeout_minutes == 10.0  # Megatron's default
    with pytest.raises(ConfigError, match="--distributed-timeout-minutes"):
        TrainConfig(distributed_timeout_minutes=0).validate(1)


# ---- demo data on two simulated nodes: rank 0 on node 0, ranks 1 and 2 on node 1, a cache per node -------------
def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _demo_data_worker(rank, base):
    from megaglot.config import ConfigError, TrainConfig, get_model_preset

    node, local_rank = (0, 0) if rank == 0 else (1, rank - 1)
    os.environ["LOCAL_RANK"] = str(local_rank)
    example = load_example()
    model = get_model_preset("tiny")
    train = TrainConfig()
    example.prepare_demo_data(train, model, cache=os.path.join(base, f"node{node}"))
    prefix, tok = train.data.data_path[0], train.data.tokenizer
    out = {"prefix": prefix, "tok": tok, "cache": train.data.data_cache_dir,
           "sha": [_sha(prefix + ".bin"), _sha(prefix + ".idx"), _sha(tok)]}

    # Node 1 finds a stale copy whose .bin differs by one byte: every rank fails with one message
    dist.barrier()
    if rank == 1:
        stale = os.path.join(base, "stale1")
        shutil.copytree(os.path.join(base, "node0"), stale)
        with open(os.path.join(stale, os.path.relpath(prefix + ".bin", os.path.join(base, "node1"))), "r+b") as f:
            first = f.read(1)
            f.seek(0)
            f.write(bytes([first[0] ^ 1]))
    dist.barrier()
    try:
        example.prepare_demo_data(TrainConfig(), model, cache=os.path.join(base, ["node0", "stale1"][node]))
        out["stale"] = None
    except ConfigError as e:
        out["stale"] = str(e)

    # Rank 0 cannot prepare (no corpus): every rank fails instead of waiting for it
    example.DEMO_CORPUS = os.path.join(base, "missing.jsonl")
    try:
        example.prepare_demo_data(TrainConfig(), model, cache=os.path.join(base, f"missing{node}"))
        out["missing"] = None
    except ConfigError as e:
        out["missing"] = str(e)
    return out


def test_demo_data_prepared_per_node_bit_identical(tmp_path):
    results = run_distributed(_demo_data_worker, 3, str(tmp_path), timeout=180)
    for rank, r in enumerate(results):
        node_dir = os.path.join(str(tmp_path), f"node{min(rank, 1)}")
        assert r["prefix"].startswith(node_dir + os.sep) and r["tok"].startswith(node_dir + os.sep), r
        assert r["cache"] == node_dir
        assert r["sha"] == results[0]["sha"]  # both nodes' copies are bit-identical
        assert r["stale"] is not None and "node of rank 1 differs from rank 0's" in r["stale"], r["stale"]
        assert "stale1" in r["stale"] and "\n" not in r["stale"]
        assert r["missing"] is not None and "missing.jsonl" in r["missing"], r["missing"]
    # node 1 wrote its own copy (node-local cache); node 0's was written once, by rank 0
    assert os.path.exists(results[1]["prefix"] + ".bin") and os.path.exists(results[0]["prefix"] + ".bin")
    assert results[1]["prefix"] == results[2]["prefix"] != results[0]["prefix"]
