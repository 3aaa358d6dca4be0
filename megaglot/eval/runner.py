"""KOBEST multiple choice end to end: examples -> requests -> scores -> accuracy and macro F1."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from megaglot.eval.metrics import accuracy, macro_f1, perplexity
from megaglot.eval.scoring import Scorer, encode_pair, indexed_dataset_windows
from megaglot.eval.tasks import Example, Task, build_examples


def score_examples(scorer: Scorer, tokenizer, examples: Sequence[Example], desc: str = "scoring") -> List[List[float]]:
    """Log-likelihood of every choice of every example (all examples' choices batched together);
    `desc` names the progress bar."""
    requests, owners = [], []
    for e, example in enumerate(examples):
        for continuation in example.continuations:
            requests.append(encode_pair(tokenizer, example.context, continuation, tokenizer.eod))
            owners.append(e)
    scores = scorer.loglikelihood_tokens(requests, desc=desc)
    out: List[List[float]] = [[] for _ in examples]
    for e, (lp, _) in zip(owners, scores):
        out[e].append(lp)
    return out


def evaluate_task(scorer: Scorer, tokenizer, task: Task, docs: Sequence[dict], *, num_fewshot: int = 0,
                  seed: int = 1234, fewshot_docs: Optional[Sequence[dict]] = None) -> Dict:
    """{'task', 'n', 'acc', 'f1', ('acc_norm'), 'preds', 'golds', 'loglikelihoods'}."""
    examples = build_examples(task, docs, num_fewshot, seed, fewshot_docs)
    lls = score_examples(scorer, tokenizer, examples, desc=f"scoring {task.name}")
    golds = [e.gold for e in examples]
    preds = [max(range(len(ll)), key=lambda i: ll[i]) for ll in lls]  # first maximum, as numpy argmax
    result = dict(task=task.name, n=len(examples), num_fewshot=num_fewshot, acc=accuracy(golds, preds),
                  f1=macro_f1(golds, preds), preds=preds, golds=golds, loglikelihoods=lls)
    if task.report_acc_norm:
        norm = [[lp / max(1, len(c.encode("utf-8"))) for lp, c in zip(ll, e.continuations)]
                for ll, e in zip(lls, examples)]
        result["acc_norm"] = accuracy(golds, [max(range(len(n)), key=lambda i: n[i]) for n in norm])
    return result


def evaluate_perplexity(scorer: Scorer, prefix: str, seq_length: int, max_tokens: Optional[int] = None) -> Dict:
    from megaglot.data.indexed_dataset import IndexedDataset

    expected = max(IndexedDataset(prefix).num_tokens - 1, 0)  # for the progress bar: every token but the first
    if max_tokens is not None:
        expected = min(expected, -(-max_tokens // seq_length) * seq_length)
    total, count = scorer.perplexity_windows(indexed_dataset_windows(prefix, seq_length, max_tokens),
                                             total_tokens=expected)
    return dict(data=prefix, tokens=count, nll=total / count if count else float("nan"),
                ppl=perplexity(total, count), seq_length=seq_length)


def format_table(results: Sequence[Dict]) -> str:
    lines = [f"| {'task':<18} | {'shots':>5} | {'n':>6} | {'acc':>7} | {'macro F1':>8} | {'acc_norm':>8} |",
             f"|{'-' * 20}|{'-' * 6}:|{'-' * 7}:|{'-' * 8}:|{'-' * 9}:|{'-' * 9}:|"]
    for r in results:
        norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
        lines.append(f"| {r['task']:<18} | {r['num_fewshot']:>5} | {r['n']:>6} | {r['acc']:>7.4f} | "
                     f"{r['f1']:>8.4f} | {norm:>8} |")
    return "\n".join(lines)


__all__ = ["score_examples", "evaluate_task", "evaluate_perplexity", "format_table"]
