"""Reading preprocessing input: JSONL or plain text files (optionally gzipped) -> documents.

Separate from `preprocess.py` (which encodes and writes): this module decides what a document is
and which lines are skipped and why.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

from megaglot.data.pii import KINDS

if TYPE_CHECKING:  # the reader only reads fields of the config preprocess.py defines
    from megaglot.data.preprocess import PreprocessConfig

SKIP_REASONS = ("malformed_json", "missing_key", "undecodable", "empty")
MAX_REPORTED_LINES = 5


class PreprocessError(ValueError):
    """Input or flags that cannot be processed; the message names the file, line or flag."""


@dataclass
class _Stats:
    documents: int = 0
    tokens: int = 0
    bytes_in: int = 0
    masks: dict = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    skipped: dict = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    skipped_lines: dict = field(default_factory=lambda: {r: [] for r in SKIP_REASONS})
    lines: int = 0
    """Non-blank input lines read."""
    key_tokens: dict = field(default_factory=dict)
    """{key: tokens written for it} (each key is its own dataset)."""
    missing_keys: dict = field(default_factory=dict)
    """{--json-keys key: lines whose record lacks it as a string}."""
    first_record_keys: Optional[list] = None
    """The keys of the first record that lacked one: what --json-keys probably should have named."""

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_lines[reason]) < MAX_REPORTED_LINES:
            self.skipped_lines[reason].append(where)


def no_documents_message(stats: _Stats, files: list[str]) -> str:
    """Why a run wrote nothing, in one line: a run that writes no document is a failed run."""
    if stats.lines == 0:
        more = f" and {len(files) - 1} more" if len(files) > 1 else ""
        return f"no documents written: the input ({files[0]}{more}) holds no text (0 non-blank lines read)"
    skipped = sum(stats.skipped.values())
    reasons = [f"key {key!r} missing in {n}" for key, n in stats.missing_keys.items() if n]
    reasons += [f"{reason.replace('_', ' ')} {n}" for reason, n in stats.skipped.items()
                if n and reason != "missing_key"]
    message = f"no documents written: {stats.lines} lines read, {skipped} skipped ({', '.join(reasons)})"
    if stats.skipped["missing_key"]:
        message += " - check --json-keys"
        if stats.first_record_keys is not None:
            message += f" (the first such record has keys: {', '.join(map(str, stats.first_record_keys)) or 'none'})"
    return message


def expand_inputs(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise PreprocessError(f"--input {pattern}: matches no file")
        for path in matched:
            if not os.path.isfile(path):
                raise PreprocessError(f"--input {path}: no such file")
            files.append(path)
    if not files:
        raise PreprocessError("--input: no input files given")
    return files


def _is_jsonl(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return True
    if name.endswith((".txt", ".text")):
        return False
    with _open_binary(path)[0] as f:
        for line in f:
            if line.strip():
                return line.lstrip().startswith(b"{")
    return False


def _open_binary(path: str):
    """(stream of decompressed bytes, raw file whose tell() measures progress on disk)."""
    raw = open(path, "rb")
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return raw, raw


class _Reader:
    """Yields (location, {key: text}) for every usable document, counting what it skips."""

    def __init__(self, cfg: PreprocessConfig, stats: _Stats):
        self.cfg, self.stats = cfg, stats
        self.bytes_done = 0  # on-disk bytes of finished files
        self._raw = None

    def progress_bytes(self) -> int:
        try:
            return self.bytes_done + (self._raw.tell() if self._raw is not None and not self._raw.closed else 0)
        except (ValueError, OSError):
            return self.bytes_done

    def _problem(self, reason: str, where: str, detail: str) -> None:
        if self.cfg.strict:
            raise PreprocessError(f"{where}: {detail} (--strict)")
        self.stats.skip(reason, where)

    def documents(self, files: list[str]) -> Iterator[tuple[str, dict]]:
        for path in files:
            stream, self._raw = _open_binary(path)
            with stream:
                yield from (self._jsonl(path, stream) if _is_jsonl(path) else self._text(path, stream))
            self.bytes_done += os.path.getsize(path)
            self._raw = None

    def _jsonl(self, path: str, stream) -> Iterator[tuple[str, dict]]:
        keys = self.cfg.json_keys
        for number, line in enumerate(stream, 1):
            where = f"{path}:{number}"
            self.stats.bytes_in += len(line)
            if not line.strip():
                continue
            self.stats.lines += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                self._problem("undecodable", where, f"not UTF-8 ({error.reason} at byte {error.start})")
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                self._problem("malformed_json", where, f"malformed JSON ({error.msg})")
                continue
            if not isinstance(record, dict) or any(not isinstance(record.get(k), str) for k in keys):
                missing = [k for k in keys if not isinstance(record, dict) or not isinstance(record.get(k), str)]
                self._count_missing(record, missing)
                self._problem("missing_key", where, f"no string value for key(s) {', '.join(missing)}")
                continue
            if all(not record[k].strip() for k in keys):
                self.stats.skip("empty", where)
                continue
            yield where, {k: record[k] for k in keys}

    def _count_missing(self, record, missing: list[str]) -> None:
        for key in missing:
            self.stats.missing_keys[key] = self.stats.missing_keys.get(key, 0) + 1
        if self.stats.first_record_keys is None:
            self.stats.first_record_keys = list(record)[:10] if isinstance(record, dict) else []

    def _text(self, path: str, stream) -> Iterator[tuple[str, dict]]:
        key = self.cfg.json_keys[0]
        mode = self.cfg.text_split
        if mode == "auto":
            head = stream.peek(1 << 20)[: 1 << 20] if hasattr(stream, "peek") else b""
            mode = "blank" if b"\n\n" in head.replace(b"\r\n", b"\n") else "line"
        paragraph: list[str] = []
        start = 1
        for number, line in enumerate(stream, 1):
            self.stats.bytes_in += len(line)
            try:
                text = line.decode("utf-8").rstrip("\r\n")
                self.stats.lines += bool(text.strip())
            except UnicodeDecodeError as error:
                self.stats.lines += 1
                self._problem("undecodable", f"{path}:{number}", f"not UTF-8 ({error.reason} at byte {error.start})")
                continue
            if mode == "line":
                if text.strip():
                    yield f"{path}:{number}", {key: text}
                continue
            if text.strip():
                if not paragraph:
                    start = number
                paragraph.append(text)
            elif paragraph:
                yield f"{path}:{start}", {key: "\n".join(paragraph)}
                paragraph = []
        if paragraph:
            yield f"{path}:{start}", {key: "\n".join(paragraph)}
