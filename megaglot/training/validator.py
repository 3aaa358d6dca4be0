"""Validation: the loss on the same held-out batches every time, so successive values compare."""

from __future__ import annotations

import torch

from megaglot.training.metrics import Metrics
from megaglot.training.run import Run, global_batches, loss_everywhere, forward_step
from megaglot.training.sft import response_tokens
from megaglot.pipeline.schedules import forward_backward


@torch.no_grad()
def evaluate(run: Run, batches) -> float:
    """Mean forward-only loss over lists of this DP rank's microbatches (one list per global batch);
    in SFT runs each batch's loss is its global response-token mean, as in training."""
    for c in run.chunks:
        c.eval()
    losses = []
    for microbatches in batches:
        sft = response_tokens(run, microbatches)
        step = forward_step(run, 1.0, None if sft is None else sft.weight)
        loss = forward_backward(run.chunks, microbatches, step, tensor_shape=run.tensor_shape,
                                dtype=run.dtype, forward_only=True, device=run.device)
        losses.append(loss_everywhere(loss, run.device))
    return sum(losses) / max(1, len(losses))


class Validator:
    """Validates every --eval-interval iterations and at the last one; nothing when the interval is 0
    or there is no validation split."""

    def __init__(self, run: Run, valid_ds, metrics: Metrics):
        self.run, self.valid_ds, self.metrics = run, valid_ds, metrics
        self.losses: list = []

    @property
    def enabled(self) -> bool:
        return self.valid_ds is not None and bool(self.run.train_cfg.eval_interval)

    def maybe_validate(self, iteration: int) -> None:
        cfg = self.run.train_cfg
        if self.enabled and (iteration % cfg.eval_interval == 0 or iteration == cfg.train_iters):
            self.validate(iteration)

    def validate(self, iteration: int) -> float:
        batches = global_batches(self.valid_ds, 0, self.run)
        loss = evaluate(self.run, [b for _, b in zip(range(self.run.train_cfg.eval_iters), batches)])
        self.metrics.log_validation(loss, iteration)
        self.losses.append(loss)
        return loss
