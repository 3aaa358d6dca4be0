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
