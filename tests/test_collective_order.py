"""Every member of every process group issues the same collectives, in the same order, with the
same shapes and dtypes, over whole training steps of the README's layouts (issue 18).

NCCL does not check this: a rank that skips a collective, issues one on another group first, or
sends a tensor of another shape hangs the job or silently mixes tensors. Up to 8 gloo processes
cannot run the README's 32-rank layout, so each rank is simulated in turn on torch's fake process
group, one process for all of them (tests/collective_trace.py): the library's own build_run,
train_step (forward, backward, DP gradient reduce-scatter, SP gradient all-reduce, clipping norm,
distributed optimizer step and parameter all-gather), evaluate and save_checkpoint run, and every
torch.distributed call is recorded. The checks then compare the members of each group, pair each
pipeline send with its receive, and replay the collectives as blocking rendezvous (no rank may
wait forever). Sabotaged runs and edited traces prove that each check reports what it should.
An instruction-tuning (SFT) step on packed rows, with response tokens that differ per rank, adds
exactly one all-reduce of the response-token count per DP group, before the schedule (issue 19).

Data on the fake PG is not real, so nothing here checks values (tests/test_training.py does, on
gloo); the recorder keeps what arrives finite so that control flow cannot depend on garbage. In
bf16 without loss scaling no branch of a step depends on a reduced value; the one that does, the
checkpoint's "did every rank's file arrive" verdict, is computed by rank 0 from every rank's real
file list (see collective_trace.Recorder._objects), and the test checks the checkpoint was published.
"""

import concurrent.futures
import dataclasses
import multiprocessing
import os
import re

import pytest

import collective_trace as ct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = {
    # M = 4 > p = 2: interleaving's warm-up, steady state and cool-down; two steps (the second
    # one zeroes and refills the buffers).
    "tp2-pp2-vp2-dp2": ct.Layout("TP2 x PP2 (VP2) x DP2, SP, distributed optimizer, bf16", tp=2, pp=2, dp=2,
                                 layers_per_virtual_stage=2, microbatches=4, train_steps=2),
    # M = p = 4: interleaving's all-forwards-first branch, at the 12.8B example's TP8 x PP4 with
    # its selective recomputation.
    "tp8-pp4-vp2": ct.Layout("TP8 x PP4 (VP2) x DP1, SP, distributed optimizer, selective recomputation, bf16",
                             tp=8, pp=4, dp=1, layers_per_virtual_stage=1, microbatches=4,
                             recompute_granularity="selective"),
}
# Instruction tuning at the 8-rank layout: packed rows, response tokens that differ per microbatch and
# DP rank, one training step and validation (the response-token all-reduce in each).
LAYOUTS["tp2-pp2-vp2-dp2-sft"] = dataclasses.replace(
    LAYOUTS["tp2-pp2-vp2-dp2"], name="TP2 x PP2 (VP2) x DP2, SP, distributed optimizer, bf16, SFT packed rows",
    train_steps=1, sft=True)
# One training step of the 8-rank layout with one broken rank each.
BROKEN = dataclasses.replace(LAYOUTS["tp2-pp2-vp2-dp2"], train_steps=1, validate=False, save=False)
SABOTAGED = {"skip_sequence_parallel_reduction": 5, "other_bucket_size": 2}
SFT_SABOTAGED = {"skip_response_token_count": 3}
SAME_OP = {"all_gather_into_tensor": "all_gather_single", "reduce_scatter_tensor": "reduce_scatter_single"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{label: (checkpoint root, traces)}: every simulation in one spawned process (~20-40 s)."""
    base = tmp_path_factory.mktemp("collective_order")
    jobs = [(key, layout, str(base / key), None) for key, layout in LAYOUTS.items()]
    jobs += [(name, BROKEN, str(base / name), (name, victim)) for name, victim in SABOTAGED.items()]
    jobs += [(name, dataclasses.replace(BROKEN, sft=True), str(base / name), (name, victim))
             for name, victim in SFT_SABOTAGED.items()]
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        traces = pool.submit(ct.simulate_all, jobs).result(timeout=600)
    return {label: (str(base / label), traces[label]) for label in traces}


def groups_of(layout: ct.Layout, rank: int) -> dict:
    """This rank's groups from docs/design.md's rank layout, written out independently of the library."""
    tp, pp, dp = layout.tp, layout.pp, layout.dp
    p, d, t = rank // (dp * tp), (rank // tp) % dp, rank % tp

    def at(p_, d_, t_):
        return p_ * dp * tp + d_ * tp + t_

    return {"tp": tuple(at(p, d, x) for x in range(tp)), "dp": tuple(at(p, x, t) for x in range(dp)),
            "pp": tuple(at(x, d, t) for x in range(pp)),
            "mp": tuple(sorted(at(x, d, y) for x in range(pp) for y in range(tp))),
            "world": tuple(range(layout.world))}


def required_calls(layout: ct.Layout) -> set:
    """(phase, op, group kind) that a whole step must contain on every rank of these layouts."""
    train = [("tp", "all_gather_single"), ("tp", "reduce_scatter_single"),  # sequence parallel
             ("tp", "all_reduce"),  # sequence-parallel LayerNorm/bias gradients
             ("mp", "all_reduce"),  # the global gradient norm
             ("pp", ct.P2P)]
    if layout.dp > 1:
        train += [("dp", "reduce_scatter_single"),  # gradients (distributed optimizer)
                  ("dp", "all_gather_single"),  # updated parameters
                  ("dp", "all_reduce")]  # norm of the optimizer shards, logged loss
    need = {(f"train step {s}", op, kind) for s in range(layout.train_steps) for kind, op in train}
    need |= {("validation", op, kind) for kind, op in (("pp", ct.P2P), ("tp", "all_gather_single"),
                                                        ("mp", "all_reduce"))}
    need |= {("checkpoint save", op, "world") for op in ("barrier", "all_gather_object", "broadcast_object_list")}
    return need


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_every_group_issues_the_same_collectives_in_the_same_order(runs, key):
    layout, (root, traces) = LAYOUTS[key], runs[key]
    assert sorted(traces) == list(range(layout.world))
    problems = ct.check_traces(traces)
    assert not problems, f"{layout.name}: {len(problems)} problem(s)\n\n" + "\n\n".join(problems[:6])
    # The traces are whole steps: each rank issued every kind of collective a step needs, on the
    # groups the rank layout gives it.
    for rank, calls in traces.items():
        groups = groups_of(layout, rank)
        seen = {(c.phase, SAME_OP.get(c.op, c.op), kind) for c in calls  # DP1: the model group is the world
                for kind in [k for k, g in groups.items() if g == c.group] or [str(c.group)]}
        missing = required_calls(layout) - seen
        assert not missing, f"{layout.name}: rank {rank} never issued {sorted(missing)}"
    # The save completed: rank 0 confirmed every rank's files and published the checkpoint.
    from megaglot.checkpoint.format import resolve

    published = resolve(root)
    assert os.path.basename(published) == f"iter_{layout.train_steps:07d}"
    rng_files = sorted(os.listdir(os.path.join(published, "rng")))
    assert rng_files == [f"rank_{r:05d}.json" for r in range(layout.world)]


def _comparable(calls):
    """What the members of a group must agree on, without where and in which phase it was issued."""
    return [(c.op, c.group, c.detail) for c in calls]


def test_an_sft_step_adds_only_the_response_token_all_reduce_on_every_dp_group(runs):
    """Per step and per validation batch, every rank issues exactly one all-reduce from
    training/sft.py: on its DP group, one float64, before the step's first pipeline message; its
    other collectives are pretraining's, call for call (packed rows and masks change no collective)."""
    sft, pretraining = LAYOUTS["tp2-pp2-vp2-dp2-sft"], runs["tp2-pp2-vp2-dp2"][1]
    _, traces = runs["tp2-pp2-vp2-dp2-sft"]
    for rank, calls in traces.items():
        for phase in ("train step 0", "validation"):
            mine = [c for c in calls if c.phase == phase]
            counts = [i for i, c in enumerate(mine) if c.where.startswith("training/sft.py")]
            assert len(counts) == 1, f"rank {rank}, {phase}: {[mine[i].render() for i in counts]}"
            call = mine[counts[0]]
            assert (call.op, call.group) == ("all_reduce", groups_of(sft, rank)["dp"]), call.render()
            assert call.detail[0] == ("tensor", (1,), "float64"), call.render()
            assert counts[0] < next(i for i, c in enumerate(mine) if c.op == ct.P2P), call.render()
            rest = [c for i, c in enumerate(mine) if i != counts[0]]
            want = [c for c in pretraining[rank] if c.phase == phase]
            assert _comparable(rest) == _comparable(want), f"rank {rank}, {phase}: other collectives than pretraining's"


def _problem_text(problems):
    return "\n\n".join(problems)


def _reported_groups(problems):
    """The groups named by check_groups' problems ("group [0, 2]: ..."), as tuples of ranks."""
    found = [re.match(r"group \[([\d, ]+)\]:", p) for p in problems]
    return [tuple(int(x) for x in m.group(1).split(", ")) for m in found if m]


def test_a_rank_that_skips_the_sequence_parallel_reduction_is_reported(runs):
    """Rank 5 forgets the TP all-reduce of its SP gradients: its TP group [4, 5] disagrees, and the
    replay shows the hang (rank 4 waits in that all-reduce, rank 5 in the norm's all-reduce)."""
    _, traces = runs["skip_sequence_parallel_reduction"]
    problems = ct.check_traces(traces)
    text = _problem_text(problems)
    group_problems = [p for p in problems if p.startswith("group ")]
    assert _reported_groups(group_problems) == [(4, 5)], text
    removed = [line for line in group_problems[0].splitlines() if line.startswith("- #")]
    assert len(removed) == 1 and removed[0].split()[2] == "all_reduce", text  # rank 4's extra call
    assert "optim/optimizer.py" in removed[0] and "train step 0" in removed[0], text
    assert any(p.startswith("the collectives cannot all complete") and "rank 4 waits" in p for p in problems), text


def test_a_rank_with_other_gradient_buckets_is_reported(runs):
    """Rank 2 lays out its DP buckets differently: its reduce-scatters and all-gathers on DP group
    [0, 2] have other shapes and counts; no group without rank 2 is reported."""
    _, traces = runs["other_bucket_size"]
    problems = ct.check_traces(traces)
    text = _problem_text(problems)
    group_problems = [p for p in problems if p.startswith("group ")]
    reported = _reported_groups(group_problems)
    assert reported and all(2 in g for g in reported), text
    dp = [p for p in group_problems if p.startswith("group [0, 2]:")]
    assert len(dp) == 1, text
    changed = [line for line in dp[0].splitlines() if line.startswith(("- #", "+ #"))]
    assert any("reduce_scatter_single" in line for line in changed), text
    assert any(line.startswith("+ #") and "reduce_scatter_single" in line for line in changed), text


def test_a_rank_that_skips_the_response_token_all_reduce_is_reported(runs):
    """SFT: rank 3 weighs its loss by its own response tokens only. Its DP group [1, 3] is the only
    group reported, with rank 1's extra all-reduce from training/sft.py, and the replay shows the hang."""
    _, traces = runs["skip_response_token_count"]
    problems = ct.check_traces(traces)
    text = _problem_text(problems)
    group_problems = [p for p in problems if p.startswith("group ")]
    assert _reported_groups(group_problems) == [(1, 3)], text
    removed = [line for line in group_problems[0].splitlines() if line.startswith("- #")]
    added = [line for line in group_problems[0].splitlines() if line.startswith("+ #")]
    assert len(removed) == 1 and not added, text
    assert removed[0].split()[2] == "all_reduce" and "training/sft.py" in removed[0], text
    assert any(p.startswith("the collectives cannot all complete") and "rank 1 waits" in p for p in problems), text


def _first_index(calls, predicate):
    return next(i for i, c in enumerate(calls) if predicate(c))


def test_the_checks_catch_mismatched_sends_and_crossed_collectives(runs):
    """Edited copies of a correct trace: each edit is reported by the check meant for it."""
    _, good = runs["tp2-pp2-vp2-dp2"]
    assert not ct.check_traces(good)

    # A send of another shape: rank 0's first send to rank 4 no longer matches rank 4's receive.
    edited = {r: list(c) for r, c in good.items()}
    i = _first_index(edited[0], lambda c: c.op == ct.P2P and any(op[0] == "isend" for op in c.detail))
    call = edited[0][i]
    ops = tuple((k, p, (s[0] + 1,) + s[1:], d) if k == "isend" else (k, p, s, d) for k, p, s, d in call.detail)
    edited[0][i] = dataclasses.replace(call, detail=ops)
    problems = ct.check_p2p(edited)
    assert [p.split(":")[0] for p in problems] == ["messages 0 -> 4"], _problem_text(problems)
    assert not ct.check_groups(edited)

    # A dropped receive: rank 4 never posts its first receive from rank 0.
    edited = {r: list(c) for r, c in good.items()}
    i = _first_index(edited[4], lambda c: c.op == ct.P2P and any(op[0] == "irecv" and op[1] == 0 for op in c.detail))
    call = edited[4][i]
    edited[4][i] = dataclasses.replace(call, detail=tuple(op for op in call.detail if op[0] != "irecv"))
    problems = ct.check_p2p(edited)
    assert any(p.startswith("messages 0 -> 4:") for p in problems), _problem_text(problems)

    # Two collectives on different groups swapped on one rank: every group still sees the same
    # sequence from its members, but rank 0 and rank 1 (in both groups) wait for each other.
    edited = {r: list(c) for r, c in good.items()}
    calls = edited[0]
    i = _first_index(range(len(calls) - 1), lambda k: calls[k].op != ct.P2P and calls[k + 1].op != ct.P2P
                     and calls[k].group != calls[k + 1].group
                     and len(set(calls[k].group) & set(calls[k + 1].group)) > 1)
    calls[i], calls[i + 1] = calls[i + 1], calls[i]
    assert not ct.check_groups(edited) and not ct.check_p2p(edited)
    problems = ct.check_progress(edited)
    assert len(problems) == 1 and "rank 0 waits" in problems[0], _problem_text(problems)


def test_the_recorder_wraps_every_collective_the_library_calls():
    """A torch.distributed function the recorder does not wrap would pass unseen: every
    `dist.<name>(` (or getattr(dist, "<name>")) in megaglot/ is wrapped or moves no data."""
    wrapped = set(ct.TENSOR_COLLECTIVES) | set(ct.OBJECT_COLLECTIVES)
    call = re.compile(r"\b(?:dist|torch\.distributed)\.([A-Za-z_]\w*)\s*\(")
    looked_up = re.compile(r"getattr\(\s*(?:dist|torch\.distributed)\s*,\s*[\"'](\w+)[\"']")
    unknown = []
    for folder, _, files in os.walk(os.path.join(ROOT, "megaglot")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    for used in call.findall(line) + looked_up.findall(line):
                        if used not in wrapped and used not in ct.NON_COMMUNICATING:
                            unknown.append(f"{os.path.relpath(path, ROOT)}:{number}: dist.{used}")
    assert not unknown, ("torch.distributed functions the recorder does not know (wrap them in "
                         "tests/collective_trace.py, or list them as NON_COMMUNICATING):\n" + "\n".join(unknown))
