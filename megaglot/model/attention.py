"""Causal self-attention with a fused QKV column-parallel projection and rotary embedding.

The QKV weight keeps Hugging Face's per-head `[q, k, v]` row order, so splitting its rows over
TP hands each rank whole heads and converting a checkpoint is a reshape, never a shuffle.
Backends: `torch` (the plain reference, eager rotary), `sdpa` (torch's scaled_dot_product_attention)
and `fused` (megaglot's causal softmax kernel); the last two rotate q and k with the fused rotary
kernel. All compute the same thing to round-off.

Inference: `KVCache` keeps every layer's keys and values for generation; with one, a forward pass
over s new tokens attends to the cached positions plus its own (`cached_attention`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from megaglot.config import ModelConfig
from megaglot.kernels.rotary import apply_rotary_torch, fused_rotary, rotary_cos_sin
from megaglot.kernels.softmax import scaled_upper_triang_masked_softmax
from megaglot.parallel import state
from megaglot.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megaglot.parallel.random import checkpoint, get_rng_tracker


class CoreAttention(nn.Module):
    """softmax(q k^T / sqrt(hn)) v over this rank's heads; q, k, v: `[s, b, np, hn]` -> `[s, b, np*hn]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.backend = config.attention_backend
        self.dropout = config.attention_dropout
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def forward(self, q, k, v):
        s, b, np_, hn = q.shape
        dropout = self.dropout if self.training else 0.0
        if self.backend == "sdpa":
            qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, np, s, hn]
            with get_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
                ctx = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout, is_causal=True, scale=self.scale)
            return ctx.permute(2, 0, 1, 3).reshape(s, b, np_ * hn)
        # [b*np, s, hn] batches for bmm
        qb = q.permute(1, 2, 0, 3).reshape(b * np_, s, hn)
        kb = k.permute(1, 2, 0, 3).reshape(b * np_, s, hn)
        vb = v.permute(1, 2, 0, 3).reshape(b * np_, s, hn)
        if self.backend == "fused":
            probs = scaled_upper_triang_masked_softmax(torch.bmm(qb, kb.transpose(1, 2)), self.scale)
        else:
            scores = torch.bmm(qb, kb.transpose(1, 2)) * self.scale  # [b*np, s, s]
            causal = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if dropout > 0:
            with get_rng_tracker().fork():  # heads differ per TP rank: so do their masks
                probs = F.dropout(probs, p=dropout, training=True)
        ctx = torch.bmm(probs, vb)  # [b*np, s, hn]
        return ctx.view(b, np_, s, hn).permute(2, 0, 1, 3).reshape(s, b, np_ * hn)


class KVCache:
    """Keys and values of the positions seen so far, per layer: `[max_length, b, np/tp, hn]` each.

    Pass it as `batch['kv_cache']`: the chunk's layers append the new tokens' keys and values at
    `offset` (which is also their rotary position), and the caller calls `advance(s)` after the
    forward pass of s tokens. Buffers are allocated on first use with the keys' dtype and device.
    """

    def __init__(self, max_length: int):
        self.max_length = int(max_length)
        self.offset = 0
        self._buffers = {}

    def layer(self, layer_id: int) -> "LayerKVCache":
        return LayerKVCache(self, layer_id)

    def advance(self, tokens: int) -> None:
        self.offset += int(tokens)

    def reset(self) -> None:
        self.offset = 0

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor):
        s = k.shape[0]
        end = self.offset + s
        if end > self.max_length:
            raise ValueError(f"KV cache of {self.max_length} positions cannot hold {end}")
        buffers = self._buffers.get(layer_id)
        if buffers is None or buffers[0].shape[1:] != k.shape[1:] or buffers[0].dtype != k.dtype:
            shape = (self.max_length,) + tuple(k.shape[1:])
            buffers = (torch.zeros(shape, dtype=k.dtype, device=k.device),
                       torch.zeros(shape, dtype=v.dtype, device=v.device))
            self._buffers[layer_id] = buffers
        kb, vb = buffers
        kb[self.offset:end] = k
        vb[self.offset:end] = v
        return kb[:end], vb[:end]


class LayerKVCache:
    """One layer's view of a KVCache (what SelfAttention receives)."""

    def __init__(self, cache: KVCache, layer_id: int):
        self.cache, self.layer_id = cache, layer_id

    @property
    def offset(self) -> int:
        return self.cache.offset

    def update(self, k, v):
        return self.cache.update(self.layer_id, k, v)


def cached_attention(q, k, v, offset: int, scale: float):
    """q: `[sq, b, np, hn]` at positions offset..offset+sq-1; k, v: `[offset+sq, b, np, hn]`.

    Query i sees keys 0..offset+i (causal, aligned at the bottom right). Softmax in float32.
    """
    sq, b, np_, hn = q.shape
    sk = k.shape[0]
    qb = q.permute(1, 2, 0, 3).reshape(b * np_, sq, hn)
    kb = k.permute(1, 2, 0, 3).reshape(b * np_, sk, hn)
    vb = v.permute(1, 2, 0, 3).reshape(b * np_, sk, hn)
    scores = torch.bmm(qb, kb.transpose(1, 2)).float() * scale  # [b*np, sq, sk]
    rows = torch.arange(sq, device=q.device).unsqueeze(1) + offset
    cols = torch.arange(sk, device=q.device).unsqueeze(0)
    scores = scores.masked_fill(cols > rows, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    ctx = torch.bmm(probs, vb)  # [b*np, sq, hn]
    return ctx.view(b, np_, sq, hn).permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, *, layer_seed_init, sequence_parallel: bool,
                 recompute_core: bool, params_dtype, device):
        super().__init__()
        tp = state.get_tensor_parallel_world_size()
        self.config = config
        self.heads_per_rank = config.num_attention_heads // tp
        self.head_dim = config.head_dim
        self.recompute_core = recompute_core
        h = config.hidden_size
        self.query_key_value = ColumnParallelLinear(
            h, 3 * h, sequence_parallel=sequence_parallel, init_method=layer_seed_init("attention.query_key_value.weight"),
            params_dtype=params_dtype, device=device)
        self.dense = RowParallelLinear(
            h, h, input_is_parallel=True, sequence_parallel=sequence_parallel, skip_bias_add=True,
            init_method=layer_seed_init("attention.dense.weight", output_layer=True),
            params_dtype=params_dtype, device=device)
        self.core = CoreAttention(config)

    def forward(self, x: torch.Tensor, position_offset: int = 0, kv_cache: "LayerKVCache" = None):
        """x: `[s(/tp), b, h]`; tokens sit at positions position_offset .. position_offset + s - 1.

        kv_cache: inference only; the new keys/values are appended and attention covers the cache."""
        qkv, _ = self.query_key_value(x)  # [s, b, np/tp * 3 * hn]
        s, b = qkv.shape[0], qkv.shape[1]
        qkv = qkv.view(s, b, self.heads_per_rank, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [s, b, np/tp, hn]
        rd = self.config.rotary_ndims
        if rd > 0:
            length = max(position_offset + s, self.config.max_position_embeddings)  # one cached table
            cos, sin = rotary_cos_sin(length, rd, self.config.rotary_base, q.device)
            cos, sin = cos[position_offset:position_offset + s], sin[position_offset:position_offset + s]
            if self.config.attention_backend != "torch":  # the fused kernel: one pass over q and k
                q, k = fused_rotary(q, k, cos, sin)
            else:
                q, k = apply_rotary_torch(q, cos, sin), apply_rotary_torch(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
            ctx = cached_attention(q, k, v, kv_cache.offset, self.core.scale)
        elif self.recompute_core and self.training:
            ctx = checkpoint(self.core, q, k, v)
        else:
            ctx = self.core(q, k, v)  # [s, b, h/tp]
        out, bias = self.dense(ctx)  # [s(/tp), b, h], bias added by the caller after dropout
        return out, bias
