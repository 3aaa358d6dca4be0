"""Pretrain a Polyglot-Ko-style GPT-NeoX with tensor, pipeline and data parallelism.

    torchrun --nproc_per_node 4 examples/pretrain_ko.py          # the embedded CPU demo
    torchrun --nnodes 2 --nproc_per_node 8 examples/pretrain_ko.py --model polyglot-ko-1.3b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --bf16 --data-path ...

With no arguments: a tiny model over the bundled Korean sample (preprocessed on first use with a
freshly trained tokenizer), TP=2 x PP=2 on 4 processes (another fitting layout otherwise).
That demo preset (see demo_preset) sets --seq-length 128 --train-iters 100 --eval-interval 20
--log-interval 10 --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 --save checkpoints/demo --load checkpoints/demo
--tensorboard-dir runs/demo --generate-prompt 대한민국의 수도는; any flag given overrides it. With
--model or --data-path, the defaults below apply (--seq-length 128 for the tiny models).
Every flag is a field of megaglot.config's dataclasses; --x none sets an optional field to None.

SIGTERM (SLURM's warning before preemption) saves a checkpoint at the next step boundary and exits 0
(143 without --save: nothing kept); Ctrl-C exits 130 with one line; an `error:` line exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CORPUS = os.path.join(ROOT, "examples", "data", "ko_sample.jsonl")
DEMO_CACHE = os.path.join(ROOT, "examples", "data", "cache")
DEMO_CHECKPOINT = os.path.join(ROOT, "checkpoints", "demo")  # --save and --load: a rerun resumes


def parse_args(argv=None):
    """Every flag comes from a dataclass field in megaglot.config (its doc is the help); absent flags
    are absent from the result, so the demo or model preset fills them (see build_configs)."""
    from megaglot.config.cli import add_config_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, shown_defaults={"model.name": "tiny"})
    return p.parse_args(argv)


def default_layout(world: int):
    """TP=2 x PP=2 on 4 processes; otherwise the largest of TP x PP in {4, 2, 1} that divides the world."""
    for tp, pp in ((2, 2), (2, 1), (1, 1)):
        if world % (tp * pp) == 0:
            return tp, pp
    return 1, 1


def demo_preset(world: int):
    """(model preset, ParallelConfig, TrainConfig) of the embedded CPU demo: the tiny model on the
    bundled corpus, TP2 x PP2 on 4 ranks, 100 iterations; the user's flags apply on top of it."""
    from megaglot.config import (CheckpointConfig, LoggingConfig, OptimizerConfig, ParallelConfig,
                                 TrainConfig)

    tp, pp = default_layout(world)
    train = TrainConfig(seq_length=128, train_iters=100, eval_interval=20,
                        optimizer=OptimizerConfig(lr=1e-3, min_lr=1e-4, lr_warmup_iters=10),
                        checkpoint=CheckpointConfig(save=DEMO_CHECKPOINT, load=DEMO_CHECKPOINT),
                        logging=LoggingConfig(log_interval=10, tensorboard_dir=os.path.join(ROOT, "runs", "demo"),
                                              generate_prompt="대한민국의 수도는"))
    return "tiny", ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), train


def run_preset(model_name: str):
    """(model preset, ParallelConfig, TrainConfig) of a run on the user's data: the dataclass defaults,
    with 128-token samples for the tiny models (their rotary cache holds 256 positions)."""
    from megaglot.config import ParallelConfig, TrainConfig

    return "tiny", ParallelConfig(), TrainConfig(seq_length=128) if model_name.startswith("tiny") else TrainConfig()


def build_configs(args, world: int):
    """(model, parallel, train, demo?): a preset, then every flag the user gave on top of it."""
    import dataclasses

    from megaglot.config.cli import configs_from_args, given

    flags = given(args)
    demo = "data_path" not in flags.get("train", {}).get("data", {}) and "name" not in flags.get("model", {})
    preset = demo_preset(world) if demo else run_preset(flags.get("model", {}).get("name", "tiny"))
    model, parallel, train = configs_from_args(args, *preset)
    if model.attention_backend == "sdpa" and "attention_backend" not in flags.get("model", {}):
        import torch

        if not torch.cuda.is_available():
            model = dataclasses.replace(model, attention_backend="torch")
    return model, parallel, train, demo


def _demo_paths(out: str):
    """(dataset prefix, tokenizer.json) that ensure_preprocessed(DEMO_CORPUS, out) writes."""
    from megaglot.data.preprocess import output_prefix_for

    return output_prefix_for(out, "text"), os.path.join(os.path.dirname(os.path.abspath(out)), "tokenizer.json")


def _prepare_demo(out: str, vocab_size: int):
    """(sha256 of .bin, .idx and tokenizer, error or None): preprocess into `out` unless already there."""
    import hashlib

    from megaglot.data.preprocess import ensure_preprocessed

    try:
        prefix, tok = ensure_preprocessed(DEMO_CORPUS, out, vocab_size=vocab_size, lang="ko")
        digests = []
        for path in (prefix + ".bin", prefix + ".idx", tok):
            with open(path, "rb") as f:
                digests.append(hashlib.sha256(f.read()).hexdigest())
        return digests, None
    except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
        return None, f"preparing the demo data from {DEMO_CORPUS} into {out}: {type(e).__name__}: {e}"


def prepare_demo_data(train, model, cache: str = DEMO_CACHE):
    """Preprocess the bundled corpus (with a tokenizer trained on it) for every node.

    Rank 0 prepares it first. Then the first rank of each other node (LOCAL_RANK 0) reuses the
    files when its filesystem shows them (`cache` shared) or writes its node's own copy (`cache`
    node-local), so one process at most writes on any filesystem. Preparation is deterministic, and
    each node's files are checked against rank 0's sha256, so every node trains on identical bytes.
    """
    import torch.distributed as dist

    from megaglot.config import ConfigError

    out = os.path.join(cache, f"v{model.vocab_size}", "ko_sample")
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    first = [_prepare_demo(out, model.vocab_size) if rank == 0 else None]
    dist.broadcast_object_list(first, src=0)  # also a barrier: rank 0's files are complete
    reference, error = first[0]
    if error is None and local_rank == 0 and rank != 0:
        digests, error = _prepare_demo(out, model.vocab_size)
        if error is None and digests != reference:
            error = (f"the demo data in {out} on the node of rank {rank} differs from rank 0's (sha256 of "
                     f".bin/.idx/tokenizer.json); delete {cache} on that node and rerun")
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)  # every node's copy is complete before any rank reads it
    error = next((e for e in errors if e), None)
    if error:
        raise ConfigError(error)
    prefix, tok = _demo_paths(out)
    train.data.data_path, train.data.tokenizer = [prefix], tok
    train.data.data_cache_dir = cache
    train.data.split = "90,10,0"


def fit_vocab_to_tokenizer(model, tokenizer, path: str, vocab_given: bool):
    """The model's vocabulary follows --tokenizer (a tokenizer trained with --vocab-size 4096 trains
    the tiny model) unless --vocab-size or a published Polyglot-Ko preset (30003) fixes it; a
    tokenizer larger than a fixed vocabulary is refused, naming both flags."""
    import dataclasses

    from megaglot.config import ConfigError

    if not vocab_given and not model.name.startswith("polyglot-ko"):
        return dataclasses.replace(model, vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > model.vocab_size:
        fixed = "--vocab-size" if vocab_given else f"--model {model.name}"
        raise ConfigError(f"--tokenizer {path} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{model.vocab_size} (fixed by {fixed}); pass --vocab-size {tokenizer.vocab_size} or a "
                          f"tokenizer of at most {model.vocab_size} tokens")
    return model


def start(args):
    """(model, parallel, train, tokenizer) of the run, the process group formed, the banner printed."""
    from megaglot.config import TrainConfig
    from megaglot.config.cli import given
    from megaglot.data.tokenizer import load_tokenizer
    from megaglot.training import init_distributed

    # The process group forms before the world size (and so the preset) is known: the flag or its default.
    flags = given(args)
    init_distributed(flags.get("train", {}).get("distributed_timeout_minutes", TrainConfig().distributed_timeout_minutes))
    import torch.distributed as dist

    world = dist.get_world_size()
    model, parallel, train, demo = build_configs(args, world)
    # Refuse a layout that does not fit before anything is printed or prepared (the banner then
    # states a DP size that exists), naming the flags to change.
    parallel.validate(model, world)
    if demo:
        prepare_demo_data(train, model)
    tokenizer = None
    if train.data.tokenizer:
        tokenizer = load_tokenizer(train.data.tokenizer)
        model = fit_vocab_to_tokenizer(model, tokenizer, train.data.tokenizer, "vocab_size" in flags.get("model", {}))
        parallel.validate(model, world)  # the vocabulary may have changed: TP must still divide its padding
    if dist.get_rank() == 0:
        print(f"megaglot: {model.name} ({model.num_parameters():,} parameters), TP={parallel.tensor_model_parallel_size} "
              f"PP={parallel.pipeline_model_parallel_size} DP={parallel.data_parallel_size_for(world)}, "
              f"{train.precision}, {train.train_iters} iterations of {train.global_batch_size} x {train.seq_length} tokens",
              flush=True)
    return model, parallel, train, tokenizer


# Exit codes: 0 trained to --train-iters, or stopped by SIGTERM after saving a checkpoint (a
# requeued job resumes with --load); 2 one `error:` line; 130 Ctrl-C; 143 SIGTERM without --save
# (stopped at a step boundary, nothing kept); 1 an unexpected exception (its traceback).
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED_UNSAVED = 2, 130, 143


def exit_interrupted(error: KeyboardInterrupt) -> None:
    """One line from rank 0, then exit 130 at once: the process group is not torn down, since
    peers that have already exited would make that wait."""
    from megaglot.training.signals import Interrupted

    line = str(error) if isinstance(error, Interrupted) else "interrupted outside the training loop (start-up or the end of the run)"
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_INTERRUPTED)


def main(argv=None) -> int:
    args = parse_args(argv)
    import traceback

    from megaglot.config import ConfigError
    from megaglot.parallel.launch import record_error
    from megaglot.training import pretrain, shutdown
    from megaglot.training.signals import watch_sigint

    sigint = watch_sigint()
    try:
        model, parallel, train, tokenizer = start(args)
        result = pretrain(model, parallel, train, tokenizer=tokenizer)
    except KeyboardInterrupt as e:
        exit_interrupted(e)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if sigint.seen:  # a peer's Ctrl-C exit broke this rank's collective
            exit_interrupted(KeyboardInterrupt())
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        record_error(f"error: {e}")  # torchrun's summary names this line as the root cause
        return EXIT_ERROR
    except Exception as e:
        if sigint.seen:
            exit_interrupted(KeyboardInterrupt())
        record_error(f"{type(e).__name__}: {e}", traceback.format_exc())
        raise
    finally:
        shutdown()
    return EXIT_TERMINATED_UNSAVED if result["stopped_by_signal"] and not train.checkpoint.save else 0


if __name__ == "__main__":
    sys.exit(main())
