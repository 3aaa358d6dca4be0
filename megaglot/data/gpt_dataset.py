"""GPT pretraining samples: train/valid/test document splits, document/sample/shuffle indices,
blending, and the data-parallel batch order.

A sample is seq_length+1 consecutive tokens of the shuffled document stream, crossing document
boundaries (EOD is an ordinary token), split into input and shifted labels. The three indices
depend only on the data, split, seq_length, num_samples and seed; they are cached on disk under a
hash of exactly those, written atomically and memory-mapped, so the first rank builds them and
every other rank (and every restart) maps the same files. The layer imports no process groups:
callers pass the data-parallel rank and size.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from megaglot.config import EOD_TOKEN_ID
from megaglot.data.blending import (BlendedDataset, BlendingError, balance_weights, format_table, make_table,
                                    normalize, parse_balance, parse_data_paths, samples_per_dataset)
from megaglot.data.indexed_dataset import IndexedDataset, index_file_path
from megaglot.kernels import load_extension

INDEX_VERSION = 1  # bump when the way indices are built changes, so old caches are not reused
SPLIT_NAMES = ("train", "valid", "test")


class DatasetError(ValueError):
    """Data that cannot give the samples asked for; the message names the flag or file."""


@dataclass
class GPTDatasetConfig:
    """What determines a GPT dataset's indices and items."""

    seq_length: int
    """Tokens per sample fed to the model (each sample reads seq_length+1)."""
    seed: int = 1234
    """Seed of the document and sample shuffles."""
    cache_dir: Optional[str] = None
    """Index cache; None = a `cache/` directory beside the data (in memory if not writable)."""
    eod_mask_loss: bool = False
    """Zero the loss where the input token is EOD (Megatron's --eod-mask-loss); off by default."""
    eod_token: int = EOD_TOKEN_ID
    """Id of <|endoftext|>."""


def parse_split(split: str) -> list[float]:
    """'969,30,1' -> normalized fractions [train, valid, test]."""
    try:
        parts = [float(s) for s in split.replace("/", ",").split(",") if s.strip() != ""]
    except ValueError:
        raise DatasetError(f"--split {split!r}: expected up to three comma-separated numbers like 969,30,1") from None
    if not parts or len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DatasetError(f"--split {split!r}: expected up to three non-negative numbers with a positive sum")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def split_document_ranges(split: str, num_documents: int) -> list[tuple[int, int]]:
    """Document [begin, end) of each split, rounded exactly as Megatron's get_split_indices."""
    fractions = parse_split(split)
    index = [0]
    for f in fractions:
        index.append(index[-1] + int(round(f * float(num_documents))))
    diff = index[-1] - num_documents
    for i in range(1, len(index)):
        index[i] -= diff
    return [(index[i], index[i + 1]) for i in range(3)]


def build_sample_idx_reference(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int,
                               num_samples: int) -> np.ndarray:
    """Vectorized numpy twin of the C++ `build_sample_idx`: sample i starts at token i*seq_length of
    the document stream, at the document that holds that token."""
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(doc_idx, dtype=np.int64)]
    ends = np.cumsum(lengths)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    total = int(ends[-1]) if len(ends) else 0
    if num_samples and starts[-1] >= total:
        raise IndexError(f"build_sample_idx: documents exhausted: {num_samples} samples of {seq_length} need "
                         f"{int(starts[-1]) + 1} tokens, the document index has {total}")
    position = np.searchsorted(ends, starts, side="right")
    offset = starts - np.where(position > 0, ends[np.maximum(position - 1, 0)], 0)
    out = np.stack([position, offset], axis=1).astype(np.int64)
    out[0] = (0, 0)
    return out


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    ext = load_extension()
    if ext is not None:
        return ext.build_sample_idx(np.asarray(sizes, dtype=np.int32), np.asarray(doc_idx, dtype=np.int64),
                                    int(seq_length), int(num_samples))
    return build_sample_idx_reference(sizes, doc_idx, seq_length, num_samples)


def _save_atomic(path: str, array: np.ndarray) -> None:
    temporary = f"{path}.{os.getpid()}.tmp.npy"
    np.save(temporary, array, allow_pickle=False)
    os.replace(temporary, path)


class GPTDataset:
    """`num_samples` samples of seq_length+1 tokens over the sequences `sequence_ids` of one dataset."""

    def __init__(self, dataset: IndexedDataset, name: str, sequence_ids: np.ndarray, num_samples: int,
                 config: GPTDatasetConfig, document_range: tuple[int, int] = (0, 0)):
        self.dataset, self.name, self.config = dataset, name, config
        self.seq_length = config.seq_length
        self.num_samples = int(num_samples)
        self.sequence_ids = np.asarray(sequence_ids, dtype=np.int64)
        self.tokens_per_epoch = int(dataset.sizes[self.sequence_ids].sum(dtype=np.int64)) if len(sequence_ids) else 0
        if self.seq_length <= 0:
            raise DatasetError(f"--seq-length must be positive, got {self.seq_length}")
        if self.num_samples > 0 and self.tokens_per_epoch == 0:
            raise DatasetError(f"{dataset.prefix}: the {name} split has no tokens but {self.num_samples} samples "
                               f"were asked for; change --split or the sample counts")
        needed = self.num_samples * self.seq_length + 1
        self.num_epochs = -(-needed // self.tokens_per_epoch) if self.tokens_per_epoch else 0
        self.description = {
            "class": "GPTDataset", "index_version": INDEX_VERSION, "prefix": os.path.abspath(dataset.prefix),
            "idx_bytes": os.path.getsize(index_file_path(dataset.prefix)), "sequences": len(dataset),
            "tokens": dataset.num_tokens, "split": name, "document_range": list(document_range),
            "num_samples": self.num_samples, "seq_length": self.seq_length, "seed": config.seed,
        }
        self.hash = hashlib.sha256(json.dumps(self.description, sort_keys=True).encode()).hexdigest()[:16]
        self.doc_idx, self.sample_idx, self.shuffle_idx = self._load_or_build()

    def _build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.RandomState(self.config.seed)
        # every epoch is its own permutation, so data repeats only after all of it was seen once
        doc_idx = np.concatenate([rng.permutation(self.sequence_ids) for _ in range(self.num_epochs)]
                                 or [np.zeros(0, dtype=np.int64)]).astype(np.int64)
        sample_idx = build_sample_idx(self.dataset.sizes, doc_idx, self.seq_length, self.num_samples)
        dtype = np.uint32 if self.num_samples < 2 ** 32 else np.int64
        shuffle_idx = rng.permutation(self.num_samples).astype(dtype)
        return doc_idx, sample_idx, shuffle_idx

    def _cache_dir(self) -> Optional[str]:
        directory = self.config.cache_dir or os.path.join(os.path.dirname(os.path.abspath(self.dataset.prefix)),
                                                          "cache")
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError:
            return None
        return directory if os.access(directory, os.W_OK) else None

    def _load_or_build(self):
        directory = self._cache_dir()
        if directory is None:
            return self._build()
        stem = os.path.join(directory, f"{os.path.basename(self.dataset.prefix)}-{self.name}-{self.hash}")
        paths = [f"{stem}-{k}_idx.npy" for k in ("doc", "sample", "shuffle")]
        if not all(os.path.exists(p) for p in paths):
            arrays = self._build()
            with open(f"{stem}.json.{os.getpid()}.tmp", "w") as f:
                json.dump(self.description, f, indent=2)
            os.replace(f"{stem}.json.{os.getpid()}.tmp", f"{stem}.json")
            for path, array in zip(paths, arrays):
                _save_atomic(path, array)
        return tuple(np.load(p, mmap_mode="r", allow_pickle=False) for p in paths)

    def __len__(self) -> int:
        return self.num_samples

    def tokens_of(self, idx: int) -> np.ndarray:
        """The seq_length+1 tokens of sample idx (after the sample shuffle)."""
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"{self.name} sample {idx} out of range [0, {self.num_samples})")
        i = int(self.shuffle_idx[idx])
        (d0, o0), (d1, o1) = self.sample_idx[i], self.sample_idx[i + 1]
        d0, o0, d1, o1 = int(d0), int(o0), int(d1), int(o1)
        if d0 == d1:
            return self.dataset.get(int(self.doc_idx[d0]), o0, o1 - o0 + 1).astype(np.int64)
        parts = [self.dataset.get(int(self.doc_idx[d0]), o0)]
        parts += [self.dataset.get(int(self.doc_idx[d])) for d in range(d0 + 1, d1)]
        parts.append(self.dataset.get(int(self.doc_idx[d1]), 0, o1 + 1))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> dict:
        tokens = self.tokens_of(int(idx))
        inputs = tokens[:-1]
        loss_mask = np.ones(self.seq_length, dtype=np.float32)
        if self.config.eod_mask_loss:
            loss_mask[inputs == self.config.eod_token] = 0.0
        return {"tokens": inputs, "labels": tokens[1:], "loss_mask": loss_mask,
                "position_ids": np.arange(self.seq_length, dtype=np.int64)}


def _resolve_weights(prefixes: list[str], weights: Optional[list[float]], datasets: list[IndexedDataset],
                     balance: Optional[str]) -> list[float]:
    alpha = parse_balance(balance)
    if alpha is not None:
        if weights is not None and len(prefixes) > 1:
            raise BlendingError("--data-balance cannot be combined with weights in --data-path; give prefixes only")
        return balance_weights([d.num_tokens for d in datasets], alpha)
    if weights is None:
        return balance_weights([max(d.num_tokens, 1) for d in datasets], 1.0)  # natural: as if concatenated
    return normalize(weights).tolist()


def build_train_valid_test_datasets(data_prefixes_and_weights: Union[str, Sequence], split: str = "969,30,1",
                                    seq_length: int = 2048, seed: int = 1234,
                                    num_samples: Sequence[int] = (0, 0, 0), cache_dir: Optional[str] = None,
                                    balance: Optional[str] = None, eod_mask_loss: bool = False,
                                    eod_token: int = EOD_TOKEN_ID,
                                    log: Optional[Callable[[str], None]] = None) -> tuple:
    """(train, valid, test) map-style datasets; an entry is None where its sample count is 0.

    With one prefix the datasets are GPTDatasets; with several, BlendedDatasets whose `table`
    lists tokens, weight, samples drawn and effective epochs per dataset (also printed via log).
    Call it on one rank first (it builds and caches the indices), then on the others.
    """
    log = log or (lambda line: print(line, file=sys.stdout, flush=True))
    if len(num_samples) != 3 or any(int(n) < 0 for n in num_samples):
        raise DatasetError(f"num_samples must be three non-negative counts (train, valid, test), got {num_samples}")
    prefixes, weights = parse_data_paths(data_prefixes_and_weights)
    datasets = [IndexedDataset(p) for p in prefixes]
    weights = _resolve_weights(prefixes, weights, datasets, balance)
    config = GPTDatasetConfig(seq_length=seq_length, seed=seed, cache_dir=cache_dir, eod_mask_loss=eod_mask_loss,
                              eod_token=eod_token)
    ranges = [split_document_ranges(split, d.num_documents) for d in datasets]
    results = []
    for s, name in enumerate(SPLIT_NAMES):
        wanted = int(num_samples[s])
        if wanted == 0:
            results.append(None)
            continue
        pieces = []
        for d, dataset in enumerate(datasets):
            begin, end = ranges[d][s]
            lo, hi = int(dataset.document_indices[begin]), int(dataset.document_indices[end])
            sequence_ids = np.arange(lo, hi, dtype=np.int64)
            tokens = int(dataset.sizes[lo:hi].sum(dtype=np.int64))
            pieces.append((d, sequence_ids, tokens, (begin, end)))
        usable = [p for p in pieces if p[2] > 0 and weights[p[0]] > 0]
        if not usable:
            raise DatasetError(f"--split {split}: the {name} split has no documents in "
                               f"{', '.join(prefixes)}; {wanted} samples were asked for")
        if len(datasets) == 1:
            d, ids, tokens, rng = usable[0]
            gpt = GPTDataset(datasets[d], name, ids, wanted, config, rng)
            table = make_table([prefixes[d]], [tokens], [1.0], [wanted], seq_length)
            gpt.table = table
            log(format_table(table, f"data ({name}): {wanted:,} samples of {seq_length} tokens"))
            results.append(gpt)
            continue
        w = normalize([weights[p[0]] for p in usable])
        counts = samples_per_dataset(w, wanted)
        members = [GPTDataset(datasets[p[0]], name, p[1], int(c), config, p[3]) for p, c in zip(usable, counts)]
        blended = BlendedDataset(members, w, wanted)
        blended.table = make_table([prefixes[p[0]] for p in usable], [p[2] for p in usable], w, counts, seq_length)
        kept = {p[0] for p in usable}
        dropped = [prefixes[p[0]] for p in pieces if p[0] not in kept]
        title = f"data blend ({name}): {wanted:,} samples of {seq_length} tokens"
        if dropped:
            title += f" (no {name} documents or zero weight, left out: {', '.join(dropped)})"
        log(format_table(blended.table, title))
        results.append(blended)
    return tuple(results)


# ---- data-parallel batching ---------------------------------------------------------------------

def micro_batch_indices(total_samples: int, consumed_samples: int, micro_batch_size: int,
                        data_parallel_rank: int, data_parallel_size: int) -> Iterator[list[int]]:
    """Megatron's MegatronPretrainingSampler order.

    The global sample order is 0, 1, 2, ... whatever the DP size. It is cut into groups of
    micro_batch_size x data_parallel_size consecutive samples; DP rank r takes the contiguous slice
    [r*mbs, (r+1)*mbs) of each group. So global sample i goes to rank (i // mbs) % dp, and a global
    batch (a multiple of mbs x dp) holds the same samples at every DP size. Incomplete final groups
    are dropped; resuming from consumed_samples continues exactly where the run stopped.
    """
    if micro_batch_size <= 0:
        raise DatasetError(f"--micro-batch-size must be positive, got {micro_batch_size}")
    if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
        raise DatasetError(f"data-parallel rank {data_parallel_rank} is not in [0, {data_parallel_size})")
    group = micro_batch_size * data_parallel_size
    if consumed_samples < 0 or consumed_samples % group:
        raise DatasetError(f"consumed_samples {consumed_samples} is not a multiple of micro_batch_size x "
                           f"data_parallel_size = {group}")
    if consumed_samples > total_samples:
        raise DatasetError(f"consumed_samples {consumed_samples} exceeds the {total_samples} samples of the "
                           f"dataset; raise the sample count (--train-iters / --train-samples)")
    first = data_parallel_rank * micro_batch_size
    for start in range(consumed_samples, total_samples - group + 1, group):
        yield list(range(start + first, start + first + micro_batch_size))


def collate(items: list[dict]):
    """Stack sample dicts into [b, s] torch tensors."""
    import torch

    return {key: torch.from_numpy(np.stack([item[key] for item in items])) for key in items[0]}


def make_batches(dataset, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int) -> Iterator[dict]:
    """Micro-batches (dicts of torch tensors [b, s]) of this DP rank, from consumed_samples on."""
    for indices in micro_batch_indices(len(dataset), consumed_samples, micro_batch_size, data_parallel_rank,
                                       data_parallel_size):
        yield collate([dataset[i] for i in indices])
