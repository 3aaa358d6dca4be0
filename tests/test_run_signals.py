"""A run stops cleanly on a signal (issue 17): SIGTERM (SLURM's warning before preemption) saves a
checkpoint at the next step boundary, agreed by every rank, and exits 0; Ctrl-C exits 130 with one
line; under torchrun the `error:` line is the root cause in torchrun's summary; the tiny model's
vocabulary follows --tokenizer (the README's preprocessing example trains it).

The example runs as a real process (python examples/pretrain_ko.py) on the README's own
preprocessing output, signalled after its first iteration line."""

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import types

import pytest

from dist_harness import free_port, run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "pretrain_ko.py")
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "TORCHELASTIC_ERROR_FILE")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The README's preprocessing example (--vocab-size 4096: the sample corpus learns 2527 tokens,
    more than the tiny preset's 1024): (dataset prefix, tokenizer.json)."""
    out = tmp_path_factory.mktemp("data")
    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", "examples/data/ko_sample.jsonl",
                           "--output-prefix", str(out / "ko"), "--train-tokenizer", "--vocab-size", "4096",
                           "--append-eod", "--lang", "ko", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return str(out / "ko_text_document"), str(out / "tokenizer.json")


def tiny_parameters(vocab_size: int) -> int:
    from megaglot.config import get_model_preset

    return get_model_preset("tiny", vocab_size=vocab_size).num_parameters()


TINY_2527 = tiny_parameters(2527)  # the tiny model over the README example's tokenizer


def flags(data, *extra) -> list:
    prefix, tokenizer = data
    return ["--model", "tiny", "--data-path", prefix, "--tokenizer", tokenizer, "--seq-length", "32",
            "--global-batch-size", "4", "--micro-batch-size", "2", "--split", "90,10,0", "--eval-interval", "0",
            "--log-interval", "1", *extra]


def env() -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return dict(clean, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))


def run_example(args, send=None, after="iter ", launcher=(sys.executable,)):
    """(exit code, output lines): stdout and stderr together; `send` (a signal) goes to the
    process after its first line starting with `after`. Killed after 120 s so that a hang fails."""
    proc = subprocess.Popen([*launcher, EXAMPLE, *args], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if send is not None and line.startswith(after):
                proc.send_signal(send)
                send = None
        return proc.wait(), lines
    finally:
        watchdog.cancel()


def iteration_lines(lines) -> list:
    return [int(m.group(1)) for m in map(re.compile(r"^iter +(\d+)/").match, lines) if m]


def test_sigterm_saves_at_the_next_step_boundary_exits_0_and_the_rerun_resumes(data, tmp_path):
    save = str(tmp_path / "ck")
    code, lines = run_example(flags(data, "--train-iters", "1000", "--save", save), send=signal.SIGTERM)
    assert code == 0, "\n".join(lines[-30:])
    assert lines[0].startswith(f"megaglot: tiny ({TINY_2527:,} parameters)"), lines[0]  # vocabulary of --tokenizer
    stops = [line for line in lines if line.startswith("SIGTERM at iteration")]
    assert len(stops) == 1, lines
    n = int(re.match(r"SIGTERM at iteration (\d+): ", stops[0]).group(1))
    assert stops[0] == f"SIGTERM at iteration {n}: saved checkpoint {save}/iter_{n:07d}; exiting"
    assert n == iteration_lines(lines)[-1] and n < 1000  # it stopped at a step boundary it logged
    assert open(os.path.join(save, "latest")).read().strip() == f"iter_{n:07d}"
    assert not any("Traceback" in line for line in lines)

    code, lines = run_example(flags(data, "--train-iters", str(n + 2), "--load", save, "--save", save))
    assert code == 0, "\n".join(lines[-30:])
    assert any(line.startswith(f"loaded {save} at iteration {n} ({4 * n} samples consumed)") for line in lines), lines
    assert iteration_lines(lines) == [n + 1, n + 2]
    assert open(os.path.join(save, "latest")).read().strip() == f"iter_{n + 2:07d}"


def test_sigterm_without_save_stops_with_one_line_and_exit_143(data):
    code, lines = run_example(flags(data, "--train-iters", "1000"), send=signal.SIGTERM)
    assert code == 143, "\n".join(lines[-30:])
    stops = [line for line in lines if line.startswith("SIGTERM at iteration")]
    assert len(stops) == 1 and stops[0].endswith(": no --save, nothing saved; exiting"), lines


def test_ctrl_c_prints_one_line_and_exits_130(data, tmp_path):
    save = str(tmp_path / "ck")
    code, lines = run_example(flags(data, "--train-iters", "1000", "--save", save, "--save-interval", "1"),
                              send=signal.SIGINT, after="saved checkpoint")
    assert code == 130, "\n".join(lines[-30:])
    interrupted = [line for line in lines if "interrupted at iteration" in line]
    assert len(interrupted) == 1, lines
    n = int(re.match(r"interrupted at iteration (\d+); last checkpoint: ", interrupted[0]).group(1))
    latest = open(os.path.join(save, "latest")).read().strip()  # saved every iteration: n, or n - 1 mid-save
    assert interrupted[0] == f"interrupted at iteration {n}; last checkpoint: {save}/{latest}"
    assert latest in (f"iter_{n:07d}", f"iter_{n - 1:07d}") and n >= 1
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in lines), lines


def _sigterm_on_one_rank_worker(rank, save):
    """Rank 1 alone receives SIGTERM during step 2: both ranks stop after step 2 and save it."""
    from megaglot.training import loop, pretrain
    from test_training import SyntheticTokens, configs

    step, calls = loop.train_step, []

    def train_step(run, microbatches):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(run, microbatches)

    loop.train_step = train_step
    model, parallel, train = configs(1, 1, None, False, train_iters=50, save=save)
    result = pretrain(model, parallel, train, datasets=(SyntheticTokens(400, model.vocab_size), None, None))
    return result["stopped_by_signal"], result["iteration"], signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    save = str(tmp_path / "ck")
    assert run_distributed(_sigterm_on_one_rank_worker, 2, save, timeout=120) == [("SIGTERM", 2, True)] * 2
    assert open(os.path.join(save, "latest")).read().strip() == "iter_0000002"


def test_torchrun_summary_shows_the_error_line_as_root_cause(data):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    code, lines = run_example(flags(data, "--micro-batch-size", "3"),
                              launcher=(torchrun, "--nproc_per_node", "2", "--master_port", str(free_port())))
    assert code == 1, "\n".join(lines)
    error = "error: --global-batch-size 4 is not divisible by --micro-batch-size x data-parallel size = 3 x 2 = 6"
    assert [line for line in lines if line.startswith("error:")] == [error]  # rank 0's line on stderr
    root = lines[lines.index("Root Cause (first observed failure):"):]
    assert f"  traceback : {error}" in root, "\n".join(lines)
    assert sum(line == f"  traceback : {error}" for line in lines) == 2  # each rank's error file


def test_the_tiny_models_vocabulary_follows_the_tokenizer(data):
    from megaglot.config import ConfigError, get_model_preset
    from megaglot.data.tokenizer import load_tokenizer

    spec = importlib.util.spec_from_file_location("pretrain_ko_signals", EXAMPLE)
    pretrain_ko = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain_ko)
    tok = load_tokenizer(data[1])
    assert tok.vocab_size == 2527  # more than the tiny preset's 1024 (the example's banner: first test)
    fit = pretrain_ko.fit_vocab_to_tokenizer
    assert fit(get_model_preset("tiny"), tok, data[1], False).vocab_size == 2527
    assert fit(get_model_preset("tiny"), tok, data[1], False).hidden_size == 128  # nothing else moves
    assert fit(get_model_preset("tiny", vocab_size=4096), tok, data[1], True).vocab_size == 4096  # --vocab-size
    assert fit(get_model_preset("polyglot-ko-1.3b"), tok, data[1], False).vocab_size == 30003  # a published shape
    with pytest.raises(ConfigError) as fixed_by_flag:
        fit(get_model_preset("tiny", vocab_size=2000), tok, data[1], True)
    assert str(fixed_by_flag.value) == (f"--tokenizer {data[1]} has 2527 tokens but the model's vocabulary is 2000 "
                                        f"(fixed by --vocab-size); pass --vocab-size 2527 or a tokenizer of at most "
                                        f"2000 tokens")
    big = types.SimpleNamespace(vocab_size=32000)
    with pytest.raises(ConfigError, match=r"has 32000 tokens .* 30003 \(fixed by --model polyglot-ko-1.3b\); "
                                          r"pass --vocab-size 32000"):
        fit(get_model_preset("polyglot-ko-1.3b"), big, "big.json", False)

