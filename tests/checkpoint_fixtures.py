"""Checkpoint fixtures for the tests: a random checkpoint of any model config at any layout.

Lives with the tests, not in megaglot: it writes what training at a layout would save without
training (or spawning ranks), through the same part names, piece plan (`reshard.position_parts`)
and layout record (`format.layout_record`) that the library writes with, so a test reads it like a
real checkpoint.
"""

from __future__ import annotations

import os

import torch

from megaglot.checkpoint.format import MODEL, OPTIMIZER_KINDS, layout_record, publish, staging_dir, write_metadata
from megaglot.checkpoint.reshard import position_parts
from megaglot.checkpoint.streaming import StreamingPart, parameter_specs, stage_names
from megaglot.config import ModelConfig, ParallelConfig


def write_random_checkpoint(root: str, cfg: ModelConfig, tp: int, pp: int, *, layers_per_virtual_stage=None,
                            dp: int = 1, optimizer: bool = True, distributed: bool = False,
                            dtype: torch.dtype = torch.float32, iteration: int = 1, seed: int = 0) -> str:
    """A checkpoint of `cfg`'s shapes filled with random values, laid out as training at TP/PP/DP
    saves it (model pieces; optimizer pieces in fp32, split over DP ranks when `distributed`),
    written part by part without holding a part in memory. Returns the published directory."""
    ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                   num_layers_per_virtual_pipeline_stage=layers_per_virtual_stage).validate(cfg)
    vp = cfg.num_layers // (pp * layers_per_virtual_stage) if layers_per_virtual_stage else 1
    specs = parameter_specs(cfg)
    generator = torch.Generator().manual_seed(seed)
    kinds = [MODEL] + (list(OPTIMIZER_KINDS) if optimizer else [])
    dtypes = {(k, n): (dtype if k == MODEL else torch.float32) for n in specs for k in kinds}
    staged = staging_dir(root, iteration)
    os.makedirs(staged, exist_ok=True)
    for pp_rank in range(pp):
        names = stage_names(specs, cfg.num_layers, pp, vp, pp_rank)
        for tp_rank in range(tp):
            parts = position_parts(names, specs, dtypes, kinds, tp, tp_rank, pp_rank, dp if distributed else 1)
            for part, entries in parts.items():
                writer = StreamingPart(staged, part, entries)
                for e in entries:
                    values = torch.randn(e["end"] - e["start"], generator=generator).to(e["dtype"])
                    if e["kind"] == "exp_avg_sq":
                        values = values.abs_()
                    writer.write(e["kind"], e["name"], values)
                writer.close()
    write_metadata(staged, iteration=iteration, consumed_samples=iteration * 8, model=cfg.to_dict(),
                   parallel=layout_record(tp, pp, vp if vp > 1 else None, dp),
                   scheduler={"iteration": iteration} if optimizer else None, grad_scaler=None,
                   optimizer=dict(step=iteration, num_skipped=0, iteration=iteration, distributed=distributed)
                   if optimizer else None)
    return publish(root, iteration)
