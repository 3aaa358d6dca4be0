"""Instruction-tuning (SFT) samples: prompt/response documents as padded or packed training rows.

Preprocessing writes, for a prefix P, `P_text_document` (one document per sample: prompt tokens,
response tokens, EOD) and `P_loss_mask_document` (uint8, the same lengths, 1 on the response and
its EOD). A sample's row is its tokens shifted by one, exactly like pretraining: inputs d[:-1],
labels d[1:], loss_mask m[1:] (the loss counts predicting each response token and the EOD).

Rows come in two forms, both the dict pretraining uses (`tokens`, `labels`, `loss_mask`,
`position_ids`, each `[seq_length]`):
- padded (default): one sample per row, right-padded with token 0 and loss 0; positions 0..s-1
  and no `segment_ids`, so the model runs exactly the pretraining code (causal attention already
  keeps padding at the end out of every real token's view).
- packed (`pack=True`): samples placed greedily in order into rows; each sample keeps its own
  shift (no label ever crosses into the next sample), its positions restart at 0, and
  `segment_ids` (0, 1, 2, ... per sample, -1 on padding) let the model attend only within a
  sample, so every sample gets exactly the loss it gets alone.
A sample longer than seq_length+1 tokens is truncated to its first seq_length+1 (counted in
`truncated`). Orders are deterministic: documents as given, or a permutation per epoch from `seed`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from megaglot.config import PAD_TOKEN_ID
from megaglot.data.gpt_dataset import DatasetError, split_document_ranges
from megaglot.data.indexed_dataset import IndexedDataset

TEXT_SUFFIX = "_text_document"
MASK_SUFFIX = "_loss_mask_document"
PAD_SEGMENT = -1


def sft_prefixes(prefix: str) -> tuple[str, str]:
    """(tokens prefix, loss-mask prefix) of an SFT dataset; `prefix` may name either file's prefix."""
    for suffix in (TEXT_SUFFIX, MASK_SUFFIX):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return prefix + TEXT_SUFFIX, prefix + MASK_SUFFIX


def open_sft(prefix: str) -> tuple[IndexedDataset, IndexedDataset]:
    """Both indexed datasets, checked to describe the same documents with the same lengths."""
    text_prefix, mask_prefix = sft_prefixes(prefix)
    for p in (text_prefix, mask_prefix):
        if not IndexedDataset.exists(p):
            raise DatasetError(f"{p}.bin/.idx not found: --sft-data {prefix} needs both {TEXT_SUFFIX} and "
                               f"{MASK_SUFFIX} files (write them with tools/preprocess_sft.py)")
    text, mask = IndexedDataset(text_prefix), IndexedDataset(mask_prefix)
    if not (np.array_equal(text.sizes, mask.sizes) and np.array_equal(text.document_indices, mask.document_indices)):
        raise DatasetError(f"{mask_prefix}.idx: document lengths differ from {text_prefix}.idx; the loss mask was "
                           f"written for other data - preprocess both again with --sft")
    return text, mask


class SFTDataset:
    """Map-style rows over the documents `documents` (default: all) of one SFT dataset.

    num_samples: rows to give (default: one epoch's); more than an epoch repeats the documents, in a
    new order per epoch when `seed` is set (np.random.RandomState(seed), one permutation per epoch),
    in the given order otherwise.
    """

    def __init__(self, prefix: str, seq_length: int, documents: Optional[Sequence[int]] = None, *,
                 pack: bool = False, seed: Optional[int] = None, num_samples: Optional[int] = None,
                 pad_token: int = PAD_TOKEN_ID, name: str = "train"):
        if seq_length <= 0:
            raise DatasetError(f"--seq-length must be positive, got {seq_length}")
        self.text, self.mask = open_sft(prefix)
        self.prefix, self.name, self.seq_length = prefix, name, int(seq_length)
        self.pack, self.seed, self.pad_token = bool(pack), seed, int(pad_token)
        docs = self._check_documents(documents)
        lengths = self._document_lengths(docs)
        self.documents = docs[lengths >= 2]  # a sample needs one input and one label
        self.skipped = int(len(docs) - len(self.documents))
        self.lengths = lengths[lengths >= 2]
        self.truncated = int(np.count_nonzero(self.lengths > self.seq_length + 1))
        self._build(num_samples)

    def _check_documents(self, documents) -> np.ndarray:
        n = self.text.num_documents
        docs = np.arange(n, dtype=np.int64) if documents is None else np.asarray(documents, dtype=np.int64)
        if docs.ndim != 1:
            raise DatasetError(f"{self.text.prefix}: document ids must be a flat list, got shape {docs.shape}")
        bad = docs[(docs < 0) | (docs >= n)]
        if bad.size:
            raise DatasetError(f"{self.text.prefix}: document id {int(bad[0])} is outside [0, {n}), the dataset's "
                               f"{n} documents")
        return docs

    def _document_lengths(self, docs: np.ndarray) -> np.ndarray:
        starts = np.cumsum(np.concatenate([[0], self.text.sizes.astype(np.int64)]))
        bounds = self.text.document_indices
        return starts[bounds[docs + 1]] - starts[bounds[docs]]

    def _epoch_order(self, epoch: int, rng) -> np.ndarray:
        """Positions into self.documents in this epoch's order."""
        order = np.arange(len(self.documents), dtype=np.int64)
        return order if rng is None else rng.permutation(order)

    def _rows_of(self, order: np.ndarray) -> list[int]:
        """Start of each row in `order`: one per sample, or greedy next-fit packing by row length."""
        if not self.pack:
            return list(range(len(order)))
        sizes = np.minimum(self.lengths[order] - 1, self.seq_length).tolist()
        starts, used = [], self.seq_length
        for i, size in enumerate(sizes):
            if used + size > self.seq_length:
                starts.append(i)
                used = 0
            used += size
        return starts

    def _build(self, num_samples: Optional[int]) -> None:
        rng = None if self.seed is None else np.random.RandomState(self.seed)
        orders, bounds, total = [], [], 0
        self.samples_per_epoch = 0
        while True:
            order = self._epoch_order(len(orders), rng)
            starts = self._rows_of(order)
            if not starts:
                break
            self.samples_per_epoch = self.samples_per_epoch or len(starts)
            bounds.extend(total + s for s in starts)
            orders.append(order)
            total += len(order)
            if num_samples is None or len(bounds) >= num_samples:
                break
        wanted = len(bounds) if num_samples is None else int(num_samples)
        if wanted > len(bounds):
            raise DatasetError(f"{self.text.prefix}: the {self.name} split has no samples of at least two tokens "
                               f"but {wanted} were asked for; change the split or the data")
        bounds.append(total)
        self.order = np.concatenate(orders) if orders else np.zeros(0, dtype=np.int64)
        self.row_bounds = np.asarray(bounds[: wanted] + [bounds[wanted]], dtype=np.int64)
        self.num_samples = wanted

    def __len__(self) -> int:
        return self.num_samples

    def sample(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, 0/1 loss mask) of self.documents[position], truncated to seq_length+1 tokens."""
        doc = int(self.documents[position])
        keep = self.seq_length + 1
        tokens = np.concatenate(self.text.document(doc))[:keep].astype(np.int64)
        mask = np.concatenate(self.mask.document(doc))[:keep] != 0
        return tokens, mask.astype(np.float32)

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"{self.name} SFT sample {idx} out of range [0, {self.num_samples})")
        members = self.order[self.row_bounds[idx]:self.row_bounds[idx + 1]]
        return self._row([self.sample(int(p)) for p in members])

    def _row(self, samples: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        s = self.seq_length
        row = {"tokens": np.full(s, self.pad_token, dtype=np.int64), "labels": np.full(s, self.pad_token, np.int64),
               "loss_mask": np.zeros(s, dtype=np.float32), "position_ids": np.arange(s, dtype=np.int64)}
        if self.pack:
            row["segment_ids"] = np.full(s, PAD_SEGMENT, dtype=np.int64)
        at = 0
        for segment, (tokens, mask) in enumerate(samples):
            n = len(tokens) - 1
            row["tokens"][at:at + n], row["labels"][at:at + n] = tokens[:-1], tokens[1:]
            row["loss_mask"][at:at + n] = mask[1:]
            if self.pack:
                row["position_ids"][at:at + n] = np.arange(n)
                row["segment_ids"][at:at + n] = segment
            at += n
        if self.pack:
            row["position_ids"][at:] = np.arange(s - at)  # padding: its own segment, positions from 0
        return row

    def stats(self) -> dict:
        """Documents used, skipped (under two tokens) and truncated, rows per epoch, and the share of
        row positions holding sample tokens (packing efficiency), for the log."""
        fill = np.minimum(self.lengths - 1, self.seq_length).sum() / max(self.samples_per_epoch * self.seq_length, 1)
        return {"documents": len(self.documents), "skipped": self.skipped, "truncated": self.truncated,
                "samples_per_epoch": self.samples_per_epoch, "fill": float(fill)}


def build_sft_datasets(prefix: str, seq_length: int, split: str = "969,30,1", *, pack: bool = False,
                       seed: Optional[int] = 1234, num_samples: Sequence[Optional[int]] = (None, None, None)
                       ) -> tuple:
    """(train, valid, test) SFTDatasets over consecutive document ranges (Megatron's --split rounding);
    None where a split has no documents. Validation and test keep the document order (seed=None)."""
    text, _ = open_sft(prefix)
    out = []
    for i, (begin, end) in enumerate(split_document_ranges(split, text.num_documents)):
        if end <= begin or (num_samples[i] is not None and int(num_samples[i]) == 0):
            out.append(None)
            continue
        out.append(SFTDataset(prefix, seq_length, np.arange(begin, end), pack=pack, seed=seed if i == 0 else None,
                              num_samples=num_samples[i], name=("train", "valid", "test")[i]))
    return tuple(out)
