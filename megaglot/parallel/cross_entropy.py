"""Cross entropy over logits split along the vocabulary, without ever gathering them.

Gathering `[s, b, V]` logits would cost s*b*V floats per rank (Polyglot-Ko: 30080 columns);
instead three all-reduces of `[s, b]` tensors (max, target logit, sum of exponentials) give the
exact softmax statistics. Padded vocabulary columns (ids >= the real vocabulary) are masked to
-inf so they never receive probability, whatever their logits.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megaglot.parallel import state


def _all_reduce(x: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_size, label_smoothing, ignore_index, group):
        # logits: [s, b, V/tp] (any leading dims), labels: [s, b]
        tp = 1 if group is None else dist.get_world_size(group)
        rank = 0 if group is None else dist.get_rank(group)
        per_partition = logits.shape[-1]
        vocab_start = rank * per_partition
        own_copy = logits.dtype != torch.float32  # .float() of bf16/fp16 logits is a new tensor
        logits = logits.float()

        # Padded columns are not part of the vocabulary: they must get exactly zero probability.
        # Whether this rank holds any is known on the host (no device sync); on our own fp32 copy
        # they are overwritten in place instead of copying the logits once more.
        column_ids = torch.arange(vocab_start, vocab_start + per_partition, device=logits.device)
        padded_columns = column_ids >= vocab_size
        if vocab_start + per_partition > vocab_size:
            first_padded = max(vocab_size - vocab_start, 0)
            if own_copy:
                logits[..., first_padded:] = float("-inf")
            else:
                logits = logits.masked_fill(padded_columns, float("-inf"))

        logits_max = logits.max(dim=-1).values
        _all_reduce(logits_max, dist.ReduceOp.MAX, group)
        shifted = logits - logits_max.unsqueeze(-1)  # [s, b, V/tp], <= 0

        ignored = labels == ignore_index
        local_labels = labels - vocab_start
        outside = (local_labels < 0) | (local_labels >= per_partition) | ignored
        local_labels = local_labels.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(outside, 0.0)
        _all_reduce(target_logit, dist.ReduceOp.SUM, group)

        exp_logits = shifted.exp()  # padded columns: exp(-inf) = 0
        sum_exp = exp_logits.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - target_logit  # [s, b]

        if label_smoothing > 0.0:
            # Smoothed target: (1 - eps) on the label + eps/V uniformly over the real vocabulary.
            log_probs = shifted - log_sum_exp.unsqueeze(-1)
            mean_log_prob = log_probs.masked_fill(padded_columns, 0.0).sum(dim=-1)
            _all_reduce(mean_log_prob, dist.ReduceOp.SUM, group)
            mean_log_prob = mean_log_prob / vocab_size
            loss = (1.0 - label_smoothing) * loss - label_smoothing * mean_log_prob
        loss = loss.masked_fill(ignored, 0.0)

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_labels, outside, ignored, padded_columns)
        ctx.label_smoothing, ctx.vocab_size, ctx.tp = label_smoothing, vocab_size, tp
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_labels, outside, ignored, padded_columns = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = softmax  # reuse the buffer: d loss / d logits = softmax - target
        on_target = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_labels.unsqueeze(-1), -(1.0 - eps) * on_target.unsqueeze(-1))
        if eps > 0.0:
            grad.sub_((eps / ctx.vocab_size) * (~padded_columns).to(grad.dtype))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: Optional[int] = None,
                                 label_smoothing: float = 0.0, ignore_index: int = -100,
                                 group=None) -> torch.Tensor:
    """Per-token losses `[s, b]` (float32) from vocab-split logits `[s, b, V/tp]`.

    `vocab_size` is the real (unpadded) vocabulary; columns at or past it are never predicted.
    Tokens labelled `ignore_index` get loss 0 and no gradient; apply a loss mask to the result.
    """
    if group is None and state.is_initialized() and state.get_tensor_parallel_world_size() > 1:
        group = state.get_tensor_parallel_group()
    tp = 1 if group is None else dist.get_world_size(group)
    padded = logits.shape[-1] * tp
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size {vocab_size} must be in (0, {padded}] (the padded vocabulary)")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return _VocabParallelCrossEntropy.apply(logits, labels, vocab_size, label_smoothing, ignore_index, group)
