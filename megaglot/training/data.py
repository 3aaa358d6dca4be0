"""The training data: checked against the model, then built (rank 0 first: it writes the index cache)."""

from __future__ import annotations

import torch.distributed as dist

from megaglot.config import ConfigError, ModelConfig
from megaglot.data.blending import parse_data_paths, read_sidecar
from megaglot.data.gpt_dataset import build_train_valid_test_datasets


def check_data_fits_model(data_path, model_cfg: ModelConfig, tokenizer=None) -> None:
    """Token ids past the model's vocabulary would be embedded as zeros on TP > 1, silently: refuse
    data whose recorded tokenizer is larger than the model's vocabulary or is not --tokenizer."""
    prefixes, _ = parse_data_paths(data_path)
    for prefix in prefixes:
        recorded = read_sidecar(prefix).get("tokenizer") or {}
        vocab = recorded.get("vocab_size")
        if vocab is not None and vocab > model_cfg.vocab_size:
            raise ConfigError(f"--data-path {prefix} was tokenized with a {vocab}-token vocabulary "
                              f"({recorded.get('path')}) but the model has {model_cfg.vocab_size}; "
                              f"use a matching --model or data")
        if tokenizer is not None and recorded.get("sha256") and recorded["sha256"] != tokenizer.sha256:
            raise ConfigError(f"--data-path {prefix} was tokenized with {recorded.get('path')}, not with "
                              f"--tokenizer {tokenizer.path} (their contents differ)")


def build_datasets(run, tokenizer=None):
    """(train, valid, test) from --data-path; built on rank 0 first (it writes the index cache)."""
    cfg = run.train_cfg
    data = cfg.data
    if not data.data_path:
        raise ConfigError("--data-path is required (prefixes of .bin/.idx files from tools/preprocess_data.py)")
    check_data_fits_model(data.data_path, run.model_cfg, tokenizer)
    gb = cfg.global_batch_size
    evals = cfg.eval_iters * gb if cfg.eval_interval else 0
    counts = (cfg.train_iters * gb, evals, 0)  # the loop never reads the test split
    kwargs = dict(split=data.split, seq_length=cfg.seq_length, seed=cfg.seed, num_samples=counts,
                  cache_dir=data.data_cache_dir, balance=data.data_balance, eod_mask_loss=data.eod_mask_loss)
    result = None
    if dist.get_rank() == 0:
        result = build_train_valid_test_datasets(data.data_path, **kwargs)
    dist.barrier()
    if dist.get_rank() != 0:
        result = build_train_valid_test_datasets(data.data_path, log=lambda line: None, **kwargs)
    return result

