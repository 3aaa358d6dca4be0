"""A run: the model chunks, optimizer and layout built once; one training step; a forward-only loss.

Everything a step needs is in `Run`, so the loop, the validator, the benchmark and the tests all
step the same object.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megaglot.config import DTYPES, ConfigError, ModelConfig, ParallelConfig, TrainConfig
from megaglot.data.gpt_dataset import make_batches
from megaglot.model import build_model_chunks, masked_mean
from megaglot.optim.grad_buffer import GradBuffer
from megaglot.optim.grad_scaler import DynamicGradScaler, scale_loss_gradient
from megaglot.optim.optimizer import Optimizer
from megaglot.optim.schedule import LRSchedule
from megaglot.parallel import state
from megaglot.parallel.random import model_parallel_seed
from megaglot.pipeline.schedules import forward_backward
from megaglot.training.sft import response_tokens, weighted_loss_sum


class TrainingDiverged(ValueError):
    """--max-skipped-steps consecutive steps had a non-finite loss or gradient norm. Raised by
    train_step on every rank alike, before the loop saves: skipped steps never touch the weights,
    so no checkpoint holds a nan. A ValueError, so the scripts print it as one `error:` line."""


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
    response_tokens: int = 0
    """Response tokens trained on so far (SFT runs; the log line's response tokens/s)."""

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


def forward_step(run: Run, loss_scale: float, weight: Optional[torch.Tensor] = None):
    """The schedule's step function. weight None: each microbatch's loss is its masked mean
    (pretraining); else sum(loss * mask) * weight, a share of the global response-token mean (SFT, see
    megaglot.training.sft)."""
    def step(chunk, input_tensor, microbatch):
        batch = {k: v.to(run.device, non_blocking=True) for k, v in microbatch.items()}
        out = chunk(input_tensor, batch)
        if chunk.post_process:
            loss = (masked_mean(out, batch["loss_mask"]) if weight is None
                    else weighted_loss_sum(out, batch["loss_mask"], weight))
            return scale_loss_gradient(loss, loss_scale)
        return out

    return step


def loss_everywhere(loss: Optional[torch.Tensor], device) -> float:
    """The last stage's loss, averaged over DP, on every rank (for logging and early stopping)."""
    value = torch.zeros(1, dtype=torch.float32, device=device)
    if loss is not None and state.is_pipeline_last_stage() and state.get_tensor_parallel_rank() == 0:
        value += loss.float().to(device)
    dist.all_reduce(value, group=state.get_model_parallel_group())
    dist.all_reduce(value, group=state.get_data_parallel_group())
    return value.item() / state.get_data_parallel_world_size()


def train_step(run: Run, microbatches: list) -> dict:
    """One optimizer step over this DP rank's microbatches of the global batch.

    The loss is reduced before the step so that a non-finite one (the same value on every rank)
    skips the step everywhere; raises TrainingDiverged after --max-skipped-steps skips in a row."""
    for c in run.chunks:
        c.train()
    sft = response_tokens(run, microbatches)  # SFT only: one all-reduce over DP, before the schedule
    run.optimizer.start_step(len(microbatches))
    step = forward_step(run, run.optimizer.loss_scale, None if sft is None else sft.weight)
    loss = forward_backward(run.chunks, microbatches, step, tensor_shape=run.tensor_shape, dtype=run.dtype,
                            device=run.device)
    loss_value = loss_everywhere(loss, run.device)
    stats = run.optimizer.step(loss_finite=math.isfinite(loss_value))
    stats["loss"] = loss_value
    if sft is not None:
        stats["response_tokens"] = sft.count()
        run.response_tokens += stats["response_tokens"]
    check_divergence(run, stats)
    return stats


def check_divergence(run: Run, stats: dict) -> None:
    """Stop the run (every rank takes the same decision: the counts follow all-reduced values)."""
    opt, limit = run.optimizer, run.train_cfg.max_skipped_steps
    if limit <= 0 or opt.hopeless_in_a_row < limit:
        return
    fp16 = " (fp16: at --min-loss-scale)" if opt.scaler is not None else ""
    raise TrainingDiverged(
        f"iteration {opt.iteration}: {opt.hopeless_in_a_row} consecutive steps skipped for a non-finite loss or "
        f"gradient norm{fp16} (--max-skipped-steps {limit}; last loss {stats['loss']:.4g}, grad norm "
        f"{stats['grad_norm']:.4g}); the weights are those of iteration {opt.iteration - opt.skipped_in_a_row} "
        f"and no checkpoint holds a non-finite value; lower --lr, or resume from an earlier checkpoint with --load")


def global_batches(dataset, consumed: int, run: Run):
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
