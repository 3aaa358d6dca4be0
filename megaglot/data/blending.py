"""Blending several datasets: `--data-path` weights, `--data-balance temperature:ALPHA`, the greedy
blend and the table printed at start.

Polyglot's multilingual step needs every language present without the small ones repeating
dozens of times, so the weights are either given or derived from token counts by a temperature,
and the table says how many epochs of each dataset a run will consume before the run starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np

from megaglot.kernels import load_extension


class BlendingError(ValueError):
    """A --data-path or --data-balance that cannot be used; the message names the flag."""


def parse_data_paths(spec: Union[str, Sequence]) -> tuple[list[str], Optional[list[float]]]:
    """'0.7 ko 0.3 en' (or its list, or [(0.7, 'ko'), ...]) -> (prefixes, weights); weights None if none given."""
    if isinstance(spec, str):
        items = spec.split()
    else:
        items = []
        for entry in spec:
            items.extend(entry if isinstance(entry, (tuple, list)) else [entry])
    items = [str(x) for x in items]
    if not items:
        raise BlendingError("--data-path: no dataset given")

    def number(x: str) -> Optional[float]:
        try:
            return float(x)
        except ValueError:
            return None

    numbers = [number(x) for x in items]
    if all(n is None for n in numbers):
        return items, None
    if len(items) % 2 or any(n is None for n in numbers[0::2]) or any(n is not None for n in numbers[1::2]):
        raise BlendingError(f"--data-path {' '.join(items)}: give 'WEIGHT PREFIX' pairs (e.g. 0.7 ko 0.3 en) or "
                            f"prefixes only")
    weights = [float(n) for n in numbers[0::2]]
    if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise BlendingError(f"--data-path weights {weights} must be non-negative with a positive sum")
    return items[1::2], weights


def parse_balance(spec: Optional[str]) -> Optional[float]:
    """'temperature:ALPHA' -> ALPHA ('natural' = 1, 'uniform' = 0); None keeps the given weights."""
    if spec is None or spec == "":
        return None
    if spec == "natural":
        return 1.0
    if spec == "uniform":
        return 0.0
    kind, _, value = spec.partition(":")
    try:
        alpha = float(value)
    except ValueError:
        alpha = None
    if kind != "temperature" or alpha is None or not np.isfinite(alpha) or alpha < 0:
        raise BlendingError(f"--data-balance {spec!r}: expected temperature:ALPHA with ALPHA >= 0 "
                            f"(1 = natural, 0 = uniform), 'natural' or 'uniform'")
    return alpha


def balance_weights(tokens: Sequence[int], alpha: float) -> list[float]:
    """Weights proportional to tokens_i ** alpha, normalized."""
    t = np.asarray(tokens, dtype=np.float64)
    if np.any(t <= 0):
        raise BlendingError("--data-balance: every dataset needs at least one token")
    w = np.power(t / t.max(), alpha)  # scaled first so large counts and alphas cannot overflow
    return (w / w.sum()).tolist()


def normalize(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def blending_indices_reference(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Numpy twin of the C++ `build_blending_indices` (same float arithmetic, same tie-break)."""
    w = np.asarray(weights, dtype=np.float64)
    current = np.zeros(len(w), dtype=np.int64)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    for i in range(size):
        errors = w * float(max(i, 1)) - current.astype(np.float64)
        best = int(np.argmax(errors))  # first maximum, like the C++ strict '>'
        dataset_index[i] = best
        sample_index[i] = current[best]
        current[best] += 1
    return dataset_index, sample_index


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each blended sample, index of that sample within its dataset)."""
    w = normalize(weights)
    ext = load_extension()
    if ext is not None and hasattr(ext, "build_blending_indices"):
        return ext.build_blending_indices(w, int(size))
    return blending_indices_reference(w, int(size))


def samples_per_dataset(weights: Sequence[float], size: int) -> np.ndarray:
    dataset_index, _ = blending_indices(weights, size)
    return np.bincount(dataset_index.astype(np.int64), minlength=len(weights))


class BlendedDataset:
    """Blended sample i is sample `dataset_sample_index[i]` of dataset `dataset_index[i]`."""

    def __init__(self, datasets: list, weights: Sequence[float], size: int):
        self.datasets = datasets
        self.weights = normalize(weights)
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = blending_indices(self.weights, self.size)
        counts = np.bincount(self.dataset_index.astype(np.int64), minlength=len(datasets))
        for d, (dataset, count) in enumerate(zip(datasets, counts)):
            if count > len(dataset):
                raise BlendingError(f"blend needs {count} samples of dataset {d} but it has {len(dataset)}")
        self.table: list[BlendRow] = []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> dict:
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]


@dataclass
class BlendRow:
    """One line of the start-of-run table."""

    prefix: str
    """Dataset prefix."""
    lang: Optional[str]
    """Language from the preprocessing sidecar, if any."""
    tokens: int
    """Tokens in this split of the dataset."""
    weight: float
    """Normalized blend weight."""
    samples: int
    """Samples drawn from it."""
    epochs: float
    """Effective epochs: tokens drawn / tokens available (how many times its data repeats)."""


def read_sidecar(prefix: str) -> dict:
    """The JSON tools/preprocess_data.py writes beside a dataset ({} when absent or unreadable)."""
    try:
        with open(prefix + ".json", encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def sidecar_lang(prefix: str) -> Optional[str]:
    return read_sidecar(prefix).get("lang")


def make_table(prefixes: Sequence[str], tokens: Sequence[int], weights: Sequence[float],
               samples: Sequence[int], seq_length: int) -> list[BlendRow]:
    return [BlendRow(p, sidecar_lang(p), int(t), float(w), int(s), (s * seq_length / t) if t else float("inf"))
            for p, t, w, s in zip(prefixes, tokens, weights, samples)]


def format_table(rows: Sequence[BlendRow], title: str) -> str:
    width = max([len("dataset")] + [len(os.path.basename(r.prefix)) for r in rows])
    lines = [title, f"  {'dataset':<{width}}  {'lang':<4}  {'tokens':>12}  {'weight':>7}  {'samples':>10}  "
                    f"{'epochs':>8}"]
    for r in rows:
        lines.append(f"  {os.path.basename(r.prefix):<{width}}  {(r.lang or '-'):<4}  {r.tokens:>12,}  "
                     f"{r.weight:>7.4f}  {r.samples:>10,}  {r.epochs:>8.3f}")
    return "\n".join(lines)
