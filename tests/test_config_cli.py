"""The command line is derived from megaglot.config's dataclasses: every field has a documented flag,
0 and None mean what the docs say, and the demo preset yields to the flags the user gives."""

import argparse
import dataclasses
import importlib.util
import os
import typing

import numpy as np
import pytest

from dist_harness import run_distributed
from megaglot.config import (ConfigError, ModelConfig, OptimizerConfig, ParallelConfig, TrainConfig,
                             get_model_preset)
from megaglot.config.cli import add_config_arguments, field_docs, with_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "pretrain_ko.py")


def load_example():
    spec = importlib.util.spec_from_file_location("pretrain_ko_cli", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def field_paths(cls, prefix):
    """('train.optimizer.lr', OptimizerConfig, field) for every leaf field, through nested sections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from field_paths(hints[f.name], f"{prefix}.{f.name}")
        else:
            yield f"{prefix}.{f.name}", cls, f


def test_every_field_has_a_documented_flag_with_its_default(capsys):
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    printed = capsys.readouterr().out
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    by_dest = {}
    for action in parser._actions:
        by_dest.setdefault(action.dest, action)  # the field's own flag; --bf16/--fp16 come after --precision
    paths = [*field_paths(ModelConfig, "model"), *field_paths(ParallelConfig, "parallel"),
             *field_paths(TrainConfig, "train")]
    assert len(paths) > 50
    for dest, cls, f in paths:
        action = by_dest.get(dest)
        assert action is not None, f"{dest} has no flag"
        doc = field_docs(cls).get(f.name)
        assert doc, f"{cls.__name__}.{f.name} has no doc string"
        assert action.help.startswith(doc.replace("%", "%%")) and "(default: " in action.help, (dest, action.help)
        flag = action.option_strings[0]
        assert flag in printed, f"{flag} missing from --help"
    # Megatron's names, and its precision switches
    for flag in ("--tensor-model-parallel-size", "--lr", "--min-lr", "--eval-interval", "--save-interval",
                 "--no-load-optim", "--bf16", "--fp16", "--loss-scale-window", "--initial-loss-scale",
                 "--eod-mask-loss", "--distributed-timeout-minutes", "--bucket-size", "--model"):
        assert flag in printed, flag
    # one line of help text per shown default: "(default: 0.0003)" for --lr
    assert "(default: 0.0003)" in " ".join(printed.split())


def test_zero_and_none_mean_what_the_docs_say():
    example = load_example()
    model, parallel, train, demo = example.build_configs(
        example.parse_args(["--eval-interval", "0", "--lr", "0", "--min-lr", "0", "--lr-warmup-iters", "0",
                            "--log-interval", "1", "--train-iters", "3", "--lr-decay-iters", "none",
                            "--clip-grad", "0", "--save", "none"]), 1)
    assert demo
    assert train.eval_interval == 0 and train.optimizer.lr == 0.0 and train.optimizer.min_lr == 0.0
    assert train.logging.log_interval == 1 and train.train_iters == 3 and train.optimizer.clip_grad == 0.0
    assert train.optimizer.lr_decay_iters is None and train.checkpoint.save is None
    train.validate(1)  # all of these are valid settings


def test_the_demo_preset_yields_to_the_flags_given():
    example = load_example()
    model, parallel, train, demo = example.build_configs(example.parse_args([]), 4)
    assert demo and model.name == "tiny"
    assert (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size) == (2, 2)
    assert (train.seq_length, train.train_iters, train.eval_interval, train.logging.log_interval) == (128, 100, 20, 10)
    assert (train.optimizer.lr, train.optimizer.min_lr, train.optimizer.lr_warmup_iters) == (1e-3, 1e-4, 10)
    assert train.checkpoint.save == os.path.join(ROOT, "checkpoints", "demo")
    assert train.logging.tensorboard_dir == os.path.join(ROOT, "runs", "demo")
    assert train.logging.generate_prompt == "대한민국의 수도는"

    flags = ["--train-iters", "7", "--lr", "0.01", "--tensor-model-parallel-size", "1", "--no-overlap-grad-reduce",
             "--loss-scale-window", "50", "--bucket-size", "1000", "--eod-mask-loss", "--fp16", "--hidden-size", "256"]
    model, parallel, train, demo = example.build_configs(example.parse_args(flags), 4)
    assert demo  # still the demo: its other settings stay
    assert (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size) == (1, 2)
    assert (train.train_iters, train.optimizer.lr, train.eval_interval, train.optimizer.min_lr) == (7, 0.01, 20, 1e-4)
    assert train.optimizer.overlap_grad_reduce is False and train.optimizer.loss_scale_window == 50
    assert train.optimizer.bucket_size == 1000 and train.data.eod_mask_loss and train.precision == "fp16"
    assert (model.hidden_size, model.ffn_hidden_size) == (256, 1024)  # FFN = 4h follows the flag

    model, parallel, train, demo = example.build_configs(example.parse_args(["--model", "tiny"]), 4)
    assert not demo and train.checkpoint.save is None and train.eval_interval == TrainConfig().eval_interval
    assert (parallel.tensor_model_parallel_size, train.seq_length) == (1, 128)


def test_bad_values_fail_with_one_line_naming_the_flag(capsys):
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--lr", "fast"])
    assert "--lr expects float, got 'fast'" in capsys.readouterr().err
    for flags, message in ((["--eval-interval", "-1"], "--eval-interval must be >= 0"),
                           (["--log-interval", "0"], "--log-interval must be positive"),
                           (["--lr", "-1"], "--lr must be >= 0"),
                           (["--bucket-size", "0"], "--bucket-size must be positive")):
        _, _, train, _ = example.build_configs(example.parse_args(flags), 1)
        with pytest.raises(ConfigError, match=message):
            train.validate(1)


def test_validate_neither_mutates_nor_returns():
    model = get_model_preset("tiny-test")
    parallel = ParallelConfig(sequence_parallel=True)
    assert parallel.validate(model, 2) is None and parallel.sequence_parallel is True
    assert parallel.data_parallel_size_for(2) == 2
    train = with_fields(TrainConfig(), micro_batch_size=2, global_batch_size=8)
    before = dataclasses.asdict(train)
    assert train.validate(2) is None and dataclasses.asdict(train) == before
    assert train.num_microbatches(2) == 2
    with pytest.raises(TypeError, match="no field bogus"):
        with_fields(train, bogus=1)
    assert OptimizerConfig().validate() is None


class _Tokens:
    def __init__(self, n, vocab, seq):
        rng = np.random.default_rng(0)
        self.t = rng.integers(0, vocab, size=(n, seq + 1))
        self.seq = seq

    def __len__(self):
        return len(self.t)

    def __getitem__(self, i):
        t = self.t[i]
        return {"tokens": t[:-1].astype(np.int64), "labels": t[1:].astype(np.int64),
                "loss_mask": np.ones(self.seq, dtype=np.float32), "position_ids": np.arange(self.seq, dtype=np.int64)}


def _run_worker(rank, argvs):
    """Each list of the example's flags -> configs -> pretrain on synthetic data: what the run validated."""
    import contextlib
    import io

    from megaglot.parallel import state
    from megaglot.training import pretrain

    example = load_example()
    out = []
    for argv in argvs:
        _, parallel, train, _ = example.build_configs(example.parse_args(argv), 1)
        model = get_model_preset("tiny-test")  # the demo's shape is not what this test is about
        train = with_fields(train, seq_length=16, micro_batch_size=2, global_batch_size=4, save=None, load=None,
                            tensorboard_dir=None, generate_prompt=None)
        data = _Tokens(64, model.vocab_size, 16)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            result = pretrain(model, parallel, train, datasets=(data, data, None))
        state.destroy()
        out.append({"valid": result["valid_losses"], "printed": printed.getvalue(),
                    "iteration": result["iteration"], "lr": result["run"].optimizer.schedule.lr(1)})
    return out


def test_eval_interval_zero_runs_no_validation_and_lr_zero_is_zero():
    flags = ["--train-iters", "2", "--log-interval", "1", "--eval-iters", "1", "--lr", "0", "--min-lr", "0"]
    off, on = run_distributed(_run_worker, 1, [flags + ["--eval-interval", "0"], flags + ["--eval-interval", "1"]])[0]
    assert off["iteration"] == on["iteration"] == 2
    assert off["valid"] == [] and "validation at" not in off["printed"]
    assert len(on["valid"]) == 3 and on["printed"].count("validation at") == 3  # iteration 0, 1 and 2
    assert off["lr"] == 0.0 and "lr 0.000e+00" in off["printed"]


def _tool_actions(monkeypatch, name, command=None):
    """{flag: argparse action} of tools/<name>.py's parser (of its `command` sub-parser when given)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    captured = {}

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(SystemExit):
            tool.parse_args([])
    parser = captured["parser"]
    if command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[command]
    return {s: a for a in parser._actions for s in a.option_strings}


def test_tools_share_the_trainers_flags(monkeypatch):
    trainer = argparse.ArgumentParser()
    add_config_arguments(trainer)
    want = {s: a for a in trainer._actions for s in a.option_strings}
    tools = {"evaluate": _tool_actions(monkeypatch, "evaluate"), "generate": _tool_actions(monkeypatch, "generate"),
             "convert_hf import": _tool_actions(monkeypatch, "convert_hf", "import")}
    for name, actions in tools.items():
        for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
            assert actions[flag].help == want[flag].help and actions[flag].default == 1, (name, flag)
            assert actions[flag].type("3") == 3, (name, flag)
    for name in ("evaluate", "generate"):
        actions = tools[name]
        assert actions["--precision"].choices == want["--precision"].choices
        assert actions["--bf16"].const == "bf16" and actions["--fp16"].const == "fp16"
        assert actions["--attention-backend"].choices == want["--attention-backend"].choices
    assert "--num-layers-per-virtual-pipeline-stage" in tools["convert_hf import"]
    reshard = _tool_actions(monkeypatch, "reshard_checkpoint")  # the layout it writes, in Megatron's --target-* names
    for flag, target in (("--tensor-model-parallel-size", "--target-tensor-parallel-size"),
                         ("--pipeline-model-parallel-size", "--target-pipeline-parallel-size")):
        assert reshard[target].required and reshard[target].type("3") == 3
        assert reshard[target].help.split(" (default")[0] == want[flag].help.split(" (default")[0]
    virtual = reshard["--target-num-layers-per-virtual-pipeline-stage"]
    assert virtual.help == want["--num-layers-per-virtual-pipeline-stage"].help and virtual.default is None
