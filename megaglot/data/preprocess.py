"""JSONL / plain text -> PII-masked tokens in Megatron `.bin/.idx` files (the library behind
`tools/preprocess_data.py`).

Documents are read in order, encoded in batches by N worker processes and written in the same
order, so the output is identical whatever the worker count. Bad input lines are counted and
skipped (with the first few line numbers reported) rather than aborting a day-long run on one bad
line; `strict` turns them into errors. Outputs are written under `.tmp` names and renamed only at
the end, so an interrupted run never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, TextIO

import numpy as np

from megaglot.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megaglot.data.input_reader import (PreprocessError, _is_jsonl, _Reader, _Stats, expand_inputs,
                                       no_documents_message)
from megaglot.data.pii import KINDS, split_pii
from megaglot.data.tokenizer import (Tokenizer, TokenizerExistsError, load_tokenizer, save_new_tokenizer,
                                    tokenizer_summary, train_tokenizer)
from megaglot.progress import progress


@dataclass
class PreprocessConfig:
    """Everything `tools/preprocess_data.py` takes; field names follow its flags."""

    input: list[str]
    """Input files or globs: .jsonl/.json (one JSON object per line) or text; any of them .gz."""
    output_prefix: str
    """Outputs are {output_prefix}_{key}_document.bin/.idx/.json."""
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    """JSON keys to tokenize; one output pair per key (text files use the first key's name)."""
    tokenizer: Optional[str] = None
    """Path of a tokenizer.json (or its directory)."""
    train_tokenizer: bool = False
    """Train a byte-level BPE on the input first, saved as tokenizer.json beside the output (never over a different one)."""
    vocab_size: Optional[int] = None
    """Vocabulary size of the trained tokenizer."""
    append_eod: bool = False
    """Append <|endoftext|> after each document."""
    workers: int = 1
    """Encoding processes."""
    lang: Optional[str] = None
    """Language tag recorded in the sidecar (the blending table shows it)."""
    mask_pii: bool = True
    """Replace phone, registration and account numbers by <|tel|>, <|rrn|>, <|acc|>."""
    strict: bool = False
    """Stop at the first malformed line instead of skipping it."""
    text_split: str = "auto"
    """Plain text: 'line' (one document per line), 'blank' (blank-line separated) or 'auto'."""
    batch_size: int = 128
    """Documents per encode batch handed to a worker."""
    log_interval: float = 10.0
    """Seconds between progress lines when the log stream is not a terminal (a terminal gets a live bar)."""
    quiet: bool = False
    """No progress bar (input bytes read, MB/s, documents, time left)."""


# ---- encoding (runs in worker processes) ---------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_path: Optional[str], tokenizer: Optional[Tokenizer], mask_pii: bool,
                 append_eod: bool, dtype: str) -> None:
    if tokenizer is None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one core per worker process
        tokenizer = load_tokenizer(tokenizer_path)
    _WORKER.update(tokenizer=tokenizer, pii=tokenizer.pii_token_ids() if mask_pii else None,
                   eod=tokenizer.eod if append_eod else None, dtype=np.dtype(dtype))


def encode_documents(texts: list[str], tokenizer: Tokenizer, pii_ids: Optional[dict], eod: Optional[int]):
    """Token arrays of a batch of documents and the mask counts; PII spans become single ids.

    Each document is cut at its PII spans and the plain pieces are encoded in one batch call, so
    a mask id never merges with neighbouring bytes whatever the tokenizer's added-token setup.
    """
    counts = dict.fromkeys(KINDS, 0)
    pieces: list[str] = []
    plans: list[list] = []  # per document: ints (mask ids) and None (next encoded piece)
    for text in texts:
        plan = []
        parts = split_pii(text) if pii_ids is not None else [(text, None)]
        for piece, kind in parts:
            if kind is None:
                pieces.append(piece)
                plan.append(None)
            else:
                plan.append(pii_ids[kind])
                counts[kind] += 1
        plans.append(plan)
    encoded = iter(tokenizer.encode_batch(pieces)) if pieces else iter(())
    out = []
    for plan in plans:
        ids: list[int] = []
        for step in plan:
            if step is None:
                ids.extend(next(encoded))
            else:
                ids.append(step)
        if eod is not None:
            ids.append(eod)
        out.append(ids)
    return out, counts


def _encode_batch(batch: list[dict]) -> tuple[list[list[np.ndarray]], dict, dict]:
    """(per document, its arrays per key; PII mask counts; {key: largest id in the batch})."""
    w = _WORKER
    keys = list(batch[0].keys()) if batch else []
    per_key, largest = {}, {}
    total = dict.fromkeys(KINDS, 0)
    for key in keys:
        ids, counts = encode_documents([doc[key] for doc in batch], w["tokenizer"], w["pii"], w["eod"])
        per_key[key] = [np.asarray(x, dtype=w["dtype"]) for x in ids]
        largest[key] = max((int(a.max()) for a in per_key[key] if a.size), default=None)
        for k in KINDS:
            total[k] += counts[k]
    return [[per_key[key][i] for key in keys] for i in range(len(batch))], total, largest


# ---- the driver ----------------------------------------------------------------------------------

def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: {output_prefix}_{json_key}_document."""
    return f"{output_prefix}_{key}_document"


def _batches(docs: Iterator[tuple[str, dict]], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for _, doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _resolve_tokenizer(cfg: PreprocessConfig, files: list[str], log: TextIO) -> Tokenizer:
    if cfg.train_tokenizer:
        if not cfg.vocab_size:
            raise PreprocessError("--train-tokenizer needs --vocab-size N")
        if cfg.tokenizer:
            raise PreprocessError("give either --tokenizer or --train-tokenizer, not both")
        return _train(cfg, files, log)
    if not cfg.tokenizer:
        raise PreprocessError("no tokenizer: give --tokenizer PATH or --train-tokenizer --vocab-size N")
    return load_tokenizer(cfg.tokenizer)


def _train(cfg: PreprocessConfig, files: list[str], log: TextIO) -> Tokenizer:
    """Train on the input, then save beside the output; nothing is saved when no document was read."""
    save = os.path.join(os.path.dirname(os.path.abspath(cfg.output_prefix)), "tokenizer.json")
    stats = _Stats()
    reader = _Reader(cfg, stats)

    def texts():
        for _, doc in reader.documents(files):
            stats.documents += 1
            for text in doc.values():
                # train on masked text, so no merges are spent on numbers that will be masked
                yield "".join(p if k is None else "" for p, k in split_pii(text)) if cfg.mask_pii else text

    log.write(f"preprocess: training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) -> {save}\n")
    trained = train_tokenizer(texts(), cfg.vocab_size)
    if stats.documents == 0:
        raise PreprocessError(no_documents_message(stats, files))
    if trained.vocab_size < cfg.vocab_size:
        log.write(f"preprocess: tokenizer: learned {trained.vocab_size} tokens, fewer than --vocab-size "
                  f"{cfg.vocab_size} (the corpus is small)\n")
    try:
        return save_new_tokenizer(trained, save)
    except TokenizerExistsError as error:
        raise PreprocessError(f"--train-tokenizer: {error}; pass --tokenizer {save} to reuse it, or give an "
                              f"--output-prefix in another directory") from None


def _check_flags(cfg: PreprocessConfig) -> None:
    if cfg.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.text_split not in ("auto", "line", "blank"):
        raise PreprocessError(f"--text-split must be auto, line or blank, got {cfg.text_split!r}")
    if not cfg.json_keys:
        raise PreprocessError("--json-keys: give at least one key")


def _prepare_output_dir(cfg: PreprocessConfig) -> Optional[str]:
    """Create the output directory, or say in one line why it cannot be (a file in the way, no rights);
    returns the directory if this call created it (a failed run removes it again when empty)."""
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    created = None if os.path.isdir(out_dir) else out_dir
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        blocking = out_dir
        while blocking and not os.path.exists(blocking):
            blocking = os.path.dirname(blocking)
        why = f"{blocking} is a file, not a directory" if os.path.isfile(blocking) else error.strerror
        raise PreprocessError(f"--output-prefix {cfg.output_prefix}: cannot create the directory {out_dir} "
                              f"({why}); choose a prefix inside a directory") from None
    if not os.access(out_dir, os.W_OK):
        raise PreprocessError(f"--output-prefix {cfg.output_prefix}: the directory {out_dir} is not writable")
    return created


def preprocess(cfg: PreprocessConfig, log: TextIO = sys.stderr) -> dict:
    """Run the whole conversion; returns the sidecar dict (also written as JSON per output).

    A run that writes no document fails (PreprocessError saying why) and leaves nothing behind;
    outputs of an earlier run under the same prefix stay until new ones replace them whole.
    """
    _check_flags(cfg)
    files = expand_inputs(cfg.input)
    created = _prepare_output_dir(cfg)
    try:
        return _preprocess(cfg, files, log)
    except BaseException:
        if created is not None:
            with contextlib.suppress(OSError):
                os.rmdir(created)  # only when empty: a directory this failed run made and left nothing in
        raise


def _preprocess(cfg: PreprocessConfig, files: list[str], log: TextIO) -> dict:
    any_text = any(not _is_jsonl(f) for f in files)
    if any_text and len(cfg.json_keys) > 1:
        raise PreprocessError("--json-keys with several keys needs JSONL inputs only")
    tokenizer = _resolve_tokenizer(cfg, files, log)
    if cfg.mask_pii:
        tokenizer.pii_token_ids()  # fail now, naming the tokenizer, not inside a worker
    if cfg.append_eod and tokenizer.eod is None:
        raise PreprocessError(f"--append-eod: tokenizer {tokenizer.path} has no <|endoftext|> token")
    dtype = best_dtype(tokenizer.vocab_size)
    keys = cfg.json_keys if not any_text else cfg.json_keys[:1]
    prefixes = {key: output_prefix_for(cfg.output_prefix, key) for key in keys}
    stats = _Stats()
    started = time.perf_counter()
    largest = _encode_all(cfg, files, tokenizer, dtype, prefixes, stats, log)
    sidecar = {
        "documents": stats.documents, "tokens": stats.tokens, "masks": stats.masks if cfg.mask_pii else None,
        "mask_pii": cfg.mask_pii, "skipped": stats.skipped,
        "skipped_first_lines": {k: v for k, v in stats.skipped_lines.items() if v},
        "tokenizer": tokenizer_summary(tokenizer), "lang": cfg.lang, "append_eod": cfg.append_eod,
        "dtype": str(dtype), "inputs": files, "input_bytes": stats.bytes_in,
        "seconds": round(time.perf_counter() - started, 3), "workers": cfg.workers,
    }
    for key in keys:
        # tokens and max_token_id are per key: the trainer checks every id is below the model's vocabulary
        _write_json(prefixes[key] + ".json.tmp", {**sidecar, "json_key": key, "tokens": stats.key_tokens[key],
                                                   "max_token_id": largest[key]})
        for suffix in (".bin", ".idx", ".json"):
            os.replace(prefixes[key] + suffix + ".tmp", prefixes[key] + suffix)
    _report(sidecar, prefixes, keys, log)
    return sidecar


def _encode_all(cfg: PreprocessConfig, files: list[str], tokenizer: Tokenizer, dtype: np.dtype, prefixes: dict,
                stats: _Stats, log: TextIO) -> dict:
    """Encode every document into `{prefix}.bin.tmp/.idx.tmp` per key; {key: largest id}.

    On any failure, and when no document was written, the temporary files are removed."""
    keys = list(prefixes)
    reader = _Reader(cfg, stats)
    builders: dict = {}
    largest: dict = dict.fromkeys(keys)
    stats.key_tokens = dict.fromkeys(keys, 0)
    bar = progress(sum(os.path.getsize(f) for f in files), "preprocess", unit="B", unit_scale=True,
                   quiet=cfg.quiet, stream=log, interval=cfg.log_interval)
    pool = None
    try:
        for key in keys:
            builders[key] = IndexedDatasetBuilder(prefixes[key] + ".bin.tmp", dtype)
        batches = _batches(reader.documents(files), cfg.batch_size)
        if cfg.workers == 1:
            _init_worker(None, tokenizer, cfg.mask_pii, cfg.append_eod, dtype.str)
            results = map(_encode_batch, batches)
        else:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                  else "spawn")
            pool = context.Pool(cfg.workers, initializer=_init_worker,
                                initargs=(tokenizer.path, None, cfg.mask_pii, cfg.append_eod, dtype.str))
            results = pool.imap(_encode_batch, batches, chunksize=1)
        for docs, counts, batch_largest in results:
            _add_batch(builders, keys, docs, counts, stats)
            for key, value in batch_largest.items():
                if value is not None and (largest[key] is None or value > largest[key]):
                    largest[key] = value
            bar.set_postfix_str(f"{stats.documents} docs", refresh=False)
            bar.update(max(reader.progress_bytes() - bar.n, 0))
        if stats.documents == 0:
            raise PreprocessError(no_documents_message(stats, files))
        for key in keys:
            builders[key].finalize(prefixes[key] + ".idx.tmp")
    except BaseException:
        for key, builder in builders.items():
            builder.close()
            for suffix in (".bin.tmp", ".idx.tmp"):
                if os.path.exists(prefixes[key] + suffix):
                    os.remove(prefixes[key] + suffix)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close()
    return largest


def _add_batch(builders: dict, keys: list, docs: list, counts: dict, stats: _Stats) -> None:
    for arrays in docs:
        for key, array in zip(keys, arrays):
            builders[key].add_document(array)
            stats.tokens += int(array.size)
            stats.key_tokens[key] += int(array.size)
    stats.documents += len(docs)
    for kind in KINDS:
        stats.masks[kind] += counts[kind]


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")


def _report(sidecar: dict, prefixes: dict, keys: list[str], log: TextIO) -> None:
    seconds = max(sidecar["seconds"], 1e-9)
    log.write(f"preprocess: {sidecar['documents']} documents, {sidecar['tokens']} tokens in {seconds:.1f}s "
              f"({sidecar['documents'] / seconds:.0f} docs/s, {sidecar['input_bytes'] / seconds / 1e6:.2f} MB/s)\n")
    if sidecar["masks"] is not None:
        log.write("preprocess: PII masked: " + ", ".join(f"{k} {v}" for k, v in sidecar["masks"].items()) + "\n")
    skipped = {k: v for k, v in sidecar["skipped"].items() if v}
    if skipped:
        log.write("preprocess: skipped: " + ", ".join(f"{k} {v}" for k, v in skipped.items()) + "\n")
        for reason, lines in sidecar["skipped_first_lines"].items():
            log.write(f"preprocess:   first {reason}: {', '.join(lines)}\n")
    for key in keys:
        log.write(f"preprocess: wrote {prefixes[key]}.bin/.idx/.json\n")


def ensure_preprocessed(input_path: str, output_prefix: str, vocab_size: int = 4096,
                        tokenizer: Optional[str] = None, lang: Optional[str] = None,
                        json_key: str = "text", log: TextIO = sys.stderr) -> tuple[str, str]:
    """(dataset prefix, tokenizer.json path): preprocess once, reuse afterwards.

    For demos: trains a tokenizer beside the output when none is given, appends EOD, masks PII.
    Re-runs only when the outputs are missing.
    """
    prefix = output_prefix_for(output_prefix, json_key)
    tok_path = tokenizer or os.path.join(os.path.dirname(os.path.abspath(output_prefix)), "tokenizer.json")
    if os.path.exists(prefix + ".idx") and os.path.exists(prefix + ".bin") and os.path.exists(tok_path):
        return prefix, tok_path
    preprocess(PreprocessConfig(input=[input_path], output_prefix=output_prefix, json_keys=[json_key],
                                tokenizer=tokenizer if tokenizer else (tok_path if os.path.exists(tok_path) else None),
                                train_tokenizer=tokenizer is None and not os.path.exists(tok_path),
                                vocab_size=vocab_size, append_eod=True, lang=lang), log=log)
    return prefix, tok_path


__all__ = ["PreprocessConfig", "PreprocessError", "preprocess", "ensure_preprocessed", "encode_documents",
           "expand_inputs", "output_prefix_for"]
