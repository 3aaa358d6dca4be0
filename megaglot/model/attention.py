"""Causal self-attention with a fused QKV column-parallel projection and rotary embedding.

The QKV weight keeps Hugging Face's per-head `[q, k, v]` row order, so splitting its rows over
TP hands each rank whole heads and converting a checkpoint is a reshape, never a shuffle.
Backends: `torch` (the plain reference, eager rotary), `sdpa` (torch's scaled_dot_product_attention)
and `fused` (megaglot's causal softmax kernel); the last two rotate q and k with the fused rotary
kernel. All compute the same thing to round-off.

Packed sequences (several samples per row): `packed_attention(position_ids, segment_ids)` gives a
`PackedSequences` that the chunk hands to every layer: rotary then rotates each token by its own
position, and token j attends to token i only if i <= j and both are in the same segment. `sdpa`
passes that boolean mask to scaled_dot_product_attention; `torch` and `fused` use the explicit
masked softmax (the fused kernel knows only the plain causal mask). Without it nothing changes.

Inference: `KVCache` keeps every layer's keys and values for generation; with one, a forward pass
over s new tokens attends to the cached positions plus its own (`cached_attention`).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

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

    def forward(self, q, k, v, mask: Optional[torch.Tensor] = None):
        """mask: None (causal) or a boolean `[b, 1, s, s]`, True where a query may see a key."""
        s, b, np_, hn = q.shape
        dropout = self.dropout if self.training else 0.0
        if self.backend == "sdpa":
            qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, np, s, hn]
            masking = dict(is_causal=True) if mask is None else dict(attn_mask=mask)
            with get_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
                ctx = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout, scale=self.scale, **masking)
            return ctx.permute(2, 0, 1, 3).reshape(s, b, np_ * hn)
        # [b*np, s, hn] batches for bmm
        qb = q.permute(1, 2, 0, 3).reshape(b * np_, s, hn)
        kb = k.permute(1, 2, 0, 3).reshape(b * np_, s, hn)
        vb = v.permute(1, 2, 0, 3).reshape(b * np_, s, hn)
        if self.backend == "fused" and mask is None:
            probs = scaled_upper_triang_masked_softmax(torch.bmm(qb, kb.transpose(1, 2)), self.scale)
        else:
            scores = torch.bmm(qb, kb.transpose(1, 2)) * self.scale  # [b*np, s, s]
            if mask is None:
                causal = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, torch.finfo(scores.dtype).min)
            else:
                scores = scores.view(b, np_, s, s).masked_fill(~mask, torch.finfo(scores.dtype).min)
                scores = scores.view(b * np_, s, s)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        if dropout > 0:
            with get_rng_tracker().fork():  # heads differ per TP rank: so do their masks
                probs = F.dropout(probs, p=dropout, training=True)
        ctx = torch.bmm(probs, vb)  # [b*np, s, hn]
        return ctx.view(b, np_, s, hn).permute(2, 0, 1, 3).reshape(s, b, np_ * hn)


class PackedSequences(NamedTuple):
    """Per-token positions `[b, s]` and the segment mask `[b, 1, s, s]` of a packed batch."""

    position_ids: torch.Tensor
    mask: torch.Tensor


def packed_attention(position_ids: torch.Tensor, segment_ids: torch.Tensor) -> PackedSequences:
    """The attention inputs of rows that hold several samples (full length `[b, s]`, also under SP).

    Token j sees token i when i <= j and segment_ids[i] == segment_ids[j]: every sample attends only
    to itself, exactly as if it ran alone (padding, with its own segment id, sees only padding).
    """
    if position_ids.shape != segment_ids.shape or position_ids.dim() != 2:
        raise ValueError(f"position_ids {tuple(position_ids.shape)} and segment_ids {tuple(segment_ids.shape)} "
                         f"must both be [b, s]")
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s (query), s (key)]
    return PackedSequences(position_ids.long(), (same & causal).unsqueeze(1))


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

    def forward(self, x: torch.Tensor, position_offset: int = 0, kv_cache: "LayerKVCache" = None,
                packed: Optional[PackedSequences] = None):
        """x: `[s(/tp), b, h]`; tokens sit at positions position_offset .. position_offset + s - 1.

        kv_cache: inference only; the new keys/values are appended and attention covers the cache.
        packed: per-token positions and the segment mask of packed samples (then position_offset is unused)."""
        qkv, _ = self.query_key_value(x)  # [s, b, np/tp * 3 * hn]
        s, b = qkv.shape[0], qkv.shape[1]
        qkv = qkv.view(s, b, self.heads_per_rank, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each [s, b, np/tp, hn]
        if self.config.rotary_ndims > 0:
            q, k = self._rotary(q, k, position_offset) if packed is None else \
                self._rotary_per_token(q, k, packed.position_ids)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
            ctx = cached_attention(q, k, v, kv_cache.offset, self.core.scale)
        elif self.recompute_core and self.training:
            ctx = checkpoint(self.core, q, k, v) if packed is None else checkpoint(self.core, q, k, v, packed.mask)
        else:
            ctx = self.core(q, k, v) if packed is None else self.core(q, k, v, packed.mask)  # [s, b, h/tp]
        out, bias = self.dense(ctx)  # [s(/tp), b, h], bias added by the caller after dropout
        return out, bias

    def _rotate(self, q, k, cos, sin):
        if self.config.attention_backend != "torch":  # the fused kernel: one pass over q and k
            return fused_rotary(q, k, cos, sin)
        return apply_rotary_torch(q, cos, sin), apply_rotary_torch(k, cos, sin)

    def _rotary(self, q, k, position_offset: int):
        s, rd = q.shape[0], self.config.rotary_ndims
        length = max(position_offset + s, self.config.max_position_embeddings)  # one cached table
        cos, sin = rotary_cos_sin(length, rd, self.config.rotary_base, q.device)
        return self._rotate(q, k, cos[position_offset:position_offset + s], sin[position_offset:position_offset + s])

    def _rotary_per_token(self, q, k, position_ids: torch.Tensor):
        """Rotary at positions `[b, s]`: the rotary ops take one table row per leading index, so
        `[s, b, np, hn]` is viewed as `[s*b, 1, np, hn]` with the rows gathered in that order."""
        s, b, np_, hn = q.shape
        if tuple(position_ids.shape) != (b, s):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected [b, s] = [{b}, {s}] "
                             f"(full length, also under sequence parallel)")
        length = max(s, self.config.max_position_embeddings)  # packed positions restart, so stay below s
        cos, sin = rotary_cos_sin(length, self.config.rotary_ndims, self.config.rotary_base, q.device)
        rows = position_ids.t().reshape(-1).to(q.device)  # [s*b], s-major like q
        q, k = self._rotate(q.reshape(s * b, 1, np_, hn), k.reshape(s * b, 1, np_, hn), cos[rows], sin[rows])
        return q.view(s, b, np_, hn), k.view(s, b, np_, hn)
