"""The checkpoint check: every piece of a checkpoint against the model config it describes.

One validation for every reader that loads a checkpoint at another layout than it was saved at
(training's `load_checkpoint`, the offline resharder): names, global shapes, split dimensions,
stored sizes and dtypes, TP shards covered exactly, part files present. It reads the index files
and one safetensors header per file, never tensor data, so a bad checkpoint fails in one line
naming the file and the tensor before anything is copied or written. It checks only the kinds the
caller will read: loading weights alone neither needs nor checks the optimizer's files.
`verify_checksums` is the other, costly check: every part file read whole against its checksum. A sibling of `format` (which it reads through) only
because it needs the model's parameter list (`streaming.parameter_specs`), which imports `format`.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

from megaglot.checkpoint.format import (MODEL, OPTIMIZER_KINDS, CheckpointError, CheckpointReader, Piece,
                                        model_config_of)
from megaglot.checkpoint.streaming import TORCH_DTYPES, numel, parameter_specs
from megaglot.config import ModelConfig

Specs = Dict[str, Tuple[Tuple[int, ...], Optional[int]]]
Stored = Dict[str, Dict[str, Tuple[str, int]]]  # file -> key -> (safetensors dtype, numel)


def check_checkpoint(reader: CheckpointReader, cfg: Optional[ModelConfig] = None,
                     kinds: Optional[Sequence[str]] = (MODEL,)) -> Dict[Tuple[str, str], torch.dtype]:
    """Check the pieces of `kinds` (default the model's; None: every kind the checkpoint holds) of
    `reader` against the model config (its own unless `cfg` is given) without reading tensor data;
    returns {(kind, name): stored dtype}. Raises CheckpointError with one line naming the file and
    the tensor."""
    cfg = cfg or model_config_of(reader)
    specs = parameter_specs(cfg)
    pieces_of = reader.pieces_of(kinds)
    for pieces in pieces_of.values():
        for p in pieces:
            reader.files.check_present(p.file)
    _check_names(reader, cfg, specs, pieces_of)
    stored = _stored_headers(reader, pieces_of)
    dtypes = {}
    for (kind, name), pieces in sorted(pieces_of.items(), key=lambda kv: (kv[0][0] != MODEL, kv[0])):
        dtypes[(kind, name)] = _check_pieces(reader.directory, kind, name, pieces, specs[name], stored)
        _check_coverage(reader.directory, kind, name, pieces)
    return dtypes


def _check_names(reader: CheckpointReader, cfg: ModelConfig, specs: Specs, pieces_of) -> None:
    """Every kind holds exactly the model's tensors; optimizer state is all of its kinds or none."""
    where = reader.directory
    kinds = sorted({kind for kind, _ in pieces_of}, key=lambda k: (k != MODEL, k))  # model first
    if MODEL not in kinds:
        raise CheckpointError(f"{where}: holds no model tensors")
    for kind in kinds:
        names = {n for k, n in pieces_of if k == kind}
        missing = [n for n in specs if n not in names]
        if missing:
            raise CheckpointError(
                f"{where}: missing {kind} tensor {missing[0]} ({len(missing)} of {len(specs)} in all); "
                f"are the shard files of a pipeline stage missing?")
        extra = sorted(names - set(specs))
        if extra:
            raise CheckpointError(f"{where}: unexpected {kind} tensor {extra[0]} ({len(extra)} in all) that its "
                                  f"model config ({cfg.num_layers} layers) does not describe")
    opt = [k for k in kinds if k != MODEL]
    if opt and sorted(opt) != sorted(OPTIMIZER_KINDS):
        absent = [k for k in OPTIMIZER_KINDS if k not in opt]
        raise CheckpointError(f"{where}: optimizer state incomplete: kinds {', '.join(opt)} but no "
                              f"{', '.join(absent) or 'model'}; are optimizer shard files missing?")


def _stored_headers(reader: CheckpointReader, pieces_of) -> Stored:
    """Stored dtype and size of every key, one safetensors header per file (no tensor data is read)."""
    stored: Stored = {}
    for file in sorted({p.file for pieces in pieces_of.values() for p in pieces}):
        path = os.path.join(reader.directory, file)
        try:
            with safe_open(path, framework="pt") as handle:
                stored[file] = {key: (handle.get_slice(key).get_dtype(), numel(handle.get_slice(key).get_shape()))
                                for key in handle.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return stored


def _check_pieces(where: str, kind: str, name: str, pieces: List[Piece], spec, stored: Stored) -> torch.dtype:
    """Each piece's shape, split, TP position and stored size against the model; returns the dtype."""
    want_shape, want_dim = spec
    first = pieces[0]
    label = f"{kind} tensor {name} ({first.file})"
    first_dtype = stored[first.file].get(first.key, (None,))[0]
    for p in pieces:
        if tuple(p.global_shape) != want_shape:
            raise CheckpointError(f"{where}: {label} has global shape {tuple(p.global_shape)}, but metadata.json's "
                                  f"model config implies {want_shape}; the metadata and the tensors disagree")
        if p.partition_dim != want_dim:
            raise CheckpointError(f"{where}: {label} is split on dim {p.partition_dim}, the model splits it on "
                                  f"{want_dim}")
        if p.tp_size != first.tp_size:
            raise CheckpointError(f"{where}: {label} has pieces saved at TP {first.tp_size} and TP {p.tp_size}")
        if p.partition_dim is not None and (p.tp_size <= 0 or want_shape[p.partition_dim] % p.tp_size):
            raise CheckpointError(f"{where}: {label}: TP {p.tp_size} does not divide dim {p.partition_dim} of "
                                  f"{want_shape}")
        if not 0 <= p.tp_rank < p.tp_size:
            raise CheckpointError(f"{where}: {label}: TP rank {p.tp_rank} outside TP size {p.tp_size}")
        entry = stored[p.file].get(p.key)
        path = os.path.join(where, p.file)
        if entry is None:
            raise CheckpointError(f"{path}: has no tensor {p.key!r} that its index lists")
        if entry[1] != p.end - p.start:
            raise CheckpointError(f"{path}: {p.key} holds {entry[1]} values, its index says [{p.start}, {p.end}) "
                                  f"({p.end - p.start})")
        if entry[0] not in TORCH_DTYPES:
            raise CheckpointError(f"{path}: {p.key} has unsupported dtype {entry[0]}")
        if entry[0] != first_dtype:
            raise CheckpointError(f"{where}: {label} has pieces of dtypes {first_dtype} and {entry[0]}")
    return TORCH_DTYPES[first_dtype]


def _check_coverage(where: str, kind: str, name: str, pieces: List[Piece]) -> None:
    """Every TP shard (one copy of a TP-replicated tensor) covered exactly, from 0 to its size."""
    first = pieces[0]
    shard_numel = numel(first.shard_shape)
    ranks = range(first.tp_size) if first.partition_dim is not None else [min(p.tp_rank for p in pieces)]
    for tp_rank in ranks:
        covered = 0
        for p in sorted((p for p in pieces if p.tp_rank == tp_rank), key=lambda p: p.start):
            if p.start != covered:
                break
            covered = p.end
        if covered != shard_numel:
            raise CheckpointError(f"{where}: {kind} tensor {name} TP shard {tp_rank} of {first.tp_size} is "
                                  f"incomplete ({covered} of {shard_numel} values); a shard file is missing")


def verify_checksums(reader: CheckpointReader, kinds: Optional[Sequence[str]] = None) -> int:
    """Read every part file holding `kinds` (None: all) whole against its recorded checksum, now
    rather than on first use; returns how many files had one (older checkpoints record none)."""
    files = sorted({p.file for pieces in reader.pieces_of(kinds).values() for p in pieces})
    return sum(reader.files.verify(f) for f in files)
