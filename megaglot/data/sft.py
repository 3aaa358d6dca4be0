"""Instruction-tuning data: KoAlpaca / chat JSONL -> tokens plus a loss mask, as indexed datasets.

For `--output-prefix P` this writes `P_text_document.bin/.idx` (one document per sample: prompt,
response and <|endoftext|>; the pretraining dtype rule, so Megatron's reader reads it as any other
token file), `P_loss_mask_document.bin/.idx` (uint8 0/1, the same document lengths: 1 on response
tokens and the end-of-text token, 0 on the prompt) and the sidecar `P_text_document.json`
(pretraining's fields plus {"sft": {"template", "loss_mask", ...}}).

Prompt and response are tokenized separately, so the mask boundary is exact and the prompt tokens
are exactly those a generator gets from the same template. PII is found on the whole rendered
sample, as pretraining does on a document, and each number becomes one mask token.

Records (one JSON object per line; blank lines are skipped):
  {"instruction": ..., "input": ... (optional), "output": ...}                 one exchange
  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   a dialogue
An optional system message comes first, then user and assistant alternate, ending with the
assistant; every assistant message is a response (loss). Fields named in METADATA_FIELDS are
ignored; any other field is an error, as is a record without a response. Bad input stops the run
with one line naming the file and line: fine-tuning sets are small and curated, and a silently
skipped record is a silently changed experiment.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, TextIO

import numpy as np

from megaglot.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megaglot.data.input_reader import PreprocessError, expand_inputs
from megaglot.data.pii import KINDS, find_pii
from megaglot.data.sft_templates import SEPARATOR, Template, load_template
from megaglot.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_summary

RECORD_FIELDS = ("instruction", "input", "output", "messages")
METADATA_FIELDS = ("id", "category", "source", "url")
ROLES = ("system", "user", "assistant")


@dataclass
class SFTConfig:
    """Everything `tools/preprocess_sft.py` takes; field names follow its flags."""

    input: list[str]
    """JSONL files or globs (.gz allowed) of KoAlpaca records or chat messages."""
    output_prefix: str
    """Writes {output_prefix}_text_document and _loss_mask_document .bin/.idx, and a .json sidecar."""
    tokenizer: Optional[str] = None
    """tokenizer.json of the model to fine-tune (required; the one its pretraining data used)."""
    template: str = "koalpaca"
    """Prompt template: koalpaca, chat, or a file with {instruction}, optional {input} and {output}."""
    workers: int = 1
    """Encoding processes (the output is byte-identical for any count)."""
    mask_pii: bool = True
    """Replace phone, registration and account numbers by <|tel|>, <|rrn|>, <|acc|> as in pretraining."""
    lang: Optional[str] = None
    """Language tag recorded in the sidecar."""
    batch_size: int = 64
    """Samples per encode batch handed to a worker."""
    quiet: bool = False
    """Print nothing but errors."""


def text_and_mask_prefixes(output_prefix: str) -> tuple[str, str]:
    """(tokens prefix, loss-mask prefix) of an SFT dataset; accepts P or P_text_document."""
    base = output_prefix[:-len("_text_document")] if output_prefix.endswith("_text_document") else output_prefix
    return f"{base}_text_document", f"{base}_loss_mask_document"


# ---- records -> segments [(text, is_response)] (main process: errors are found in input order) -------

def _string(record: dict, key: str, where: str) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise PreprocessError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _check_fields(record, where: str) -> None:
    if not isinstance(record, dict):
        raise PreprocessError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = [k for k in record if k not in RECORD_FIELDS + METADATA_FIELDS]
    if unknown:
        raise PreprocessError(f"{where}: unknown field '{unknown[0]}' (records have {', '.join(RECORD_FIELDS[:3])} "
                              f"or messages; {', '.join(METADATA_FIELDS)} are ignored)")
    if "messages" in record and any(k in record for k in RECORD_FIELDS[:3]):
        raise PreprocessError(f"{where}: give either instruction/input/output or messages, not both")


def _exchanges(record: dict, where: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(system text, [(instruction, input, output)]) of one record."""
    if "messages" not in record:
        instruction, output = _string(record, "instruction", where), _string(record, "output", where)
        if not output.strip():
            raise PreprocessError(f"{where}: no response: 'output' is missing or empty")
        if not instruction.strip():
            raise PreprocessError(f"{where}: no 'instruction' (or it is empty)")
        return "", [(instruction, _string(record, "input", where), output)]
    return _dialogue(record["messages"], where)


def _dialogue(messages, where: str) -> tuple[str, list[tuple[str, str, str]]]:
    if not isinstance(messages, list):
        raise PreprocessError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    turns: list[tuple[str, str]] = []
    for n, message in enumerate(messages, 1):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise PreprocessError(f"{where}: message {n} must be an object with exactly 'role' and 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise PreprocessError(f"{where}: message {n}: unknown role {role!r} (use {', '.join(ROLES)})")
        if not isinstance(content, str) or not content.strip():
            raise PreprocessError(f"{where}: message {n} ({role}): 'content' must be a non-empty string")
        turns.append((role, content))
    system = turns.pop(0)[1] if turns and turns[0][0] == "system" else ""
    if not any(role == "assistant" for role, _ in turns):
        raise PreprocessError(f"{where}: no response: 'messages' has no assistant message")
    expected = ("user", "assistant") * (len(turns) // 2 + 1)
    for n, (role, _) in enumerate(turns):
        if role != expected[n]:
            raise PreprocessError(f"{where}: message {n + 1 + bool(system)}: expected a {expected[n]} message, "
                                  f"got {role} (an optional system message, then user and assistant alternate)")
    if len(turns) % 2:
        raise PreprocessError(f"{where}: the last message is from the user; a dialogue must end with the assistant")
    return system, [(turns[i][1], "", turns[i + 1][1]) for i in range(0, len(turns), 2)]


def render_record(record, template: Template, where: str) -> list[tuple[str, bool]]:
    """Validated record -> [(text, is_response)], adjacent prompt texts joined."""
    _check_fields(record, where)
    system, exchanges = _exchanges(record, where)
    if (system or exchanges[0][1]) and template.system is None and not template.has_input:
        what = "a system message" if system else "an 'input'"
        raise PreprocessError(f"{where}: the record has {what} but template {template.name} has no {{input}}")
    segments: list[tuple[str, bool]] = []
    prefix = template.render_system(system) if system and template.system is not None else ""
    for n, (instruction, inp, output) in enumerate(exchanges):
        if n == 0 and system and template.system is None:
            inp = system if not inp else f"{system}\n\n{inp}"
        prompt = (SEPARATOR if n else prefix) + template.render_prompt(instruction, inp)
        segments += [(prompt, False), (template.render_response(output), True)]
    return segments


def read_records(files: list[str], template: Template) -> Iterator[tuple[str, list[tuple[str, bool]]]]:
    """(file:line, segments) for every record of the files, in order; the first bad line raises."""
    for path in files:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as stream:
            for number, raw in enumerate(stream, 1):
                where = f"{path}:{number}"
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8").rstrip("\r\n"))
                except UnicodeDecodeError as error:
                    raise PreprocessError(f"{where}: not UTF-8 ({error.reason} at byte {error.start})") from None
                except json.JSONDecodeError as error:
                    raise PreprocessError(f"{where}: malformed JSON ({error.msg} at column {error.colno}); "
                                          f"each line must be one JSON object") from None
                yield where, render_record(record, template, where)


# ---- segments -> tokens and mask (worker processes) ------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_path: Optional[str], tokenizer: Optional[Tokenizer], mask_pii: bool, dtype: str) -> None:
    if tokenizer is None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tokenizer = load_tokenizer(tokenizer_path)
    _WORKER.update(tokenizer=tokenizer, pii=tokenizer.pii_token_ids() if mask_pii else None,
                   eod=tokenizer.eod, dtype=np.dtype(dtype))


def _pieces(segments: list[tuple[str, bool]], mask: bool) -> list[tuple[str, Optional[str], bool]]:
    """(text, PII kind or None, is_response) pieces; PII is searched in the whole sample's text.

    A number that straddles a segment boundary (only possible when template text holds digits)
    is masked in the segment where it starts."""
    full = "".join(text for text, _ in segments)
    spans = find_pii(full) if mask else []
    out: list[tuple[str, Optional[str], bool]] = []
    begin, consumed, s = 0, 0, 0
    for text, is_response in segments:
        end = begin + len(text)
        start = max(begin, consumed)
        while s < len(spans) and spans[s].start < end:
            span = spans[s]
            if span.start > start:
                out.append((full[start:span.start], None, is_response))
            out.append((full[span.start:span.end], span.kind, is_response))
            start = consumed = span.end
            s += 1
        if start < end:
            out.append((full[start:end], None, is_response))
        begin = end
    return out


def encode_samples(batch: list[list[tuple[str, bool]]]) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """[(tokens, loss mask)] of a batch of samples and the PII counts; runs in a worker."""
    w = _WORKER
    counts = dict.fromkeys(KINDS, 0)
    plans = [_pieces(segments, w["pii"] is not None) for segments in batch]
    plain = [text for plan in plans for text, kind, _ in plan if kind is None]
    encoded = iter(w["tokenizer"].encode_batch(plain)) if plain else iter(())
    out = []
    for plan in plans:
        ids: list[int] = []
        mask: list[int] = []
        for text, kind, is_response in plan:
            if kind is None:
                piece = next(encoded)
            else:
                piece = [w["pii"][kind]]
                counts[kind] += 1
            ids.extend(piece)
            mask.extend([int(is_response)] * len(piece))
        ids.append(w["eod"])
        mask.append(1)
        out.append((np.asarray(ids, dtype=w["dtype"]), np.asarray(mask, dtype=np.uint8)))
    return out, counts


# ---- the driver --------------------------------------------------------------------------------------

def _batches(records: Iterator[tuple[str, list]], size: int, stats: dict) -> Iterator[list]:
    batch: list = []
    for _, segments in records:
        stats["records"] += 1
        stats["exchanges"] += sum(1 for _, is_response in segments if is_response)
        batch.append(segments)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _resolve_tokenizer(cfg: SFTConfig) -> Tokenizer:
    if not cfg.tokenizer:
        raise PreprocessError("--tokenizer is required: give the tokenizer.json of the model to fine-tune "
                              "(the one its pretraining data was prepared with)")
    file = os.path.join(cfg.tokenizer, "tokenizer.json") if os.path.isdir(cfg.tokenizer) else cfg.tokenizer
    if not os.path.isfile(file):
        raise PreprocessError(f"--tokenizer {cfg.tokenizer}: no tokenizer.json there (give the file or its directory)")
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.eod is None:
        raise PreprocessError(f"--tokenizer {tokenizer.path}: no <|endoftext|> token; every sample ends with it")
    if cfg.mask_pii:
        tokenizer.pii_token_ids()  # fail now, naming the tokenizer, not inside a worker
    return tokenizer


def _encode_all(cfg: SFTConfig, files: list[str], template: Template, tokenizer: Tokenizer, dtype,
                builders: tuple[IndexedDatasetBuilder, IndexedDatasetBuilder]) -> dict:
    """Encode every record in input order into the two builders; returns the counts."""
    stats = {"records": 0, "exchanges": 0, "tokens": 0, "response_tokens": 0, "masks": dict.fromkeys(KINDS, 0)}
    batches = _batches(read_records(files, template), cfg.batch_size, stats)
    pool = None
    try:
        if cfg.workers == 1:
            _init_worker(None, tokenizer, cfg.mask_pii, dtype.str)
            results = map(encode_samples, batches)
        else:
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(
                cfg.workers, initializer=_init_worker, initargs=(tokenizer.path, None, cfg.mask_pii, dtype.str))
            results = pool.imap(encode_samples, batches, chunksize=1)
        for samples, counts in results:
            for tokens, mask in samples:
                builders[0].add_document(tokens)
                builders[1].add_document(mask)
                stats["tokens"] += int(tokens.size)
                stats["response_tokens"] += int(mask.sum())
            for kind in KINDS:
                stats["masks"][kind] += counts[kind]
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return stats


def preprocess_sft(cfg: SFTConfig, log: TextIO = sys.stderr) -> dict:
    """Run the whole conversion; returns the sidecar dict (also written as P_text_document.json)."""
    if cfg.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.batch_size < 1:
        raise PreprocessError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    files = expand_inputs(cfg.input)
    template = load_template(cfg.template)
    tokenizer = _resolve_tokenizer(cfg)
    dtype = best_dtype(tokenizer.vocab_size)
    text_prefix, mask_prefix = text_and_mask_prefixes(cfg.output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(text_prefix)), exist_ok=True)
    builders = (IndexedDatasetBuilder(text_prefix + ".bin.tmp", dtype),
                IndexedDatasetBuilder(mask_prefix + ".bin.tmp", np.uint8))
    try:
        stats = _encode_all(cfg, files, template, tokenizer, dtype, builders)
        if stats["records"] == 0:
            raise PreprocessError(f"no samples: {', '.join(files)} hold no records")
        builders[0].finalize(text_prefix + ".idx.tmp")
        builders[1].finalize(mask_prefix + ".idx.tmp")
    except BaseException:
        for builder, prefix in zip(builders, (text_prefix, mask_prefix)):
            builder.close()
            for suffix in (".bin.tmp", ".idx.tmp"):
                if os.path.exists(prefix + suffix):
                    os.remove(prefix + suffix)
        raise
    sidecar = {
        "documents": stats["records"], "tokens": stats["tokens"], "masks": stats["masks"] if cfg.mask_pii else None,
        "mask_pii": cfg.mask_pii, "tokenizer": tokenizer_summary(tokenizer), "lang": cfg.lang, "append_eod": True,
        "dtype": str(dtype), "inputs": files, "workers": cfg.workers, "json_key": "text",
        "sft": {"template": template.name, "loss_mask": mask_prefix, "exchanges": stats["exchanges"],
                "response_tokens": stats["response_tokens"], "prompt": template.prompt,
                "response": template.response, "system": template.system},
    }
    for prefix in (text_prefix, mask_prefix):
        os.replace(prefix + ".bin.tmp", prefix + ".bin")
        os.replace(prefix + ".idx.tmp", prefix + ".idx")
    _write_json(text_prefix + ".json", sidecar)
    if not cfg.quiet:
        _report(sidecar, text_prefix, mask_prefix, log)
    return sidecar


def _write_json(path: str, data: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _report(sidecar: dict, text_prefix: str, mask_prefix: str, log: TextIO) -> None:
    sft = sidecar["sft"]
    log.write(f"preprocess_sft: {sidecar['documents']} samples ({sft['exchanges']} responses), {sidecar['tokens']} "
              f"tokens, {sft['response_tokens']} with loss; template {sft['template']}\n")
    if sidecar["masks"] is not None:
        log.write("preprocess_sft: PII masked: " + ", ".join(f"{k} {v}" for k, v in sidecar["masks"].items()) + "\n")
    log.write(f"preprocess_sft: wrote {text_prefix}.bin/.idx/.json and {mask_prefix}.bin/.idx\n")


__all__ = ["SFTConfig", "preprocess_sft", "read_records", "render_record", "encode_samples",
           "text_and_mask_prefixes", "RECORD_FIELDS", "METADATA_FIELDS"]
