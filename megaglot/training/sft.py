"""Instruction tuning (--sft-data) in the trainer: the run's datasets and the response-token loss.

The loss of an SFT step is the mean per-token loss over the response tokens of the whole global
batch: sum(loss * mask) over every microbatch on every DP rank, divided by their total count. A mean
per microbatch (pretraining's, where every microbatch holds as many loss tokens) would give a token
of a short answer more weight than one of a long answer, and the result would change with the
micro-batch size and the DP size. The schedule divides each microbatch's loss by M and the gradient
reduction averages over D ranks, so each microbatch returns sum(loss * mask) * M * D / total; the
total is one all-reduce of this rank's count over DP per step (issued by every rank, in SFT runs only,
before the schedule starts: the same collectives in the same order everywhere). Pretraining is untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megaglot.config import ConfigError, ModelConfig, TrainConfig
from megaglot.data.sft_dataset import build_sft_datasets, open_sft, sft_prefixes
from megaglot.parallel import state


def is_sft(train_cfg: TrainConfig) -> bool:
    """True for an instruction-tuning run (--sft-data): loss on response tokens, globally averaged."""
    return bool(train_cfg.data.sft_data)


@dataclass
class ResponseTokens:
    """One step's (or one validation batch's) response-token count over the global batch."""

    weight: torch.Tensor
    """M * D / total (float32, on the run's device): what each microbatch's masked loss sum is scaled by."""
    total: torch.Tensor
    """Response tokens in the global batch (float64, on the run's device; read it after the step)."""

    def count(self) -> int:
        return int(self.total.item())


def response_tokens(run, microbatches: list) -> Optional[ResponseTokens]:
    """None outside SFT; else the global response-token count of these microbatches (this DP rank's
    share of one global batch) and the weight that makes the step's loss their global mean. Collective
    over DP; no host synchronisation (the count stays on the device until it is read)."""
    if not is_sft(run.train_cfg):
        return None
    local = sum(float(mb["loss_mask"].double().sum()) for mb in microbatches)
    total = torch.tensor([local], dtype=torch.float64, device=run.device)
    dist.all_reduce(total, group=state.get_data_parallel_group())
    scale = len(microbatches) * state.get_data_parallel_world_size()
    weight = (scale / total.clamp(min=1.0)).to(torch.float32).reshape(())
    return ResponseTokens(weight=weight, total=total)


def weighted_loss_sum(losses: torch.Tensor, loss_mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """This microbatch's share of the global response-token mean: sum(losses * mask) * weight."""
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() * weight.to(losses.dtype)


def build_sft_training_datasets(train_cfg: TrainConfig, model_cfg: ModelConfig, tokenizer=None, log=None) -> tuple:
    """(train, valid, test) SFT datasets of a --sft-data run: documents split by --split (validation
    on held-out samples), rows padded or packed (--pack-sequences), as many as the run reads.

    Checks first that both files exist (DatasetError naming the missing one) and that the token ids
    fit the model (collective: rank 0 checks, every rank raises the same error). `log(line)` gets
    one summary line (rank 0 passes print)."""
    from megaglot.training.data import check_data_fits_model

    data = train_cfg.data
    if not data.sft_data:
        raise ConfigError("--sft-data is required: the prefix tools/preprocess_sft.py wrote (P for "
                          "P_text_document and P_loss_mask_document)")
    open_sft(data.sft_data)
    text_prefix, _ = sft_prefixes(data.sft_data)
    check_data_fits_model([text_prefix], model_cfg, tokenizer, cache_dir=data.data_cache_dir, flag="--sft-data")
    gb = train_cfg.global_batch_size
    counts = (train_cfg.train_iters * gb, train_cfg.eval_iters * gb if train_cfg.eval_interval else 0, 0)
    datasets = build_sft_datasets(data.sft_data, train_cfg.seq_length, data.split, pack=data.pack_sequences,
                                  seed=train_cfg.seed, num_samples=counts)
    if datasets[0] is None:
        raise ConfigError(f"--sft-data {data.sft_data}: --split {data.split} leaves no training samples")
    if log is not None:
        log(describe(datasets, data.pack_sequences, train_cfg.seq_length))
    return datasets


def describe(datasets: tuple, pack: bool, seq_length: int) -> str:
    """One line: documents per split, rows per epoch, fill and truncation (what packing bought)."""
    train, valid, _ = datasets
    s = train.stats()
    form = f"packed {100 * s['fill']:.0f}% full" if pack else f"padded, {100 * s['fill']:.0f}% of positions used"
    held = f"{valid.stats()['documents']} held out for validation" if valid is not None else "no validation split"
    cut = f", {s['truncated']} truncated to {seq_length + 1} tokens" if s["truncated"] else ""
    return (f"SFT data {train.prefix}: {s['documents']} training samples in {s['samples_per_epoch']} rows of "
            f"{seq_length} per epoch ({form}{cut}); {held}")
