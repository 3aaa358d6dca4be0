"""Start, resume and fine-tune with the same command (issue 17): the real `pretrain` on one gloo rank.

1. `--load X --save X` with X missing starts from scratch with one log line; the same command,
   relaunched after a preemption, resumes and trains exactly as an uninterrupted run. A root holding
   only a killed save's staging directory is "nothing yet" too; a broken `latest` still fails.
2. A run that would move X's `latest` backwards is refused before it reads a sample.
3. --no-load-optim keeps the iteration, schedule clock and data position; --finetune starts at 0.
4. --save-retain 2 keeps exactly the two newest checkpoints (saves at 2, 4, 5 leave 4 and 5), and a
   killed save's staging directory older than `latest` goes too.

All scenarios run inside one spawned rank (spawning costs seconds); the tests check its record.
"""

import contextlib
import io
import json
import os

import pytest

from dist_harness import run_distributed
from test_training import SyntheticTokens, configs


class Preempted(Exception):
    """Stands in for the scheduler killing the job between iterations."""


class Tokens(SyntheticTokens):
    """SyntheticTokens that counts reads, starts at sample `shift`, and is preempted (raises) when
    asked for sample `stop_at` or later."""

    def __init__(self, vocab, shift=0, stop_at=None):
        super().__init__(64, vocab)
        self.tokens, self.stop_at, self.reads = self.tokens[shift:], stop_at, 0

    def __getitem__(self, i):
        if self.stop_at is not None and i >= self.stop_at:
            raise Preempted(f"preempted before sample {i}")
        self.reads += 1
        return super().__getitem__(i)


def _train(data=None, **flags):
    """pretrain on the tiny model (4 iterations, batch 8) with `flags`: a record of what happened,
    the exception's type and message in place of a result when it raised."""
    from megaglot.parallel import state
    from megaglot.training import pretrain

    flags.setdefault("train_iters", 4)
    model, parallel, train = configs(**flags)
    data = data or Tokens(model.vocab_size)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            result = pretrain(model, parallel, train, datasets=(data, None, None))
        opt = result["run"].optimizer
        return dict(losses=result["losses"], iteration=result["iteration"], clock=opt.iteration,
                    adam_steps=opt.adam_step_count(), reads=data.reads, log=log.getvalue())
    except Exception as e:  # the tests assert on the type and the message
        return dict(error=type(e).__name__, message=str(e), reads=data.reads, log=log.getvalue())
    finally:
        state.destroy()


def _scenarios(rank, root):
    from megaglot.config import get_model_preset

    vocab = get_model_preset("tiny-test").vocab_size
    a = os.path.join(root, "a")
    same = dict(load=a, save=a, save_interval=2)  # the one command line, launched twice
    out = {"reference": _train()}
    out["first"] = _train(Tokens(vocab, stop_at=16), **same)  # preempted after the save at iteration 2
    out["again"] = _train(**same)
    out["backwards_no_load"] = _train(save=a)
    out["backwards_older_load"] = _train(load=os.path.join(a, "iter_0000002"), save=a)
    out["backwards_finetune"] = _train(load=a, save=a, finetune=True)
    out["no_load_optim"] = _train(load=os.path.join(a, "iter_0000002"), train_iters=3, no_load_optim=True)
    # Fine-tuned from the weights after 2 steps on data whose sample 0 is the original sample 16: at
    # data position 0 its first loss is the uninterrupted run's third.
    out["finetune"] = _train(Tokens(vocab, shift=16), load=os.path.join(a, "iter_0000002"), train_iters=2,
                             finetune=True, save=os.path.join(root, "ft"))
    os.makedirs(os.path.join(root, "r", "iter_0000003.tmp"))  # left by an earlier run's killed save
    out["retain"] = _train(save=os.path.join(root, "r"), train_iters=5, save_interval=2, save_retain=2)
    os.makedirs(os.path.join(root, "staged", "iter_0000003.tmp"))
    out["staged_only"] = _train(load=os.path.join(root, "staged"), train_iters=1)
    os.makedirs(os.path.join(root, "broken", "iter_0000002"))  # half-written: a shard, no metadata.json
    open(os.path.join(root, "broken", "iter_0000002", "model_tp00_pp00.safetensors"), "w").close()
    with open(os.path.join(root, "broken", "latest"), "w") as f:
        f.write("iter_0000009\n")
    out["broken_latest"] = _train(load=os.path.join(root, "broken"))
    out["half_written"] = _train(load=os.path.join(root, "broken", "iter_0000002"))
    out["missing_iteration"] = _train(load=os.path.join(root, "a", "iter_0000003"))
    out["finetune_from_nothing"] = _train(load=os.path.join(root, "nothing"), finetune=True)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    return run_distributed(_scenarios, 1, str(root))[0], root


def _ok(record):
    assert "error" not in record, f"{record.get('error')}: {record.get('message')}\n{record['log']}"
    return record


def _latest(root):
    with open(os.path.join(root, "latest")) as f:
        return f.read().strip()


def test_a_missing_load_dir_starts_fresh_and_the_same_command_resumes_exactly(runs):
    out, root = runs
    reference, first, again = _ok(out["reference"]), out["first"], _ok(out["again"])
    assert first["error"] == "Preempted" and first["reads"] == 16, "preempted after 2 iterations"
    assert first["log"].count(f"--load {root / 'a'}: no checkpoint yet, starting from scratch") == 1
    assert again["log"].count("starting from scratch") == 0
    assert f"loaded {root / 'a'} at iteration 2 (16 samples consumed) with its optimizer state" in again["log"]
    assert again["iteration"] == 4 and again["losses"] == reference["losses"][2:], "resumed != uninterrupted"
    assert _latest(root / "a") == "iter_0000004"


def test_only_a_killed_saves_staging_dir_counts_as_nothing_yet(runs):
    out, root = runs
    staged = _ok(out["staged_only"])
    assert staged["iteration"] == 1 and "no checkpoint yet, starting from scratch" in staged["log"]


def test_an_unreadable_load_dir_still_fails_clearly(runs):
    out, root = runs
    broken, half = out["broken_latest"], out["half_written"]  # `latest` at a missing dir; no metadata.json
    assert broken["error"] == "CheckpointError" and broken["reads"] == 0
    assert broken["message"] == f"{root / 'broken' / 'latest'}: points at iter_0000009, which is missing or incomplete"
    assert half["error"] == "CheckpointError" and half["reads"] == 0
    assert half["message"] == (f"{root / 'broken' / 'iter_0000002'}: neither a checkpoint directory (metadata.json) "
                               f"nor a root with a 'latest' file")
    missing = out["missing_iteration"]
    assert missing["error"] == "CheckpointError" and missing["reads"] == 0, "a missing iter_N is a wrong path"
    assert missing["message"].startswith(f"{root / 'a' / 'iter_0000003'}: neither a checkpoint directory")
    nothing = out["finetune_from_nothing"]  # weights from nowhere: a wrong path, not a first launch
    assert nothing["error"] == "CheckpointError" and nothing["reads"] == 0
    assert nothing["message"] == f"--load {root / 'nothing'}: no checkpoint there, and --finetune needs one"


def test_saving_into_a_root_with_a_newer_latest_is_refused_before_training(runs):
    out, root = runs
    a = root / "a"
    for name, start in (("backwards_no_load", 0), ("backwards_older_load", 2), ("backwards_finetune", 0)):
        record = out[name]
        assert record["error"] == "ConfigError" and record["reads"] == 0, name
        resume = f"--load {a}" + (" without --finetune" if name == "backwards_finetune" else "")
        assert record["message"] == (f"--save {a}: {a}/latest is at iteration 4 and this run starts at iteration "
                                     f"{start}; saving would move it backwards. Resume with {resume}, or save into "
                                     f"a new --save directory"), name
    assert _latest(a) == "iter_0000004"
    assert sorted(os.listdir(a)) == ["iter_0000002", "iter_0000004", "latest"]


def test_no_load_optim_keeps_the_iteration_and_data_position_with_a_fresh_optimizer(runs):
    out, _ = runs
    reference, record = _ok(out["reference"]), _ok(out["no_load_optim"])
    assert "with a fresh optimizer (--no-load-optim)" in record["log"]
    assert len(record["losses"]) == 1 and record["clock"] == 3, "iteration and schedule clock continue from 2"
    assert record["adam_steps"] == 1, "the optimizer state was not loaded"
    assert record["losses"] == reference["losses"][2:3], "the same weights on the same samples 16..23"


def test_finetune_loads_weights_only_and_starts_at_iteration_0(runs):
    out, root = runs
    reference, record = _ok(out["reference"]), _ok(out["finetune"])
    assert "--finetune: loaded the weights of" in record["log"]
    assert record["iteration"] == 2 and record["clock"] == 2 and record["adam_steps"] == 2
    assert record["losses"][0] == reference["losses"][2], "loaded weights at data position 0"
    with open(root / "ft" / "iter_0000002" / "metadata.json") as f:
        meta = json.load(f)
    assert (meta["iteration"], meta["consumed_samples"]) == (2, 16)


def test_save_retain_keeps_exactly_the_two_newest(runs):
    out, root = runs
    record = _ok(out["retain"])
    assert sorted(os.listdir(root / "r")) == ["iter_0000004", "iter_0000005", "latest"]
    assert _latest(root / "r") == "iter_0000005"
    assert f"--save-retain 2: removed iter_0000003.tmp from {root / 'r'}" in record["log"], "once 4 is published"
    assert f"--save-retain 2: removed iter_0000002 from {root / 'r'}" in record["log"], "once 5 is published"
