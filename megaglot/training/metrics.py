"""What a run reports: the log line (loss, throughput, TFLOP/s, MFU, memory) and TensorBoard scalars.

FLOPs and MFU follow docs/design.md (Narayanan et al., 2021). Lines print on rank 0; TensorBoard
is written by the last rank, which holds the last pipeline stage's loss first-hand.
"""

from __future__ import annotations

import math
import resource
from typing import Optional

import torch
import torch.distributed as dist

from megaglot.config import ModelConfig

H100_BF16_PEAK = 989e12  # datasheet dense BF16 FLOP/s of an H100 SXM (docs/design.md)


def model_flops_per_iteration(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Narayanan et al. (2021): 72 B s L h^2 (1 + s/(6h) + V/(12 L h)); recomputation not counted."""
    h, L, V = cfg.hidden_size, cfg.num_layers, cfg.padded_vocab_size
    return 72.0 * batch * seq * L * h * h * (1.0 + seq / (6.0 * h) + V / (12.0 * L * h))


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def log0(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


class Metrics:
    """The log line of each window of iterations and the TensorBoard scalars of the run."""

    def __init__(self, run):
        self.run = run
        self.writer = None
        if run.train_cfg.logging.tensorboard_dir and dist.get_rank() == dist.get_world_size() - 1:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(run.train_cfg.logging.tensorboard_dir)
        # Where the current log window starts (built after --load): SFT runs report response tokens/s.
        self._mark = (run.optimizer.iteration, run.response_tokens)

    def _response_tokens_per_s(self, iteration: int, seconds_per_iter: float) -> Optional[float]:
        """Response tokens trained on per second over the window just ended; None outside SFT."""
        if not self.run.train_cfg.data.sft_data:
            return None
        (start, tokens), self._mark = self._mark, (iteration, self.run.response_tokens)
        seconds = seconds_per_iter * max(iteration - start, 1)
        return (self.run.response_tokens - tokens) / seconds if seconds > 0 else 0.0

    def log_iteration(self, stats: dict, iteration: int, consumed: int, seconds_per_iter: float) -> None:
        """The log line (and scalars) for the window of iterations just ended."""
        run, cfg = self.run, self.run.train_cfg
        tokens_per_iter = cfg.global_batch_size * cfg.seq_length
        flops_per_iter = model_flops_per_iteration(run.model_cfg, cfg.global_batch_size, cfg.seq_length)
        tflops = flops_per_iter / seconds_per_iter / dist.get_world_size() / 1e12
        mfu = f"{100 * tflops * 1e12 / H100_BF16_PEAK:.1f}%" if run.device.type == "cuda" else "n/a (CPU)"
        memory = peak_memory_gb(run.device)
        opt = run.optimizer
        skipped = f"{opt.num_skipped}" + (f" ({opt.skipped_in_a_row} in a row)" if opt.skipped_in_a_row else "")
        response = self._response_tokens_per_s(iteration, seconds_per_iter)
        responses = "" if response is None else f"{response:.0f} response tokens/s | "
        log0(f"iter {iteration:6d}/{cfg.train_iters} | samples {consumed:9d} | loss {stats['loss']:.4f} | "
             f"lr {stats['lr']:.3e} | grad norm {stats['grad_norm']:.3f} | loss scale {stats['loss_scale']:.0f} | "
             f"skipped {skipped} | {1000 * seconds_per_iter:.1f} ms/iter | "
             f"{tokens_per_iter / seconds_per_iter:.0f} tokens/s | {responses}{tflops:.3f} TFLOP/s/GPU | MFU {mfu} | "
             f"peak mem {memory:.2f} GB")
        extra = {} if response is None else {"response_tokens_per_s": response}
        self._scalars(iteration, {**{key: stats[key] for key in ("loss", "lr", "grad_norm", "loss_scale")},
                                  "ms_per_iter": 1000 * seconds_per_iter,
                                  "tokens_per_s": tokens_per_iter / seconds_per_iter, "tflops_per_gpu": tflops,
                                  "skipped_steps": run.optimizer.num_skipped, "consumed_samples": consumed,
                                  "peak_memory_gb": memory, **extra}, "train")

    def log_validation(self, loss: float, iteration: int) -> None:
        ppl = math.exp(min(loss, 50))
        log0(f"validation at iter {iteration}: loss {loss:.4f} | perplexity {ppl:.2f}")
        self._scalars(iteration, {"loss": loss, "ppl": ppl}, "valid")

    def _scalars(self, iteration: int, values: dict, section: str) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{section}/{key}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer: Optional[object] = None
