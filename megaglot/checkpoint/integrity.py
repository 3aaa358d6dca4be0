"""Self-checking checkpoints: a checksum per part file, and no non-finite value loaded unnoticed.

A run is restarted dozens of times from its checkpoints; a flipped byte (a bad disk, a truncated
copy) would otherwise load silently as wrong weights, and the checkpoint of a run that diverged
would load as NaN weights that only show up as a NaN loss steps later. So every part file's
checksum is recorded in its index when it is written (`format.PieceWriter`,
`streaming.StreamingPart`) and checked the first time a reader opens the file, and every tensor
read is tested for NaN/inf. Both failures are one line naming the file and what to do.

CRC-32 (zlib), not a cryptographic hash: it guards against corruption, not tampering, and on the
CPUs measured it is the fastest checksum the standard library has (about 2x sha256, 4x blake2b;
see benchmarks/bench_checkpoint_checksum.py). Files are read in 16 MiB chunks into one reused
buffer, so checking a file of any size holds 16 MiB. A leaf module: `format` builds on it (and
re-exports `CheckpointError`, defined here so both can raise it).
"""

from __future__ import annotations

import os
import zlib
from typing import Dict, Optional, Set

import torch

ALGORITHM = "crc32"
CHUNK_BYTES = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file."""


class RunningChecksum:
    """The checksum of bytes written in order (a file streamed tensor by tensor)."""

    def __init__(self):
        self.value, self.nbytes = 0, 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        self.value = zlib.crc32(view, self.value)
        self.nbytes += len(view)

    def record(self) -> dict:
        """What an index file stores under "checksum"."""
        return {"algorithm": ALGORITHM, "value": f"{self.value:08x}", "bytes": self.nbytes}


def file_checksum(path: str) -> dict:
    """The checksum record of a whole file, read in CHUNK_BYTES pieces into one buffer."""
    running, buffer = RunningChecksum(), bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            running.update(view[:n])
    return running.record()


def checksum_mismatch(path: str, recorded: dict) -> Optional[str]:
    """None when the file matches its recorded checksum, else the one-line error (which file,
    expected and actual, what to do). A size mismatch is found without reading the file."""
    fix = "the file is corrupt: restore it from a copy, or load an earlier iteration"
    if recorded.get("algorithm") != ALGORITHM:
        return (f"{path}: recorded checksum algorithm {recorded.get('algorithm')!r} is not one this megaglot "
                f"knows ({ALGORITHM}); update megaglot")
    size = os.path.getsize(path)
    if "bytes" in recorded and size != recorded["bytes"]:
        return f"{path}: {size} bytes, its index recorded {recorded['bytes']}; {fix}"
    actual = file_checksum(path)["value"]
    if actual != recorded.get("value"):
        return f"{path}: checksum mismatch ({ALGORITHM} expected {recorded.get('value')}, actual {actual}); {fix}"
    return None


def nonfinite_message(path: str, kind: str, name: str, values: torch.Tensor) -> Optional[str]:
    """None when every value is finite, else the one-line error. A nan or inf anywhere makes the
    sum nan or inf, and a sum is one fast reduction (on CPU ~30x `isfinite(t).all()` for bf16);
    only a non-finite sum (or one that overflowed: then the count is 0) counts value by value."""
    if not values.is_floating_point() or bool(torch.isfinite(values.sum())):
        return None
    bad = int(values.numel() - torch.isfinite(values).sum())
    if bad == 0:
        return None
    return (f"{path}: {kind} tensor {name!r} has {bad} non-finite values (nan/inf); the run that saved it "
            f"diverged: load an earlier iteration")


class PartFiles:
    """What a reader knows of its part files besides their pieces: which are missing (and the
    index that refers to each), the checksums their indexes recorded, and which it has verified."""

    def __init__(self, directory: str):
        self.directory = directory
        self.missing: Dict[str, str] = {}  # part file -> the index that refers to it
        self.checksums: Dict[str, dict] = {}
        self.verified: Set[str] = set()

    def add_index(self, index_path: str, index: dict) -> str:
        """Record the part file of one index (`<part>.index.json` -> `<part>.safetensors`)."""
        file = os.path.basename(index_path)[:-len(".index.json")] + ".safetensors"
        if index.get("checksum"):
            self.checksums[file] = index["checksum"]
        return file

    def require(self, file: str, index_path: str, fail: bool) -> None:
        """A missing `file` fails now when `fail` (model pieces), else when it is read."""
        if not os.path.isfile(os.path.join(self.directory, file)):
            if fail:
                raise CheckpointError(f"{index_path}: refers to missing shard {file}")
            self.missing[file] = index_path

    def check_present(self, file: str) -> None:
        if file in self.missing:
            raise CheckpointError(f"{self.missing[file]}: refers to missing shard {file}; restore it from a copy "
                                  f"(the weights alone load without it, e.g. with --no-load-optim)")

    def verify(self, file: str) -> bool:
        """Check `file` against its recorded checksum, once (it reads the whole file); False when
        none was recorded (an older checkpoint loads unverified)."""
        self.check_present(file)
        if file in self.verified or file not in self.checksums:
            return file in self.verified
        error = checksum_mismatch(os.path.join(self.directory, file), self.checksums[file])
        if error:
            raise CheckpointError(error)
        self.verified.add(file)
        return True
