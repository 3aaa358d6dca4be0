"""Progress of long work for the person at the terminal: a tqdm bar, or log lines in a file.

One wrapper so that every long step (evaluation, conversion, resharding, preprocessing,
generation, training start-up) behaves the same way:
- on stderr only: stdout carries results (JSON, generated text) that scripts read;
- on rank 0 only: N ranks drawing N bars would be noise;
- a terminal gets tqdm's live bar; a stream that is not a terminal (a log file, a pipe) gets one
  plain line every `LOG_INTERVAL` seconds (plus the first and the last), never one per item;
- nothing at all with `quiet` (the tools' --quiet).
Floor 1: imports nothing else of megaglot (and torch.distributed only if it is already loaded).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO

from tqdm import tqdm

LOG_INTERVAL = 5.0
"""Seconds between progress lines when the stream is not a terminal."""

_LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def is_rank0() -> bool:
    """True on global rank 0, or when no process group exists (RANK unset or 0). torch is not
    imported here: a process that has not loaded torch.distributed has no process group."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _LineWriter:
    """tqdm redraws its status in place with '\\r'; a log file gets each redraw as a line of its own."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Bar(tqdm):
    """tqdm with a second count shown after the rate (tensors written while the bar counts bytes)."""

    def __init__(self, *args, items: Optional[int] = None, item_unit: str = "items", **kwargs):
        self.items_done, self.items_total, self.item_unit = 0, items, item_unit
        super().__init__(*args, **kwargs)

    def advance(self, n: float, items: int = 1) -> None:
        """`n` more units (bytes) and `items` more items done; closes the bar when the total is reached."""
        self.items_done += items
        of = f"/{self.items_total}" if self.items_total is not None else ""
        self.set_postfix_str(f"{self.items_done}{of} {self.item_unit}", refresh=False)
        self.update(n)
        if self.total is not None and self.n >= self.total:
            self.close()


def progress(total: Optional[float] = None, desc: str = "", *, unit: str = "it", unit_scale: bool = False,
             quiet: bool = False, stream: Optional[TextIO] = None, interval: float = LOG_INTERVAL,
             **kwargs) -> Bar:
    """A tqdm progress bar (`.update(n)`, `.advance(n, items)`, `.set_postfix_str(...)`, `.close()`
    or `with`). Disabled (every call a no-op) with `quiet` or off rank 0. `unit="B",
    unit_scale=True` shows bytes as kB/MB/GB and the rate as MB/s; `items=N, item_unit="tensors"`
    adds a count of items to the line."""
    stream = stream if stream is not None else sys.stderr
    common = dict(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=quiet or not is_rank0(),
                  leave=True)
    common.update(kwargs)
    if _is_tty(stream):
        return Bar(file=stream, dynamic_ncols=True, **common)
    return Bar(file=_LineWriter(stream), mininterval=interval, maxinterval=max(interval, 10.0), ascii=True,
               bar_format=_LINE_FORMAT if total else _LINE_FORMAT_NO_TOTAL, **common)


def write(message: str, stream: Optional[TextIO] = None) -> None:
    """Print a line (stdout by default) without tearing a live bar: tqdm clears it, prints, redraws."""
    tqdm.write(message, file=stream if stream is not None else sys.stdout)


class StepLog:
    """`<prefix>: <what happened> (<seconds since start> s)` lines on stderr, rank 0 only, for
    steps too coarse for a bar (training start-up: model built, checkpoint loaded, ...)."""

    def __init__(self, prefix: str, *, quiet: bool = False, stream: Optional[TextIO] = None):
        self.prefix, self.quiet, self.stream = prefix, quiet, stream
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, message: str) -> None:
        if self.quiet or not is_rank0():
            return
        stream = self.stream if self.stream is not None else sys.stderr
        stream.write(f"{self.prefix}: {message} ({self.elapsed():.1f} s)\n")
        stream.flush()


__all__ = ["LOG_INTERVAL", "Bar", "progress", "write", "StepLog", "is_rank0"]
