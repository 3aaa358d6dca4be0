"""GPT-NeoX split into pipeline chunks.

The model is built as this rank's list of chunks (one per virtual stage); the pipeline schedules
only call them. Chunk v of stage p holds global chunk g = v * pp + p, i.e. layers
[g * n, (g + 1) * n) with n = num_layers / (pp * vp). The first global chunk also embeds, the
last also applies the final norm, the output layer and the loss.

Every parameter records `global_name` (Hugging Face's GPT-NeoX name without the `gpt_neox.`
prefix), `global_shape` and `partition_dim`, which checkpoints and conversion rely on.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megaglot.config import ModelConfig
from megaglot.model.attention import PackedSequences, packed_attention
from megaglot.model.layernorm import LayerNorm
from megaglot.model.transformer import TransformerBlock
from megaglot.parallel import state
from megaglot.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaglot.parallel.layers import ColumnParallelLinear, VocabParallelEmbedding, seeded_normal_init
from megaglot.parallel.random import checkpoint, get_rng_tracker


def parameter_seed(seed: int, global_name: str) -> int:
    """A seed per parameter name: the same weights whatever layout or chunk holds the layer."""
    return (seed * 1_000_003 + zlib.crc32(global_name.encode())) % (2 ** 62)


def layers_of_chunk(num_layers: int, pp: int, vp: int, pp_rank: int, chunk: int) -> range:
    per_chunk = num_layers // (pp * vp)
    global_chunk = chunk * pp + pp_rank
    return range(global_chunk * per_chunk, (global_chunk + 1) * per_chunk)


class GPTChunk(nn.Module):
    """One pipeline chunk: `chunk(input_tensor, batch)`.

    input_tensor: `[s(/tp), b, h]` from the previous stage, ignored (None) on the first chunk,
    which embeds `batch['tokens']` `[b, s]`. The last chunk returns per-token losses `[b, s]`
    (float32) when the batch has `labels`, else the vocab-parallel logits `[s, b, V/tp]`;
    other chunks return hidden states `[s(/tp), b, h]` for the next stage.
    """

    def __init__(self, config: ModelConfig, layer_ids: range, *, pre_process: bool, post_process: bool,
                 seed: int = 1234, sequence_parallel: bool = False, recompute_granularity: Optional[str] = None,
                 params_dtype=torch.float32, device=None):
        super().__init__()
        if recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"--recompute-granularity must be 'full' or 'selective', got {recompute_granularity!r}")
        tp = state.get_tensor_parallel_world_size()
        self.config = config
        self.layer_ids = layer_ids
        self.pre_process, self.post_process = pre_process, post_process
        self.sequence_parallel = sequence_parallel and tp > 1
        self.recompute_full = recompute_granularity == "full"
        std = config.init_method_std

        def seeded(name, output_layer=False):
            scaled = std / (2.0 * config.num_layers) ** 0.5 if output_layer else std
            return seeded_normal_init(scaled, parameter_seed(seed, name))

        if pre_process:
            self.embed_in = VocabParallelEmbedding(
                config.padded_vocab_size, config.hidden_size, init_method=seeded("embed_in.weight"),
                sequence_parallel=self.sequence_parallel, params_dtype=params_dtype, device=device)
        self.layers = nn.ModuleList()
        for i in layer_ids:
            def layer_seed_init(name, output_layer=False, _i=i):
                return seeded(f"layers.{_i}.{name}", output_layer)

            self.layers.append(TransformerBlock(
                config, layer_seed_init=layer_seed_init, sequence_parallel=self.sequence_parallel,
                recompute_core=recompute_granularity == "selective", params_dtype=params_dtype, device=device))
        if post_process:
            self.final_layer_norm = LayerNorm(config.hidden_size, config.layernorm_epsilon,
                                              sequence_parallel=self.sequence_parallel,
                                              params_dtype=params_dtype, device=device)
            self.embed_out = ColumnParallelLinear(
                config.hidden_size, config.padded_vocab_size, bias=False, sequence_parallel=self.sequence_parallel,
                init_method=seeded("embed_out.weight"), params_dtype=params_dtype, device=device)
        self._name_parameters()

    def _name_parameters(self) -> None:
        offset = self.layer_ids.start
        for local_name, param in self.named_parameters():
            parts = local_name.split(".")
            if parts[0] == "layers":
                parts[1] = str(int(parts[1]) + offset)
            param.global_name = ".".join(parts)

    def forward(self, input_tensor: Optional[torch.Tensor], batch: dict) -> torch.Tensor:
        # Positions are 0..s-1 (GPT samples never reset them); `position_offset` is for generation.
        # `kv_cache` (attention.KVCache, inference only): positions start at its offset and every
        # layer appends its keys/values; the caller advances the cache after the pass.
        # `segment_ids` [b, s] (packed samples, with `position_ids` [b, s]): every layer rotates by the
        # per-token positions and attends only within a segment; every stage reads them from the batch.
        kv_cache = batch.get("kv_cache")
        default_offset = kv_cache.offset if kv_cache is not None else 0
        position_offset = int(batch.get("position_offset", default_offset))
        packed = self._packed(batch)
        if self.pre_process:
            hidden = self.embed_in(batch["tokens"].t())  # [s(/tp), b, h]
            p = self.config.hidden_dropout if self.training else 0.0
            if p > 0:
                with get_rng_tracker().fork() if self.sequence_parallel else contextlib.nullcontext():
                    hidden = F.dropout(hidden, p=p, training=True)
        else:
            if input_tensor is None:
                raise ValueError("a chunk that does not embed needs the previous stage's activations")
            hidden = input_tensor
        extra = () if packed is None else (None, packed)  # batches without segment_ids: today's calls
        for layer_id, layer in zip(self.layer_ids, self.layers):
            if kv_cache is not None:
                hidden = layer(hidden, position_offset, kv_cache.layer(layer_id))
            elif self.recompute_full and self.training:
                hidden = checkpoint(layer, hidden, position_offset, *extra)
            else:
                hidden = layer(hidden, position_offset, *extra)
        if not self.post_process:
            return hidden
        hidden = self.final_layer_norm(hidden)
        logits, _ = self.embed_out(hidden)  # [s, b, V/tp]
        labels = batch.get("labels")
        if labels is None:
            return logits
        losses = vocab_parallel_cross_entropy(logits, labels.t(), vocab_size=self.config.vocab_size)
        return losses.t()  # [b, s]

    @staticmethod
    def _packed(batch: dict) -> Optional[PackedSequences]:
        """The per-token positions and segment mask of a packed batch; None for an ordinary one."""
        segment_ids = batch.get("segment_ids")
        if segment_ids is None:
            return None
        if batch.get("kv_cache") is not None:
            raise ValueError("segment_ids (packed samples) cannot be combined with a kv_cache (generation)")
        position_ids = batch.get("position_ids")
        if position_ids is None:
            raise ValueError("a batch with segment_ids needs position_ids [b, s] too (positions restart per sample)")
        return packed_attention(position_ids, segment_ids)


def build_model_chunks(config: ModelConfig, *, seed: int = 1234, sequence_parallel: bool = False,
                       recompute_granularity: Optional[str] = None, params_dtype=torch.float32,
                       device=None) -> list[GPTChunk]:
    """This rank's chunks, from the pipeline layout held by megaglot.parallel.state."""
    pp, pp_rank = state.get_pipeline_parallel_world_size(), state.get_pipeline_parallel_rank()
    vp = (state.get_virtual_pipeline_world_size() if state.is_initialized() else None) or 1
    tp = state.get_tensor_parallel_world_size()
    from megaglot.config import ParallelConfig, check_pipeline_split

    ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp).validate(config)
    check_pipeline_split(config.num_layers, pp, vp)
    chunks = []
    for v in range(vp):
        chunks.append(GPTChunk(
            config, layers_of_chunk(config.num_layers, pp, vp, pp_rank, v),
            pre_process=(pp_rank == 0 and v == 0), post_process=(pp_rank == pp - 1 and v == vp - 1),
            seed=seed, sequence_parallel=sequence_parallel, recompute_granularity=recompute_granularity,
            params_dtype=params_dtype, device=device))
    return chunks


def masked_mean(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean of per-token losses `[b, s]` over the tokens the mask keeps."""
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)
