"""Offline resharding: a megaglot checkpoint at any TP/PP/VP/DP layout -> the same run at another.

    reshard(load, save, tp, pp, layers_per_virtual_stage=None, dp=None, verify=False) -> published dir

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

Memory stays near one full tensor: each part file's header is planned up front from the source's index (names,
shapes, dtypes), then every full tensor is assembled once, its TP shards (or DP ranges) streamed into the open
part files of its stage, and freed before the next; the reader's memory maps are dropped after each tensor so
their pages leave the resident set.

Every check runs before the first byte is written: the source's tensors against its own model config (missing or
unexpected names, global shapes and split dimensions, stored sizes, TP shards that are incomplete), the target
layout against the model (`ParallelConfig.validate`), and the save path (never the source or inside it, never
over a checkpoint). The target is staged in `iter_N.tmp/` and published (`latest` last), so a failure leaves
nothing half-written. `check_checkpoint` is the same validation for a reader that loads at another layout.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

from megaglot.checkpoint.format import (MODEL, CheckpointError, CheckpointReader, publish, resolve, staging_dir,
                                        write_metadata)
from megaglot.checkpoint.sharding import shard
from megaglot.checkpoint.streaming import TORCH_DTYPES, StreamingPart, numel, parameter_specs, stage_names
from megaglot.config import ConfigError, ModelConfig, ParallelConfig
from megaglot.progress import progress

OPTIMIZER_KINDS = ("master", "exp_avg", "exp_avg_sq")

# What the target flags are called on the reshard command line (ConfigError names training's flags).
_TARGET_FLAGS = (("--tensor-model-parallel-size", "--target-tensor-parallel-size"),
                 ("--pipeline-model-parallel-size", "--target-pipeline-parallel-size"),
                 ("--num-layers-per-virtual-pipeline-stage", "--target-num-layers-per-virtual-pipeline-stage"))


def model_config_of(reader: CheckpointReader) -> ModelConfig:
    meta_path = os.path.join(reader.directory, "metadata.json")
    saved = reader.metadata.get("model")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{meta_path}: no model config ('model' section)")
    try:
        return ModelConfig.from_dict(saved)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: invalid model config ({e})") from None


# ---- validation of a source checkpoint ---------------------------------------------------------
def check_checkpoint(reader: CheckpointReader, cfg: Optional[ModelConfig] = None) -> Dict[Tuple[str, str], torch.dtype]:
    """Check every piece of `reader` against the model config (its own unless `cfg` is given)
    without reading tensor data; returns {(kind, name): stored dtype}. Raises CheckpointError with
    one line naming the file and the tensor."""
    cfg = cfg or model_config_of(reader)
    where = reader.directory
    specs = parameter_specs(cfg)
    kinds = sorted({kind for kind, _ in reader.pieces}, key=lambda k: (k != MODEL, k))  # model first
    if MODEL not in kinds:
        raise CheckpointError(f"{where}: holds no model tensors")
    for kind in kinds:
        names = set(reader.names(kind))
        missing = [n for n in specs if n not in names]
        if missing:
            raise CheckpointError(
                f"{where}: missing {kind} tensor {missing[0]} ({len(missing)} of {len(specs)} in all); "
                f"are the shard files of a pipeline stage missing?")
        extra = sorted(names - set(specs))
        if extra:
            raise CheckpointError(f"{where}: unexpected {kind} tensor {extra[0]} ({len(extra)} in all) that its "
                                  f"model config ({cfg.num_layers} layers) does not describe")
    opt = [k for k in kinds if k != MODEL]
    if opt and sorted(opt) != sorted(OPTIMIZER_KINDS):
        absent = [k for k in OPTIMIZER_KINDS if k not in opt]
        raise CheckpointError(f"{where}: optimizer state incomplete: kinds {', '.join(opt)} but no "
                              f"{', '.join(absent) or 'model'}; are optimizer shard files missing?")

    # stored sizes and dtypes, one header per file (no tensor data is read)
    stored: Dict[str, Dict[str, Tuple[str, int]]] = {}
    for file in sorted({p.file for pieces in reader.pieces.values() for p in pieces}):
        path = os.path.join(where, file)
        try:
            with safe_open(path, framework="pt") as handle:
                stored[file] = {key: (handle.get_slice(key).get_dtype(), numel(handle.get_slice(key).get_shape()))
                                for key in handle.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None

    dtypes = {}
    for (kind, name), pieces in sorted(reader.pieces.items(), key=lambda kv: (kv[0][0] != MODEL, kv[0])):
        want_shape, want_dim = specs[name]
        first = pieces[0]
        label = f"{kind} tensor {name} ({first.file})"
        for p in pieces:
            if tuple(p.global_shape) != want_shape:
                raise CheckpointError(f"{where}: {label} has global shape {tuple(p.global_shape)}, but metadata.json's "
                                      f"model config implies {want_shape}; the metadata and the tensors disagree")
            if p.partition_dim != want_dim:
                raise CheckpointError(f"{where}: {label} is split on dim {p.partition_dim}, the model splits it on "
                                      f"{want_dim}")
            if p.tp_size != first.tp_size:
                raise CheckpointError(f"{where}: {label} has pieces saved at TP {first.tp_size} and TP {p.tp_size}")
            if p.partition_dim is not None and (p.tp_size <= 0 or want_shape[p.partition_dim] % p.tp_size):
                raise CheckpointError(f"{where}: {label}: TP {p.tp_size} does not divide dim {p.partition_dim} of "
                                      f"{want_shape}")
            if not 0 <= p.tp_rank < p.tp_size:
                raise CheckpointError(f"{where}: {label}: TP rank {p.tp_rank} outside TP size {p.tp_size}")
            entry = stored[p.file].get(p.key)
            if entry is None:
                raise CheckpointError(f"{os.path.join(where, p.file)}: has no tensor {p.key!r} that its index lists")
            if entry[1] != p.end - p.start:
                raise CheckpointError(f"{os.path.join(where, p.file)}: {p.key} holds {entry[1]} values, its index "
                                      f"says [{p.start}, {p.end}) ({p.end - p.start})")
            if entry[0] not in TORCH_DTYPES:
                raise CheckpointError(f"{os.path.join(where, p.file)}: {p.key} has unsupported dtype {entry[0]}")
            if entry[0] != stored[first.file][first.key][0]:
                raise CheckpointError(f"{where}: {label} has pieces of dtypes {stored[first.file][first.key][0]} and "
                                      f"{entry[0]}")
        dtypes[(kind, name)] = TORCH_DTYPES[stored[first.file][first.key][0]]
        # every TP shard covered exactly, from 0 to its size
        shard_numel = numel(first.shard_shape)
        ranks = range(first.tp_size) if first.partition_dim is not None else [min(p.tp_rank for p in pieces)]
        for tp_rank in ranks:
            covered = 0
            for p in sorted((p for p in pieces if p.tp_rank == tp_rank), key=lambda p: p.start):
                if p.start != covered:
                    break
                covered = p.end
            if covered != shard_numel:
                raise CheckpointError(f"{where}: {kind} tensor {name} TP shard {tp_rank} of {first.tp_size} is "
                                      f"incomplete ({covered} of {shard_numel} values); a shard file is missing")
    return dtypes


# ---- layouts --------------------------------------------------------------------------------
def source_layout(meta: dict) -> dict:
    """(tp, pp, vp, dp) of the metadata's `parallel` section, as far as it says (training's or
    an offline tool's key names)."""
    par = meta.get("parallel") or {}
    vp = par.get("virtual_pipeline_size")
    k = par.get("num_layers_per_virtual_pipeline_stage")
    if vp is None and k and "model" in meta:
        vp = meta["model"]["num_layers"] // (par.get("pipeline_model_parallel_size", 1) * k)
    return dict(tp=par.get("tensor_model_parallel_size"), pp=par.get("pipeline_model_parallel_size"),
                vp=vp if vp and vp > 1 else None, dp=par.get("data_parallel_size"))


def _target_flags(message: str) -> str:
    for flag, target in _TARGET_FLAGS:
        message = message.replace(flag, target)
    # the padded vocabulary is part of the checkpoint: the hint to re-pad does not apply here
    return re.sub(r"; set --make-vocab-size-divisible-by \d+", "; choose a TP size that divides it", message)


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


# ---- resharding -----------------------------------------------------------------------------
def _optimizer_plan(names, kinds, specs, dtypes, tp: int, tp_rank: int, dp: int) -> List[List[dict]]:
    """The optimizer pieces of one (tp, pp) position in `dp` parts: the position's tensors laid end
    to end (model order) and cut into dp contiguous ranges, as the distributed optimizer owns them."""
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


def reshard(load: str, save: str, tp: int, pp: int, layers_per_virtual_stage: Optional[int] = None,
            dp: Optional[int] = None, verify: bool = False, log: Optional[Callable[[str], None]] = None,
            quiet: bool = False) -> str:
    """Write checkpoint `load` (a root with `latest`, or an iteration directory; any layout) at TP=tp, PP=pp
    (`layers_per_virtual_stage` layers per virtual stage) and, for the distributed optimizer's shards, DP=dp
    (default: the source's), into the new root `save`. Returns the published iteration directory. `verify`: reread
    both and compare every full tensor bit for bit. Progress on stderr unless `quiet`."""
    log = log or (lambda msg: None)
    start_time = time.time()
    if not os.path.exists(load):
        raise CheckpointError(f"--load {load}: no such checkpoint directory")
    source_dir = resolve(load)
    reader = CheckpointReader(source_dir)
    meta = reader.metadata
    cfg = model_config_of(reader)
    if not isinstance(meta.get("iteration"), int):
        raise CheckpointError(f"{os.path.join(source_dir, 'metadata.json')}: no integer 'iteration'")
    try:
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       num_layers_per_virtual_pipeline_stage=layers_per_virtual_stage).validate(cfg)
    except ConfigError as e:
        raise ConfigError(_target_flags(str(e))) from None
    src = source_layout(meta)
    if dp is None:
        dp = src["dp"] or 1
    if dp <= 0:
        raise ConfigError(f"--target-data-parallel-size must be positive, got {dp}")
    vp = cfg.num_layers // (pp * layers_per_virtual_stage) if layers_per_virtual_stage else 1
    _check_save_path(save, load, source_dir)
    dtypes = check_checkpoint(reader, cfg)
    specs = parameter_specs(cfg)
    opt_kinds = [k for k in OPTIMIZER_KINDS if (k, next(iter(specs))) in dtypes]
    distributed = bool((meta.get("optimizer") or {}).get("distributed"))
    opt_dp = dp if distributed else 1
    log(f"source {source_dir}: TP {src['tp']} PP {src['pp']} VP {src['vp'] or 1} DP {src['dp']}, "
        f"{len(specs)} tensors x {1 + len(opt_kinds)} kinds; target TP {tp} PP {pp} VP {vp} DP {dp}"
        + (f" (distributed optimizer: {opt_dp} DP parts)" if opt_kinds and distributed else ""))

    iteration = meta["iteration"]
    staged = staging_dir(save, iteration)
    shutil.rmtree(staged, ignore_errors=True)  # a leftover of an interrupted reshard into this new root
    os.makedirs(staged)
    writers: List[StreamingPart] = []
    bar = progress(sum(numel(specs[n][0]) * torch.empty((), dtype=dtypes[(k, n)]).element_size() for k in
                       [MODEL] + opt_kinds for n in specs), "reshard", unit="B", unit_scale=True, quiet=quiet,
                   items=len(specs) * (1 + len(opt_kinds)), item_unit="tensors")
    try:
        for pp_rank in range(pp):
            names = stage_names(specs, cfg.num_layers, pp, vp, pp_rank)
            model_parts, opt_parts = [], []  # [tp_rank] -> writer, [tp_rank][dp_rank] -> writer
            writers = []
            for tp_rank in range(tp):
                plan = []
                for name in names:
                    shape, dim = specs[name]
                    if dim is None and tp_rank != 0:
                        continue  # TP-replicated: written once, by TP rank 0
                    n = numel(shape) // (tp if dim is not None else 1)
                    plan.append(dict(kind=MODEL, name=name, global_shape=shape, partition_dim=dim, tp_size=tp,
                                     tp_rank=tp_rank, start=0, end=n, dtype=dtypes[(MODEL, name)]))
                model_parts.append(StreamingPart(staged, f"model_tp{tp_rank:02d}_pp{pp_rank:02d}", plan))
                writers.append(model_parts[-1])
                row = []
                if opt_kinds:
                    for d, plan in enumerate(_optimizer_plan(names, opt_kinds, specs, dtypes, tp, tp_rank, opt_dp)):
                        row.append(StreamingPart(staged, f"optim_tp{tp_rank:02d}_pp{pp_rank:02d}_dp{d:03d}", plan))
                        writers.append(row[-1])
                opt_parts.append(row)
            for name in names:
                _, dim = specs[name]
                for kind in [MODEL] + opt_kinds:
                    full = reader.full_tensor(kind, name)
                    for tp_rank in range(tp if dim is not None else 1):
                        flat = shard(full, dim, tp, tp_rank).reshape(-1).contiguous()
                        if kind == MODEL:
                            model_parts[tp_rank].write(kind, name, flat)
                            continue
                        for part in opt_parts[tp_rank]:  # the DP parts that own a range of it
                            e = part.next_entry()
                            if e is not None and (e["kind"], e["name"]) == (kind, name):
                                part.write(kind, name, flat[e["start"]:e["end"]])
                        del flat
                    bar.advance(full.numel() * full.element_size())
                    del full
                    reader.release()
            for writer in writers:
                writer.close()
            writers = []
            log(f"stage {pp_rank + 1}/{pp}: {len(names)} tensors x {1 + len(opt_kinds)} kinds x {tp} TP shards "
                f"written ({time.time() - start_time:.1f}s)")

        unchanged = (tp, pp, vp if vp > 1 else None, dp) == (src["tp"], src["pp"], src["vp"], src["dp"])
        rng_src = os.path.join(source_dir, "rng")
        new_meta = {k: v for k, v in meta.items() if k != "format_version"}
        if unchanged and os.path.isdir(rng_src):
            shutil.copytree(rng_src, os.path.join(staged, "rng"))
        else:
            new_meta["parallel"] = dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                        virtual_pipeline_size=vp if vp > 1 else None, data_parallel_size=dp,
                                        world_size=tp * pp * dp)
            if os.path.isdir(rng_src):
                log("RNG states dropped: they belong to the ranks of the source layout (loading warns; dropout "
                    "masks will differ from an uninterrupted run)")
        new_meta["resharded_from"] = dict(directory=os.path.abspath(source_dir), parallel=meta.get("parallel"))
        write_metadata(staged, **new_meta)
    except BaseException:
        bar.close()
        for writer in writers:
            writer.abort()
        shutil.rmtree(staged, ignore_errors=True)
        raise
    final = publish(save, iteration)
    log(f"wrote {final} in {time.time() - start_time:.1f}s")
    if verify:
        n = verify_same(source_dir, final)
        log(f"verified: {n} tensors bit-identical ({time.time() - start_time:.1f}s)")
    return final


def verify_same(a: str, b: str) -> int:
    """Compare every gathered full tensor (every kind) of checkpoints `a` and `b` bit for bit, and
    their iteration, consumed samples, model, scheduler, scaler and optimizer metadata. Returns
    the number of tensors compared; raises CheckpointError at the first difference."""
    ra, rb = CheckpointReader(resolve(a)), CheckpointReader(resolve(b))
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


# ---- a random checkpoint of any preset (benchmarks and tests) --------------------------------
def write_random_checkpoint(root: str, cfg: ModelConfig, tp: int, pp: int, *, layers_per_virtual_stage=None,
                            dp: int = 1, optimizer: bool = True, distributed: bool = False,
                            dtype: torch.dtype = torch.float32, iteration: int = 1, seed: int = 0) -> str:
    """A checkpoint of `cfg`'s shapes filled with random values, laid out as training at TP/PP/DP
    saves it (model pieces; optimizer pieces in fp32, split over DP ranks when `distributed`),
    written part by part without holding a part in memory. Returns the published directory."""
    ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                   num_layers_per_virtual_pipeline_stage=layers_per_virtual_stage).validate(cfg)
    vp = cfg.num_layers // (pp * layers_per_virtual_stage) if layers_per_virtual_stage else 1
    specs = parameter_specs(cfg)
    generator = torch.Generator().manual_seed(seed)
    kinds = list(OPTIMIZER_KINDS) if optimizer else []
    dtypes = {(k, n): (dtype if k == MODEL else torch.float32) for n in specs for k in [MODEL] + kinds}
    staged = staging_dir(root, iteration)
    os.makedirs(staged, exist_ok=True)
    for pp_rank in range(pp):
        names = stage_names(specs, cfg.num_layers, pp, vp, pp_rank)
        for tp_rank in range(tp):
            plans = {f"model_tp{tp_rank:02d}_pp{pp_rank:02d}": _optimizer_plan(names, [MODEL], specs, dtypes, tp,
                                                                                tp_rank, 1)[0]}
            if kinds:
                for d, plan in enumerate(_optimizer_plan(names, kinds, specs, dtypes, tp, tp_rank,
                                                         dp if distributed else 1)):
                    plans[f"optim_tp{tp_rank:02d}_pp{pp_rank:02d}_dp{d:03d}"] = plan
            for part, plan in plans.items():
                writer = StreamingPart(staged, part, plan)
                for e in plan:
                    values = torch.randn(e["end"] - e["start"], generator=generator).to(e["dtype"])
                    if e["kind"] == "exp_avg_sq":
                        values = values.abs_()
                    writer.write(e["kind"], e["name"], values)
                writer.close()
    write_metadata(staged, iteration=iteration, consumed_samples=iteration * 8, model=cfg.to_dict(),
                   parallel=dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_size=vp if vp > 1 else None, data_parallel_size=dp,
                                 world_size=tp * pp * dp),
                   scheduler={"iteration": iteration} if optimizer else None, grad_scaler=None,
                   optimizer=dict(step=iteration, num_skipped=0, iteration=iteration, distributed=distributed)
                   if optimizer else None)
    return publish(root, iteration)
