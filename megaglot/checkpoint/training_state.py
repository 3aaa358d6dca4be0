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
checkpoint saved at one TP/PP/DP layout loads at another. Every part file read is checked against
its checksum and every tensor for NaN/inf (`format`). Without the optimizer (`load_optimizer=False`)
no optimizer file is opened: the weights and the schedule's clock load, the optimizer starts fresh
from the loaded weights. The metadata returned is always the checkpoint's own; whether a run then
starts at iteration 0 (fine-tuning) is its caller's decision.
A checkpoint is self-contained: the run's tokenizer is copied in as `tokenizer.json`, so a moved
checkpoint still generates, evaluates and exports.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import warnings
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megaglot.checkpoint.check import check_checkpoint
from megaglot.checkpoint.format import (MODEL, TOKENIZER_FILE, CheckpointError, CheckpointReader, PieceWriter,
                                        layout_record, model_part_name, optimizer_part_name, publish, read_json,
                                        resolve, staging_dir, write_json, write_metadata)
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
                    extra: Optional[dict] = None, tokenizer: Optional[str] = None) -> str:
    """Collective: every rank calls it. Returns the published directory. `tokenizer` (a
    tokenizer.json or a directory holding one) is copied in and recorded relatively."""
    rank = dist.get_rank()
    directory = staging_dir(root, iteration)
    _stage(root, directory, iteration, tokenizer)  # collective: rank 0 has created it when it returns
    written = _write_tensors(directory, chunks, optimizer)  # (file, size) of every file this rank wrote
    rng_file = os.path.join("rng", f"rank_{rank:05d}.json")
    os.makedirs(os.path.join(directory, "rng"), exist_ok=True)
    write_json(os.path.join(directory, rng_file), rng_state())
    written.append((rng_file, os.path.getsize(os.path.join(directory, rng_file))))
    if rank == 0:
        scaler = optimizer.scaler.state_dict() if optimizer.scaler is not None else None
        fields = dict(iteration=iteration, consumed_samples=consumed_samples, model=model_cfg.to_dict(),
                      parallel=_layout(), scheduler=optimizer.schedule.state_dict(), grad_scaler=scaler,
                      optimizer=dict(step=optimizer.adam_step_count(), num_skipped=optimizer.num_skipped,
                                     iteration=optimizer.iteration, distributed=optimizer.distributed))
        fields.update(extra or {})
        if tokenizer is not None:
            shutil.copyfile(_tokenizer_file(tokenizer), os.path.join(directory, TOKENIZER_FILE))
            written.append((TOKENIZER_FILE, os.path.getsize(os.path.join(directory, TOKENIZER_FILE))))
            fields["tokenizer"] = TOKENIZER_FILE  # relative: resolved against the iteration directory
        write_metadata(directory, **fields)
    _confirm_every_file(root, directory, written)  # collective: every rank has written when it returns
    final = publish(root, iteration) if rank == 0 else None
    dist.barrier()
    return final or os.path.join(root, os.path.basename(directory)[:-len(".tmp")])


def _tokenizer_file(tokenizer: str) -> str:
    return os.path.join(tokenizer, TOKENIZER_FILE) if os.path.isdir(tokenizer) else tokenizer


def _stage(root: str, directory: str, iteration: int, tokenizer: Optional[str]) -> None:
    """Collective. Rank 0 checks what it will copy, then creates the staging directory; every rank
    raises its verdict (one line naming the tokenizer) before anything is written."""
    verdict = [None]
    if dist.get_rank() == 0:
        if tokenizer is not None and not os.path.isfile(_tokenizer_file(tokenizer)):
            verdict[0] = (f"{_tokenizer_file(tokenizer)}: no such tokenizer file to copy into the checkpoint "
                          f"(iteration {iteration} was not saved); fix --tokenizer")
        else:
            os.makedirs(directory, exist_ok=True)
    dist.broadcast_object_list(verdict, src=0)  # also the barrier: the directory exists when it returns
    if verdict[0] is not None:
        raise CheckpointError(verdict[0])


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
    """Restore what the checkpoint has and returns its metadata as saved (iteration, consumed
    samples, ...). `load_optimizer=False`, or a checkpoint without optimizer state (a converted
    one): no optimizer file is read; the schedule's clock (iteration, skipped steps) is restored
    when recorded, Adam starts fresh and its fp32 masters are the loaded weights."""
    directory = resolve(path)
    reader = CheckpointReader(directory)
    # The offline resharder's validation: every piece against the model's shapes, before any copy.
    check_same_model(reader.metadata.get("model", {}), model_cfg, directory)
    meta = reader.metadata
    with_optimizer = load_optimizer and meta.get("optimizer") is not None
    if with_optimizer and not any(kind != MODEL for kind, _ in reader.pieces):
        raise CheckpointError(f"{directory}: metadata.json records optimizer state, but there are no optimizer "
                              f"shards (optim_*.index.json); restore them, or load the weights alone (--no-load-optim)")
    check_checkpoint(reader, model_cfg, kinds=None if with_optimizer else (MODEL,))
    load_model(chunks, reader, model_cfg)
    if with_optimizer:
        _load_optimizer(reader, optimizer)
        _restore_rng(directory, meta)
    else:
        _fresh_optimizer(optimizer)
    saved = meta.get("optimizer") or {}
    if "iteration" in saved:
        optimizer.iteration, optimizer.num_skipped = saved["iteration"], saved.get("num_skipped", 0)
    return meta


def _load_optimizer(reader: CheckpointReader, optimizer) -> None:
    """Masters, moments and step count (only the pieces this rank's ranges need), loss scale."""
    s, meta = state.get_state(), reader.metadata

    def fetch(kind, piece):  # only the pieces this range needs, at an unchanged TP size
        values = reader.shard_range(kind, piece.param.global_name, s.tp_size, s.tp_rank, piece.flat_start,
                                    piece.flat_end)
        return values.to(piece.master.device)

    optimizer.load_state_pieces(fetch, meta["optimizer"]["step"])
    if optimizer.scaler is not None and meta.get("grad_scaler"):
        optimizer.scaler.load_state_dict(meta["grad_scaler"])


def _fresh_optimizer(optimizer) -> None:
    """A fresh Adam over the loaded weights. The masters were copied from the parameters when the
    optimizer was built, before the weights were loaded: refill them (and zero the moments, step
    0, as a new optimizer has) through the optimizer's own loading path, which also copies the
    masters back (a no-op round trip) and, with the distributed optimizer, all-gathers."""
    def fetch(kind, piece):
        if kind != "master":
            return torch.zeros_like(piece.master)
        return piece.param.detach().reshape(-1)[piece.flat_start:piece.flat_end].float().clone()

    optimizer.load_state_pieces(fetch, 0)


def _restore_rng(directory: str, meta: dict) -> None:
    """This rank's RNG states, at the layout they were saved at only."""
    saved = meta.get("parallel", {})
    rng_file = os.path.join(directory, "rng", f"rank_{dist.get_rank():05d}.json")
    if saved == _layout() and os.path.isfile(rng_file):
        set_rng_state(read_json(rng_file))
    elif dist.get_rank() == 0:
        warnings.warn(f"{directory}: saved at layout {saved}, now {_layout()}: RNG states are not restored "
                      f"(dropout masks will differ from an uninterrupted run)")
