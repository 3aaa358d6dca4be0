"""Per-rank record of what a schedule computed and when, and the bubble fraction it implies.

An event is `(op, microbatch, chunk, start, end)`: op "F" (forward) or "B" (backward), the
microbatch index, the model chunk (virtual stage) and `time.perf_counter()` stamps. On Linux
perf_counter is CLOCK_MONOTONIC, shared by all processes of one machine, so the ranks of a
single-node run line up; `gather` also records each rank's offset against rank 0 measured right
after a barrier, for multi-node runs.

Bubble fraction, as in Narayanan et al. (2021): idle time over ideal compute time. For each rank,
`(span - busy) / busy`, where span runs from the earliest start to the latest end over all ranks
and busy is the rank's summed F+B time; the schedule's figure is the mean over ranks. Theory for
1F1B is `(p - 1) / m`, for interleaved 1F1B `(p - 1) / (v * m)`.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch.distributed as dist


class Timeline:
    """Events of one rank; `gather()` collects every pipeline rank's into a `{rank: events}` dict."""

    def __init__(self) -> None:
        self.events: List[tuple] = []

    def record(self, op: str, microbatch: int, chunk: int, start: float, end: float) -> None:
        self.events.append((op, int(microbatch), int(chunk), float(start), float(end)))

    @contextmanager
    def span(self, op: str, microbatch: int, chunk: int):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(op, microbatch, chunk, start, time.perf_counter())

    def clear(self) -> None:
        self.events.clear()

    def gather(self, group=None) -> Dict[int, list]:
        """All ranks of `group` (default: the pipeline group) -> {pipeline rank: events}."""
        from megaglot.parallel import state

        if group is None:
            group = state.get_pipeline_parallel_group()
        world = dist.get_world_size(group)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, self.events, group=group)
        return {rank: [tuple(e) for e in events] for rank, events in enumerate(gathered)}


def bubble_fraction(events_by_rank: Dict[int, list]) -> float:
    """Mean over ranks of (span - busy) / busy, with one span common to all ranks."""
    starts = [e[3] for events in events_by_rank.values() for e in events]
    ends = [e[4] for events in events_by_rank.values() for e in events]
    if not starts:
        raise ValueError("the timeline holds no events")
    span = max(ends) - min(starts)
    fractions = []
    for events in events_by_rank.values():
        busy = sum(e[4] - e[3] for e in events if e[0] in ("F", "B"))
        fractions.append((span - busy) / busy if busy > 0 else float("inf"))
    return sum(fractions) / len(fractions)


def theoretical_bubble_fraction(pipeline_size: int, num_microbatches: int, virtual_size: Optional[int] = None) -> float:
    """(p - 1) / (v * m)."""
    return (pipeline_size - 1) / ((virtual_size or 1) * num_microbatches)


def save_json(path: str, events_by_rank: Dict[int, list], **meta) -> None:
    """Write `{"meta": {...}, "ranks": {"0": [[op, mb, chunk, start, end], ...], ...}}`."""
    data = {"meta": meta, "ranks": {str(r): [list(e) for e in ev] for r, ev in sorted(events_by_rank.items())}}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def load_json(path: str):
    """(events_by_rank, meta) from a file written by `save_json`; a clear error on bad input."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not a JSON timeline ({e.msg})") from None
    if not isinstance(data, dict) or "ranks" not in data:
        raise ValueError(f"{path}: a timeline JSON needs a 'ranks' object mapping rank -> events")
    events = {}
    for rank, evs in data["ranks"].items():
        parsed = []
        for i, e in enumerate(evs):
            if len(e) != 5:
                raise ValueError(f"{path}: rank {rank} event {i} must be [op, microbatch, chunk, start, end], got {e!r}")
            parsed.append((str(e[0]), int(e[1]), int(e[2]), float(e[3]), float(e[4])))
        events[int(rank)] = parsed
    return events, data.get("meta", {})
