"""The training data: checked against the model, then built (rank 0 first: it writes the index cache)."""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch.distributed as dist

from megaglot.config import ConfigError, ModelConfig
from megaglot.data.blending import parse_data_paths, read_sidecar
from megaglot.data.gpt_dataset import build_train_valid_test_datasets
from megaglot.data.indexed_dataset import cached_max_token_id, data_file_path


def check_data_fits_model(data_path, model_cfg: ModelConfig, tokenizer=None, cache_dir: Optional[str] = None,
                          flag: str = "--data-path") -> None:
    """Token ids at or past the model's vocabulary are embedded as zeros at TP > 1 (silently) and
    raise a bare IndexError at TP = 1: refuse such data before any training, naming the dataset.

    The largest id comes from the preprocessing sidecar, else from one scan of the .bin (cached).
    Collective when torch.distributed is up: rank 0 checks (a large file is scanned once, not once
    per rank) and every rank raises the same error. `flag`: how errors name the data (--sft-data).
    """
    prefixes, _ = parse_data_paths(data_path)
    _on_rank0(lambda: [_check_one(prefix, model_cfg, tokenizer, cache_dir, flag) for prefix in prefixes])


def _on_rank0(check: Callable[[], object]) -> None:
    """Run `check` on rank 0 only; if it raised, every other rank raises a ConfigError with its message."""
    if not (dist.is_available() and dist.is_initialized()):
        check()
        return
    failure = None
    if dist.get_rank() == 0:
        try:
            check()
        except Exception as error:  # noqa: BLE001 - the other ranks must hear of any failure, or they wait
            failure = error
    verdict = [None if failure is None else str(failure)]
    dist.broadcast_object_list(verdict, src=0)
    if failure is not None:
        raise failure
    if verdict[0] is not None:
        raise ConfigError(verdict[0])


def _check_one(prefix: str, model_cfg: ModelConfig, tokenizer, cache_dir: Optional[str], flag: str) -> None:
    sidecar = read_sidecar(prefix)
    recorded = sidecar.get("tokenizer") or {}
    largest, source = largest_token_id(prefix, sidecar, cache_dir)
    if largest is not None and largest >= model_cfg.vocab_size:
        vocab = recorded.get("vocab_size")
        made = f" - it was tokenized with a {vocab}-token vocabulary ({recorded.get('path')})" if vocab else ""
        raise ConfigError(f"{flag} {prefix}: token id {largest} ({source}) is not below the model's "
                          f"vocabulary of {model_cfg.vocab_size}{made}; set --vocab-size {int(largest) + 1} or more "
                          f"(or a --model whose vocabulary covers the data), or preprocess the data again with "
                          f"the model's tokenizer")
    if tokenizer is not None and recorded.get("sha256") and recorded["sha256"] != tokenizer.sha256:
        raise ConfigError(tokenizer_mismatch(prefix, recorded, tokenizer, flag))


def largest_token_id(prefix: str, sidecar: dict, cache_dir: Optional[str] = None):
    """(largest id or None if no tokens, where it came from): the sidecar's record while it still
    describes this .bin (its token count times the dtype's size is the file's size), else a scan."""
    value, tokens, dtype = sidecar.get("max_token_id"), sidecar.get("tokens"), sidecar.get("dtype")
    if value is not None and tokens is not None and dtype is not None:
        try:
            if int(tokens) * np.dtype(dtype).itemsize == os.path.getsize(data_file_path(prefix)):
                return value, f"recorded in {prefix}.json"
        except (TypeError, ValueError, OSError):
            pass
    return cached_max_token_id(prefix, cache_dir), f"found by scanning {data_file_path(prefix)}"


def tokenizer_mismatch(prefix: str, recorded: dict, tokenizer, flag: str = "--data-path") -> str:
    """What differs between the tokenizer the sidecar records and --tokenizer, each path named once."""
    then = f"sha256 {recorded['sha256'][:12]}, {recorded.get('vocab_size', '?')} tokens"
    now = f"sha256 {tokenizer.sha256[:12]}, {tokenizer.vocab_size} tokens"
    was = recorded.get("path")
    if was and tokenizer.path and os.path.realpath(was) == os.path.realpath(tokenizer.path):
        return (f"{flag} {prefix} was tokenized with {was} as it was then ({then}) but that file now holds "
                f"another tokenizer ({now}): it was overwritten since; preprocess the data again with it, or "
                f"restore the tokenizer the data was made with")
    return (f"{flag} {prefix} was tokenized with {was or 'an unrecorded tokenizer file'} ({then}), not with "
            f"--tokenizer {tokenizer.path} ({now}); pass the tokenizer the data was made with, or preprocess the "
            f"data again with --tokenizer {tokenizer.path}")


def build_datasets(run, tokenizer=None):
    """(train, valid, test) from --data-path; built on rank 0 first (it writes the index cache)."""
    cfg = run.train_cfg
    data = cfg.data
    if data.sft_data:  # instruction tuning: tokens + loss mask, padded or packed
        from megaglot.training.sft import build_sft_training_datasets

        return build_sft_training_datasets(cfg, run.model_cfg, tokenizer, log=print if dist.get_rank() == 0 else None)
    if not data.data_path:
        raise ConfigError("--data-path is required (prefixes of .bin/.idx files from tools/preprocess_data.py)")
    check_data_fits_model(data.data_path, run.model_cfg, tokenizer, cache_dir=data.data_cache_dir)
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
