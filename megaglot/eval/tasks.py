"""KOBEST tasks: reading local task files and building prompts as lm-evaluation-harness does.

Every task is multiple choice by log-likelihood. lm-evaluation-harness (v0.4, `tasks/kobest`)
builds one request per choice: context = few-shot block + `doc_to_text(doc)`, continuation =
" " (its target delimiter) + the choice. The few-shot block is k examples, each
`doc_to_text(ex) + " " + the correct choice of ex`, joined and followed by "\\n\\n". The prompts:

- kobest_copa: `"{premise} 왜냐하면"` (question 원인) or `"{premise} 그래서"` (결과); choices the two
  alternatives.
- kobest_hellaswag: `"문장: {context}"`; choices ending_1..ending_4 (also reports acc_norm, the
  accuracy of the log-likelihood divided by the choice's length in UTF-8 bytes).
- kobest_boolq: `"{paragraph} 질문: {question} 답변: "`; choices 아니오 / 예.
- kobest_sentineg: `"문장: {sentence} 긍부정:"`; choices 부정 / 긍정.
- kobest_wic: `"문장1: {context_1} 문장2: {context_2} 두 문장에서 {word}가 같은 뜻으로 쓰였나?"`;
  choices 아니오 / 예.

Files hold the Hugging Face dataset's fields (skt/kobest_v1), one document per JSON line, or
parquet / Arrow exports (read with pyarrow when it is installed).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence


class TaskFileError(ValueError):
    """A task file that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class Task:
    name: str
    fields: tuple
    num_choices: int
    doc_to_text: Callable[[dict], str]
    doc_to_choices: Callable[[dict], List[str]]
    report_acc_norm: bool = False


def _copa_text(doc):
    connector = {"원인": " 왜냐하면", "결과": " 그래서"}[doc["question"].strip()]
    return f"{doc['premise']} {connector}"


TASKS = {
    "kobest_copa": Task("kobest_copa", ("premise", "question", "alternative_1", "alternative_2", "label"), 2,
                        _copa_text, lambda d: [d["alternative_1"], d["alternative_2"]]),
    "kobest_hellaswag": Task("kobest_hellaswag", ("context", "ending_1", "ending_2", "ending_3", "ending_4", "label"),
                             4, lambda d: f"문장: {d['context']}",
                             lambda d: [d["ending_1"], d["ending_2"], d["ending_3"], d["ending_4"]],
                             report_acc_norm=True),
    "kobest_boolq": Task("kobest_boolq", ("paragraph", "question", "label"), 2,
                         lambda d: f"{d['paragraph']} 질문: {d['question']} 답변: ", lambda d: ["아니오", "예"]),
    "kobest_sentineg": Task("kobest_sentineg", ("sentence", "label"), 2,
                            lambda d: f"문장: {d['sentence']} 긍부정:", lambda d: ["부정", "긍정"]),
    "kobest_wic": Task("kobest_wic", ("word", "context_1", "context_2", "label"), 2,
                       lambda d: f"문장1: {d['context_1']} 문장2: {d['context_2']} 두 문장에서 {d['word']}가 같은 뜻으로 쓰였나?",
                       lambda d: ["아니오", "예"]),
}
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
EXTENSIONS = (".jsonl", ".json", ".parquet", ".arrow")


def get_task(name: str) -> Task:
    task = TASKS.get(name) or TASKS.get("kobest_" + name)
    if task is None:
        raise TaskFileError(f"--tasks: unknown task {name!r}; known: {', '.join(TASKS)}")
    return task


# ---- reading ----------------------------------------------------------------------------------
def _check_doc(task: Task, doc, where: str) -> dict:
    if not isinstance(doc, dict):
        raise TaskFileError(f"{where}: expected a JSON object with fields {', '.join(task.fields)}, "
                            f"got {type(doc).__name__}")
    missing = [f for f in task.fields if doc.get(f) is None]
    if missing:
        raise TaskFileError(f"{where}: missing field {', '.join(missing)} ({task.name} needs "
                            f"{', '.join(task.fields)})")
    for f in task.fields:
        if f != "label" and not isinstance(doc[f], str):
            raise TaskFileError(f"{where}: field {f} must be a string, got {type(doc[f]).__name__}")
    label = doc["label"]
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        label = int(label.strip())
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < task.num_choices:
        raise TaskFileError(f"{where}: label {doc['label']!r} out of range (0..{task.num_choices - 1} "
                            f"for {task.name})")
    if task.name == "kobest_copa" and doc["question"].strip() not in ("원인", "결과"):
        raise TaskFileError(f"{where}: question must be 원인 or 결과, got {doc['question']!r}")
    return dict(doc, label=label)


def _read_jsonl(path: str, task: Task) -> List[dict]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{where}: not valid JSON ({e.msg})") from None
            docs.append(_check_doc(task, doc, where))
    return docs


def _read_columnar(path: str, task: Task) -> List[dict]:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise TaskFileError(f"{path}: reading parquet/arrow files needs pyarrow (pip install pyarrow), "
                            f"or export the task as JSONL") from None
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow as pa

            try:  # Hugging Face datasets' cache files are Arrow streams; Feather v2 is the file format
                with pa.memory_map(path) as source:
                    table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                with pa.memory_map(path) as source:
                    table = pa.ipc.open_file(source).read_all()
    except Exception as e:  # noqa: BLE001 - pyarrow raises many error types
        raise TaskFileError(f"{path}: cannot be read as {os.path.splitext(path)[1][1:]} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return [_check_doc(task, doc, f"{path}: row {i + 1}") for i, doc in enumerate(table.to_pylist())]


def read_task_file(path: str, task: Task) -> List[dict]:
    if not os.path.isfile(path):
        raise TaskFileError(f"{path}: no such file")
    if path.endswith((".parquet", ".arrow")):
        docs = _read_columnar(path, task)
    else:
        docs = _read_jsonl(path, task)
    if not docs:
        raise TaskFileError(f"{path}: no documents")
    return docs


def find_task_file(data_dir: str, task: Task, splits: Sequence[str]) -> Optional[str]:
    """`<data_dir>/<task>_<split>.<ext>` (or without the `kobest_` prefix, or with no split)."""
    short = task.name[len("kobest_"):]
    for split in splits:
        for stem in (task.name, short):
            for ext in EXTENSIONS:
                name = f"{stem}_{split}{ext}" if split else f"{stem}{ext}"
                path = os.path.join(data_dir, name)
                if os.path.isfile(path):
                    return path
    return None


def load_task(data_dir: str, name: str, split: str = "test"):
    """(task, eval docs, eval file, few-shot docs or None, few-shot file or None)."""
    task = get_task(name)
    if not os.path.isdir(data_dir):
        raise TaskFileError(f"--data-dir {data_dir}: no such directory")
    path = find_task_file(data_dir, task, (split, "validation", "") if split != "train" else (split,))
    if path is None:
        raise TaskFileError(f"--data-dir {data_dir}: no file for {task.name} (looked for "
                            f"{task.name}_{split}.jsonl, {task.name}.jsonl, .parquet, .arrow)")
    train = find_task_file(data_dir, task, ("train",)) if split != "train" else None
    return task, read_task_file(path, task), path, (read_task_file(train, task) if train else None), train


# ---- prompts ----------------------------------------------------------------------------------
@dataclass
class Example:
    """One document as requests: the shared context, each choice's continuation, the gold index."""

    context: str
    continuations: List[str]
    gold: int
    choices: List[str]


def target_text(task: Task, doc: dict) -> str:
    return task.doc_to_choices(doc)[doc["label"]]


def fewshot_context(task: Task, doc: dict, shots: Sequence[dict]) -> str:
    block = "".join(task.doc_to_text(s) + TARGET_DELIMITER + target_text(task, s) + FEWSHOT_DELIMITER for s in shots)
    return block + task.doc_to_text(doc)


def build_examples(task: Task, docs: Sequence[dict], num_fewshot: int = 0, seed: int = 1234,
                   fewshot_docs: Optional[Sequence[dict]] = None) -> List[Example]:
    """Examples for every doc. Few-shot examples are drawn with `random.Random(seed)` (one stream per
    task, in document order, as lm-evaluation-harness's sampler does) from `fewshot_docs`, else from
    `docs` without the current document."""
    rng = random.Random(seed)
    pool = list(fewshot_docs) if fewshot_docs is not None else None
    if num_fewshot < 0:
        raise TaskFileError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    available = len(pool) if pool is not None else len(docs) - 1
    if num_fewshot > available:
        source = "its train file" if pool is not None else "the other documents of its file"
        raise TaskFileError(f"--num-fewshot {num_fewshot}: {task.name} has only {available} examples in {source}")
    examples = []
    for i, doc in enumerate(docs):
        shots = []
        if num_fewshot:
            if pool is not None:
                shots = rng.sample(pool, num_fewshot)
            else:
                picked = rng.sample(range(len(docs)), num_fewshot + 1)
                shots = [docs[j] for j in picked if j != i][:num_fewshot]
        choices = task.doc_to_choices(doc)
        examples.append(Example(fewshot_context(task, doc, shots), [TARGET_DELIMITER + c for c in choices],
                                doc["label"], choices))
    return examples


__all__ = ["TASKS", "Task", "TaskFileError", "Example", "get_task", "read_task_file", "find_task_file",
           "load_task", "build_examples", "fewshot_context"]
