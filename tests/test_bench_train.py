"""benchmarks/bench_train.py end to end on CPU with a tiny model (megaglot and --compare hf)."""

import importlib.util
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_train.py")
TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--warmup", "1", "--iters", "2", "--precision", "fp32", "--device", "cpu"]


def table_rows(output: str) -> dict:
    """{framework: [cells]} from the markdown table at the end of the output."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("megaglot", "hf"):
            rows[cells[0]] = cells
    return rows


def test_bench_train_tiny_cpu_with_hf_comparison():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, SCRIPT, *TINY, "--compare", "hf"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "command: python " in out and "commit " in out and "torch " in out
    assert "no fp32 master weights" in out
    rows = table_rows(out)
    assert set(rows) == {"megaglot", "hf"}, out
    for framework, cells in rows.items():
        assert cells[1] == "2", cells  # micro-batch
        tokens_s, ms, loss = float(cells[2].replace(",", "")), float(cells[7]), float(cells[8])
        assert math.isfinite(tokens_s) and tokens_s > 0, cells
        assert math.isfinite(ms) and ms > 0, cells
        # A few steps from initialization: close to ln(vocabulary) (30003 real / 30080 padded)
        assert math.isfinite(loss) and abs(loss - math.log(30003)) < 1.0, cells
        assert cells[4] == "n/a", cells  # no datasheet MFU on CPU
    assert "largest micro-batch that fit: megaglot 2, hf 2" in out


def test_bench_train_unknown_preset_is_one_line(capsys):
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--model", "polyglot-ko-99b"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "polyglot-ko-1.3b" in err and "polyglot-ko-99b" in err, err


# ---- out of memory on one rank of two (gloo) -----------------------------------------------------------------
def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _oom_sweep_worker(rank):
    """Micro-batch 1 runs the real train step on both ranks; at 2 rank 1 runs out of memory in its second
    step while rank 0's step succeeds; 4 must not run. Returns every rank's results and rank 0's output."""
    import contextlib
    import io

    import torch

    bench = _load_bench()
    real_step, recorded = bench.train_step, []

    def step(run, microbatches):
        if run.train_cfg.micro_batch_size != 2:
            return real_step(run, microbatches)
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"loss": torch.tensor(10.0)}  # no collective: rank 0 reaches the meeting by itself

    def bench_megaglot(*a):
        recorded.append(real_bench(*a))
        return recorded[-1]

    calls, real_bench = [], bench.bench_megaglot
    bench.train_step, bench.bench_megaglot = step, bench_megaglot
    args = bench.parse_args(TINY[:-2] + ["--micro-batch-size", "1,2,4", "--matmul-size", "32", "--device", "cpu",
                                         "--oom-wait", "60"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = bench.run_benchmark(args, bench.build_model_config(args), [1, 2, 4], torch.device("cpu"))
    return code, [(r["micro"], r["oom"]) for r in recorded], recorded[0].get("times"), out.getvalue()


def test_bench_train_oom_on_one_rank_is_reported_by_every_rank():
    from dist_harness import run_distributed

    results = run_distributed(_oom_sweep_worker, 2, timeout=150)
    for code, configs, times, _ in results:
        assert code == 0
        assert configs == [(1, False), (2, True)], configs  # the same verdict on both ranks; 4 not run
        assert len(times) == 2 and all(t > 0 for t in times)
    out = results[0][3]
    assert "micro-batch   2 (global 4): OOM" in out, out
    assert "stopping the sweep after an OOM with 2 ranks" in out and "not run: micro-batch 4" in out, out
    assert "| megaglot | 1 |" in out and "| megaglot | 2 | OOM |" in out, out


def _oom_mid_step_worker(rank):
    """Rank 1 runs out of memory before a collective of the step that rank 0 is already waiting in."""
    import torch
    import torch.distributed as dist

    bench = _load_bench()

    def step(run, microbatches):
        if rank == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        dist.all_reduce(torch.ones(4))  # rank 1 never joins this one
        return {"loss": torch.tensor(10.0)}

    bench.train_step = step
    args = bench.parse_args(TINY[:-2] + ["--device", "cpu", "--oom-wait", "10"])
    model_cfg = bench.build_model_config(args)
    parallel_cfg = bench.build_parallel_config(args, model_cfg, 2)
    meeting = bench.OOMMeeting(torch.device("cpu"), args.oom_wait)
    try:
        bench.bench_megaglot(args, model_cfg, parallel_cfg, bench.build_train_config(args, 2, 2),
                             torch.device("cpu"), meeting)
    except RuntimeError as exc:  # rank 0: its collective fails once rank 1 has exited
        return f"rank 0 released: {type(exc).__name__}"
    return "rank 1 went on"  # must not happen


def test_bench_train_oom_in_the_middle_of_a_step_stops_every_rank_instead_of_hanging(capfd):
    import time

    import pytest
    from dist_harness import run_distributed

    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] died with exit codes \[3\]"):
        run_distributed(_oom_mid_step_worker, 2, timeout=150)
    assert time.monotonic() - started < 120
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "rank 1 ran out of memory in the middle of a step" in err[0], err
    assert "--oom-wait 10s" in err[0]
