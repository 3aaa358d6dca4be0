"""Evaluation and generation: KOBEST few-shot multiple choice (accuracy, macro F1), perplexity on
an indexed dataset, an lm-evaluation-harness adapter (`megaglot.eval.harness`) and KV-cache text
generation, all through the parallel model at any TP/PP layout (generation's KV cache: TP only).

The command-line faces are tools/evaluate.py and tools/generate.py.
"""

from megaglot.eval.metrics import accuracy, macro_f1, perplexity
from megaglot.eval.tasks import TASKS, TaskFileError, build_examples, get_task, load_task, read_task_file

__all__ = ["TASKS", "TaskFileError", "accuracy", "build_examples", "get_task", "load_task", "macro_f1",
           "perplexity", "read_task_file"]
