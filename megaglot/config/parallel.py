"""The parallel layout: `ParallelConfig` and the layout rules, each checked in exactly one function.

`check_world_size` (TP x PP divides the world), `check_pipeline_split` (the layers split evenly over
pipeline x virtual stages) and `check_vocab_divisible` are the only places these rules live; the
model builder, the loaders and the tools call them instead of repeating the arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megaglot.config.model import ConfigError, ModelConfig


@dataclass
class ParallelConfig:
    """How the model and the batch are split over the world: TP x PP x DP (+ virtual stages).

    The data-parallel size is not a setting: it is world size / (TP x PP), see `data_parallel_size_for`.
    """

    tensor_model_parallel_size: int = 1
    """Ranks that split every layer (heads, FFN, vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Ranks that split the layer stack into stages."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers per model chunk for interleaved 1F1B; None = one chunk per stage."""
    sequence_parallel: bool = False
    """Split LayerNorm/dropout activations along the sequence over TP (no effect at TP 1)."""

    def virtual_pipeline_size(self, num_layers: int) -> Optional[int]:
        k = self.num_layers_per_virtual_pipeline_stage
        if k is None:
            return None
        return num_layers // (self.pipeline_model_parallel_size * k)

    def data_parallel_size_for(self, world_size: int) -> int:
        """world_size / (TP x PP); a ConfigError naming the flags when it does not divide."""
        return check_world_size(world_size, self.tensor_model_parallel_size, self.pipeline_model_parallel_size)

    def validate(self, model: ModelConfig, world_size: Optional[int] = None) -> None:
        """Raise a ConfigError naming the flag when this layout cannot hold `model` (on `world_size` ranks)."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        for flag, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
            if v <= 0:
                raise ConfigError(f"{flag} must be positive, got {v}")
        if world_size is not None:
            check_world_size(world_size, tp, pp)
        if model.num_attention_heads % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads "
                f"{model.num_attention_heads}")
        if model.ffn_hidden_size % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} does not divide --ffn-hidden-size {model.ffn_hidden_size}")
        check_vocab_divisible(model, tp)
        k = self.num_layers_per_virtual_pipeline_stage
        if k is None:
            check_pipeline_split(model.num_layers, pp, None)
            return
        if pp == 1:
            raise ConfigError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
        if k <= 0 or model.num_layers % (pp * k):
            raise ConfigError(
                f"--num-layers {model.num_layers} is not divisible by --pipeline-model-parallel-size "
                f"x --num-layers-per-virtual-pipeline-stage = {pp} x {k}")


def check_world_size(world_size: int, tp: int, pp: int) -> int:
    """The data-parallel size world_size / (TP x PP), or a ConfigError that says how to fix the launch."""
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by TP x PP = {tp} x {pp} = {tp * pp} "
                          f"(--tensor-model-parallel-size {tp}, --pipeline-model-parallel-size {pp}); start a "
                          f"multiple of {tp * pp} processes (torchrun --nproc_per_node x --nnodes) or choose "
                          f"sizes whose product divides {world_size} (one of "
                          f"{[d for d in range(1, world_size + 1) if world_size % d == 0]})")
    return world_size // (tp * pp)


def check_pipeline_split(num_layers: int, pp: int, vp: Optional[int]) -> None:
    """The layer stack must split evenly into pp x vp chunks (vp None or 1: one chunk per stage)."""
    v = vp or 1
    if v == 1 and num_layers % pp:
        raise ConfigError(f"--pipeline-model-parallel-size {pp} does not divide --num-layers {num_layers}")
    if num_layers % (pp * v):
        raise ConfigError(f"--num-layers {num_layers} is not divisible by pipeline x virtual size = "
                          f"{pp} x {v} = {pp * v}")


def check_vocab_divisible(model: ModelConfig, tp: int) -> None:
    padded = model.padded_vocab_size
    if padded % tp:
        working = model.make_vocab_size_divisible_by * tp // math.gcd(model.make_vocab_size_divisible_by, tp)
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} does not divide the padded vocabulary {padded} "
            f"(vocab {model.vocab_size} padded to a multiple of {model.make_vocab_size_divisible_by}); "
            f"set --make-vocab-size-divisible-by {working}")
