"""A small model of how NCCL progresses point-to-point traffic, to replay recorded traces on CPU.

No GPU here has a peer, so whether the pipeline schedules would hang or mis-deliver on NCCL is
checked by replaying what every rank posts under NCCL's rules (docs/pipeline.md "Point-to-point rules"):

* Matching: messages from `src` to `dst` on one communicator are matched strictly in posting
  order (per-pair FIFO); tags are ignored. A matched pair must agree in shape and dtype, and in
  `label` when both ends carry one (what the sender sent / what the receiver will use it as).
* Streams: a rank's batches on one communicator run in posting order on one stream; batch k+1
  starts only once batch k has completed.
* Completion: an operation completes once its batch and its partner's batch have both started
  (a send needs its receive posted and running, no buffering is assumed); a batch completes when
  all its operations have.
* Programs: each rank's trace is its sequence of `Post(batch, ops)` (never blocks) and
  `Wait(batch)` (blocks the rank until the batch has completed).

`replay(traces)` runs all ranks together until every rank has finished or none can progress and
returns a `Report`: mismatches, unmatched operations, a deadlock (each stuck rank's blocked event
with the reason) and batches that never complete. Pure Python: it knows nothing of torch.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

SEND, RECV = "send", "recv"


@dataclass(frozen=True)
class Op:
    """One send or receive of a batch; `peer` is the other end's global rank."""

    kind: str
    peer: int
    shape: Tuple[int, ...]
    dtype: str
    group: Tuple[int, ...] = ()
    """The communicator (its global ranks): operations on different ones never match."""
    label: Optional[object] = None
    """What the message means (sender) or will be used as (receiver); None: not checked."""

    def describe(self) -> str:
        arrow = "->" if self.kind == SEND else "<-"
        return f"{self.kind}{arrow}{self.peer} {list(self.shape)} {self.dtype}"


@dataclass(frozen=True)
class Post:
    """batch_isend_irecv: posts `ops` as batch number `batch` of this rank (never blocks)."""

    batch: int
    ops: Tuple[Op, ...]


@dataclass(frozen=True)
class Wait:
    """Waiting on batch `batch`: the rank stops until every op of it has completed."""

    batch: int


Event = object  # Post or Wait
OpId = Tuple[int, int, int]  # (rank, batch, index in batch)


@dataclass
class Report:
    """What the replay found; `ok` when nothing."""

    mismatches: List[str] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)
    deadlock: Dict[int, str] = field(default_factory=dict)
    """rank -> its blocked event and why, for every rank that could not finish."""
    hung: List[str] = field(default_factory=list)
    """Batches still incomplete after every rank finished its program."""
    messages: int = 0

    @property
    def ok(self) -> bool:
        return not (self.mismatches or self.unmatched or self.deadlock or self.hung)

    def __str__(self) -> str:
        lines = [f"{self.messages} matched messages"]
        lines += self.mismatches + self.unmatched
        lines += [f"deadlock: rank {r} {why}" for r, why in sorted(self.deadlock.items())]
        lines += [f"never completes: {h}" for h in self.hung]
        return "\n".join(lines)


def _check_traces(traces: Mapping[int, Sequence[Event]]) -> Dict[Tuple[int, int], Post]:
    """Index the posts by (rank, batch); reject malformed traces (a test bug, not a finding)."""
    posts = {}
    for rank, program in traces.items():
        for event in program:
            if isinstance(event, Post):
                if (rank, event.batch) in posts:
                    raise ValueError(f"rank {rank} posts batch {event.batch} twice")
                if len({op.group for op in event.ops}) > 1:
                    raise ValueError(f"rank {rank} batch {event.batch} mixes communicators")
                posts[(rank, event.batch)] = event
            elif isinstance(event, Wait):
                if (rank, event.batch) not in posts:
                    raise ValueError(f"rank {rank} waits on batch {event.batch} before posting it")
            else:
                raise ValueError(f"rank {rank}: unknown trace event {event!r}")
    return posts


def match(traces: Mapping[int, Sequence[Event]], report: Report) -> Dict[OpId, OpId]:
    """Pair the n-th send src->dst with the n-th receive at dst from src (per communicator)."""
    posts = _check_traces(traces)
    sends, recvs = defaultdict(list), defaultdict(list)
    for rank in sorted(traces):
        for event in traces[rank]:
            if not isinstance(event, Post):
                continue
            for j, op in enumerate(event.ops):
                if op.kind == SEND:
                    sends[(op.group, rank, op.peer)].append((rank, event.batch, j))
                elif op.kind == RECV:
                    recvs[(op.group, op.peer, rank)].append((rank, event.batch, j))
                else:
                    raise ValueError(f"rank {rank} batch {event.batch}: unknown op kind {op.kind!r}")
    partner: Dict[OpId, OpId] = {}
    for key in sorted(set(sends) | set(recvs), key=repr):
        _, src, dst = key
        out, into = sends.get(key, []), recvs.get(key, [])
        for n, (s, r) in enumerate(zip(out, into)):
            partner[s], partner[r] = r, s
            _compare(posts, s, r, n, report)
        report.messages += min(len(out), len(into))
        for n, (rank, batch, j) in enumerate(out[len(into):] + into[len(out):], start=min(len(out), len(into))):
            op = posts[(rank, batch)].ops[j]
            report.unmatched.append(f"unmatched: rank {rank} batch {batch} op {j} {op.describe()} is message "
                                    f"#{n} from {src} to {dst}, but only {min(len(out), len(into))} are "
                                    f"{'received' if op.kind == SEND else 'sent'}")
    return partner


def _compare(posts, send: OpId, recv: OpId, n: int, report: Report) -> None:
    s_op, r_op = posts[send[:2]].ops[send[2]], posts[recv[:2]].ops[recv[2]]
    where = (f"message #{n} from rank {send[0]} (batch {send[1]} op {send[2]}) to rank {recv[0]} "
             f"(batch {recv[1]} op {recv[2]})")
    if (s_op.shape, s_op.dtype) != (r_op.shape, r_op.dtype):
        report.mismatches.append(f"shape/dtype mismatch: {where}: sends {list(s_op.shape)} {s_op.dtype}, "
                                 f"receives into {list(r_op.shape)} {r_op.dtype}")
    elif s_op.label is not None and r_op.label is not None and s_op.label != r_op.label:
        report.mismatches.append(f"content mismatch: {where}: sends {s_op.label!r}, "
                                 f"the receiver expects {r_op.label!r}")


class _Sim:
    """The progress state of all ranks: program counters, streams, started and completed batches."""

    def __init__(self, traces: Mapping[int, Sequence[Event]], partner: Dict[OpId, OpId]):
        self.traces, self.partner = traces, partner
        self.pc = {rank: 0 for rank in traces}
        self.streams: Dict[tuple, deque] = defaultdict(deque)  # (rank, group) -> posted, not completed
        self.posts: Dict[Tuple[int, int], Post] = {}
        self.started, self.done = set(), set()

    def _stream(self, rank: int, post: Post) -> deque:
        return self.streams[(rank, post.ops[0].group if post.ops else ())]

    def run_programs(self) -> bool:
        """Advance every rank to its next blocking wait; True if anything moved."""
        moved = False
        for rank, program in self.traces.items():
            while self.pc[rank] < len(program):
                event = program[self.pc[rank]]
                if isinstance(event, Post):
                    self.posts[(rank, event.batch)] = event
                    queue = self._stream(rank, event)
                    queue.append(event.batch)
                    if len(queue) == 1:
                        self.started.add((rank, event.batch))
                elif (rank, event.batch) not in self.done:
                    break
                self.pc[rank] += 1
                moved = True
        return moved

    def op_complete(self, op_id: OpId) -> bool:
        other = self.partner.get(op_id)
        return other is not None and op_id[:2] in self.started and other[:2] in self.started

    def complete_batches(self) -> bool:
        """Retire every stream head whose ops have all completed, starting the next; True if any."""
        moved, again = False, True
        while again:
            again = False
            for (rank, _), queue in self.streams.items():
                while queue and all(self.op_complete((rank, queue[0], j))
                                    for j in range(len(self.posts[(rank, queue[0])].ops))):
                    self.done.add((rank, queue.popleft()))
                    if queue:
                        self.started.add((rank, queue[0]))
                    moved = again = True
        return moved

    def why_blocked(self, rank: int, batch: int) -> str:
        """The incomplete ops of a batch and what each is waiting for."""
        post = self.posts[(rank, batch)]
        if (rank, batch) not in self.started:
            head = self._stream(rank, post)[0]
            return (f"batch {batch} is queued behind this rank's unfinished batch {head} "
                    f"({self.why_blocked(rank, head)})")
        reasons = []
        for j, op in enumerate(post.ops):
            if self.op_complete((rank, batch, j)):
                continue
            other = self.partner.get((rank, batch, j))
            if other is None:
                reasons.append(f"{op.describe()} has no match")
            elif other[:2] not in self.posts:
                reasons.append(f"{op.describe()} waits for rank {other[0]} to post its batch {other[1]}")
            else:
                reasons.append(f"{op.describe()} waits for rank {other[0]}'s batch {other[1]}, queued on its stream")
        return "; ".join(reasons)


def replay(traces: Mapping[int, Sequence[Event]]) -> Report:
    """Run all ranks' programs together under NCCL's rules (module docstring)."""
    report = Report()
    sim = _Sim(traces, match(traces, report))
    while sim.run_programs() | sim.complete_batches():
        pass
    for rank, program in traces.items():
        if sim.pc[rank] < len(program):
            event = program[sim.pc[rank]]
            report.deadlock[rank] = (f"blocked at event {sim.pc[rank]}: wait on batch {event.batch}: "
                                     f"{sim.why_blocked(rank, event.batch)}")
    if not report.deadlock:
        for (rank, _), queue in sorted(sim.streams.items(), key=repr):
            for batch in queue:
                report.hung.append(f"rank {rank} batch {batch}: {sim.why_blocked(rank, batch)}")
    return report
