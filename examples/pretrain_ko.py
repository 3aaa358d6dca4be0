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
        generate_prompt=args.generate_prompt or ("대한민국의 수도는" if demo else None))
    return model, parallel, train, demo


def prepare_demo_data(train, model):
    """Preprocess the bundled corpus once (rank 0), with a tokenizer trained on it."""
    import torch.distributed as dist

    from megaglot.data.preprocess import ensure_preprocessed

    prefix = tok = None
    if dist.get_rank() == 0:
        prefix, tok = ensure_preprocessed(DEMO_CORPUS, os.path.join(DEMO_CACHE, f"v{model.vocab_size}", "ko_sample"),
                                          vocab_size=model.vocab_size, lang="ko")
    shared = [prefix, tok]
    dist.broadcast_object_list(shared, src=0)
    train.data_path, train.tokenizer = [shared[0]], shared[1]
    train.data_cache_dir = DEMO_CACHE
    train.split = "90,10,0"


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaglot.config import ConfigError
    from megaglot.data.tokenizer import load_tokenizer
    from megaglot.training import init_distributed, pretrain, shutdown

    try:
        init_distributed()
        import torch.distributed as dist

        model, parallel, train, demo = build_configs(args, dist.get_world_size())
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
                  f"PP={parallel.pipeline_model_parallel_size} DP={dist.get_world_size() // (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size)}, "
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
