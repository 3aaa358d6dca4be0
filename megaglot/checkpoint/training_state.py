"""Saving and resuming a training run: model, optimizer shards, schedule, scaler, RNG, data position.

Who writes what (so nothing is written twice and everything is written once):
  - model tensors: DP rank 0 of every (TP, PP) position; TP-replicated tensors by TP rank 0 only;
  - optimizer tensors (fp32 master, exp_avg, exp_avg_sq): the same ranks, or with the distributed
    optimizer every DP rank its own flat ranges;
  - RNG states: every rank; metadata: global rank 0.
Everything lands in `iter_N.tmp/`, and only when every rank has finished, and rank 0 has seen every
rank's files at the sizes their writers saw (a `--save` on node-local disks fails here, with one
line), does rank 0 rename it and point `latest` at it, so a run killed mid-save leaves the previous
checkpoint intact.
Loading reads, at the TP size the checkpoint was saved at, only the pieces (and parts of pieces)
this rank's shards need; at another TP size it assembles full tensors and slices them, so a
checkpoint saved at one TP/PP/DP layout loads at another.
"""

from __future__ import annotations

import base64
import os
import random
import warnings
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megaglot.checkpoint.check import check_checkpoint
from megaglot.checkpoint.format import (CheckpointError, CheckpointReader, PieceWriter, layout_record, model_part_name,
                                        optimizer_part_name, publish, read_json, resolve, staging_dir, write_json,
                                        write_metadata)
from megaglot.checkpoint.model_state import add_model_pieces, check_same_model, load_model
from megaglot.config import ModelConfig
from megaglot.parallel import state
from megaglot.parallel.random import get_rng_tracker


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": _b64(torch.get_rng_state()),
        "cuda": _b64(torch.cuda.get_rng_state()) if torch.cuda.is_available() else None,
        "tracker": {name: _b64(s) for name, s in get_rng_tracker().get_states().items()},
    }


def set_rng_state(d: dict) -> None:
    random.setstate((d["python"][0], tuple(d["python"][1]), d["python"][2]))
    n = d["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(_unb64(d["torch"]))
    if d.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(d["cuda"]))
    get_rng_tracker().set_states({name: _unb64(s) for name, s in d["tracker"].items()})


def _layout() -> dict:
    """This run's layout record (also what a loaded checkpoint's is compared with)."""
    s = state.get_state()
    return layout_record(s.tp_size, s.pp_size, s.vp_size, s.dp_size)


def save_checkpoint(root: str, *, iteration: int, consumed_samples: int, chunks, optimizer, model_cfg: ModelConfig,
                    extra: Optional[dict] = None) -> str:
    """Collective: every rank calls it. Returns the published directory."""
    rank = dist.get_rank()
    directory = staging_dir(root, iteration)
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    written = _write_tensors(directory, chunks, optimizer)  # (file, size) of every file this rank wrote
    rng_file = os.path.join("rng", f"rank_{rank:05d}.json")
    os.makedirs(os.path.join(directory, "rng"), exist_ok=True)
    write_json(os.path.join(directory, rng_file), rng_state())
    written.append((rng_file, os.path.getsize(os.path.join(directory, rng_file))))
    if rank == 0:
        scaler = optimizer.scaler.state_dict() if optimizer.scaler is not None else None
        write_metadata(directory, iteration=iteration, consumed_samples=consumed_samples, model=model_cfg.to_dict(),
                       parallel=_layout(), scheduler=optimizer.schedule.state_dict(), grad_scaler=scaler,
                       optimizer=dict(step=optimizer.adam_step_count(), num_skipped=optimizer.num_skipped,
                                      iteration=optimizer.iteration, distributed=optimizer.distributed),
                       **(extra or {}))
    _confirm_every_file(root, directory, written)  # collective: every rank has written when it returns
    final = publish(root, iteration) if rank == 0 else None
    dist.barrier()
    return final or os.path.join(root, os.path.basename(directory)[:-len(".tmp")])


def _write_tensors(directory: str, chunks, optimizer) -> List[Tuple[str, int]]:
    """This rank's model and optimizer part files (see the module docstring for who writes what)."""
    s = state.get_state()
    written = []
    if s.dp_rank == 0:
        writer = PieceWriter(directory, model_part_name(s.tp_rank, s.pp_rank))
        add_model_pieces(writer, chunks)
        _drop_replicated_duplicates(writer, s.tp_rank)
        written += writer.write()
    if optimizer.distributed or s.dp_rank == 0:
        writer = PieceWriter(directory, optimizer_part_name(s.tp_rank, s.pp_rank, s.dp_rank))
        for kind, piece, tensor in optimizer.state_pieces():
            p = piece.param
            writer.add(kind, p.global_name, tensor, global_shape=p.global_shape, partition_dim=p.partition_dim,
                       tp_size=s.tp_size, tp_rank=s.tp_rank, flat_range=(piece.flat_start, piece.flat_end))
        _drop_replicated_duplicates(writer, s.tp_rank)
        written += writer.write()
    return written


def _confirm_every_file(root: str, directory: str, written: List[Tuple[str, int]]) -> None:
    """Collective. Rank 0 publishes by renaming a directory other ranks (other nodes) wrote into;
    on node-local disks it would publish a checkpoint missing their files. So rank 0 checks every
    rank's files, with the sizes their writers saw, from its own view, and every rank raises the
    same one-line error when one is missing: nothing is published and `latest` stays."""
    everyone: List[Optional[List[Tuple[str, int]]]] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, written)
    verdict = [_first_unseen(root, directory, everyone) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])


def _first_unseen(root: str, directory: str, everyone) -> Optional[str]:
    for rank, files in enumerate(everyone):
        for name, size in files:
            path = os.path.join(directory, name)
            seen = os.path.getsize(path) if os.path.isfile(path) else None
            if seen != size:
                what = "missing" if seen is None else f"{seen} bytes, not the {size} it wrote"
                return (f"--save {root}: {path}, written by rank {rank}, is {what} as rank 0 sees it; --save must "
                        f"be on a filesystem all nodes share (the checkpoint was not published)")
    return None


def _drop_replicated_duplicates(writer: PieceWriter, tp_rank: int) -> None:
    """TP-replicated tensors are identical on every TP rank: only TP rank 0 writes them."""
    if tp_rank == 0:
        return
    keep = [i for i, e in enumerate(writer.index) if e["partition_dim"] is not None]
    keys = {writer.index[i]["key"] for i in keep}
    writer.index = [writer.index[i] for i in keep]
    writer.tensors = {k: v for k, v in writer.tensors.items() if k in keys}


def load_checkpoint(path: str, *, chunks, optimizer, model_cfg: ModelConfig, load_optimizer: bool = True) -> dict:
    """Restore what the checkpoint has; returns its metadata (iteration, consumed_samples, ...)."""
    directory = resolve(path)
    reader = CheckpointReader(directory)
    # The offline resharder's validation: every piece against the model's shapes, before any copy.
    check_same_model(reader.metadata.get("model", {}), model_cfg, directory)
    check_checkpoint(reader, model_cfg)
    load_model(chunks, reader, model_cfg)
    meta = reader.metadata
    s = state.get_state()
    has_optimizer = meta.get("optimizer") is not None and any(k == "exp_avg" for k, _ in reader.pieces)
    if load_optimizer and has_optimizer:
        def fetch(kind, piece):  # only the pieces this range needs, at an unchanged TP size
            values = reader.shard_range(kind, piece.param.global_name, s.tp_size, s.tp_rank, piece.flat_start,
                                        piece.flat_end)
            return values.to(piece.master.device)

        optimizer.load_state_pieces(fetch, meta["optimizer"]["step"])
        optimizer.iteration = meta["optimizer"]["iteration"]
        optimizer.num_skipped = meta["optimizer"]["num_skipped"]
        if optimizer.scaler is not None and meta.get("grad_scaler"):
            optimizer.scaler.load_state_dict(meta["grad_scaler"])
        saved = meta.get("parallel", {})
        rng_file = os.path.join(directory, "rng", f"rank_{dist.get_rank():05d}.json")
        if saved == _layout() and os.path.isfile(rng_file):
            set_rng_state(read_json(rng_file))
        elif dist.get_rank() == 0:
            warnings.warn(f"{directory}: saved at layout {saved}, now {_layout()}: RNG states are not restored "
                          f"(dropout masks will differ from an uninterrupted run)")
    else:  # weights only (a converted checkpoint, or fine-tuning): the run starts from iteration 0
        meta = dict(meta, iteration=0, consumed_samples=0)
    return meta
