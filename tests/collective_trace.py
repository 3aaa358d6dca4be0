"""Record every collective a rank issues, and check that the members of each group agree.

Used by tests/test_collective_order.py. A whole training step is run for each rank of a layout in
turn, in one process, on torch's fake process group (`FakeStore` + the "fake" backend): it
accepts every collective and moves no data. A `Recorder` wraps the `torch.distributed` functions
the library calls (it looks them up at call time as `dist.<name>`), notes (op, group ranks, shapes,
dtypes, ...) and then calls the fake original. `check_traces` compares what the members of every
group recorded: NCCL hangs (or silently mixes tensors) when they differ.

The fake PG moves no data, so the recorder makes what "arrives" finite and shaped like the real
thing (gathers copy the local input, receive buffers are zeroed): nothing reads uninitialised
memory, and no rank's control flow can depend on garbage. Object collectives (the checkpoint's
file confirmation) are simulated: the objects of ranks that already ran are delivered, so rank 0,
run last, sees every rank's file list, as on a real run.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

# Every torch.distributed function that communicates and that a caller can use on its own.
# isend/irecv are recorded through batch_isend_irecv: P2POp insists on the original functions.
TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
                      "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single",
                      "broadcast", "reduce", "gather", "scatter", "barrier", "monitored_barrier", "send", "recv",
                      "batch_isend_irecv")
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                      "send_object_list", "recv_object_list")
# Functions of torch.distributed that set up or describe groups and move no data.
NON_COMMUNICATING = {"get_rank", "get_world_size", "is_initialized", "is_available", "init_process_group",
                     "destroy_process_group", "new_group", "new_subgroups", "get_process_group_ranks",
                     "get_group_rank", "get_global_rank", "get_backend", "get_backend_config", "P2POp", "ReduceOp",
                     "is_nccl_available", "is_gloo_available", "is_torchelastic_launched", "Backend"}
P2P = "batch_isend_irecv"


@dataclass(frozen=True)
class Call:
    """One collective as a rank issued it. Equality ignores where and when (for the diffs only)."""

    op: str
    group: Tuple[int, ...]
    detail: tuple
    where: str = field(default="", compare=False)
    phase: str = field(default="", compare=False)

    def render(self) -> str:
        return f"{self.op} {_render_detail(self.detail)}   [{self.phase}; {self.where}]"


def _render_detail(detail) -> str:
    parts = []
    for item in detail:
        if isinstance(item, tuple) and len(item) == 3 and isinstance(item[1], tuple):  # (name, shape, dtype)
            parts.append(f"{item[0]}={list(item[1])}:{item[2]}")
        else:
            parts.append(str(item))
    return " ".join(parts)


def _describe(value, name):
    """A comparable, picklable description of one argument (tensors by shape and dtype)."""
    if isinstance(value, torch.Tensor):
        return (name, tuple(value.shape), str(value.dtype).replace("torch.", ""))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return (f"{name}[{len(value)}]",) + tuple(_describe(v, "")[1:] for v in value)
    if isinstance(value, dist.ReduceOp.RedOpType) or type(value).__name__ in ("ReduceOp", "RedOpType"):
        return f"{name}={str(value).split('.')[-1]}"
    if isinstance(value, list):  # object lists: only their length is common to the members
        return f"{name}[{len(value)}]"
    return f"{name}={value!r}"


def _where() -> str:
    """The two innermost megaglot frames that issued the call, innermost first:
    'parallel/comm.py:27 all_gather_single < parallel/layers.py:165 forward'."""
    marker = os.sep + "megaglot" + os.sep
    frame, found = sys._getframe(2), []
    while frame is not None and len(found) < 2:
        path = frame.f_code.co_filename
        if marker in path:
            found.append(f"{path.rsplit(marker, 1)[1]}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(found) or "?"


def _group_ranks(group) -> Tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


# ---- recording ---------------------------------------------------------------------------------
class Recorder:
    """While active, every communicating `torch.distributed.<name>` records a `Call`, then runs.

    `mailbox` is shared by the ranks of one simulation: object collectives leave their objects
    there and pick up those of the ranks that already ran.
    """

    def __init__(self, mailbox: dict):
        self.calls: List[Call] = []
        self.phase = "setup"
        self.mailbox = mailbox
        self._originals: Dict[str, object] = {}
        self._object_calls: Dict[tuple, int] = defaultdict(int)

    def __enter__(self) -> "Recorder":
        for name in TENSOR_COLLECTIVES + OBJECT_COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(dist, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc) -> bool:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()
        return False

    def _wrap(self, name, original):
        parameters = inspect.signature(original).parameters
        names = list(parameters)
        defaults = {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}

        def recorded(*args, **kwargs):
            arguments = dict(zip(names, args))  # what signature.bind gives, at a tenth of its cost
            arguments.update(kwargs)
            for key, value in defaults.items():
                arguments.setdefault(key, value)
            if name == P2P:
                return self._p2p(original, arguments["p2p_op_list"])
            group = _group_ranks(arguments.get("group"))
            detail = tuple(_describe(arguments[k], k) for k in names  # in signature order, however called
                           if k in arguments and k not in ("group", "async_op", "obj", "device", "timeout"))
            self.calls.append(Call(name, group, detail, _where(), self.phase))
            if name in OBJECT_COLLECTIVES:
                return self._objects(name, arguments, group)
            result = original(*args, **kwargs)
            _arrive(name, [arguments[n] for n in names if n in arguments], arguments.get("group"))
            return result

        recorded.__wrapped__ = original
        return recorded

    def _p2p(self, original, ops):
        """One Call per batch: (isend|irecv, global peer, shape, dtype) of each op in posting order."""
        group = _group_ranks(ops[0].group) if ops else ()
        detail = tuple((op.op.__name__, op.peer, tuple(op.tensor.shape), str(op.tensor.dtype).replace("torch.", ""))
                       for op in ops)
        self.calls.append(Call(P2P, group, detail, _where(), self.phase))
        works = original(ops)
        for op in ops:
            if op.op.__name__ == "irecv":
                op.tensor.zero_()  # the fake PG leaves torch.empty's garbage in receive buffers
        return works

    def _objects(self, name, arguments, group):
        key = (name, group)
        box = self.mailbox.setdefault(key + (self._object_calls[key],), {})
        self._object_calls[key] += 1
        me = dist.get_rank()
        if name == "all_gather_object":
            box[me] = copy.deepcopy(arguments["obj"])
            for i, rank in enumerate(group):  # ranks still to run: a stand-in, our own object
                arguments["object_list"][i] = copy.deepcopy(box.get(rank, arguments["obj"]))
        elif name == "broadcast_object_list":
            src = arguments["src"] if arguments["src"] is not None else group[arguments["group_src"]]
            if me == src:
                box[me] = copy.deepcopy(arguments["object_list"])
            elif src in box:
                arguments["object_list"][:] = copy.deepcopy(box[src])
        else:
            raise NotImplementedError(f"collective_trace: {name} is recorded but not simulated; add it to "
                                      f"Recorder._objects")
        return None


def _arrive(name: str, args: list, group) -> None:
    """Give the fake PG's outputs finite values shaped like the real ones (see the module docstring)."""
    if name in ("all_gather_into_tensor", "all_gather_single"):  # out [world * n, ...] <- x [n, ...]
        out, x = args[0], args[1]
        out.view(-1, x.numel()).copy_(x.reshape(1, -1))
    elif name in ("reduce_scatter_tensor", "reduce_scatter_single"):  # out [n, ...] <- our slice of x
        out, x = args[0], args[1]
        out.copy_(x.reshape(-1, out.numel())[dist.get_rank(group)].reshape(out.shape).clone())
    elif name == "all_gather":
        for t in args[0]:
            t.copy_(args[1])
    elif name == "recv":
        args[0].zero_()


# ---- checking ----------------------------------------------------------------------------------
def check_traces(traces: Dict[int, List[Call]]) -> List[str]:
    """Every problem found, each a readable paragraph; [] when the traces agree."""
    return check_groups(traces) + check_p2p(traces) + check_progress(traces)


def _diff(name_a: str, a: List[Call], name_b: str, b: List[Call], key=lambda c: (c.op, c.detail),
          limit: int = 40) -> str:
    """A unified-diff-like listing of two call sequences, compared by `key`."""
    matcher = difflib.SequenceMatcher(a=[key(c) for c in a], b=[key(c) for c in b], autojunk=False)
    lines = [f"--- {name_a} ({len(a)} calls)", f"+++ {name_b} ({len(b)} calls)"]
    for chunk in matcher.get_grouped_opcodes(2):
        lines.append("@@")
        for tag, i1, i2, j1, j2 in chunk:
            if tag == "equal":
                lines += [f"  #{i} {a[i].render()}" for i in range(i1, i2)]
                continue
            lines += [f"- #{i} {a[i].render()}" for i in range(i1, i2)]
            lines += [f"+ #{j} {b[j].render()}" for j in range(j1, j2)]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more lines)"]
    return "\n".join(lines)


def check_groups(traces: Dict[int, List[Call]]) -> List[str]:
    """Members of a group issue the same collectives on it, in the same order, shapes and dtypes."""
    problems, by_group = [], defaultdict(lambda: defaultdict(list))
    for rank, calls in traces.items():
        for call in calls:
            if call.op == P2P:
                continue
            if rank not in call.group:
                problems.append(f"rank {rank} issued {call.render()} on group {list(call.group)}, without itself")
            by_group[call.group][rank].append(call)
    for group, sequences in sorted(by_group.items()):
        reference = group[0]
        for member in group[1:]:
            a, b = sequences.get(reference, []), sequences.get(member, [])
            if [(c.op, c.detail) for c in a] != [(c.op, c.detail) for c in b]:
                problems.append(f"group {list(group)}: its members issue different collectives on it\n"
                                + _diff(f"rank {reference}", a, f"rank {member}", b))
    return problems


def check_p2p(traces: Dict[int, List[Call]]) -> List[str]:
    """The k-th send from a to b meets b's k-th receive from a (NCCL's matching): same shape and dtype."""
    problems, sends, recvs = [], defaultdict(list), defaultdict(list)
    for rank, calls in traces.items():
        for call in (c for c in calls if c.op == P2P):
            for kind, peer, shape, dtype in call.detail:
                if rank not in call.group or peer not in call.group:
                    problems.append(f"rank {rank}: {kind} with rank {peer} outside its group {list(call.group)}")
                pair = (rank, peer) if kind == "isend" else (peer, rank)
                message = Call(kind, pair, (("tensor", shape, dtype),), call.where, call.phase)
                (sends if kind == "isend" else recvs)[pair].append(message)
    for src, dst in sorted(set(sends) | set(recvs)):
        s, r = sends.get((src, dst), []), recvs.get((src, dst), [])
        if [c.detail for c in s] != [c.detail for c in r]:
            problems.append(f"messages {src} -> {dst}: the sends of rank {src} do not match the receives of rank {dst}"
                            f" in posting order\n" + _diff(f"rank {src} sends", s, f"rank {dst} receives", r,
                                                          key=lambda c: c.detail))
    return problems


def check_progress(traces: Dict[int, List[Call]]) -> List[str]:
    """Run the collectives as blocking rendezvous (P2P never blocks here): every rank must finish.

    Agreement per group is not enough: rank a reducing over G1 then G2 while rank b (in both)
    does G2 then G1 hangs NCCL, though each group's sequence is the same on its members.
    """
    queues = {rank: [c for c in calls if c.op != P2P] for rank, calls in traces.items()}
    position = {rank: 0 for rank in queues}

    def head(rank):
        q = queues.get(rank)
        return q[position[rank]] if q is not None and position[rank] < len(q) else None

    progress = True
    while progress:
        progress = False
        for rank in queues:
            call = head(rank)
            if call is not None and all(head(m) == call for m in call.group):
                for m in call.group:
                    position[m] += 1
                progress = True
    stuck = [rank for rank in sorted(queues) if head(rank) is not None]
    if not stuck:
        return []
    lines = [f"rank {rank} waits in call #{position[rank]}: {head(rank).render()} on {list(head(rank).group)}"
             for rank in stuck[:16]]
    return [f"the collectives cannot all complete: {len(stuck)} rank(s) wait forever\n" + "\n".join(lines)]


# ---- running a layout, one simulated rank at a time ----------------------------------------------
SEQ, MICRO = 16, 1


@dataclass(frozen=True)
class Layout:
    """A README layout, shrunk: 8 layers of h 64 with 8 heads (TP 8 divides them), bf16."""

    name: str
    tp: int
    pp: int
    dp: int
    layers_per_virtual_stage: Optional[int]
    microbatches: int
    train_steps: int = 1
    validate: bool = True
    save: bool = True
    recompute_granularity: Optional[str] = None
    sft: bool = False
    """Instruction tuning (--sft-data, --pack-sequences): packed rows whose response tokens differ per
    microbatch and DP rank, and the step's all-reduce of their count over DP (megaglot.training.sft)."""

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def _configs(layout: Layout):
    from megaglot.config import ParallelConfig, TrainConfig, get_model_preset
    from megaglot.config.cli import with_fields

    model = get_model_preset("tiny-test", num_layers=8, num_attention_heads=8)
    parallel = ParallelConfig(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                              num_layers_per_virtual_pipeline_stage=layout.layers_per_virtual_stage,
                              sequence_parallel=True)
    train = with_fields(TrainConfig(), micro_batch_size=MICRO, global_batch_size=MICRO * layout.microbatches * layout.dp,
                        seq_length=SEQ, train_iters=layout.train_steps, eval_interval=0, precision="bf16",
                        use_distributed_optimizer=True, recompute_granularity=layout.recompute_granularity,
                        lr=1e-3, min_lr=1e-4, lr_warmup_iters=1, seed=3)
    if layout.sft:  # the data never opens: the rank program hands train_step its own batches
        train = with_fields(train, sft_data="(simulated)", pack_sequences=True)
    return model, parallel, train


def _microbatches(layout: Layout, vocab: int, step: int, dp_rank: int) -> list:
    """This DP rank's finite synthetic microbatches ([b, s] each) of one global batch."""
    import numpy as np

    rng = np.random.default_rng([step, dp_rank])
    out = []
    for _ in range(layout.microbatches):
        t = torch.as_tensor(rng.integers(0, vocab, size=(MICRO, SEQ + 1)), dtype=torch.long)
        out.append({"tokens": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
                    "loss_mask": torch.ones(MICRO, SEQ), "position_ids": torch.arange(SEQ).repeat(MICRO, 1)})
        if layout.sft:
            out[-1].update(_packed_rows(rng))
    return out


def _packed_rows(rng) -> dict:
    """Three samples per row, cut at random places (positions restart at each), padding at the end
    (segment -1), and a response mask of another size in every microbatch and on every DP rank."""
    import numpy as np

    cuts = np.sort(rng.choice(np.arange(1, SEQ - 1), size=2, replace=False))
    segments = np.searchsorted(cuts, np.arange(SEQ), side="right")
    positions = np.arange(SEQ) - np.concatenate([[0], cuts])[segments]
    segments[SEQ - 1] = -1
    mask = rng.random((MICRO, SEQ)) < rng.uniform(0.2, 0.8)
    mask[:, SEQ - 1] = False
    return {"loss_mask": torch.as_tensor(mask, dtype=torch.float32),
            "position_ids": torch.as_tensor(positions).repeat(MICRO, 1),
            "segment_ids": torch.as_tensor(segments).repeat(MICRO, 1)}


def _check_finite(phase: str, *values: float) -> None:
    """The values are meaningless on the fake PG, but must stay finite: a NaN (from a buffer the
    recorder left unfilled) could send ranks down different branches where the library tests
    finiteness (skipping a step), which no real run would do."""
    if not all(math.isfinite(v) for v in values):
        raise AssertionError(f"rank {dist.get_rank()}, {phase}: non-finite {values} on the fake process group; "
                             f"a collective's output is not filled in collective_trace._arrive")


def _rank_program(layout: Layout, root: str, recorder: Recorder) -> None:
    """What every rank runs: the library's own entry points, as the training loop calls them."""
    from megaglot.checkpoint.training_state import save_checkpoint
    from megaglot.parallel import state
    from megaglot.training import build_run, evaluate, train_step

    model, parallel, train = _configs(layout)
    run = build_run(model, parallel, train, torch.device("cpu"))
    dp_rank = state.get_data_parallel_rank()
    for step in range(layout.train_steps):
        recorder.phase = f"train step {step}"
        stats = train_step(run, _microbatches(layout, model.vocab_size, step, dp_rank))
        _check_finite(recorder.phase, stats["loss"], stats["grad_norm"])
    if layout.validate:
        recorder.phase = "validation"
        _check_finite(recorder.phase, evaluate(run, [_microbatches(layout, model.vocab_size, 1000, dp_rank)]))
    if layout.save:
        recorder.phase = "checkpoint save"
        save_checkpoint(root, iteration=layout.train_steps, consumed_samples=layout.train_steps *
                        train.global_batch_size, chunks=run.chunks, optimizer=run.optimizer, model_cfg=model)


def simulate(layout: Layout, root: str, sabotage: Optional[Tuple[str, int]] = None) -> Dict[int, List[Call]]:
    """Every rank's trace. Ranks run one after another, last rank first: rank 0 publishes the
    checkpoint only after it has checked every other rank's files, so it must run after them.
    `sabotage`: (name in SABOTAGES, victim rank), to prove the checks catch a broken rank."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megaglot.parallel import state

    mailbox, traces = {}, {}
    for rank in reversed(range(layout.world)):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world)
        undo = SABOTAGES[sabotage[0]]() if sabotage is not None and sabotage[1] == rank else None
        try:
            with Recorder(mailbox) as recorder:
                _rank_program(layout, root, recorder)
            traces[rank] = recorder.calls
        finally:
            if undo is not None:
                undo()
            state.destroy()
            dist.destroy_process_group()
    return traces


def _skip_sequence_parallel_reduction():
    """The victim forgets the TP all-reduce of its sequence-parallel LayerNorm/bias gradients."""
    import megaglot.optim.optimizer as optimizer

    original = optimizer.reduce_sequence_parallel_gradients
    optimizer.reduce_sequence_parallel_gradients = lambda params: None
    return lambda: setattr(optimizer, "reduce_sequence_parallel_gradients", original)


def _other_bucket_size():
    """The victim lays out its DP gradient buckets differently (3000 elements): its reduce-scatters
    and parameter all-gathers have other shapes and counts than its DP peers'."""
    import megaglot.training.run as run_module

    original = run_module.GradBuffer
    run_module.GradBuffer = lambda *args, **kwargs: original(*args, **dict(kwargs, bucket_size=3000))
    return lambda: setattr(run_module, "GradBuffer", original)


def _skip_response_token_count():
    """The victim (an SFT run) weighs its loss by its own response tokens: it never all-reduces their
    count over DP, which its DP peers wait for."""
    import types

    import megaglot.training.sft as sft

    original = sft.dist
    sft.dist = types.SimpleNamespace(all_reduce=lambda *args, **kwargs: None)
    return lambda: setattr(sft, "dist", original)


SABOTAGES = {"skip_sequence_parallel_reduction": _skip_sequence_parallel_reduction,
             "other_bucket_size": _other_bucket_size, "skip_response_token_count": _skip_response_token_count}


def simulate_all(jobs: list) -> dict:
    """[(label, layout, root, sabotage)] -> {label: traces}; the entry point of the spawned child."""
    torch.set_num_threads(1)
    return {label: simulate(layout, root, sabotage) for label, layout, root, sabotage in jobs}
