"""Megatron-Core's memory-mapped indexed dataset (`MMIDIDX`, version 1), byte for byte.

Token files are written once and then read by every rank of every job for weeks, so the format is
the one Megatron-Core already uses: data prepared by either tool is read by the other. The `.idx`
holds, after a fixed header, int32 sequence lengths, int64 byte pointers into `.bin` and int64
document boundaries; the `.bin` is the tokens concatenated, little-endian. Nothing is unpickled.

Every malformed file raises `IndexedDatasetError` with one line that names the file, because a
training job that fails an hour in on a half-copied shard should say which shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from megaglot.kernels import load_extension

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # magic, version <Q, dtype <B, sequence count <Q, document count <Q

# Megatron-Core's DType codes.
DTYPE_CODES = {
    np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
    np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A `.bin/.idx` pair that cannot be read or written as asked; the message names the file."""


def best_dtype(vocab_size: Optional[int]) -> np.dtype:
    """uint16 halves the disk and page-cache footprint whenever the ids fit (Megatron's rule)."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def _dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype not in DTYPE_CODES:
        raise IndexedDatasetError(f"dtype {dtype} cannot be stored in an MMIDIDX file; use one of "
                                  f"{', '.join(str(d) for d in DTYPE_CODES)}")
    return DTYPE_CODES[dtype]


def write_index(idx_path: str, dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray) -> None:
    """Write an `.idx` file; pointers are derived from the lengths, exactly as Megatron-Core does."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    documents = np.asarray(document_indices, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    with open(idx_path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", _dtype_code(dtype)))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(documents)))
        f.write(lengths.astype("<i4").tobytes(order="C"))
        f.write(pointers.astype("<i8").tobytes(order="C"))
        f.write(documents.astype("<i8").tobytes(order="C"))


class IndexedDatasetBuilder:
    """Appends tokens to a `.bin` as they come; the `.idx` is written by `finalize`.

    `add_item` adds one sequence, `end_document` closes the current document (a document may hold
    several sequences, e.g. sentences); `add_document` does both for the common one-sequence case.
    """

    def __init__(self, bin_path: str, dtype=np.int32):
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        _dtype_code(self.dtype)
        self._file = open(bin_path, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self._max_token = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None
        self._min_token = np.iinfo(self.dtype).min if self.dtype.kind in "iu" else None

    def _as_array(self, tokens) -> np.ndarray:
        array = np.asarray(tokens.numpy() if hasattr(tokens, "numpy") else tokens)
        if array.ndim != 1:
            raise IndexedDatasetError(f"{self.bin_path}: a sequence must be 1-D, got shape {array.shape}")
        if self._max_token is not None and array.size and array.dtype != self.dtype:
            high, low = array.max(), array.min()
            if high > self._max_token or low < self._min_token:
                raise IndexedDatasetError(
                    f"{self.bin_path}: token id {high if high > self._max_token else low} does not fit "
                    f"dtype {self.dtype}; use a wider dtype (int32) for this vocabulary")
        return array.astype(self.dtype.newbyteorder("<"), copy=False)

    def add_item(self, tokens: Sequence[int]) -> None:
        array = self._as_array(tokens)
        self._file.write(array.tobytes(order="C"))
        self.sequence_lengths.append(int(array.size))

    def end_document(self) -> None:
        self.document_indices.append(len(self.sequence_lengths))

    def add_document(self, tokens: Sequence[int], lengths: Optional[Iterable[int]] = None) -> None:
        """One document; `lengths` splits it into several sequences (Megatron-Core's signature)."""
        array = self._as_array(tokens)
        self._file.write(array.tobytes(order="C"))
        if lengths is None:
            self.sequence_lengths.append(int(array.size))
        else:
            lengths = [int(n) for n in lengths]
            if sum(lengths) != array.size:
                raise IndexedDatasetError(f"{self.bin_path}: lengths sum to {sum(lengths)} but the document "
                                          f"has {array.size} tokens")
            self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def merge(self, prefix: str) -> None:
        """Append another `.bin/.idx` pair (e.g. one worker's shard) after what is written so far."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise IndexedDatasetError(f"{index_file_path(prefix)}: dtype {other.dtype} differs from the "
                                      f"builder's {self.dtype}; cannot merge")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(other.sizes.tolist())
        self.document_indices.extend((other.document_indices[1:] + offset).tolist())
        del other
        with open(data_file_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._file, length=16 << 20)

    add_index = merge  # Megatron-Core's name

    def finalize(self, idx_path: str) -> None:
        self._file.close()
        write_index(idx_path, self.dtype, np.array(self.sequence_lengths, dtype=np.int32),
                    np.array(self.document_indices, dtype=np.int64))

    def close(self) -> None:
        """Abandon without writing an index (the caller removes the partial `.bin`)."""
        self._file.close()


def read_index_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """(dtype, sequence count, document count), checking magic, version and the file's length."""
    try:
        size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            header = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise IndexedDatasetError(f"{idx_path}: index file not found") from None
    magic = header[: len(MAGIC)]
    if magic != MAGIC and not (len(magic) < len(MAGIC) and MAGIC.startswith(magic)):
        raise IndexedDatasetError(f"{idx_path}: bad magic {magic!r}, expected {MAGIC!r} "
                                  f"(not a Megatron MMIDIDX index)")
    if len(header) < HEADER_SIZE:
        raise IndexedDatasetError(f"{idx_path}: truncated index ({size} bytes, header needs {HEADER_SIZE})")
    (version,) = struct.unpack_from("<Q", header, len(MAGIC))
    if version != VERSION:
        raise IndexedDatasetError(f"{idx_path}: index version {version}, only version {VERSION} is supported")
    (code,) = struct.unpack_from("<B", header, len(MAGIC) + 8)
    if code not in CODE_DTYPES:
        raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}")
    sequence_count, document_count = struct.unpack_from("<QQ", header, len(MAGIC) + 9)
    expected = HEADER_SIZE + sequence_count * 4 + sequence_count * 8 + document_count * 8
    if size < expected:
        raise IndexedDatasetError(f"{idx_path}: truncated index ({size} bytes, header promises {expected} for "
                                  f"{sequence_count} sequences and {document_count} document boundaries)")
    if size > expected:
        raise IndexedDatasetError(f"{idx_path}: {size - expected} unexpected trailing bytes after the index")
    return CODE_DTYPES[code], int(sequence_count), int(document_count)


class IndexedDataset:
    """Memory-mapped reader: item i is sequence i as a numpy array (no copy until sliced further).

    Both files are mapped, never read whole, so every rank of a node shares one page-cache copy.
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        self.dtype, sequence_count, document_count = read_index_header(idx_path)
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        offset = HEADER_SIZE
        self.sizes = np.frombuffer(index, dtype="<i4", count=sequence_count, offset=offset)
        offset += sequence_count * 4
        self.pointers = np.frombuffer(index, dtype="<i8", count=sequence_count, offset=offset)
        offset += sequence_count * 8
        self.document_indices = np.frombuffer(index, dtype="<i8", count=document_count, offset=offset)
        self._index = index
        if document_count == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != sequence_count:
            raise IndexedDatasetError(f"{idx_path}: document boundaries must run from 0 to the sequence count "
                                      f"{sequence_count}")
        if sequence_count and np.any(np.diff(self.document_indices) < 0):
            raise IndexedDatasetError(f"{idx_path}: document boundaries are not increasing")
        if sequence_count and np.any(self.sizes < 0):
            raise IndexedDatasetError(f"{idx_path}: negative sequence length")
        if not os.path.exists(bin_path):
            raise IndexedDatasetError(f"{bin_path}: data file not found (index {idx_path} exists)")
        itemsize = self.dtype.itemsize
        expected = int(self.sizes.sum(dtype=np.int64)) * itemsize
        actual = os.path.getsize(bin_path)
        if actual != expected:
            raise IndexedDatasetError(f"{bin_path}: {actual} bytes but {idx_path} lists {expected // itemsize} "
                                      f"tokens ({expected} bytes); the pair is truncated or mismatched")
        if sequence_count:
            want = np.zeros(sequence_count, dtype=np.int64)
            np.cumsum(self.sizes[:-1].astype(np.int64) * itemsize, out=want[1:])
            if not np.array_equal(want, self.pointers):
                raise IndexedDatasetError(f"{idx_path}: sequence pointers disagree with sequence lengths")
        self._bin = np.memmap(bin_path, dtype=self.dtype.newbyteorder("<"), mode="r") if actual else \
            np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence idx: the GPT dataset's only read path."""
        n = len(self)
        if idx < 0:
            idx += n
        if not 0 <= idx < n:
            raise IndexError(f"{self.prefix}: sequence {idx} out of range [0, {n})")
        size = int(self.sizes[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"{self.prefix}: slice [{offset}, {offset + length}) outside sequence {idx} of "
                             f"length {size}")
        start = int(self.pointers[idx]) // self.dtype.itemsize + offset
        return self._bin[start:start + length]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return [self.get(i) for i in range(*idx.indices(len(self)))]
        return self.get(int(idx))

    def document(self, d: int) -> list[np.ndarray]:
        """The sequences of document d."""
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        return [self.get(i) for i in range(lo, hi)]

    @staticmethod
    def exists(prefix: str) -> bool:
        return os.path.exists(index_file_path(prefix)) and os.path.exists(data_file_path(prefix))


# ---- the largest token id (the trainer's check against the model's vocabulary) --------------------

MAX_ID_CACHE_VERSION = 1


def max_token_id_reference(tokens: np.ndarray, chunk: int = 1 << 24) -> Optional[Union[int, float]]:
    """Numpy twin of the C++ `max_token_id`: chunked, so a memmap is never read into memory whole."""
    best = None
    for start in range(0, len(tokens), chunk):
        value = tokens[start:start + chunk].max()
        best = value if best is None or value > best or value != value else best
    if best is None:
        return None
    return float(best) if np.dtype(tokens.dtype).kind == "f" else int(best)


def scan_max_token_id(prefix: str) -> Optional[Union[int, float]]:
    """Largest token id in `{prefix}.bin` (None when it holds no tokens): one pass, in C++ when built.

    The pair is opened (and so validated) first: a truncated `.bin` is named, never half-scanned.
    """
    tokens = IndexedDataset(prefix)._bin
    if tokens.size == 0:
        return None
    ext = load_extension()
    if ext is not None and hasattr(ext, "max_token_id"):
        return ext.max_token_id(np.asarray(tokens))
    return max_token_id_reference(tokens)


def _bin_identity(prefix: str) -> dict:
    """What a cached scan is valid for: the .bin's path, size and mtime (a rewritten file changes them)."""
    path = os.path.abspath(data_file_path(prefix))
    stat = os.stat(path)
    return {"version": MAX_ID_CACHE_VERSION, "bin": path, "bin_bytes": stat.st_size,
            "bin_mtime_ns": stat.st_mtime_ns}


def max_token_id_cache_path(prefix: str, cache_dir: Optional[str] = None) -> str:
    """`{cache_dir}/{name}-{hash of the .bin path}-max_token_id.json`; cache_dir defaults to `cache/`
    beside the dataset, like the GPT sample-index cache."""
    directory = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")
    key = hashlib.sha256(os.path.abspath(data_file_path(prefix)).encode()).hexdigest()[:12]
    return os.path.join(directory, f"{os.path.basename(prefix)}-{key}-max_token_id.json")


def cached_max_token_id(prefix: str, cache_dir: Optional[str] = None) -> Optional[Union[int, float]]:
    """The scan's result from the cache while the .bin is unchanged; else scan and cache it.

    Run it on one rank (the trainer's rank 0): a large file is scanned once, not once per rank. The
    cache is written atomically and skipped, never an error, where the directory is not writable.
    """
    if not os.path.exists(data_file_path(prefix)):
        IndexedDataset(prefix)  # raises the one-line error naming the missing file
    identity = _bin_identity(prefix)
    path = max_token_id_cache_path(prefix, cache_dir)
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if isinstance(cached, dict) and {k: cached.get(k) for k in identity} == identity:
            return cached.get("max_token_id")
    except (OSError, ValueError):
        pass
    value = scan_max_token_id(prefix)
    if _bin_identity(prefix) == identity:  # not rewritten while it was scanned
        _write_json_atomic(path, {**identity, "max_token_id": value})
    return value


def _write_json_atomic(path: str, data: dict) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(temporary, path)
    except OSError:  # a read-only data directory: the scan still counts, it is just not kept
        with contextlib.suppress(OSError):
            os.remove(temporary)
