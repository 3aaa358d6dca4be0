"""The training loop: build the run, load, then step, log, validate and save until --train-iters (or SIGTERM)."""

from __future__ import annotations

import time

import torch

from megaglot.config import EOD_TOKEN_ID, ConfigError, ModelConfig, ParallelConfig, TrainConfig
from megaglot.data.text import decode_new_tokens
from megaglot.eval.generation import generate
from megaglot.parallel.launch import init_distributed
from megaglot.progress import StepLog
from megaglot.training.checkpointer import Checkpointer
from megaglot.training.data import build_datasets
from megaglot.training.metrics import Metrics, log0
from megaglot.training.run import Run, build_run, global_batches, train_step
from megaglot.training.signals import RunSignals
from megaglot.training.validator import Validator


def pretrain(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, train_cfg: TrainConfig,
             datasets=None, tokenizer=None) -> dict:
    """Train; returns {'losses': [...], 'valid_losses': [...], 'iteration': N, 'stopped_by_signal': None or
    'SIGTERM'} (for tests and scripts). Ctrl-C raises `Interrupted` (a KeyboardInterrupt) naming the iteration.

    datasets: (train, valid, test) map-style datasets, or None to build them from train_cfg.data.data_path.
    """
    device = init_distributed(train_cfg.distributed_timeout_minutes)
    startup = StepLog("start-up")  # rank 0, stderr: one line per step up to the first iteration, time so far
    run = build_run(model_cfg, parallel_cfg, train_cfg, device)
    startup(f"model built, {sum(p.numel() for c in run.chunks for p in c.parameters()):,} parameters on rank 0")
    checkpointer = Checkpointer(run)
    start_iteration, consumed = checkpointer.load()
    if train_cfg.checkpoint.load:
        startup("checkpoint loaded")
    if datasets is None:
        datasets = build_datasets(run, tokenizer)
        startup("data indices built")
    train_ds, valid_ds, _ = datasets
    metrics = Metrics(run)
    validator = Validator(run, valid_ds, metrics)
    if validator.enabled and start_iteration == 0:
        validator.validate(0)  # the starting point of the curve
    batches = global_batches(train_ds, consumed, run)
    losses, iteration, stopped = [], start_iteration, None
    window_start, window_iters = time.perf_counter(), 0
    with RunSignals(device, train_cfg.checkpoint, iteration) as signals:  # SIGTERM and Ctrl-C: signals.py
        while iteration < train_cfg.train_iters:
            microbatches = next(batches, None)
            if microbatches is None:
                raise ConfigError(f"the training data ran out at iteration {iteration}; raise the sample count")
            stats = train_step(run, microbatches)
            iteration, consumed, window_iters = iteration + 1, consumed + train_cfg.global_batch_size, window_iters + 1
            losses.append(stats["loss"])
            stop = signals.stop_requested(iteration)  # SIGTERM on any rank: every rank saves this iteration
            if iteration == start_iteration + 1:
                startup("first step done")
            if iteration % train_cfg.logging.log_interval == 0 or iteration == train_cfg.train_iters:
                if device.type == "cuda":
                    torch.cuda.synchronize()  # once per log window, so ms/iter counts the queued work
                metrics.log_iteration(stats, iteration, consumed, (time.perf_counter() - window_start) / window_iters)
                window_start, window_iters = time.perf_counter(), 0
            if stop:  # before validating: a preempted job has seconds to spare
                stopped = signals.stop(checkpointer, consumed)
                break
            validator.maybe_validate(iteration)
            checkpointer.maybe_save(iteration, consumed)
    metrics.close()
    result = {"losses": losses, "valid_losses": validator.losses, "iteration": iteration, "run": run,
              "stopped_by_signal": stopped}
    if train_cfg.logging.generate_prompt and tokenizer is not None and stopped is None:
        result["generated"] = _generate_demo(run, tokenizer)
    return result


def _generate_demo(run: Run, tokenizer) -> list:
    """Greedy continuation of --generate-prompt; every step reruns the (short) sequence through the
    pipeline (no KV cache)."""
    cfg = run.train_cfg.logging
    ids = tokenizer.encode(cfg.generate_prompt)
    (new,) = generate(run.chunks, run.model_cfg, [ids], cfg.generate_tokens, eod=EOD_TOKEN_ID,
                      use_cache=False, device=run.device)
    log0(f"prompt: {cfg.generate_prompt}\ncontinuation: {decode_new_tokens(tokenizer, new)}")
    return new
