#!/usr/bin/env python
"""KOBEST few-shot evaluation (accuracy, macro F1) and perplexity of a megaglot checkpoint.

    python tools/evaluate.py --load ckpt/run --data-dir kobest/ \\
        --tasks kobest_copa,kobest_hellaswag,kobest_boolq,kobest_sentineg,kobest_wic \\
        --num-fewshot 5 --batch-size 8 --seed 1234
    torchrun --nproc_per_node 4 tools/evaluate.py --load ckpt/run --data-dir kobest/ --tasks kobest_copa \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    python tools/evaluate.py --hf-dir polyglot-ko-1.3b --ppl-data data/ko_text_document --seq-length 2048

Task files in --data-dir: `<task>_test.jsonl` (or `<task>_validation.jsonl`, `<task>.jsonl`; also
.parquet / .arrow with pyarrow), few-shot examples from `<task>_train.jsonl` when present.
Ranks beyond TP x PP are data-parallel replicas that split the work. The tokenizer is the
checkpoint's own copy (found also after the checkpoint was moved), or --tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    from megaglot.config.cli import add_inference_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    add_inference_arguments(p, src)
    src.add_argument("--hf-dir", help="Hugging Face GPT-NeoX directory (config.json + weights)")
    p.add_argument("--tasks", default="", help="comma-separated: kobest_copa,kobest_hellaswag,kobest_boolq,"
                                               "kobest_sentineg,kobest_wic")
    p.add_argument("--data-dir", help="directory of the task files")
    p.add_argument("--split", default="test", help="which split's file to score (default test)")
    p.add_argument("--num-fewshot", type=int, default=0, help="examples in the prompt (default 0)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward microbatch (default 8)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot sampling (default 1234)")
    p.add_argument("--max-length", type=int, default=None,
                   help="longest input in tokens (default: the model's max_position_embeddings); longer "
                        "prompts lose their beginning")
    p.add_argument("--ppl-data", help="indexed dataset prefix (.bin/.idx) to report perplexity on")
    p.add_argument("--seq-length", type=int, default=None,
                   help="perplexity window (default: min(2048, max_position_embeddings))")
    p.add_argument("--ppl-max-tokens", type=int, default=None, help="stop perplexity after this many tokens")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars (progress goes to stderr on rank 0; results to stdout and --output)")
    args = p.parse_args(argv)
    if not args.tasks and not args.ppl_data:
        p.error("nothing to do: give --tasks (with --data-dir) and/or --ppl-data")
    if args.tasks and not args.data_dir:
        p.error("--tasks needs --data-dir (the directory of the task files)")
    for flag in ("batch_size", "tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if args.num_fewshot < 0:
        p.error("--num-fewshot must be >= 0")
    return args


def run(args) -> dict:
    import torch.distributed as dist

    from megaglot.eval.loading import init_parallel, load_inference_model, load_tokenizer_for
    from megaglot.eval.runner import evaluate_perplexity, evaluate_task, format_table
    from megaglot.eval.scoring import Scorer
    from megaglot.eval.tasks import load_task
    from megaglot.training import init_distributed

    # read and check every task file before the model is built: bad files fail fast
    loaded = [load_task(args.data_dir, name.strip(), args.split) for name in args.tasks.split(",") if name.strip()]
    device = init_distributed()
    init_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    model = load_inference_model(args.load, args.hf_dir, precision=args.precision,
                                 attention_backend=args.attention_backend, device=device, tokenizer=args.tokenizer)
    rank0 = dist.get_rank() == 0

    def say(msg):
        if rank0:
            print(msg, flush=True)

    say(f"loaded {model.source} ({model.cfg.num_layers} layers, hidden {model.cfg.hidden_size}) at "
        f"TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size}")
    scorer = Scorer(model.chunks, model.cfg, device=device, dtype=model.dtype, batch_size=args.batch_size,
                    max_length=args.max_length, show_progress=not args.quiet)
    out = {"source": model.source, "tasks": [], "perplexity": None}
    if loaded:
        tokenizer = load_tokenizer_for(model)
        if tokenizer.eod is None:
            from megaglot.eval.loading import EvalError

            raise EvalError(f"tokenizer {tokenizer.path} has no <|endoftext|> token")
        for task, docs, path, shots, shots_path in loaded:
            say(f"{task.name}: {len(docs)} documents from {path}" +
                (f", few-shot from {shots_path}" if shots_path and args.num_fewshot else ""))
            result = evaluate_task(scorer, tokenizer, task, docs, num_fewshot=args.num_fewshot, seed=args.seed,
                                   fewshot_docs=shots)
            out["tasks"].append(result)
        say(format_table(out["tasks"]))
    if args.ppl_data:
        from megaglot.data.indexed_dataset import IndexedDataset

        if not IndexedDataset.exists(args.ppl_data):
            from megaglot.eval.loading import EvalError

            raise EvalError(f"--ppl-data {args.ppl_data}: no {args.ppl_data}.bin/.idx")
        seq = args.seq_length or min(2048, model.cfg.max_position_embeddings)
        if seq > scorer.max_length:
            from megaglot.eval.loading import EvalError

            raise EvalError(f"--seq-length {seq} exceeds the model's context {scorer.max_length}")
        ppl = evaluate_perplexity(scorer, args.ppl_data, seq, args.ppl_max_tokens)
        out["perplexity"] = ppl
        say(f"perplexity of {args.ppl_data}: {ppl['ppl']:.4f} (mean NLL {ppl['nll']:.4f} over {ppl['tokens']} "
            f"tokens, windows of {seq})")
    if args.output and rank0:
        slim = dict(out, tasks=[{k: v for k, v in r.items() if k not in ("loglikelihoods",)} for r in out["tasks"]])
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(slim, f, ensure_ascii=False, indent=1)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaglot.checkpoint.format import CheckpointError
    from megaglot.config import ConfigError
    from megaglot.data.indexed_dataset import IndexedDatasetError
    from megaglot.data.tokenizer import TokenizerError
    from megaglot.eval.loading import EvalError
    from megaglot.eval.tasks import TaskFileError
    from megaglot.training import shutdown

    try:
        run(args)
    except (EvalError, TaskFileError, CheckpointError, ConfigError, TokenizerError, IndexedDatasetError,
            ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
