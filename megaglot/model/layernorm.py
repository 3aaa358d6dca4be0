"""LayerNorm that uses apex's fused kernel on CUDA when apex is installed, torch's otherwise.

apex is not on the package registry, so it is only ever detected, never required.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.lru_cache(maxsize=None)
def apex_fused_layer_norm():
    """apex's fused_layer_norm_affine, or None when apex (with its CUDA extension) is absent."""
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine

        return fused_layer_norm_affine
    except Exception:  # ImportError, or an apex built without its extensions
        return None


class LayerNorm(nn.Module):
    """`sequence_parallel`: the input is a sequence slice per TP rank, so the (replicated)
    weight and bias gradients are partial and get all-reduced over TP before the step."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, *, sequence_parallel: bool = False,
                 params_dtype=torch.float32, device=None):
        super().__init__()
        self.hidden_size, self.eps = hidden_size, eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=params_dtype, device=device))
        for p in (self.weight, self.bias):
            p.partition_dim, p.global_shape, p.sequence_parallel = None, (hidden_size,), sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = apex_fused_layer_norm() if x.is_cuda else None
        if fused is not None:
            return fused(x, self.weight, self.bias, (self.hidden_size,), self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
