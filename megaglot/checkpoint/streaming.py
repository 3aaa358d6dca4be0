"""What the offline checkpoint tools (HF import/export in `convert`, resharding in `reshard`) share.

Both work without process groups and without ever holding more than one full tensor: the shapes
come from a meta-device model, and every output file is written as a stream whose safetensors
header is planned from those shapes before the first tensor is read. One copy lives here so the
two tools cannot drift apart in what they write (the keys and index entries `format.PieceWriter`
writes, which `format.CheckpointReader` relies on).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, List, Optional, Tuple

import torch

from megaglot.checkpoint.format import write_json
from megaglot.checkpoint.integrity import RunningChecksum
from megaglot.config import ModelConfig

ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
TORCH_DTYPES = {v: k for k, v in ST_DTYPES.items()}


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- the model's parameters, without building it ---------------------------------------------
def parameter_specs(cfg: ModelConfig) -> Dict[str, Tuple[Tuple[int, ...], Optional[int]]]:
    """{global name: (global shape, partition dim)} in model order.

    Taken from the model itself (built on the meta device, so nothing is allocated) rather than
    from a second list of names, so a checkpoint tool cannot disagree with what training saves."""
    # imported here: the tools (and training_state) import this module, the model stack (kernels
    # included) loads only once shapes are asked for
    from megaglot.model.gpt import GPTChunk

    chunk = GPTChunk(cfg, range(cfg.num_layers), pre_process=True, post_process=True, device="meta")
    return {p.global_name: (tuple(p.global_shape), p.partition_dim) for p in chunk.parameters()}


def stage_names(specs, num_layers: int, pp: int, vp: int, pp_rank: int) -> List[str]:
    """The global names pipeline stage `pp_rank` holds, in model order: its layers over all its
    virtual chunks, the embedding on the first stage, the final norm and output layer on the last.
    A stage's part file holds all its virtual chunks, as training saves them, so the offline tools
    write one part per (TP, PP) position whatever the virtual layout."""
    from megaglot.model.gpt import layers_of_chunk

    layers = set()
    for chunk in range(vp):
        layers.update(layers_of_chunk(num_layers, pp, vp, pp_rank, chunk))
    names = []
    for name in specs:
        if name.startswith("layers."):
            keep = int(name.split(".")[1]) in layers
        elif name.startswith("embed_in."):
            keep = pp_rank == 0
        else:
            keep = pp_rank == pp - 1
        if keep:
            names.append(name)
    return names


# ---- safetensors files written tensor by tensor --------------------------------------------
class StreamingSafetensors:
    """A safetensors file filled one tensor at a time, in the order of `entries` (key, dtype,
    shape). `safetensors.save_file` needs every tensor in memory at once; planning the header
    up front from shapes alone lets a file of any size be written holding one tensor. The
    result is an ordinary safetensors file (safe_open, transformers). Each tensor keeps the
    dtype it is planned with, so a float16 source stays float16 bit for bit. With `checksum`, the
    file's checksum (`integrity`) is taken from the bytes as they are written (`self.checksum`).
    Tensors are written in the order given: list wider dtypes first (as `format.PieceWriter`
    does) to keep every tensor aligned to its element size."""

    def __init__(self, path: str, entries: List[Tuple[str, torch.dtype, Tuple[int, ...]]], metadata=None,
                 checksum: bool = False, fsync: bool = True):
        self.path, self.entries = path, entries
        header, offset = {}, 0
        for key, dtype, shape in entries:
            nbytes = numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = dict(metadata or {"format": "pt"})
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.checksum = RunningChecksum() if checksum else None
        self.fsync = fsync
        self._f = open(path, "wb")
        self._emit(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def _emit(self, data) -> None:
        self._f.write(data)
        if self.checksum is not None:
            self.checksum.update(data)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, dtype, shape = self.entries[self._next]
        if key != want_key or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"{self.path}: got {key} {tuple(tensor.shape)} {tensor.dtype}, planned "
                               f"{want_key} {tuple(shape)} {dtype}")
        flat = tensor.detach().reshape(-1).contiguous()
        self._emit(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            raise RuntimeError(f"{self.path}: {self._next} of {len(self.entries)} planned tensors written")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()


class StreamingPart:
    """`<part>.safetensors` + `<part>.index.json` exactly as `format.PieceWriter` writes them (same
    keys, same index entries), but streamed: `PieceWriter` collects a rank's pieces in memory,
    which offline means a whole TP/PP shard of the model (and its optimizer state). The index
    records the file's checksum, taken as it is streamed.

    `plan`: dicts with kind, name, global_shape, partition_dim, tp_size, tp_rank, start, end and
    dtype, written in this order. start/end are a flat range of the TP shard (0 and its size for
    a whole shard; a DP rank's range for the distributed optimizer's parts)."""

    def __init__(self, directory: str, part: str, plan: List[dict]):
        self.directory, self.part, self.plan = directory, part, plan
        self.file = f"{part}.safetensors"
        self.path = os.path.join(directory, self.file)
        for e in plan:
            e["key"] = f"{e['kind']}/{e['name']}/tp{e['tp_rank']}/{e['start']}"
        os.makedirs(directory, exist_ok=True)
        self._st = StreamingSafetensors(self.path, [(e["key"], e["dtype"], (e["end"] - e["start"],)) for e in plan],
                                        checksum=True)
        self._next = 0

    def next_entry(self) -> Optional[dict]:
        return self.plan[self._next] if self._next < len(self.plan) else None

    def write(self, kind: str, name: str, values: torch.Tensor) -> None:
        e = self.plan[self._next]
        flat = values.detach().reshape(-1)
        if (e["kind"], e["name"]) != (kind, name) or flat.numel() != e["end"] - e["start"] or flat.dtype != e["dtype"]:
            raise RuntimeError(f"{self.path}: got {kind}/{name} ({flat.numel()} {flat.dtype}), planned "
                               f"{e['key']} ({e['end'] - e['start']} {e['dtype']})")
        self._st.write(e["key"], flat)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.plan):
            raise RuntimeError(f"{self.path}: {self._next} of {len(self.plan)} planned pieces written")
        self._st.close()
        index = [dict(kind=e["kind"], name=e["name"], global_shape=list(e["global_shape"]),
                      partition_dim=e["partition_dim"], tp_size=e["tp_size"], tp_rank=e["tp_rank"], start=e["start"],
                      end=e["end"], key=e["key"], file=self.file) for e in self.plan]
        write_json(os.path.join(self.directory, f"{self.part}.index.json"),
                   {"pieces": index, "checksum": self._st.checksum.record()})

    def abort(self) -> None:
        self._st.abort()
