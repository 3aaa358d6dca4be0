"""A model for inference: a megaglot checkpoint (any saved layout) or a Hugging Face GPT-NeoX
directory, loaded at this run's TP/PP layout, plus where its tokenizer is."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megaglot.config import (DTYPES, ConfigError, ModelConfig, ParallelConfig, check_pipeline_split,
                             check_world_size)
from megaglot.model import build_model_chunks
from megaglot.parallel import state


class EvalError(ValueError):
    """Bad input to evaluation or generation; the message names the flag or file."""


@dataclass
class InferenceModel:
    chunks: list
    cfg: ModelConfig
    device: torch.device
    dtype: torch.dtype
    tokenizer_path: Optional[str]
    source: str
    tokenizer_recorded: Optional[str] = None
    """The tokenizer metadata.json names (for the error when it cannot be found)."""


def init_parallel(tp: int = 1, pp: int = 1, vp: Optional[int] = None) -> None:
    """megaglot's process groups over the current torch.distributed world (TP x PP x DP)."""
    if state.is_initialized():
        s = state.get_state()
        if (s.tp_size, s.pp_size) != (tp, pp):
            raise EvalError(f"process groups already set up at TP={s.tp_size} PP={s.pp_size}, asked for "
                            f"TP={tp} PP={pp}")
        return
    world = dist.get_world_size()
    if tp < 1 or pp < 1:
        raise EvalError(f"--tensor-model-parallel-size {tp} and --pipeline-model-parallel-size {pp} must be positive")
    try:
        check_world_size(world, tp, pp)
    except ConfigError as e:
        raise EvalError(str(e)) from None
    state.initialize(tp, pp, vp)


def _read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise EvalError(f"--hf-dir {hf_dir}: no config.json; not a Hugging Face model directory")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON ({e})") from None


def load_inference_model(load: Optional[str] = None, hf_dir: Optional[str] = None, *, precision: str = "fp32",
                         attention_backend: Optional[str] = None, device: Optional[torch.device] = None,
                         tokenizer: Optional[str] = None) -> InferenceModel:
    """Build this rank's chunks (layout from megaglot.parallel.state) and fill them with the weights
    of `load` (checkpoint root or iteration directory) or `hf_dir` (read tensor by tensor through
    the converter's reader). Chunks are in eval mode."""
    from megaglot.checkpoint.format import CheckpointError, CheckpointReader, resolve
    from megaglot.checkpoint.hf import recorded_tokenizer

    if (load is None) == (hf_dir is None):
        raise EvalError("give exactly one of --load CKPT or --hf-dir DIR")
    if precision not in DTYPES:
        raise EvalError(f"--precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    dtype = DTYPES[precision]
    device = device or torch.device("cpu")
    overrides = {"attention_backend": attention_backend} if attention_backend else {}
    try:
        if load is not None:
            directory = resolve(load)
            reader = CheckpointReader(directory)
            model = reader.metadata.get("model")
            if not isinstance(model, dict):
                raise EvalError(f"{directory}/metadata.json: no model config")
            cfg = ModelConfig.from_dict(dict(model, hidden_dropout=0.0, attention_dropout=0.0, **overrides))
            # the checkpoint's own copy (relative record: found after a move) or an older run's path
            found, recorded = recorded_tokenizer(reader.metadata, directory)
            tok = tokenizer or found
            chunks = _build(cfg, dtype, device)
            from megaglot.checkpoint.model_state import load_model

            load_model(chunks, reader, cfg)
            source = directory
        else:
            from megaglot.checkpoint.hf import hf_names, model_config_from_hf, pad_vocab

            if not os.path.isdir(hf_dir):
                raise EvalError(f"--hf-dir {hf_dir}: no such directory")
            hf_config = _read_hf_config(hf_dir)
            cfg = model_config_from_hf(hf_config, os.path.join(hf_dir, "config.json"),
                                       hidden_dropout=0.0, attention_dropout=0.0, **overrides)
            from megaglot.checkpoint.convert import HFWeights
            from megaglot.checkpoint.sharding import load_full_tensors

            weights = HFWeights(hf_dir)
            chunks = _build(cfg, dtype, device)

            def fetch(name):
                found = [n for n in hf_names(name) if n in weights.meta]
                if not found:
                    raise EvalError(f"--hf-dir {hf_dir}: missing tensor {' or '.join(hf_names(name))}")
                return pad_vocab(weights.get(found[0]), name, cfg)

            load_full_tensors(chunks, fetch)
            weights.close()
            tok = tokenizer or (hf_dir if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")) else None)
            recorded = None
            source = hf_dir
    except (CheckpointError, ConfigError) as e:
        raise EvalError(str(e)) from None
    for c in chunks:
        c.eval()
    return InferenceModel(chunks, cfg, device, dtype, tok, source, recorded)


def _build(cfg: ModelConfig, dtype, device) -> List:
    tp, pp = state.get_tensor_parallel_world_size(), state.get_pipeline_parallel_world_size()
    vp = state.get_virtual_pipeline_world_size() or 1
    try:
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp).validate(cfg)
        check_pipeline_split(cfg.num_layers, pp, vp)
    except ConfigError as e:
        raise EvalError(str(e)) from None
    with torch.random.fork_rng():
        # initial values are overwritten by the checkpoint; meta init would be faster but is not supported
        return build_model_chunks(cfg, params_dtype=dtype, device=device)


def load_tokenizer_for(model: InferenceModel, flag: str = "--tokenizer"):
    """The model's tokenizer, checked against its vocabulary; a missing one names what the
    checkpoint records (nothing, or a path that no longer exists) and the flag to pass."""
    from megaglot.checkpoint.hf import missing_tokenizer_message
    from megaglot.data.tokenizer import TokenizerError, load_tokenizer

    if model.tokenizer_path is None:
        raise EvalError(missing_tokenizer_message(model.source, model.tokenizer_recorded, flag))
    try:
        tok = load_tokenizer(model.tokenizer_path)
    except TokenizerError as e:
        raise EvalError(str(e)) from None
    if tok.vocab_size > model.cfg.padded_vocab_size:
        raise EvalError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocabulary is "
                        f"{model.cfg.vocab_size}; pass the tokenizer the model was trained with ({flag})")
    return tok


__all__ = ["EvalError", "InferenceModel", "init_parallel", "load_inference_model", "load_tokenizer_for", "DTYPES"]
