#!/usr/bin/env python
"""Text generation from a megaglot checkpoint (or a Hugging Face GPT-NeoX directory) with a KV cache.

    python tools/generate.py --load ckpt/run --prompt "한국어 모델은" --max-new-tokens 64 --greedy
    python tools/generate.py --load ckpt/run --prompt "옛날 옛적에" --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1
    torchrun --nproc_per_node 2 tools/generate.py --load ckpt/run --tensor-model-parallel-size 2 --prompt "..."
    python tools/generate.py --load ckpt/run          # interactive: one prompt per line, empty line or EOF quits
    python tools/generate.py --load ckpt/sft --template koalpaca --greedy --prompt "한국의 수도는 어디인가요?"

Stops at <|endoftext|> (the tokenizer's id; 2 for Polyglot-Ko) or after --max-new-tokens. The
tokenizer is the checkpoint's own copy (found also after the checkpoint was moved), the path an
older checkpoint records, or --tokenizer. Tensor parallel only: the checkpoint
loads at any layout, generation runs with --pipeline-model-parallel-size 1.
Without --prompt and with stdin not a terminal, the whole of stdin is the prompt.
With --template (an instruction-tuned model), each prompt is a question: it is wrapped in the
template's prompt exactly as tools/preprocess_sft.py rendered the training samples, and only the
answer is printed.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    from megaglot.config.cli import add_inference_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    add_inference_arguments(p, src)
    src.add_argument("--hf-dir", help="Hugging Face GPT-NeoX directory")
    p.add_argument("--prompt", help="text to continue (default: interactive, or stdin when it is not a terminal)")
    p.add_argument("--template", help="treat each prompt as a question for an instruction-tuned model: wrap it in "
                                      "this template's prompt (koalpaca, chat, or a template file, as for "
                                      "tools/preprocess_sft.py) and print only the answer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (1: all)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (tokens generated, on stderr, rank 0); the text still goes to stdout")
    return p.parse_args(argv)


def check_args(args) -> None:
    from megaglot.eval.loading import EvalError

    if args.pipeline_model_parallel_size != 1:
        raise EvalError(f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}: generation runs "
                        f"with --pipeline-model-parallel-size 1 (tensor parallel only; the checkpoint loads at "
                        f"any layout)")
    if args.tensor_model_parallel_size < 1:
        raise EvalError("--tensor-model-parallel-size must be positive")
    if args.max_new_tokens < 0:
        raise EvalError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not 0.0 < args.top_p <= 1.0:
        raise EvalError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise EvalError(f"--top-k must be >= 0, got {args.top_k}")
    if args.temperature < 0:
        raise EvalError(f"--temperature must be >= 0, got {args.temperature}")


def _prompts(args, rank0: bool):
    """Yields prompts; every rank gets the same ones (rank 0 reads, then broadcasts)."""
    import torch.distributed as dist

    if args.prompt is not None:
        yield args.prompt
        return
    interactive = sys.stdin.isatty()
    if not interactive:
        box = [sys.stdin.read() if rank0 else None]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if box[0] and box[0].strip():
            yield box[0].rstrip("\n")
        return
    while True:
        box = [None]
        if rank0:
            try:
                box[0] = input("prompt> ")
            except EOFError:
                box[0] = ""
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if not box[0]:
            return
        yield box[0]


def run(args) -> list:
    import torch.distributed as dist

    from megaglot.eval.generation import generate
    from megaglot.data.text import decode_new_tokens
    from megaglot.progress import progress
    from megaglot.eval.loading import EvalError, init_parallel, load_inference_model, load_tokenizer_for
    from megaglot.training import init_distributed

    check_args(args)
    template = None
    if args.template is not None:
        from megaglot.data.sft_templates import load_template

        template = load_template(args.template)  # a bad name or file: one line, before any loading
    device = init_distributed()
    init_parallel(args.tensor_model_parallel_size, 1)
    model = load_inference_model(args.load, args.hf_dir, precision=args.precision,
                                 attention_backend=args.attention_backend, device=device, tokenizer=args.tokenizer)
    tokenizer = load_tokenizer_for(model)
    rank0 = dist.get_rank() == 0
    outputs = []
    for text in _prompts(args, rank0):
        ids = tokenizer.encode(text if template is None else template.render_prompt(text))
        if not ids:
            if tokenizer.eod is None:
                raise EvalError("an empty prompt and the tokenizer has no <|endoftext|> to start from")
            ids = [tokenizer.eod]
        if len(ids) >= model.cfg.max_position_embeddings:
            raise EvalError(f"the prompt has {len(ids)} tokens; the model holds {model.cfg.max_position_embeddings}")
        with progress(min(args.max_new_tokens, model.cfg.max_position_embeddings - len(ids)), "generating",
                      unit="tok", quiet=args.quiet) as bar:
            (new,) = generate(model.chunks, model.cfg, [ids], args.max_new_tokens, greedy=args.greedy,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eod=tokenizer.eod,
                              seed=args.seed, use_cache=not args.no_kv_cache, device=device, bar=bar)
        if new and tokenizer.eod is not None and new[-1] == tokenizer.eod:
            new = new[:-1]
        completion = decode_new_tokens(tokenizer, new)  # whole sequence: no U+FFFD for split characters
        if template is not None:
            completion = completion.strip()  # the answer alone (the template puts a space before it)
        outputs.append(completion)
        if rank0:
            print(completion if template is not None else text + completion, flush=True)
    return outputs


def main(argv=None) -> int:
    args = parse_args(argv)
    from megaglot.checkpoint.format import CheckpointError
    from megaglot.config import ConfigError
    from megaglot.data.tokenizer import TokenizerError
    from megaglot.eval.loading import EvalError
    from megaglot.training import shutdown

    try:
        run(args)
    except KeyboardInterrupt:
        return 130
    except (EvalError, CheckpointError, ConfigError, TokenizerError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
