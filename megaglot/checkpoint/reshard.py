"""Offline resharding: a megaglot checkpoint at any TP/PP/VP/DP layout -> the same run at another.

    reshard(load, save, tp, pp, layers_per_virtual_stage=None, dp=None, verify=False) -> published dir
      = write_reshard(plan_reshard(load, save, tp, pp, layers_per_virtual_stage, dp))

No process groups and no model is built (shapes come from a meta-device model). What is written:

- model pieces: one `model_tpXX_ppYY` part per target TP/PP position (that stage's layers over all its virtual
  chunks, the embedding on the first stage, final norm and output layer on the last), TP-replicated tensors by
  TP rank 0 only, exactly as training saves them;
- optimizer pieces (every non-model kind: fp32 `master`, `exp_avg`, `exp_avg_sq`): one `optim_tpXX_ppYY_dp000`
  part per position, or, when the source was saved by the distributed optimizer, each position's tensors laid end
  to end and cut into D contiguous ranges, one `optim_tpXX_ppYY_dpZZZ` part per DP rank (any split loads);
- metadata.json: the source's (iteration, consumed samples, scheduler, loss scaler, optimizer step, tokenizer,
  ...) with the new `parallel` section and a `resharded_from` record. RNG states belong to ranks of one layout:
  copied when the layout is unchanged, dropped otherwise (the loader then warns that dropout masks will differ).
  The source's `tokenizer.json` is copied along, so the target is as self-contained as the source;
- every part file's checksum in its index, taken as it is streamed. The source's files are checked against
  theirs as they are read, and `verify` reads both checkpoints' files whole against their checksums before
  comparing their tensors.

Memory stays near one full tensor: each part file's header is planned up front from the source's index (names,
shapes, dtypes), then every full tensor is assembled once, its TP shards (or DP ranges) streamed into the open
part files of its stage, and freed before the next; the reader's memory maps are dropped after each tensor so
their pages leave the resident set.

Every check runs in the plan step, before the first byte is written: the source's tensors against its own model
config (`check.check_checkpoint`: missing or unexpected names, global shapes and split dimensions, stored sizes,
TP shards that are incomplete), the target layout against the model (`ParallelConfig.validate`), and the save path
(never the source or inside it, never over a checkpoint). The plan says which pieces go into which target file;
the write step only streams them. The target is staged in `iter_N.tmp/` and published (`latest` last), so a
failure leaves nothing half-written. Part names and the layout record come from `format`.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megaglot.checkpoint.check import check_checkpoint, verify_checksums
from megaglot.checkpoint.format import (MODEL, OPTIMIZER_KINDS, TOKENIZER_FILE, CheckpointError, CheckpointReader,
                                        layout_record, model_config_of, model_part_name, optimizer_part_name, publish,
                                        read_layout, resolve, staging_dir, write_metadata)
from megaglot.checkpoint.sharding import shard
from megaglot.checkpoint.streaming import StreamingPart, numel, parameter_specs, stage_names
from megaglot.config import ConfigError, ModelConfig, ParallelConfig
from megaglot.progress import progress

# What the target flags are called on the reshard command line (ConfigError names training's flags).
_TARGET_FLAGS = (("--tensor-model-parallel-size", "--target-tensor-parallel-size"),
                 ("--pipeline-model-parallel-size", "--target-pipeline-parallel-size"),
                 ("--num-layers-per-virtual-pipeline-stage", "--target-num-layers-per-virtual-pipeline-stage"))


def _target_flags(message: str) -> str:
    for flag, target in _TARGET_FLAGS:
        message = message.replace(flag, target)
    # the padded vocabulary is part of the checkpoint: the hint to re-pad does not apply here
    return re.sub(r"; set --make-vocab-size-divisible-by \d+", "; choose a TP size that divides it", message)


def _check_target(cfg: ModelConfig, tp: int, pp: int, layers_per_virtual_stage: Optional[int]) -> None:
    try:
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       num_layers_per_virtual_pipeline_stage=layers_per_virtual_stage).validate(cfg)
    except ConfigError as e:
        raise ConfigError(_target_flags(str(e))) from None


def _check_save_path(save: str, load: str, source_dir: str) -> None:
    save_real = os.path.realpath(save)
    for src in {os.path.realpath(load), os.path.realpath(source_dir)}:
        if save_real == src or save_real.startswith(src.rstrip(os.sep) + os.sep):
            raise CheckpointError(f"--save {save} is the source checkpoint {load} or inside it; choose a directory "
                                  f"outside it (the source is never written to)")
    if os.path.realpath(source_dir).startswith(save_real.rstrip(os.sep) + os.sep) and os.path.isdir(save):
        raise CheckpointError(f"--save {save} holds the source checkpoint {source_dir}; choose a new directory")
    if os.path.exists(save):
        if not os.path.isdir(save):
            raise CheckpointError(f"--save {save} exists and is not a directory")
        leftovers = [f for f in os.listdir(save) if not re.fullmatch(r"iter_\d{7}\.tmp", f)]
        if leftovers:
            raise CheckpointError(f"--save {save} already exists and is not empty ({sorted(leftovers)[0]}); choose a "
                                  f"new directory (nothing was written)")


# ---- the plan: which pieces go into which target file ------------------------------------------
def _cut(names, kinds, specs, dtypes, tp: int, tp_rank: int, dp: int) -> List[List[dict]]:
    """The pieces of one (tp, pp) position in `dp` parts: the position's tensors laid end to end
    (model order) and cut into dp contiguous ranges, as the distributed optimizer owns them (dp = 1:
    whole TP shards). TP-replicated tensors belong to TP rank 0 only."""
    entries = []  # (name, shard numel)
    for name in names:
        shape, dim = specs[name]
        if dim is None and tp_rank != 0:
            continue
        entries.append((name, numel(shape) // (tp if dim is not None else 1)))
    total = sum(n for _, n in entries)
    bounds = [total * d // dp for d in range(dp + 1)]
    plans: List[List[dict]] = [[] for _ in range(dp)]
    offset = 0
    for name, n in entries:
        shape, dim = specs[name]
        for kind in kinds:
            for d in range(dp):
                a, b = max(offset, bounds[d]), min(offset + n, bounds[d + 1])
                if a < b:
                    plans[d].append(dict(kind=kind, name=name, global_shape=shape, partition_dim=dim, tp_size=tp,
                                         tp_rank=tp_rank, start=a - offset, end=b - offset, dtype=dtypes[(kind, name)]))
        offset += n
    return plans


def position_parts(names, specs, dtypes, kinds, tp: int, tp_rank: int, pp_rank: int,
                   opt_dp: int) -> Dict[str, List[dict]]:
    """{part name: its pieces in write order} for target position (tp_rank, pp_rank) holding `names`:
    the model part, then (when `kinds` has optimizer kinds) `opt_dp` optimizer parts, exactly as
    training at that layout saves them. Each piece is a StreamingPart plan entry (kind, name,
    global_shape, partition_dim, tp_size, tp_rank, flat start/end of the TP shard, dtype)."""
    parts = {model_part_name(tp_rank, pp_rank): _cut(names, [MODEL], specs, dtypes, tp, tp_rank, 1)[0]}
    opt_kinds = [k for k in kinds if k != MODEL]
    if opt_kinds:
        for d, entries in enumerate(_cut(names, opt_kinds, specs, dtypes, tp, tp_rank, opt_dp)):
            parts[optimizer_part_name(tp_rank, pp_rank, d)] = entries
    return parts


@dataclass
class StagePlan:
    """One target pipeline stage: the tensors it holds and, per TP rank, its part files."""

    pp_rank: int
    names: List[str]  # global names, model order
    positions: List[Dict[str, List[dict]]]  # [tp_rank] -> position_parts(...)


@dataclass
class ReshardPlan:
    """Everything `write_reshard` writes, decided (and every input checked) before it writes."""

    reader: CheckpointReader
    save: str
    iteration: int
    target: dict  # read_layout's keys: tp, pp, vp (None: one chunk per stage), dp
    kinds: List[str]  # MODEL, then the optimizer kinds the source holds
    specs: Dict[str, Tuple[Tuple[int, ...], Optional[int]]]
    dtypes: Dict[Tuple[str, str], torch.dtype]
    stages: List[StagePlan]
    metadata: dict  # the new metadata.json (format_version is added on writing)
    copy_rng: bool  # the layout is unchanged: the source's RNG states still belong to its ranks
    summary: str  # one line for the log: source and target layout

    @property
    def total_bytes(self) -> int:
        return sum(numel(self.specs[n][0]) * torch.empty((), dtype=self.dtypes[(k, n)]).element_size()
                   for k in self.kinds for n in self.specs)


def plan_reshard(load: str, save: str, tp: int, pp: int, layers_per_virtual_stage: Optional[int] = None,
                 dp: Optional[int] = None) -> ReshardPlan:
    """The plan step of `reshard`: checks the source, the target layout and the save path, and decides
    which pieces go into which target file. Reads only the source's metadata, indexes and safetensors
    headers; writes nothing, so every error is raised before anything exists at `save`."""
    if not os.path.exists(load):
        raise CheckpointError(f"--load {load}: no such checkpoint directory")
    source_dir = resolve(load)
    reader = CheckpointReader(source_dir)
    meta = reader.metadata
    cfg = model_config_of(reader)
    if not isinstance(meta.get("iteration"), int):
        raise CheckpointError(f"{os.path.join(source_dir, 'metadata.json')}: no integer 'iteration'")
    _check_target(cfg, tp, pp, layers_per_virtual_stage)
    source = read_layout(meta)
    dp = (source["dp"] or 1) if dp is None else dp
    if dp <= 0:
        raise ConfigError(f"--target-data-parallel-size must be positive, got {dp}")
    vp = cfg.num_layers // (pp * layers_per_virtual_stage) if layers_per_virtual_stage else 1
    _check_save_path(save, load, source_dir)
    dtypes = check_checkpoint(reader, cfg, kinds=None)  # every kind: all of them are copied
    specs = parameter_specs(cfg)
    kinds = [MODEL] + [k for k in OPTIMIZER_KINDS if (k, next(iter(specs))) in dtypes]
    distributed = bool((meta.get("optimizer") or {}).get("distributed"))
    opt_dp = dp if distributed else 1
    stages = []
    for pp_rank in range(pp):
        names = stage_names(specs, cfg.num_layers, pp, vp, pp_rank)
        stages.append(StagePlan(pp_rank, names, [position_parts(names, specs, dtypes, kinds, tp, tp_rank, pp_rank,
                                                                opt_dp) for tp_rank in range(tp)]))
    target = dict(tp=tp, pp=pp, vp=vp if vp > 1 else None, dp=dp)
    copy_rng = target == source and os.path.isdir(os.path.join(source_dir, "rng"))
    metadata = {k: v for k, v in meta.items() if k != "format_version"}
    if not copy_rng:
        metadata["parallel"] = layout_record(tp, pp, target["vp"], dp)
    metadata["resharded_from"] = dict(directory=os.path.abspath(source_dir), parallel=meta.get("parallel"))
    summary = (f"source {source_dir}: TP {source['tp']} PP {source['pp']} VP {source['vp'] or 1} DP {source['dp']}, "
               f"{len(specs)} tensors x {len(kinds)} kinds; target TP {tp} PP {pp} VP {vp} DP {dp}"
               + (f" (distributed optimizer: {opt_dp} DP parts)" if len(kinds) > 1 and distributed else ""))
    return ReshardPlan(reader, save, meta["iteration"], target, kinds, specs, dtypes, stages, metadata, copy_rng,
                       summary)


# ---- the write: stream every full tensor once into the planned files -----------------------------
def _write_stage(plan: ReshardPlan, stage: StagePlan, parts: List[List[StreamingPart]], bar) -> None:
    """Assemble each of the stage's full tensors once (every kind), cut its TP shards and hand each
    part of that TP rank the range it planned next; free it before the next tensor."""
    reader, tp = plan.reader, plan.target["tp"]
    for name in stage.names:
        _, dim = plan.specs[name]
        for kind in plan.kinds:
            full = reader.full_tensor(kind, name)
            for tp_rank in range(tp if dim is not None else 1):  # TP-replicated: TP rank 0's parts only
                flat = shard(full, dim, tp, tp_rank).reshape(-1).contiguous()
                for part in parts[tp_rank]:  # the parts (model, DP ranges) that own a range of it
                    e = part.next_entry()
                    if e is not None and (e["kind"], e["name"]) == (kind, name):
                        part.write(kind, name, flat[e["start"]:e["end"]])
                del flat
            bar.advance(full.numel() * full.element_size())
            del full
            reader.release()


def write_reshard(plan: ReshardPlan, log: Optional[Callable[[str], None]] = None, quiet: bool = False,
                  start_time: Optional[float] = None) -> str:
    """The write step of `reshard`: stage every planned part, the metadata (and the RNG states when
    the layout is unchanged) in `iter_N.tmp/`, then publish. On any failure, interruption included,
    the staging directory is removed. Returns the published iteration directory."""
    log = log or (lambda msg: None)
    start_time = time.time() if start_time is None else start_time
    staged = staging_dir(plan.save, plan.iteration)
    shutil.rmtree(staged, ignore_errors=True)  # a leftover of an interrupted reshard into this new root
    os.makedirs(staged)
    writers: List[StreamingPart] = []
    bar = progress(plan.total_bytes, "reshard", unit="B", unit_scale=True, quiet=quiet,
                   items=len(plan.specs) * len(plan.kinds), item_unit="tensors")
    try:
        for stage in plan.stages:
            parts: List[List[StreamingPart]] = []  # [tp_rank] -> the position's open parts
            for position in stage.positions:
                parts.append([])
                for part_name, entries in position.items():
                    writers.append(StreamingPart(staged, part_name, entries))
                    parts[-1].append(writers[-1])
            _write_stage(plan, stage, parts, bar)
            for writer in writers:
                writer.close()
            writers = []
            log(f"stage {stage.pp_rank + 1}/{len(plan.stages)}: {len(stage.names)} tensors x {len(plan.kinds)} kinds "
                f"x {plan.target['tp']} TP shards written ({time.time() - start_time:.1f}s)")
        rng_src = os.path.join(plan.reader.directory, "rng")
        if plan.copy_rng:
            shutil.copytree(rng_src, os.path.join(staged, "rng"))
        elif os.path.isdir(rng_src):
            log("RNG states dropped: they belong to the ranks of the source layout (loading warns; dropout "
                "masks will differ from an uninterrupted run)")
        tokenizer = os.path.join(plan.reader.directory, TOKENIZER_FILE)
        if os.path.isfile(tokenizer):
            shutil.copyfile(tokenizer, os.path.join(staged, TOKENIZER_FILE))
        write_metadata(staged, **plan.metadata)
    except BaseException:
        bar.close()
        for writer in writers:
            writer.abort()
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return publish(plan.save, plan.iteration)


def reshard(load: str, save: str, tp: int, pp: int, layers_per_virtual_stage: Optional[int] = None,
            dp: Optional[int] = None, verify: bool = False, log: Optional[Callable[[str], None]] = None,
            quiet: bool = False) -> str:
    """Write checkpoint `load` (a root with `latest`, or an iteration directory; any layout) at TP=tp, PP=pp
    (`layers_per_virtual_stage` layers per virtual stage) and, for the distributed optimizer's shards, DP=dp
    (default: the source's), into the new root `save`. Returns the published iteration directory. `verify`: reread
    both and compare every full tensor bit for bit. Progress on stderr unless `quiet`."""
    log = log or (lambda msg: None)
    start_time = time.time()
    plan = plan_reshard(load, save, tp, pp, layers_per_virtual_stage, dp)
    log(plan.summary)
    final = write_reshard(plan, log, quiet, start_time)
    log(f"wrote {final} in {time.time() - start_time:.1f}s")
    if verify:
        n = verify_same(plan.reader.directory, final)
        log(f"verified: every checksum matches, {n} tensors bit-identical ({time.time() - start_time:.1f}s)")
    return final


def verify_same(a: str, b: str) -> int:
    """Check every part file of checkpoints `a` and `b` against its recorded checksum, then compare
    every gathered full tensor (every kind) bit for bit, and their iteration, consumed samples,
    model, scheduler, scaler and optimizer metadata. Returns the number of tensors compared;
    raises CheckpointError at the first difference or corrupt file."""
    ra, rb = CheckpointReader(resolve(a)), CheckpointReader(resolve(b))
    verify_checksums(ra)
    verify_checksums(rb)
    for key in ("iteration", "consumed_samples", "model", "scheduler", "grad_scaler", "optimizer"):
        if ra.metadata.get(key) != rb.metadata.get(key):
            raise CheckpointError(f"verify: metadata {key!r} differs: {ra.metadata.get(key)!r} in {ra.directory}, "
                                  f"{rb.metadata.get(key)!r} in {rb.directory}")
    keys_a, keys_b = set(ra.pieces), set(rb.pieces)
    if keys_a != keys_b:
        kind, name = sorted(keys_a ^ keys_b)[0]
        raise CheckpointError(f"verify: {kind} tensor {name} is in only one of {ra.directory} and {rb.directory}")
    for kind, name in sorted(keys_a):
        ta, tb = ra.full_tensor(kind, name), rb.full_tensor(kind, name)
        same = (ta.dtype == tb.dtype and ta.shape == tb.shape
                and torch.equal(ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)))
        if not same:
            raise CheckpointError(f"verify: {kind} tensor {name} differs between {ra.directory} "
                                  f"({ta.dtype} {tuple(ta.shape)}) and {rb.directory} ({tb.dtype} {tuple(tb.shape)})")
        del ta, tb
        ra.release()
        rb.release()
    return len(keys_a)
