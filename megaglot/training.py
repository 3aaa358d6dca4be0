"""The training loop: set up the layout, model, optimizer and data, then step, log, validate, save.

Launched once per rank by torchrun. NCCL on CUDA, gloo on CPU, chosen automatically.
"""

from __future__ import annotations

import dataclasses
import math
import random
import resource
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megaglot.checkpoint.training_state import load_checkpoint, save_checkpoint
from megaglot.config import DTYPES, EOD_TOKEN_ID, ConfigError, ModelConfig, ParallelConfig, TrainConfig
from megaglot.data.blending import parse_data_paths, read_sidecar
from megaglot.data.gpt_dataset import build_train_valid_test_datasets, make_batches
from megaglot.data.text import decode_new_tokens
from megaglot.model import build_model_chunks, masked_mean
from megaglot.optim.grad_buffer import GradBuffer
from megaglot.optim.grad_scaler import DynamicGradScaler, scale_loss_gradient
from megaglot.optim.optimizer import Optimizer
from megaglot.optim.schedule import LRSchedule
from megaglot.parallel import state
from megaglot.eval.generation import generate
from megaglot.parallel.launch import init_distributed, shutdown  # noqa: F401 - tools import them from here
from megaglot.parallel.random import model_parallel_seed
from megaglot.pipeline.schedules import forward_backward
from megaglot.progress import StepLog

H100_BF16_PEAK = 989e12  # datasheet dense BF16 FLOP/s of an H100 SXM (docs/design.md)


def model_flops_per_iteration(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Narayanan et al. (2021): 72 B s L h^2 (1 + s/(6h) + V/(12 L h)); recomputation not counted."""
    h, L, V = cfg.hidden_size, cfg.num_layers, cfg.padded_vocab_size
    return 72.0 * batch * seq * L * h * h * (1.0 + seq / (6.0 * h) + V / (12.0 * L * h))


def log0(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


@dataclass
class Run:
    """Everything a step needs, built once."""

    model_cfg: ModelConfig
    parallel_cfg: ParallelConfig
    train_cfg: TrainConfig
    chunks: list
    optimizer: Optimizer
    num_microbatches: int
    device: torch.device
    dtype: torch.dtype

    @property
    def tensor_shape(self):
        s = self.train_cfg.seq_length
        if self.parallel_cfg.sequence_parallel:
            s //= self.parallel_cfg.tensor_model_parallel_size
        return (s, self.train_cfg.micro_batch_size, self.model_cfg.hidden_size)


def build_run(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, train_cfg: TrainConfig,
              device: torch.device) -> Run:
    world = dist.get_world_size()
    parallel_cfg.validate(model_cfg, world)
    dp = parallel_cfg.data_parallel_size_for(world)
    train_cfg.validate(dp)
    num_microbatches = train_cfg.num_microbatches(dp)
    if parallel_cfg.sequence_parallel and train_cfg.seq_length % parallel_cfg.tensor_model_parallel_size:
        raise ConfigError(f"--seq-length {train_cfg.seq_length} is not divisible by --tensor-model-parallel-size "
                          f"{parallel_cfg.tensor_model_parallel_size} (needed by --sequence-parallel)")
    if train_cfg.seq_length > model_cfg.max_position_embeddings:
        raise ConfigError(f"--seq-length {train_cfg.seq_length} exceeds the model's max_position_embeddings "
                          f"{model_cfg.max_position_embeddings}")
    vp = parallel_cfg.virtual_pipeline_size(model_cfg.num_layers)
    if not state.is_initialized():
        state.initialize(parallel_cfg.tensor_model_parallel_size, parallel_cfg.pipeline_model_parallel_size, vp)
    if vp is not None:
        from megaglot.pipeline.schedules import check_schedule

        check_schedule(num_microbatches, parallel_cfg.pipeline_model_parallel_size, vp, model_cfg.num_layers)
    seed = train_cfg.seed
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_seed(seed)
    dtype = DTYPES[train_cfg.precision]
    chunks = build_model_chunks(model_cfg, seed=seed, sequence_parallel=parallel_cfg.sequence_parallel,
                                recompute_granularity=train_cfg.recompute_granularity, params_dtype=dtype,
                                device=device)
    params = [p for c in chunks for p in c.parameters()]
    opt = train_cfg.optimizer
    buffer = GradBuffer(params, dp_group=state.get_data_parallel_group(),
                        distributed_optimizer=opt.use_distributed_optimizer,
                        bucket_size=opt.bucket_size, overlap=opt.overlap_grad_reduce)
    schedule = LRSchedule(max_lr=opt.lr, min_lr=opt.min_lr, warmup_iters=opt.lr_warmup_iters,
                          decay_iters=opt.lr_decay_iters or train_cfg.train_iters, style=opt.lr_decay_style)
    scaler = (DynamicGradScaler(scale=opt.initial_loss_scale, min_scale=opt.min_loss_scale,
                                growth_interval=opt.loss_scale_window, hysteresis=opt.hysteresis,
                                hysteresis_left=opt.hysteresis)
              if train_cfg.precision == "fp16" else None)
    optimizer = Optimizer(params, buffer, opt, schedule, scaler)
    return Run(model_cfg, parallel_cfg, train_cfg, chunks, optimizer, num_microbatches, device, dtype)


def _forward_step(run: Run, loss_scale: float):
    def step(chunk, input_tensor, microbatch):
        batch = {k: v.to(run.device, non_blocking=True) for k, v in microbatch.items()}
        out = chunk(input_tensor, batch)
        if chunk.post_process:
            return scale_loss_gradient(masked_mean(out, batch["loss_mask"]), loss_scale)
        return out

    return step


def _loss_everywhere(loss: Optional[torch.Tensor], device) -> float:
    """The last stage's loss, averaged over DP, on every rank (for logging and early stopping)."""
    value = torch.zeros(1, dtype=torch.float32, device=device)
    if loss is not None and state.is_pipeline_last_stage() and state.get_tensor_parallel_rank() == 0:
        value += loss.float().to(device)
    dist.all_reduce(value, group=state.get_model_parallel_group())
    dist.all_reduce(value, group=state.get_data_parallel_group())
    return value.item() / state.get_data_parallel_world_size()


def train_step(run: Run, microbatches: list) -> dict:
    """One optimizer step over this DP rank's microbatches of the global batch."""
    for c in run.chunks:
        c.train()
    run.optimizer.start_step(len(microbatches))
    loss = forward_backward(run.chunks, microbatches, _forward_step(run, run.optimizer.loss_scale),
                            tensor_shape=run.tensor_shape, dtype=run.dtype, device=run.device)
    stats = run.optimizer.step()
    stats["loss"] = _loss_everywhere(loss, run.device)
    return stats


@torch.no_grad()
def evaluate(run: Run, batches) -> float:
    for c in run.chunks:
        c.eval()
    losses = []
    for microbatches in batches:
        loss = forward_backward(run.chunks, microbatches, _forward_step(run, 1.0), tensor_shape=run.tensor_shape,
                                dtype=run.dtype, forward_only=True, device=run.device)
        losses.append(_loss_everywhere(loss, run.device))
    return sum(losses) / max(1, len(losses))


def _global_batches(dataset, consumed: int, run: Run):
    """Lists of this DP rank's microbatches, one list per global batch."""
    cfg = run.train_cfg
    it = make_batches(dataset, consumed, cfg.micro_batch_size, state.get_data_parallel_rank(),
                      state.get_data_parallel_world_size())
    while True:
        group = []
        for _ in range(run.num_microbatches):
            try:
                group.append(next(it))
            except StopIteration:
                return
        yield group


def _peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def pretrain(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, train_cfg: TrainConfig,
             datasets=None, tokenizer=None) -> dict:
    """Train; returns {'losses': [...], 'valid_losses': [...], 'iteration': N} (for tests and scripts).

    datasets: (train, valid, test) map-style datasets, or None to build them from train_cfg.data.data_path.
    """
    device = init_distributed(train_cfg.distributed_timeout_minutes)
    startup = StepLog("start-up")  # rank 0, stderr: one line per step up to the first iteration, time so far
    run = build_run(model_cfg, parallel_cfg, train_cfg, device)
    startup(f"model built, {sum(p.numel() for c in run.chunks for p in c.parameters()):,} parameters on rank 0")
    cfg, ckpt = train_cfg, train_cfg.checkpoint
    start_iteration, consumed = 0, 0
    if ckpt.load:
        meta = load_checkpoint(ckpt.load, chunks=run.chunks, optimizer=run.optimizer, model_cfg=model_cfg,
                               load_optimizer=not ckpt.no_load_optim)
        start_iteration, consumed = meta["iteration"], meta["consumed_samples"]
        log0(f"loaded {ckpt.load} at iteration {start_iteration} ({consumed} samples consumed)")
        startup("checkpoint loaded")
    if datasets is None:
        datasets = build_datasets(run, tokenizer)
        startup("data indices built")
    train_ds, valid_ds, _ = datasets
    writer = None
    if cfg.logging.tensorboard_dir and dist.get_rank() == dist.get_world_size() - 1:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(cfg.logging.tensorboard_dir)
    losses, valid_losses = [], []
    batches = _global_batches(train_ds, consumed, run)
    iteration = start_iteration
    if valid_ds is not None and cfg.eval_interval and iteration == 0:
        valid_losses.append(_validate(run, valid_ds, iteration, writer))  # the starting point of the curve
    window_start, window_iters = time.perf_counter(), 0
    while iteration < cfg.train_iters:
        microbatches = next(batches, None)
        if microbatches is None:
            raise ConfigError(f"the training data ran out at iteration {iteration}; raise the sample count")
        stats = train_step(run, microbatches)
        iteration += 1
        if iteration == start_iteration + 1:
            startup("first step done")
        consumed += cfg.global_batch_size
        losses.append(stats["loss"])
        window_iters += 1
        if iteration % cfg.logging.log_interval == 0 or iteration == cfg.train_iters:
            if device.type == "cuda":
                torch.cuda.synchronize()
            _log_iteration(run, stats, iteration, consumed, (time.perf_counter() - window_start) / window_iters,
                           writer)
            window_start, window_iters = time.perf_counter(), 0
        if valid_ds is not None and cfg.eval_interval and (iteration % cfg.eval_interval == 0
                                                            or iteration == cfg.train_iters):
            valid_losses.append(_validate(run, valid_ds, iteration, writer))
        if ckpt.save and ((ckpt.save_interval and iteration % ckpt.save_interval == 0) or iteration == cfg.train_iters):
            path = save_checkpoint(ckpt.save, iteration=iteration, consumed_samples=consumed, chunks=run.chunks,
                                   optimizer=run.optimizer, model_cfg=model_cfg,
                                   extra={"tokenizer": cfg.data.tokenizer, "train": _train_record(cfg)})
            log0(f"saved checkpoint {path}")
    if writer is not None:
        writer.close()
    result = {"losses": losses, "valid_losses": valid_losses, "iteration": iteration, "run": run}
    if cfg.logging.generate_prompt and tokenizer is not None:
        result["generated"] = _generate_demo(run, tokenizer)
    return result


def _log_iteration(run: Run, stats: dict, iteration: int, consumed: int, elapsed: float, writer) -> None:
    """The log line (and TensorBoard scalars) for the window just ended; `elapsed` is seconds per iteration."""
    cfg, device = run.train_cfg, run.device
    tokens_per_iter = cfg.global_batch_size * cfg.seq_length
    flops_per_iter = model_flops_per_iteration(run.model_cfg, cfg.global_batch_size, cfg.seq_length)
    tflops = flops_per_iter / elapsed / dist.get_world_size() / 1e12
    mfu = f"{100 * tflops * 1e12 / H100_BF16_PEAK:.1f}%" if device.type == "cuda" else "n/a (CPU)"
    log0(f"iter {iteration:6d}/{cfg.train_iters} | samples {consumed:9d} | loss {stats['loss']:.4f} | "
         f"lr {stats['lr']:.3e} | grad norm {stats['grad_norm']:.3f} | loss scale {stats['loss_scale']:.0f} | "
         f"skipped {run.optimizer.num_skipped} | {1000 * elapsed:.1f} ms/iter | "
         f"{tokens_per_iter / elapsed:.0f} tokens/s | {tflops:.3f} TFLOP/s/GPU | MFU {mfu} | "
         f"peak mem {_peak_memory_gb(device):.2f} GB")
    if writer is not None:
        for key in ("loss", "lr", "grad_norm", "loss_scale"):
            writer.add_scalar(f"train/{key}", stats[key], iteration)
        writer.add_scalar("train/ms_per_iter", 1000 * elapsed, iteration)
        writer.add_scalar("train/tokens_per_s", tokens_per_iter / elapsed, iteration)
        writer.add_scalar("train/tflops_per_gpu", tflops, iteration)
        writer.add_scalar("train/skipped_steps", run.optimizer.num_skipped, iteration)
        writer.add_scalar("train/consumed_samples", consumed, iteration)
        writer.add_scalar("train/peak_memory_gb", _peak_memory_gb(device), iteration)


def _generate_demo(run: Run, tokenizer) -> list:
    """Greedy continuation of --generate-prompt; every step reruns the (short) sequence through the
    pipeline (no KV cache)."""
    cfg = run.train_cfg.logging
    ids = tokenizer.encode(cfg.generate_prompt)
    (new,) = generate(run.chunks, run.model_cfg, [ids], cfg.generate_tokens, eod=EOD_TOKEN_ID,
                      use_cache=False, device=run.device)
    log0(f"prompt: {cfg.generate_prompt}\ncontinuation: {decode_new_tokens(tokenizer, new)}")
    return new


def _validate(run: Run, valid_ds, iteration: int, writer) -> float:
    """Loss on the same held-out batches every time, so successive values compare."""
    cfg = run.train_cfg
    batches = _global_batches(valid_ds, 0, run)
    loss = evaluate(run, [b for _, b in zip(range(cfg.eval_iters), batches)])
    log0(f"validation at iter {iteration}: loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.2f}")
    if writer is not None:
        writer.add_scalar("valid/loss", loss, iteration)
        writer.add_scalar("valid/ppl", math.exp(min(loss, 50)), iteration)
    return loss


def _train_record(cfg: TrainConfig) -> dict:
    """The run's settings for the checkpoint's JSON, sections nested as in TrainConfig."""
    return dataclasses.asdict(cfg)


def check_data_fits_model(data_path, model_cfg: ModelConfig, tokenizer=None) -> None:
    """Token ids past the model's vocabulary would be embedded as zeros on TP > 1, silently: refuse
    data whose recorded tokenizer is larger than the model's vocabulary or is not --tokenizer."""
    prefixes, _ = parse_data_paths(data_path)
    for prefix in prefixes:
        recorded = read_sidecar(prefix).get("tokenizer") or {}
        vocab = recorded.get("vocab_size")
        if vocab is not None and vocab > model_cfg.vocab_size:
            raise ConfigError(f"--data-path {prefix} was tokenized with a {vocab}-token vocabulary "
                              f"({recorded.get('path')}) but the model has {model_cfg.vocab_size}; "
                              f"use a matching --model or data")
        if tokenizer is not None and recorded.get("sha256") and recorded["sha256"] != tokenizer.sha256:
            raise ConfigError(f"--data-path {prefix} was tokenized with {recorded.get('path')}, not with "
                              f"--tokenizer {tokenizer.path} (their contents differ)")


def build_datasets(run: Run, tokenizer=None):
    """(train, valid, test) from --data-path; built on rank 0 first (it writes the index cache)."""
    cfg = run.train_cfg
    data = cfg.data
    if not data.data_path:
        raise ConfigError("--data-path is required (prefixes of .bin/.idx files from tools/preprocess_data.py)")
    check_data_fits_model(data.data_path, run.model_cfg, tokenizer)
    gb = cfg.global_batch_size
    evals = cfg.eval_iters * gb if cfg.eval_interval else 0
    counts = (cfg.train_iters * gb, evals, 0)  # the loop never reads the test split
    kwargs = dict(split=data.split, seq_length=cfg.seq_length, seed=cfg.seed, num_samples=counts,
                  cache_dir=data.data_cache_dir, balance=data.data_balance, eod_mask_loss=data.eod_mask_loss)
    result = None
    if dist.get_rank() == 0:
        result = build_train_valid_test_datasets(data.data_path, **kwargs)
    dist.barrier()
    if dist.get_rank() != 0:
        result = build_train_valid_test_datasets(data.data_path, log=lambda line: None, **kwargs)
    return result

