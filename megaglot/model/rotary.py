"""Rotary position embedding (GPT-NeoX rotate-half) on the first `rotary_ndims` of each head.

cos/sin are computed as Hugging Face's GPT-NeoX computes them (float32 frequencies from int64
arange), so megaglot and transformers agree to round-off.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def rotary_cos_sin(seq_len: int, rotary_ndims: int, base: float, device, dtype=torch.float32):
    """(cos, sin), each `[seq_len, rotary_ndims]`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_ndims, 2, dtype=torch.int64, device=device).float()
                               / rotary_ndims))
    positions = torch.arange(seq_len, device=device, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t: `[s, b, np, hn]`; cos/sin broadcastable to `[s, b, 1, rotary_ndims]`."""
    rotary_ndims = cos.shape[-1]
    t_rot, t_pass = t[..., :rotary_ndims], t[..., rotary_ndims:]
    t_rot = t_rot * cos + rotate_half(t_rot) * sin
    return torch.cat((t_rot, t_pass), dim=-1)
