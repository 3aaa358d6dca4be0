"""The checkpoint format: safetensors pieces, a JSON index per writer, JSON metadata.

    CKPT/latest                         "iter_0000100", replaced atomically after the directory is complete
    CKPT/iter_0000100/metadata.json     model config, parallel layout, iteration, consumed samples,
                                        scheduler / scaler state, tokenizer ("tokenizer.json", relative
                                        to this directory, when the run gave one), format version
    CKPT/iter_0000100/<part>.safetensors  tensors of one writer (a rank, or one TP/PP shard offline)
    CKPT/iter_0000100/<part>.index.json   {"pieces": [...], "checksum": {...}}: per tensor its kind, global
                                        name, global shape, partition dim, the TP size and rank it was saved
                                        at and the flat range of that TP shard it holds; the part file's
                                        checksum ({"algorithm": "crc32", "value": 8 hex digits, "bytes"})
    CKPT/iter_0000100/tokenizer.json    the run's tokenizer, copied in (optional)
    CKPT/iter_0000100/rng/rank_00003.json  RNG states of one rank

A piece is a flat range of one TP shard of one tensor; whole shards are the common case, the
distributed optimizer writes partial ranges from each DP rank. Because every piece is
self-describing, a reader assembles the full tensor of any name whatever layout wrote it, so
loading at another TP/PP/DP layout and offline resharding share this one reader. At the TP size
a checkpoint was saved at, a rank reads only its own shard (`shard`, `shard_range`): no rank
moves the whole model through memory to load its part of it. Nothing is unpickled: tensors are
safetensors, everything else is JSON.

Checkpoints check themselves: a reader verifies a part file's checksum the first time it opens it
(indexes without one, from older checkpoints, load unverified) and refuses non-finite values, in
one line naming the file. It reads the `optim_*` parts' indexes only when optimizer state is asked
for, so weights load (for --no-load-optim, export, generation) when the optimizer's files are gone.

This module is the one place the format is spelled: part names, tensor kinds, the layout record
(metadata.json's `parallel` section) and the model config a checkpoint describes. Training
(`training_state`), resharding, HF conversion and the test fixtures all write through it, and the
check of a checkpoint against its model (`check.check_checkpoint`) reads through it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors import safe_open

# CheckpointError is defined in `integrity` (which raises it too); everyone imports it from here
from megaglot.checkpoint.integrity import CheckpointError, PartFiles, nonfinite_message
from megaglot.config import ConfigError, ModelConfig

FORMAT_VERSION = 1
MODEL = "model"
"""The kind of the model's parameters (in their training dtype)."""
OPTIMIZER_KINDS = ("master", "exp_avg", "exp_avg_sq")
"""The kinds of optimizer state (fp32 master weights and Adam's moments): a checkpoint holds all
three or none (a model-only checkpoint, e.g. a converted one)."""
OPTIMIZER_PART_PREFIX = "optim_"
"""Parts named so hold optimizer state only: their indexes are read when it is asked for."""
TOKENIZER_FILE = "tokenizer.json"
"""The tokenizer copied into an iteration directory; metadata's "tokenizer" names it relatively."""


_numel = math.prod  # values in a shape (1 for a scalar's ())


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


# ---- part names: one file pair per writer ----------------------------------------------------
def model_part_name(tp_rank: int, pp_rank: int) -> str:
    """The model tensors of one (TP, PP) position (written by its DP rank 0)."""
    return f"model_tp{tp_rank:02d}_pp{pp_rank:02d}"


def optimizer_part_name(tp_rank: int, pp_rank: int, dp_rank: int) -> str:
    """The optimizer state of one (TP, PP) position: DP rank 0's, or with the distributed optimizer
    each DP rank's own flat ranges."""
    return f"{OPTIMIZER_PART_PREFIX}tp{tp_rank:02d}_pp{pp_rank:02d}_dp{dp_rank:03d}"


# ---- the layout record: metadata.json's `parallel` section -----------------------------------
def layout_record(tp: int, pp: int, vp: Optional[int], dp: int, **extra) -> dict:
    """The `parallel` section a checkpoint is saved with. Every writer goes through here, so that
    `read_layout` and the same-layout test (RNG states are restored, or copied by the resharder,
    only at the layout they were saved at) compare like with like. `vp` is written as given."""
    return dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_size=vp,
                data_parallel_size=dp, world_size=tp * pp * dp, **extra)


def read_layout(meta: dict) -> dict:
    """{tp, pp, vp, dp} of the metadata's `parallel` section, as far as it says (None where it does
    not; vp None for one chunk per stage). Reads `layout_record`'s keys and the older converter's
    `num_layers_per_virtual_pipeline_stage`."""
    par = meta.get("parallel") or {}
    vp = par.get("virtual_pipeline_size")
    k = par.get("num_layers_per_virtual_pipeline_stage")
    if vp is None and k and "model" in meta:
        vp = meta["model"]["num_layers"] // (par.get("pipeline_model_parallel_size", 1) * k)
    return dict(tp=par.get("tensor_model_parallel_size"), pp=par.get("pipeline_model_parallel_size"),
                vp=vp if vp and vp > 1 else None, dp=par.get("data_parallel_size"))


@dataclass
class Piece:
    """One stored range: values [start, end) of TP shard `tp_rank` (of `tp_size`) of a tensor."""

    kind: str
    name: str
    global_shape: Tuple[int, ...]
    partition_dim: Optional[int]
    tp_size: int
    tp_rank: int
    start: int
    end: int
    file: str
    key: str

    @property
    def shard_shape(self) -> Tuple[int, ...]:
        shape = list(self.global_shape)
        if self.partition_dim is not None:
            shape[self.partition_dim] //= self.tp_size
        return tuple(shape)


class PieceWriter:
    """Collects this writer's pieces, then writes `<part>.safetensors` and `<part>.index.json`."""

    def __init__(self, directory: str, part: str):
        self.directory, self.part = directory, part
        self.tensors: Dict[str, torch.Tensor] = {}
        self.index: List[dict] = []

    def add(self, kind: str, name: str, shard: torch.Tensor, *, global_shape, partition_dim: Optional[int],
            tp_size: int, tp_rank: int, flat_range: Optional[Tuple[int, int]] = None) -> None:
        """`shard` is this TP rank's whole shard, or (with flat_range) that range of it flattened."""
        start, end = flat_range if flat_range is not None else (0, shard.numel())
        key = f"{kind}/{name}/tp{tp_rank}/{start}"
        self.tensors[key] = shard.detach().reshape(-1).contiguous().cpu().clone()
        if self.tensors[key].numel() != end - start:
            raise ValueError(f"piece {key}: {self.tensors[key].numel()} values for range [{start}, {end})")
        self.index.append(dict(kind=kind, name=name, global_shape=list(global_shape), partition_dim=partition_dim,
                               tp_size=tp_size, tp_rank=tp_rank, start=start, end=end, key=key))

    def write(self) -> List[Tuple[str, int]]:
        """Returns (file name, size in bytes) of both files, as this writer sees them. The part is
        streamed (wider dtypes first: aligned), its checksum taken on the way out (no second copy,
        no read-back); like safetensors' save_file, without an fsync."""
        from megaglot.checkpoint.streaming import StreamingSafetensors  # it imports this module

        os.makedirs(self.directory, exist_ok=True)
        file = f"{self.part}.safetensors"
        order = sorted(self.tensors, key=lambda k: -self.tensors[k].element_size())
        entries = [(k, self.tensors[k].dtype, tuple(self.tensors[k].shape)) for k in order]
        out = StreamingSafetensors(os.path.join(self.directory, file), entries, checksum=True, fsync=False)
        try:
            for key in order:
                out.write(key, self.tensors[key])
            out.close()
        finally:
            out.abort()
        for entry in self.index:
            entry["file"] = file
        write_json(os.path.join(self.directory, f"{self.part}.index.json"),
                   {"pieces": self.index, "checksum": out.checksum.record()})
        return [(f, os.path.getsize(os.path.join(self.directory, f))) for f in (file, f"{self.part}.index.json")]


def write_json(path: str, obj) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointReader:
    """Reads the pieces of one iteration directory: full tensors, one at a time, or one rank's
    shard (or range of it) of a tensor. Verifies each part file's checksum the first time it
    opens it and refuses non-finite values (see the module docstring)."""

    def __init__(self, directory: str):
        self.directory = directory
        meta_path = os.path.join(directory, "metadata.json")
        if not os.path.isfile(meta_path):
            raise CheckpointError(f"{meta_path}: missing; {directory} is not a complete megaglot checkpoint")
        self.metadata = read_json(meta_path)
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{meta_path}: format version {self.metadata.get('format_version')}, "
                                  f"this megaglot reads {FORMAT_VERSION}")
        self._all: Dict[Tuple[str, str], List[Piece]] = {}  # see `pieces`
        self._handles = {}  # part file -> open safetensors handle
        self.files = PartFiles(directory)  # missing part files, recorded checksums, verified ones
        index_files = sorted(glob.glob(os.path.join(directory, "*.index.json")))
        if not index_files:
            raise CheckpointError(f"{directory}: no *.index.json files; the checkpoint holds no tensors")
        self._deferred = [p for p in index_files if os.path.basename(p).startswith(OPTIMIZER_PART_PREFIX)]
        for path in (p for p in index_files if p not in self._deferred):
            self._read_index(path)

    def _read_index(self, path: str) -> None:
        """A missing part file holding model pieces fails here, any other when it is read."""
        index = read_json(path)
        self.files.add_index(path, index)
        for entry in index["pieces"]:
            entry["global_shape"] = tuple(entry["global_shape"])
            piece = Piece(**entry)
            self.files.require(piece.file, path, fail=piece.kind == MODEL)
            self._all.setdefault((piece.kind, piece.name), []).append(piece)

    def _load_deferred(self) -> None:
        while self._deferred:
            self._read_index(self._deferred.pop(0))

    @property
    def pieces(self) -> Dict[Tuple[str, str], List[Piece]]:
        """{(kind, name): its pieces} of every kind (reads the optimizer's indexes)."""
        self._load_deferred()
        return self._all

    def pieces_of(self, kinds: Optional[Sequence[str]] = None) -> Dict[Tuple[str, str], List[Piece]]:
        """{(kind, name): pieces} of `kinds` (all: None); the optimizer's indexes are read only
        when a kind other than the model's is asked for."""
        if kinds is None or any(k != MODEL for k in kinds):
            self._load_deferred()
        return {key: pieces for key, pieces in self._all.items() if kinds is None or key[0] in kinds}

    def names(self, kind: str = MODEL) -> List[str]:
        return sorted(name for k, name in self.pieces_of([kind]))

    def has(self, kind: str, name: str) -> bool:
        return bool(self._pieces(kind, name, required=False))

    def info(self, kind: str, name: str) -> Piece:
        return self._pieces(kind, name)[0]

    def _pieces(self, kind, name, required: bool = True) -> List[Piece]:
        if kind != MODEL or (kind, name) not in self._all:  # optimizer state: read its indexes now
            self._load_deferred()
        pieces = self._all.get((kind, name))
        if required and not pieces:
            raise CheckpointError(f"{self.directory}: no {kind} tensor {name!r}; is it a checkpoint of another model?")
        return pieces

    def _read(self, piece: Piece, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """Values [lo, hi) of the piece (all by default) through a lazy slice: only its bytes leave
        the file, after the first open verified the whole file. Non-finite values are refused."""
        handle = self._handles.get(piece.file)
        if handle is None:
            self.files.verify(piece.file)
            handle = safe_open(os.path.join(self.directory, piece.file), framework="pt")
            self._handles[piece.file] = handle
        whole = lo == 0 and hi in (None, piece.end - piece.start)
        values = handle.get_tensor(piece.key) if whole else handle.get_slice(piece.key)[lo:hi]
        error = nonfinite_message(os.path.join(self.directory, piece.file), piece.kind, piece.name, values)
        if error:
            raise CheckpointError(error)
        return values

    def release(self) -> None:
        """Drop the open part files. Each stays memory-mapped while its handle lives, so the pages
        of every tensor read through this reader stay in the resident set: streaming a whole
        checkpoint through one reader would end with all of it counted in RSS. Call this after
        each tensor to stay near one; a later read reopens the file (one header parse)."""
        self._handles.clear()

    def full_tensor(self, kind: str, name: str) -> torch.Tensor:
        """The tensor at TP = 1, assembled from every piece (any TP size / DP split it was saved at)."""
        pieces = self._pieces(kind, name)
        first = pieces[0]
        shard_numel = _numel(first.shard_shape)
        if first.partition_dim is None:  # replicated over TP: one rank's copy is the tensor
            return self._assemble_shard(kind, name, pieces, min(p.tp_rank for p in pieces), shard_numel, first)
        shards = [self._assemble_shard(kind, name, pieces, tp_rank, shard_numel, first)
                  for tp_rank in range(first.tp_size)]
        return torch.cat(shards, dim=first.partition_dim)

    def shard(self, kind: str, name: str, tp_size: int, tp_rank: int) -> torch.Tensor:
        """TP shard `tp_rank` of `tp_size` (the whole tensor when it is TP-replicated). Saved at the
        same TP size, only that shard's pieces are read (one copy of a replicated tensor); at
        another TP size the full tensor is assembled and sliced (reshard on load)."""
        first = self._pieces(kind, name)[0]
        if first.partition_dim is not None and first.tp_size != tp_size:
            return self.full_tensor(kind, name).chunk(tp_size, dim=first.partition_dim)[tp_rank]
        return self.shard_range(kind, name, tp_size, tp_rank, 0, _numel(first.shard_shape)).view(first.shard_shape)

    def shard_range(self, kind: str, name: str, tp_size: int, tp_rank: int, start: int, end: int) -> torch.Tensor:
        """Flat values [start, end) of TP shard `tp_rank` of `tp_size` (the distributed optimizer's
        slice of it). Saved at the same TP size, only the stored pieces overlapping the range are
        read, and those only in part: at an unchanged layout and DP size that is this rank's own
        piece, whole. At another TP size, from the full tensor."""
        pieces = self._pieces(kind, name)
        first = pieces[0]
        if first.partition_dim is not None and first.tp_size != tp_size:
            return self.shard(kind, name, tp_size, tp_rank).reshape(-1)[start:end]
        source = tp_rank if first.partition_dim is not None else min(p.tp_rank for p in pieces)
        out, covered = None, start
        for p in sorted((p for p in pieces if p.tp_rank == source), key=lambda p: p.start):
            a, b = max(p.start, covered), min(p.end, end)
            if a >= b:
                continue
            if a > covered:
                break
            values = self._read(p, a - p.start, b - p.start)
            if out is None:
                out = torch.empty(end - start, dtype=values.dtype)
            out[a - start:b - start] = values
            covered = b
        if out is None or covered != end:
            raise CheckpointError(f"{self.directory}: {kind} tensor {name!r} TP shard {source} is incomplete "
                                  f"(values [{start}, {end}) wanted, stored up to {covered}); a shard file is missing")
        return out

    def _assemble_shard(self, kind, name, pieces, tp_rank, shard_numel, first) -> torch.Tensor:
        mine = sorted((p for p in pieces if p.tp_rank == tp_rank), key=lambda p: p.start)
        flat, covered = None, 0
        for p in mine:
            if p.start != covered:
                break
            values = self._read(p)
            if flat is None:
                flat = torch.empty(shard_numel, dtype=values.dtype)
            flat[p.start:p.end] = values
            covered = p.end
        if flat is None or covered != shard_numel:
            raise CheckpointError(f"{self.directory}: {kind} tensor {name!r} TP shard {tp_rank} is incomplete "
                                  f"({covered} of {shard_numel} values); a shard file is missing")
        return flat.view(first.shard_shape)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


# ---- directories and the `latest` pointer ---------------------------------------------------
def staging_dir(root: str, iteration: int) -> str:
    return os.path.join(root, iteration_dir_name(iteration) + ".tmp")


def publish(root: str, iteration: int) -> str:
    """Rename the complete staging directory into place, then point `latest` at it (last)."""
    staged, final = staging_dir(root, iteration), os.path.join(root, iteration_dir_name(iteration))
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    tmp = os.path.join(root, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(iteration_dir_name(iteration) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, "latest"))
    return final


def resolve(path: str) -> str:
    """An iteration directory from a checkpoint root (through `latest`) or the directory itself."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        raise CheckpointError(f"{path}: neither a checkpoint directory (metadata.json) nor a root with a "
                              f"'latest' file")
    with open(latest) as f:
        name = f.read().strip()
    directory = os.path.join(path, name)
    if not os.path.isfile(os.path.join(directory, "metadata.json")):
        raise CheckpointError(f"{latest}: points at {name}, which is missing or incomplete")
    return directory


def model_config_of(reader: "CheckpointReader") -> ModelConfig:
    """The model config metadata.json describes; CheckpointError naming the file when it is absent
    or invalid."""
    meta_path = os.path.join(reader.directory, "metadata.json")
    saved = reader.metadata.get("model")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{meta_path}: no model config ('model' section)")
    try:
        return ModelConfig.from_dict(saved)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: invalid model config ({e})") from None


def write_metadata(directory: str, **fields) -> None:
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, "metadata.json"), dict(fields, format_version=FORMAT_VERSION))
