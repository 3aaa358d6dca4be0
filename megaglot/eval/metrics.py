"""Accuracy and macro F1 (as scikit-learn's `f1_score(average='macro')`, which KOBEST reports)."""

from __future__ import annotations

import math
from typing import Sequence


def accuracy(golds: Sequence[int], preds: Sequence[int]) -> float:
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold labels but {len(preds)} predictions")
    if not golds:
        return float("nan")
    return sum(int(g == p) for g, p in zip(golds, preds)) / len(golds)


def macro_f1(golds: Sequence[int], preds: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 = 2TP / (2TP + FP + FN) over the classes that occur in golds
    or preds (so the denominator is never 0), as scikit-learn computes it."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold labels but {len(preds)} predictions")
    labels = sorted(set(golds) | set(preds))
    if not labels:
        return float("nan")
    scores = []
    for c in labels:
        tp = sum(1 for g, p in zip(golds, preds) if g == c and p == c)
        fp = sum(1 for g, p in zip(golds, preds) if g != c and p == c)
        fn = sum(1 for g, p in zip(golds, preds) if g == c and p != c)
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens) if tokens else float("nan")


__all__ = ["accuracy", "macro_f1", "perplexity"]
