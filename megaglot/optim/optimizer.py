"""Mixed-precision AdamW over fp32 master weights, plain or distributed (ZeRO-1).

One step: wait for the DP reductions, all-reduce sequence-parallel gradients over TP, unscale
and check for inf/nan on every rank (fp16), clip by the global norm, step AdamW on the fp32
masters, copy them back into the (bf16/fp16/fp32) parameters, and with the distributed
optimizer all-gather the updated parameters over DP.

In every precision a step whose loss or global gradient norm is not finite is skipped on every
rank: the norm is reduced over the whole world (model parallel, plus data parallel for the
distributed optimizer's shards; the plain optimizer's gradients are already DP all-reduced), so a
nan or inf on any rank reaches every rank's norm and all of them take the same branch, with the
same collectives, without an extra all-reduce (as Megatron does).

The global norm counts every parameter once: TP-replicated parameters (norms, row biases) only
on TP rank 0, then sums over TP x PP; the distributed optimizer's shards also sum over DP.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megaglot.config import OptimizerConfig
from megaglot.optim.grad_buffer import GradBuffer
from megaglot.optim.grad_scaler import DynamicGradScaler
from megaglot.optim.schedule import LRSchedule
from megaglot.parallel import comm, state
from megaglot.parallel.layers import reduce_sequence_parallel_gradients


def _make_adamw(groups, cfg: OptimizerConfig, device_type: str):
    """apex FusedAdam on CUDA when installed, else torch's fused (CUDA) or foreach AdamW.

    The implementations keep Adam's step count in different places (torch: a `step` tensor per
    parameter; FusedAdam: `group["step"]`), so `Optimizer` counts steps itself and writes the
    count into both places on load (see `Optimizer._restore_step`)."""
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if device_type == "cuda":
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, lr=0.0, adam_w_mode=True, **kwargs)
        except Exception:
            return torch.optim.AdamW(groups, lr=0.0, fused=True, **kwargs)
    return torch.optim.AdamW(groups, lr=0.0, foreach=True, **kwargs)


class MasterPiece:
    """A (range of a) parameter with its fp32 master copy and the gradient view that feeds it."""

    def __init__(self, param, flat_start: int, flat_end: int, grad: torch.Tensor, share_param: bool):
        self.param, self.flat_start, self.flat_end = param, flat_start, flat_end
        whole = flat_start == 0 and flat_end == param.numel()
        if share_param and whole:
            self.master = param  # fp32 parameters are their own masters
        else:
            src = param.detach().reshape(-1)[flat_start:flat_end]
            self.master = torch.nn.Parameter(src.float().clone().view(param.shape if whole else (-1,)))
        self.grad = grad.view_as(self.master)  # fp32 view into the DP buffer

    @property
    def counts_for_norm(self) -> bool:
        """TP-replicated parameters are counted by TP rank 0 only."""
        return self.param.partition_dim is not None or state.get_tensor_parallel_rank() == 0


class Optimizer:
    def __init__(self, params: List[torch.nn.Parameter], grad_buffer: GradBuffer, cfg: OptimizerConfig,
                 schedule: LRSchedule, scaler: Optional[DynamicGradScaler] = None):
        self.cfg, self.schedule, self.scaler = cfg, schedule, scaler
        self.buffer = grad_buffer
        self.params = [p for p in params if p.requires_grad]
        self.distributed = cfg.use_distributed_optimizer
        if self.distributed:
            self.pieces = [MasterPiece(p, a, b, grad_buffer.data[off:off + (b - a)], share_param=False)
                           for p, a, b, off in grad_buffer.owned_pieces()]
        else:
            self.pieces = [MasterPiece(p, 0, p.numel(), p.main_grad, share_param=p.dtype == torch.float32)
                           for p in self.params]
        decay = [pc.master for pc in self.pieces if pc.param.dim() > 1]
        no_decay = [pc.master for pc in self.pieces if pc.param.dim() <= 1]
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        device_type = self.params[0].device.type if self.params else "cpu"
        self.adam = _make_adamw(groups, cfg, device_type)
        self.iteration = 0  # completed (not skipped) + skipped steps: the schedule's clock
        self.adam_steps = 0  # Adam updates taken: bias correction's t, whatever implementation runs
        self.num_skipped = 0  # every skipped step of the run (saved in checkpoints, in the log line)
        self.skipped_in_a_row = 0  # skipped steps since the last applied one
        self.hopeless_in_a_row = 0  # of those, the ones a lower loss scale cannot fix (see _note_skip)
        self.last_grad_norm = float("nan")

    # ---- one training step ---------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler is not None else 1.0

    def start_step(self, num_microbatches: int) -> None:
        # Detach the buffer views lent to Adam: autograd would otherwise accumulate into them.
        for pc in self.pieces:
            pc.master.grad = None
        for p in self.params:
            p.grad = None
        self.buffer.start_step(num_microbatches)

    def step(self, loss_finite: bool = True) -> Dict[str, float]:
        """Returns {'lr', 'grad_norm', 'loss_scale', 'skipped'}.

        Skipped, on every rank alike, when `loss_finite` is False (the caller passes the loss
        after its all-reduce, identical everywhere) or the global gradient norm is not finite:
        no parameter, master, Adam moment or Adam step count changes. The schedule's clock
        (`iteration`) still advances, as it always did for fp16 overflows."""
        self.buffer.finish()
        reduce_sequence_parallel_gradients(self.params)
        for pc in self.pieces:  # (re)attach: the accumulation hook clears param.grad
            pc.master.grad = pc.grad
        grads = [pc.grad for pc in self.pieces]
        scale = self.loss_scale
        if scale != 1.0 and grads:
            torch._foreach_mul_(grads, 1.0 / scale)
        overflow = False
        if self.scaler is not None:
            overflow = self._found_inf_anywhere(grads)
            self.scaler.update(overflow)
        lr = self.schedule.lr(self.iteration)
        self.iteration += 1
        grad_norm = float("nan") if overflow else self.global_grad_norm()
        if not (loss_finite and math.isfinite(grad_norm)):
            at_floor = self.scaler is None or scale <= self.scaler.min_scale
            self._note_skip(hopeless=not loss_finite or at_floor)
            return dict(lr=lr, grad_norm=grad_norm, loss_scale=scale, skipped=True)
        self.skipped_in_a_row = self.hopeless_in_a_row = 0
        self.last_grad_norm = grad_norm
        if self.cfg.clip_grad > 0 and grad_norm > self.cfg.clip_grad:
            torch._foreach_mul_(grads, self.cfg.clip_grad / (grad_norm + 1e-6))
        for group in self.adam.param_groups:
            group["lr"] = lr
        self.adam.step()
        self.adam_steps += 1
        self._copy_masters_to_params()
        return dict(lr=lr, grad_norm=grad_norm, loss_scale=scale, skipped=False)

    def _note_skip(self, hopeless: bool) -> None:
        """Count a skipped step. `hopeless`: lowering the loss scale cannot fix it, so it counts
        toward --max-skipped-steps: every skip in bf16/fp32; in fp16 a non-finite loss (the
        forward does not see the scale) or an overflow at --min-loss-scale. fp16 overflows above
        the floor are the scaler's normal back-off (16 in a row from the default 2^16 to 1)."""
        self.num_skipped += 1
        self.skipped_in_a_row += 1
        if hopeless:
            self.hopeless_in_a_row += 1

    def _found_inf_anywhere(self, grads) -> bool:
        flag = torch.zeros(1, dtype=torch.float32, device=self.buffer.data.device)
        for g in grads:
            if not torch.isfinite(g).all():
                flag.fill_(1.0)
                break
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank skips together
        return bool(flag.item())

    def global_grad_norm(self) -> float:
        """The L2 norm of every gradient of the model, the same float on every rank; nan or inf
        when any rank holds a non-finite gradient, including the TP-replicated ones it does not
        count (they add 0 * their norm: 0 when finite, nan otherwise)."""
        local = torch.zeros(1, dtype=torch.float32, device=self.buffer.data.device)
        counted = [pc.grad for pc in self.pieces if pc.counts_for_norm]
        if counted:
            local += torch.stack(torch._foreach_norm(counted, 2.0)).float().pow(2).sum()
        uncounted = [pc.grad for pc in self.pieces if not pc.counts_for_norm]
        if uncounted:
            local += torch.stack(torch._foreach_norm(uncounted, 2.0)).float().sum() * 0.0
        if dist.is_initialized() and state.is_initialized():
            dist.all_reduce(local, group=state.get_model_parallel_group())
            if self.distributed:
                dist.all_reduce(local, group=state.get_data_parallel_group())
        return float(local.sqrt().item())

    @torch.no_grad()
    def _copy_masters_to_params(self) -> None:
        for pc in self.pieces:
            if pc.master is pc.param:
                continue
            pc.param.view(-1)[pc.flat_start:pc.flat_end].copy_(pc.master.reshape(-1))
        if self.distributed and self.buffer.dp_size > 1:
            self._all_gather_params()

    def _all_gather_params(self) -> None:
        """Every DP rank updated its slice of each bucket; gather the buckets, bucket by bucket."""
        buf = self.buffer
        for bucket in buf.buckets:
            lo, hi = bucket.shard_range(buf.dp_rank, buf.dp_size)
            dtype = bucket.params[0].dtype
            mine = torch.zeros(hi - lo, dtype=dtype, device=buf.data.device)
            for p in bucket.params:
                start, end = buf.offsets[p]
                a, b = max(start, lo), min(end, hi)
                if a < b:
                    mine[a - lo:b - lo] = p.detach().view(-1)[a - start:b - start]
            full = comm.all_gather_dim0(mine, buf.dp_group)  # [bucket size]
            for p in bucket.params:
                start, end = buf.offsets[p]
                p.data.view(-1).copy_(full[start - bucket.start:end - bucket.start])

    # ---- checkpoint support ----------------------------------------------------------------
    def state_pieces(self):
        """(kind, piece, tensor) for the fp32 masters and both Adam moments of this rank."""
        for pc in self.pieces:
            adam_state = self.adam.state.get(pc.master, {})
            yield "master", pc, pc.master.detach()
            for kind in ("exp_avg", "exp_avg_sq"):
                t = adam_state.get(kind)
                yield kind, pc, (t if t is not None else torch.zeros_like(pc.master))

    def adam_step_count(self) -> int:
        """Counted here, not read from the implementation: FusedAdam keeps no per-parameter step."""
        return self.adam_steps

    @torch.no_grad()
    def load_state_pieces(self, fetch, step_count: int) -> None:
        """fetch(kind, piece) -> this rank's flat values of that piece (any saved layout)."""
        for pc in self.pieces:
            pc.master.copy_(fetch("master", pc).view_as(pc.master))
            st = self.adam.state[pc.master]
            for kind in ("exp_avg", "exp_avg_sq"):
                st[kind] = fetch(kind, pc).view_as(pc.master).to(pc.master.dtype).clone()
        self._restore_step(step_count)
        self._copy_masters_to_params()

    def _restore_step(self, step_count: int) -> None:
        """Put the step count where every implementation looks for it: torch's AdamW reads a
        per-parameter `step` tensor (on the device when fused or capturable), apex's FusedAdam
        `group["step"]`; each ignores the other, and a missed one restarts bias correction."""
        self.adam_steps = step_count
        on_device = bool(self.adam.defaults.get("fused") or self.adam.defaults.get("capturable"))
        for pc in self.pieces:
            self.adam.state[pc.master]["step"] = torch.tensor(
                float(step_count), dtype=torch.float32, device=pc.master.device if on_device else "cpu")
        for group in self.adam.param_groups:
            old = group.get("step")
            if isinstance(old, torch.Tensor):  # FusedAdam(capturable=True) keeps a device tensor
                old.fill_(step_count)
            else:
                group["step"] = step_count
