"""Data: Megatron-compatible indexed datasets, Korean PII masking, tokenizers, GPT samples and blending.

Plain numpy plus the compiled index helpers; no process groups (callers pass the data-parallel
rank and size), so everything here runs the same in a test, a tool or rank 0 of a cluster job.
"""

from megaglot.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError

__all__ = ["IndexedDataset", "IndexedDatasetBuilder", "IndexedDatasetError"]
