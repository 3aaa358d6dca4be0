"""Elementwise tails of the block fused into one kernel each on CUDA with torch.compile.

Megatron's jit-fused bias-GELU and bias-dropout-add, for dropout 0: the bias additions, the
activation and the residual sum would otherwise each be a pass over an `[s, b, h]` or `[s, b, 4h]`
tensor. Fused only in training on CUDA; at inference (fused=False), on CPU (tests, the demo), with
MEGAGLOT_NO_COMPILE=1 and after a compilation failure (warned once: a machine without a working
compiler toolchain still trains) they run eagerly, with the same operations in the same order.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F


def _residual_sum(x, attn, attn_bias, mlp, mlp_bias):
    # Hugging Face's order of additions: mlp + attn + x, each branch with its bias.
    return (mlp + mlp_bias) + (attn + attn_bias) + x


def _bias_gelu(y, bias):
    return F.gelu(y + bias)


def _bias_gelu_tanh(y, bias):
    return F.gelu(y + bias, approximate="tanh")


def _bias_relu(y, bias):
    return F.relu(y + bias)


_BIAS_ACTIVATIONS = {"gelu": _bias_gelu, "gelu_new": _bias_gelu_tanh, "gelu_fast": _bias_gelu_tanh,
                     "gelu_pytorch_tanh": _bias_gelu_tanh, "relu": _bias_relu}


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


@functools.lru_cache(maxsize=None)
def _compile_failed(reason: str) -> None:
    """Called (and so cached, which turns compilation off) once, with the first failure's reason."""
    warnings.warn(f"torch.compile of the fused elementwise ops failed ({reason[:300]}); running them eagerly",
                  RuntimeWarning, stacklevel=4)


def compiling_enabled() -> bool:
    return os.environ.get("MEGAGLOT_NO_COMPILE") != "1" and _compile_failed.cache_info().currsize == 0


def _call(fn, *tensors, fused: bool = True):
    if fused and tensors[0].is_cuda and compiling_enabled():
        try:
            return _compiled(fn)(*tensors)
        except Exception as error:  # noqa: BLE001 - any compiler failure falls back to eager
            _compile_failed(f"{type(error).__name__}: {error}")
    return fn(*tensors)


def residual_sum(x, attn, attn_bias, mlp, mlp_bias, *, fused: bool = True):
    """x + (attn + attn_bias) + (mlp + mlp_bias): the parallel residual with both row-parallel
    biases, one pass over three `[s, b, h]` tensors instead of four passes over two.

    fused=False (the model passes its `training` flag) keeps inference eager: generation changes
    the sequence length at every prompt, and each new shape would be compiled anew."""
    return _call(_residual_sum, x, attn, attn_bias, mlp, mlp_bias, fused=fused)


def bias_activation(y, bias, hidden_act: str, *, fused: bool = True):
    """act(y + bias) for the MLP's `[s, b, 4h/tp]` (Hugging Face's ACT2FN names). Fused, the forward
    is one pass and the backward computes the input gradient and the bias gradient in one kernel."""
    return _call(_BIAS_ACTIVATIONS[hidden_act], y, bias, fused=fused)


def compiled_functions() -> int:
    """How many fused functions were compiled in this process (0 on CPU)."""
    return _compiled.cache_info().currsize
