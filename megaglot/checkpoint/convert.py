"""Hugging Face GPT-NeoX directory <-> megaglot checkpoint, offline, one tensor at a time.

    import_hf(hf_dir, save, tp, pp, layers_per_virtual_stage=None)  -> the published iteration dir
    export_hf(load, hf_dir, tokenizer=None)                           -> hf_dir (with a complete HF tokenizer)

No process groups: the target TP/PP ranks are iterated here and each full tensor is cut with
`sharding.shard`. Memory stays near one tensor (plus its TP shards), whatever the model size:

- import reads one source tensor at a time (safetensors via `safe_open`; `.bin` via `torch.load(mmap=True,
  weights_only=True)`, one shard file open at a time) and streams each TP shard into its part file
  (`model_tpXX_ppYY`: that stage's layers over all its virtual chunks, the embedding on the first stage, final
  norm and output layer on the last), a safetensors file whose header is planned from the source's shapes and
  dtypes before any data is read. Every check (config, layout, missing, unexpected and misshapen tensors) runs
  before the first byte is written; the checkpoint is staged and published (`latest` last), so a failure never
  leaves a partial checkpoint behind.
- export assembles one full tensor at a time from a checkpoint of any layout and streams it into Hugging Face
  safetensors files of at most `max_shard_bytes` each (one file, or several with `model.safetensors.index.json`),
  in a staging directory renamed into place at the end.

Tensors keep their dtype (Polyglot-Ko ships float16), so HF -> megaglot -> HF is bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import torch
from safetensors import safe_open

from megaglot.checkpoint.format import (MODEL, CheckpointError, CheckpointReader, iteration_dir_name, layout_record,
                                        model_config_of, model_part_name, publish, resolve, staging_dir, write_json,
                                        write_metadata)
from megaglot.checkpoint.hf import (VOCAB_PADDED, hf_config_from_model_config, hf_name, hf_names,
                                    is_ignored_hf_tensor, missing_tokenizer_message, model_config_from_hf,
                                    plan_hf_tokenizer, recorded_tokenizer, write_hf_tokenizer)
from megaglot.checkpoint.sharding import shard
from megaglot.checkpoint.streaming import (TORCH_DTYPES, StreamingPart, StreamingSafetensors, numel,
                                           parameter_specs, stage_names)
from megaglot.config import ConfigError, ModelConfig, ParallelConfig
from megaglot.progress import progress

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024 ** 3


# ---- reading a Hugging Face directory lazily --------------------------------------------------
def _read_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: no such directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing; --hf-dir must be a Hugging Face model directory")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return config


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class HFWeights:
    """The tensors of a Hugging Face directory, by name, read one at a time.

    Accepts model.safetensors, pytorch_model.bin and their sharded forms with an index file.
    Shapes and dtypes come from the files' headers (safetensors) or a memory-mapped load (.bin,
    whose tensors are not read until touched); at most one .bin shard is mapped at a time.
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self.file_of: Dict[str, str] = {}
        self.meta: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        self._open_file, self._open = None, None
        single_st, single_bin = "model.safetensors", "pytorch_model.bin"
        if os.path.isfile(os.path.join(hf_dir, SAFETENSORS_INDEX)):
            self.format, files = "safetensors", self._from_index(SAFETENSORS_INDEX)
        elif os.path.isfile(os.path.join(hf_dir, single_st)):
            self.format, files = "safetensors", [single_st]
        elif os.path.isfile(os.path.join(hf_dir, BIN_INDEX)):
            self.format, files = "bin", self._from_index(BIN_INDEX)
        elif os.path.isfile(os.path.join(hf_dir, single_bin)):
            self.format, files = "bin", [single_bin]
        else:
            raise CheckpointError(f"{hf_dir}: no weights (model.safetensors, pytorch_model.bin or their "
                                  f"sharded forms with {SAFETENSORS_INDEX} / {BIN_INDEX})")
        self.files = files
        for file in files:
            path = os.path.join(hf_dir, file)
            if self.format == "safetensors":
                with self._safe_open(path) as handle:
                    for name in handle.keys():
                        sl = handle.get_slice(name)
                        dtype = TORCH_DTYPES.get(sl.get_dtype())
                        if dtype is None:
                            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                        self._record(name, file, tuple(sl.get_shape()), dtype)
            else:
                for name, tensor in self._load_bin(file).items():
                    self._record(name, file, tuple(tensor.shape), tensor.dtype)
                self._close()

    def _from_index(self, index_file: str) -> List[str]:
        path = os.path.join(self.hf_dir, index_file)
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: not a valid index file ({type(e).__name__}: {e})") from None
        files = list(dict.fromkeys(weight_map.values()))
        for file in files:
            if not os.path.isfile(os.path.join(self.hf_dir, file)):
                raise CheckpointError(f"{path}: refers to missing shard {file}")
        self._index = weight_map
        return files

    def _record(self, name, file, shape, dtype):
        index = getattr(self, "_index", None)
        if index is not None and index.get(name, file) != file:
            return  # the index says another file holds it
        self.file_of[name] = file
        self.meta[name] = (shape, dtype)

    @staticmethod
    def _safe_open(path):
        try:
            return safe_open(path, framework="pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(e)})") from None

    def _load_bin(self, file: str) -> dict:
        path = os.path.join(self.hf_dir, file)
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                # legacy (pre-zip) torch.save format cannot be mapped: load this one shard whole
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - unpickling errors of every kind
            raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict ({_one_line(e)})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
        self._open_file, self._open = file, state
        return state

    def _close(self):
        self._open_file, self._open = None, None

    close = _close

    def get(self, name: str) -> torch.Tensor:
        file = self.file_of[name]
        if self.format == "safetensors":
            with safe_open(os.path.join(self.hf_dir, file), framework="pt") as handle:
                return handle.get_tensor(name)
        state = self._open if self._open_file == file else self._load_bin(file)
        return state[name]


# ---- import ----------------------------------------------------------------------------------
def _source_names(weights: HFWeights, specs, cfg: ModelConfig, where: str,
                  vocab_rows: Optional[int] = None) -> Dict[str, str]:
    """{global name: HF name}, with every check on names and shapes done before anything is written."""
    found = {}
    for name, (shape, _) in specs.items():
        candidates = [n for n in hf_names(name) if n in weights.meta]
        if not candidates:
            raise CheckpointError(f"{where}: missing tensor {' or '.join(hf_names(name))} "
                                  f"(config.json says {cfg.num_layers} layers)")
        src = candidates[0]
        have = weights.meta[src][0]
        if name in VOCAB_PADDED:
            rows = have[0] if len(have) == 2 else -1
            if vocab_rows is None:  # as config.json says: its vocabulary, or already padded
                ok = rows in (cfg.vocab_size, cfg.padded_vocab_size)
                want = f"({cfg.vocab_size} or {cfg.padded_vocab_size}, {shape[1]})"
            else:  # --vocab-size below config.json's: the stored rows are kept (as padding)
                ok = cfg.vocab_size <= rows <= cfg.padded_vocab_size
                want = f"({vocab_rows}, {shape[1]}) with --vocab-size {cfg.vocab_size}"
            ok = ok and have[1:] == shape[1:]
        else:
            ok, want = have == shape, str(shape)
        if not ok:
            raise CheckpointError(f"{where}: tensor {src} ({weights.file_of[src]}) has shape {have}, "
                                  f"config.json implies {want}")
        found[name] = src
    used = set(found.values())
    extra = sorted(n for n in weights.meta if n not in used and not is_ignored_hf_tensor(n)
                   and not (n == "lm_head.weight" and "embed_out.weight" in used)
                   and not (n == "embed_out.weight" and "lm_head.weight" in used))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]} ({len(extra)} in all) that config.json "
                              f"({cfg.num_layers} layers) does not describe")
    return found


def _padded(tensor: torch.Tensor, name: str, cfg: ModelConfig) -> torch.Tensor:
    if name not in VOCAB_PADDED or tensor.shape[0] == cfg.padded_vocab_size:
        return tensor
    padded = tensor.new_zeros((cfg.padded_vocab_size,) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    return padded


def import_hf(hf_dir: str, save: str, tp: int, pp: int, layers_per_virtual_stage: Optional[int] = None, *,
              vocab_size: Optional[int] = None, log=None, quiet: bool = False) -> str:
    """Convert a Hugging Face GPT-NeoX directory into a megaglot checkpoint (iteration 0) at TP=tp,
    PP=pp (and `layers_per_virtual_stage` layers per virtual stage). `vocab_size` overrides
    config.json's (Polyglot-Ko's say 30080, the padded size; 30003 is the tokenizer's), keeping
    the stored rows. Returns the published iteration directory. Progress (bytes, tensors) on stderr."""
    log = log or (lambda msg: None)
    hf_config = _read_config(hf_dir)
    overrides = {} if vocab_size is None else {"vocab_size": vocab_size}
    cfg = model_config_from_hf(hf_config, os.path.join(hf_dir, "config.json"), **overrides)
    ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                   num_layers_per_virtual_pipeline_stage=layers_per_virtual_stage).validate(cfg)
    vp = cfg.num_layers // (pp * layers_per_virtual_stage) if layers_per_virtual_stage else 1
    final = os.path.join(save, iteration_dir_name(0))
    if os.path.exists(os.path.join(save, "latest")) or os.path.exists(final):
        raise CheckpointError(f"{save}: already holds a checkpoint; choose a new --save directory "
                              f"(nothing was written)")
    if os.path.exists(save) and not os.path.isdir(save):
        raise CheckpointError(f"{save}: exists and is not a directory")

    weights = HFWeights(hf_dir)
    specs = parameter_specs(cfg)
    sources = _source_names(weights, specs, cfg, hf_dir, None if vocab_size is None else hf_config.get("vocab_size"))
    file_order = {f: i for i, f in enumerate(weights.files)}

    staged = staging_dir(save, 0)
    shutil.rmtree(staged, ignore_errors=True)  # a leftover of an interrupted conversion
    writers: List[StreamingPart] = []
    size = {n: numel(specs[n][0]) * torch.empty((), dtype=weights.meta[sources[n]][1]).element_size() for n in specs}
    bar = progress(sum(size.values()), "import", unit="B", unit_scale=True, quiet=quiet, items=len(specs),
                   item_unit="tensors")
    try:
        for pp_rank in range(pp):
            names = stage_names(specs, cfg.num_layers, pp, vp, pp_rank)
            # read a stage's tensors together, file by file (one .bin shard mapped at a time)
            names.sort(key=lambda n: file_order[weights.file_of[sources[n]]])
            writers = []
            for tp_rank in range(tp):
                plan = []
                for name in names:
                    shape, dim = specs[name]
                    plan.append(dict(kind=MODEL, name=name, global_shape=shape, partition_dim=dim,
                                     tp_size=tp, tp_rank=tp_rank, start=0,
                                     end=numel(shape) // (tp if dim is not None else 1),
                                     dtype=weights.meta[sources[name]][1]))
                writers.append(StreamingPart(staged, model_part_name(tp_rank, pp_rank), plan))
            for name in names:
                full = _padded(weights.get(sources[name]), name, cfg)
                _, dim = specs[name]
                for tp_rank, writer in enumerate(writers):
                    writer.write(MODEL, name, shard(full, dim, tp, tp_rank))
                del full
                bar.advance(size[name])
            for writer in writers:
                writer.close()
            log(f"stage {pp_rank + 1}/{pp}: {len(names)} tensors x {tp} TP shards written")
        weights.close()
        write_metadata(staged, iteration=0, consumed_samples=0, model=cfg.to_dict(),
                       parallel=layout_record(tp, pp, vp if vp > 1 else None, 1,
                                              num_layers_per_virtual_pipeline_stage=layers_per_virtual_stage,
                                              sequence_parallel=False, use_distributed_optimizer=False),
                       optimizer=None, scheduler=None, grad_scaler=None,
                       source={"hf_dir": os.path.abspath(hf_dir), "format": weights.format})
    except BaseException:
        bar.close()
        for writer in writers:
            writer.abort()
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return publish(save, 0)


# ---- export ----------------------------------------------------------------------------------
def _stored_dtype(reader: CheckpointReader, name: str) -> torch.dtype:
    piece = reader.info(MODEL, name)
    with safe_open(os.path.join(reader.directory, piece.file), framework="pt") as handle:
        return TORCH_DTYPES[handle.get_slice(piece.key).get_dtype()]


def _export_tokenizer(reader: CheckpointReader, cfg: ModelConfig, tokenizer: Optional[str]):
    """--tokenizer, else the tokenizer the checkpoint records (its own copy, found wherever the
    checkpoint was moved); None when it records none. A recorded tokenizer that is gone is an error."""
    if tokenizer is None:
        tokenizer, recorded = recorded_tokenizer(reader.metadata, reader.directory)
        if tokenizer is None and recorded is not None:
            raise CheckpointError(missing_tokenizer_message(reader.directory, recorded))
    return None if tokenizer is None else plan_hf_tokenizer(tokenizer, cfg)


def _plan_hf_files(specs, dtypes, cfg: ModelConfig, max_shard_bytes: int):
    """The HF files' tensors: model order, a new file when the next tensor would pass
    max_shard_bytes. Returns ([names per file], {name: un-padded shape}, total bytes)."""
    files: List[List[str]] = [[]]
    shapes, size, total = {}, 0, 0
    for name, (shape, _) in specs.items():
        shapes[name] = ((cfg.vocab_size,) + shape[1:]) if name in VOCAB_PADDED else shape
        nbytes = numel(shapes[name]) * torch.empty((), dtype=dtypes[name]).element_size()
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size, total = size + nbytes, total + nbytes
    return files, shapes, total


def export_hf(load: str, hf_dir: str, tokenizer: Optional[str] = None, *,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, log=None, quiet: bool = False) -> str:
    """Write the model of megaglot checkpoint `load` (a root with `latest`, or an iteration
    directory; any layout) as a Hugging Face GPT-NeoX directory `hf_dir` with the vocabulary
    un-padded. `tokenizer`: a tokenizer.json, or a directory whose tokenizer files are copied
    (default: the checkpoint's own); tokenizer_config.json and special_tokens_map.json are
    completed with the tokenizer's special tokens, and config.json names the same ids."""
    log = log or (lambda msg: None)
    if not os.path.isdir(load):
        raise CheckpointError(f"{load}: no such checkpoint directory")
    reader = CheckpointReader(resolve(load))
    cfg = model_config_of(reader)
    tokenizer_plan = _export_tokenizer(reader, cfg, tokenizer)
    if os.path.exists(hf_dir) and (not os.path.isdir(hf_dir) or os.listdir(hf_dir)):
        raise CheckpointError(f"{hf_dir}: exists and is not an empty directory; choose a new --hf-dir")
    specs = parameter_specs(cfg)
    missing = [n for n in specs if not reader.has(MODEL, n)]
    if missing:
        raise CheckpointError(f"{reader.directory}: missing model tensor {missing[0]} ({len(missing)} in all)")
    for name, (shape, _) in specs.items():
        if tuple(reader.info(MODEL, name).global_shape) != shape:
            raise CheckpointError(f"{reader.directory}: tensor {name} has global shape "
                                  f"{tuple(reader.info(MODEL, name).global_shape)}, its model config implies {shape}")

    dtypes = {name: _stored_dtype(reader, name) for name in specs}
    files, shapes, total = _plan_hf_files(specs, dtypes, cfg, max_shard_bytes)
    n = len(files)
    file_names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    parent = os.path.dirname(os.path.abspath(hf_dir))
    os.makedirs(parent, exist_ok=True)
    staged = os.path.join(parent, f".{os.path.basename(os.path.abspath(hf_dir))}.export-tmp")
    shutil.rmtree(staged, ignore_errors=True)
    os.makedirs(staged)
    bar = progress(total, "export", unit="B", unit_scale=True, quiet=quiet, items=len(specs), item_unit="tensors")
    try:
        weight_map = {}
        for file, names in zip(file_names, files):
            entries = [(hf_name(name), dtypes[name], shapes[name]) for name in names]
            writer = StreamingSafetensors(os.path.join(staged, file), entries)
            try:
                for name in names:
                    full = reader.full_tensor(MODEL, name)
                    if name in VOCAB_PADDED:
                        full = full[: cfg.vocab_size]
                    writer.write(hf_name(name), full)
                    bar.advance(full.numel() * full.element_size())
                    weight_map[hf_name(name)] = file
                    del full
                    reader.release()
                writer.close()
            finally:
                writer.abort()
            log(f"wrote {file} ({len(names)} tensors)")
        if n > 1:
            write_json(os.path.join(staged, SAFETENSORS_INDEX),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
        config = hf_config_from_model_config(cfg, **(tokenizer_plan.ids if tokenizer_plan else {}))
        dtype_name = str(dtypes["embed_in.weight"]).replace("torch.", "")
        config["torch_dtype"] = dtype_name
        write_json(os.path.join(staged, "config.json"), config)
        if tokenizer_plan is not None:
            written = write_hf_tokenizer(tokenizer_plan, staged)
            log(f"tokenizer files: {', '.join(written)} ({tokenizer_plan.note})")
        if os.path.isdir(hf_dir):
            os.rmdir(hf_dir)  # empty, checked above
        os.replace(staged, hf_dir)
    except BaseException:
        bar.close()
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return hf_dir
