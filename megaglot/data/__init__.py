"""Data: Megatron-compatible indexed datasets, Korean PII masking, tokenizers, GPT samples and blending.

Plain numpy plus the compiled index helpers; no process groups (callers pass the data-parallel
rank and size), so everything here runs the same in a test, a tool or rank 0 of a cluster job.
"""

from megaglot.data.gpt_dataset import build_train_valid_test_datasets, make_batches, micro_batch_indices
from megaglot.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError
from megaglot.data.preprocess import PreprocessConfig, ensure_preprocessed, preprocess
from megaglot.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = ["IndexedDataset", "IndexedDatasetBuilder", "IndexedDatasetError", "build_train_valid_test_datasets",
           "make_batches", "micro_batch_indices", "PreprocessConfig", "preprocess", "ensure_preprocessed",
           "load_tokenizer", "train_tokenizer"]
