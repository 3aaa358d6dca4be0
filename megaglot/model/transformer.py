"""One GPT-NeoX block: LayerNorms, attention and MLP, with parallel or sequential residual."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from megaglot.config import ModelConfig
from megaglot.model.attention import SelfAttention
from megaglot.model.fusions import bias_activation, residual_sum
from megaglot.model.layernorm import LayerNorm
from megaglot.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megaglot.parallel.random import get_rng_tracker


def activation(name: str):
    """The function Hugging Face's `hidden_act` names (ACT2FN), so conversions are exact."""
    if name == "gelu":
        return F.gelu  # exact erf form
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported hidden_act {name!r}")


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, *, layer_seed_init, sequence_parallel, params_dtype, device):
        super().__init__()
        h, f = config.hidden_size, config.ffn_hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(
            h, f, skip_bias_add=True, sequence_parallel=sequence_parallel,
            init_method=layer_seed_init("mlp.dense_h_to_4h.weight"), params_dtype=params_dtype, device=device)
        self.dense_4h_to_h = RowParallelLinear(
            f, h, input_is_parallel=True, sequence_parallel=sequence_parallel, skip_bias_add=True,
            init_method=layer_seed_init("mlp.dense_4h_to_h.weight", output_layer=True),
            params_dtype=params_dtype, device=device)
        self.act = activation(config.hidden_act)
        self.hidden_act = config.hidden_act

    def forward(self, x):
        # x: [s(/tp), b, h] -> [s, b, f/tp] -> [s(/tp), b, h] (bias returned separately)
        inner, bias = self.dense_h_to_4h(x)
        inner = self.act(inner) if bias is None else bias_activation(inner, bias, self.hidden_act, fused=self.training)
        return self.dense_4h_to_h(inner)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, *, layer_seed_init, sequence_parallel: bool,
                 recompute_core: bool, params_dtype, device):
        super().__init__()
        self.config = config
        self.sequence_parallel = sequence_parallel
        ln = dict(eps=config.layernorm_epsilon, sequence_parallel=sequence_parallel,
                  params_dtype=params_dtype, device=device)
        self.input_layernorm = LayerNorm(config.hidden_size, **ln)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, **ln)
        self.attention = SelfAttention(config, layer_seed_init=layer_seed_init, sequence_parallel=sequence_parallel,
                                       recompute_core=recompute_core, params_dtype=params_dtype, device=device)
        self.mlp = MLP(config, layer_seed_init=layer_seed_init, sequence_parallel=sequence_parallel,
                       params_dtype=params_dtype, device=device)

    def _dropout(self, x, bias):
        x = x + bias if bias is not None else x
        p = self.config.hidden_dropout if self.training else 0.0
        if p == 0.0:
            return x
        # Under sequence parallel each TP rank holds a different slice: masks must differ.
        with get_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext():
            return F.dropout(x, p=p, training=True)

    def forward(self, x: torch.Tensor, position_offset: int = 0, kv_cache=None, packed=None) -> torch.Tensor:
        # x: [s(/tp), b, h]; kv_cache: this layer's inference cache (attention.LayerKVCache) or None;
        # packed: attention.PackedSequences of a batch of packed samples, or None
        if packed is not None:
            attn = self.attention(self.input_layernorm(x), position_offset, kv_cache, packed)
        elif kv_cache is not None:
            attn = self.attention(self.input_layernorm(x), position_offset, kv_cache)
        else:
            attn = self.attention(self.input_layernorm(x), position_offset)
        if self.config.use_parallel_residual:
            mlp = self.mlp(self.post_attention_layernorm(x))
            no_dropout = self.config.hidden_dropout == 0.0 or not self.training
            if no_dropout and attn[1] is not None and mlp[1] is not None:
                return residual_sum(x, attn[0], attn[1], mlp[0], mlp[1], fused=self.training)
            attn = self._dropout(*attn)
            return self._dropout(*mlp) + attn + x  # Hugging Face's order of additions
        attn = self._dropout(*attn)
        x = attn + x
        return self._dropout(*self.mlp(self.post_attention_layernorm(x))) + x
