"""Pretrain a Polyglot-Ko-style GPT-NeoX with tensor, pipeline and data parallelism.

    torchrun --nproc_per_node 4 examples/pretrain_ko.py          # the embedded CPU demo
    torchrun --nnodes 2 --nproc_per_node 8 examples/pretrain_ko.py --model polyglot-ko-1.3b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --bf16 --data-path ...

With no arguments: a tiny model over the bundled Korean sample (preprocessed on first use with a
freshly trained tokenizer), TP=2 x PP=2 on 4 processes (another fitting layout otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CORPUS = os.path.join(ROOT, "examples", "data", "ko_sample.jsonl")
DEMO_CACHE = os.path.join(ROOT, "examples", "data", "cache")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="preset: polyglot-ko-1.3b|3.8b|5.8b|12.8b|tiny (default: tiny)")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--make-vocab-size-divisible-by", type=int)
    g.add_argument("--attention-backend", choices=("sdpa", "fused", "torch"))
    g.add_argument("--hidden-dropout", type=float)
    g.add_argument("--attention-dropout", type=float)
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int)
    g.add_argument("--pipeline-model-parallel-size", type=int)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--no-overlap-grad-reduce", action="store_true")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="how long a collective waits for its peers (default 10; raise it when --load of a large "
                        "checkpoint or building data indices on rank 0 takes longer)")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=4)
    g.add_argument("--log-interval", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-granularity", choices=("full", "selective"))
    prec = g.add_mutually_exclusive_group()
    prec.add_argument("--bf16", action="store_true")
    prec.add_argument("--fp16", action="store_true")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 16)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=None)
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--lr-decay-iters", type=int)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="prefixes of .bin/.idx, optionally weighted: 0.7 ko 0.3 en")
    g.add_argument("--data-balance", help="temperature:ALPHA (1 natural, 0 uniform)")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer", help="tokenizer.json the data was prepared with")
    g.add_argument("--data-cache-dir")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save")
    g.add_argument("--save-interval", type=int, default=0)
    g.add_argument("--load")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--tensorboard-dir")
    g.add_argument("--generate-prompt")
    return p.parse_args(argv)


def default_layout(world: int):
    """TP=2 x PP=2 on 4 processes; otherwise the largest of TP x PP in {4, 2, 1} that divides the world."""
    for tp, pp in ((2, 2), (2, 1), (1, 1)):
        if world % (tp * pp) == 0:
            return tp, pp
    return 1, 1


def build_configs(args, world: int):
    import dataclasses

    from megaglot.config import ParallelConfig, TrainConfig, get_model_preset

    demo = args.data_path is None and args.model is None
    model = get_model_preset(args.model or "tiny")
    overrides = {k: getattr(args, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                                                "max_position_embeddings", "make_vocab_size_divisible_by",
                                                "attention_backend", "hidden_dropout", "attention_dropout")
                 if getattr(args, k) is not None}
    if "hidden_size" in overrides and "ffn_hidden_size" not in overrides:
        overrides["ffn_hidden_size"] = 4 * overrides["hidden_size"]
    if model.attention_backend == "sdpa" and "attention_backend" not in overrides:
        import torch

        overrides["attention_backend"] = "sdpa" if torch.cuda.is_available() else "torch"
    model = dataclasses.replace(model, **overrides)
    tp, pp = default_layout(world) if demo else (1, 1)
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size or tp,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size or pp,
        num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
        sequence_parallel=args.sequence_parallel)
    seq = args.seq_length or (128 if demo or model.name.startswith("tiny") else 2048)
    train_iters = args.train_iters or 100
    train = TrainConfig(
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size, seq_length=seq,
        train_iters=train_iters, eval_interval=args.eval_interval or (20 if demo else 100),
        eval_iters=args.eval_iters, log_interval=args.log_interval or (10 if demo else 1), seed=args.seed,
        lr=args.lr or (1e-3 if demo else 3e-4), min_lr=args.min_lr if args.min_lr is not None else (1e-4 if demo else 3e-5),
        lr_warmup_iters=args.lr_warmup_iters if args.lr_warmup_iters is not None else (10 if demo else 0),
        lr_decay_style=args.lr_decay_style, lr_decay_iters=args.lr_decay_iters, weight_decay=args.weight_decay,
        clip_grad=args.clip_grad, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        precision="bf16" if args.bf16 else ("fp16" if args.fp16 else "fp32"),
        initial_loss_scale=args.initial_loss_scale, use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=not args.no_overlap_grad_reduce, recompute_granularity=args.recompute_granularity,
        data_path=args.data_path, data_balance=args.data_balance, split=args.split, tokenizer=args.tokenizer,
        data_cache_dir=args.data_cache_dir, save=args.save or (os.path.join(ROOT, "checkpoints", "demo") if demo else None),
        save_interval=args.save_interval, load=args.load, no_load_optim=args.no_load_optim,
        tensorboard_dir=args.tensorboard_dir or (os.path.join(ROOT, "runs", "demo") if demo else None),
        generate_prompt=args.generate_prompt or ("대한민국의 수도는" if demo else None),
        distributed_timeout_minutes=args.distributed_timeout_minutes)
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
    train.data_path, train.tokenizer = [prefix], tok
    train.data_cache_dir = cache
    train.split = "90,10,0"


def check_layout(model, parallel, world_size: int) -> None:
    """Refuse a layout that does not fit the world before anything is printed or prepared (the banner
    then states a DP size that exists), naming the flags to change."""
    from megaglot.config import ConfigError

    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if tp > 0 and pp > 0 and world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by TP x PP = {tp} x {pp} = {tp * pp} "
                          f"(--tensor-model-parallel-size {tp}, --pipeline-model-parallel-size {pp}); start a "
                          f"multiple of {tp * pp} processes (torchrun --nproc_per_node x --nnodes) or choose "
                          f"sizes whose product divides {world_size}")
    parallel.validate(model, world_size)  # sets data_parallel_size


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaglot.config import ConfigError
    from megaglot.data.tokenizer import load_tokenizer
    from megaglot.training import init_distributed, pretrain, shutdown

    try:
        init_distributed(args.distributed_timeout_minutes)
        import torch.distributed as dist

        model, parallel, train, demo = build_configs(args, dist.get_world_size())
        check_layout(model, parallel, dist.get_world_size())
        if demo:
            prepare_demo_data(train, model)
        tokenizer = None
        if train.tokenizer:
            tokenizer = load_tokenizer(train.tokenizer)
            if tokenizer.vocab_size > model.vocab_size:
                raise ConfigError(f"--tokenizer {train.tokenizer} has {tokenizer.vocab_size} tokens but the model's "
                                  f"vocabulary is {model.vocab_size}")
        if dist.get_rank() == 0:
            print(f"megaglot: {model.name} ({model.num_parameters():,} parameters), TP={parallel.tensor_model_parallel_size} "
                  f"PP={parallel.pipeline_model_parallel_size} DP={parallel.data_parallel_size}, "
                  f"{train.precision}, {train.train_iters} iterations of {train.global_batch_size} x {train.seq_length} tokens",
                  flush=True)
        pretrain(model, parallel, train, tokenizer=tokenizer)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
