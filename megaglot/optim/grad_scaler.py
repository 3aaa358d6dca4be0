"""Dynamic loss scaling for fp16: back off on overflow, grow after a run of clean steps."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class DynamicGradScaler:
    """Scale state; the optimizer asks it what to do after each step's inf/nan check."""

    scale: float = 2.0 ** 16
    """Current loss scale."""
    min_scale: float = 1.0
    """Never back off below this."""
    growth_factor: float = 2.0
    """Multiply by this after growth_interval clean steps."""
    backoff_factor: float = 0.5
    """Multiply by this on an overflow."""
    growth_interval: int = 1000
    """Clean steps between growths."""
    hysteresis: int = 1
    """Overflows before a back-off (1: every overflow lowers the scale; Megatron uses 2)."""
    clean_steps: int = 0
    """Clean steps since the last change."""
    hysteresis_left: int = 1
    """Overflows left before the next back-off."""

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.clean_steps = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
                self.hysteresis_left = self.hysteresis
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.clean_steps = 0
                self.hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by the loss scale (the reported loss stays unscaled)."""

    @staticmethod
    def forward(ctx, loss, scale):
        ctx.scale = scale
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_loss_gradient(loss: torch.Tensor, scale: float) -> torch.Tensor:
    return loss if scale == 1.0 else _ScaleGradient.apply(loss, scale)
