#!/usr/bin/env python
"""Hugging Face GPT-NeoX (Polyglot-Ko) <-> megaglot checkpoint: the command-line face of
megaglot.checkpoint.convert. Runs on CPU, no torch.distributed, one tensor at a time.

    python tools/convert_hf.py import --hf-dir polyglot-ko-1.3b --save ckpt/ko-1.3b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 [--num-layers-per-virtual-pipeline-stage K]
    python tools/convert_hf.py export --load ckpt/ko-1.3b --hf-dir out/ko-1.3b-hf --tokenizer polyglot-ko-1.3b

export writes a complete Hugging Face tokenizer (tokenizer.json, tokenizer_config.json,
special_tokens_map.json; pad/bos/eos are the tokenizer's own tokens, named by id in config.json),
so `AutoTokenizer.from_pretrained(out)` pads batches for `AutoModelForCausalLM`. Without
--tokenizer it uses the checkpoint's own copy, wherever the checkpoint was moved.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaglot.checkpoint.convert import DEFAULT_MAX_SHARD_BYTES, export_hf, import_hf  # noqa: E402
from megaglot.checkpoint.format import CheckpointError  # noqa: E402
from megaglot.config import CheckpointConfig, ConfigError, DataConfig  # noqa: E402
from megaglot.config.cli import add_field_argument, add_layout_arguments  # noqa: E402
from megaglot.progress import write  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quiet", action="store_true",
                   help="print nothing but errors (no progress bar on stderr, no summary lines on stdout)")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> megaglot checkpoint (iteration 0)")
    imp.add_argument("--hf-dir", required=True,
                     help="GPT-NeoX directory: config.json + model.safetensors / pytorch_model.bin (or sharded, "
                          "with their index file)")
    add_field_argument(imp, CheckpointConfig, "save", default=None, required=True,
                       help="new megaglot checkpoint root (gets iter_0000000 and latest)")
    add_layout_arguments(imp, virtual=True)  # the layout the checkpoint is written at
    imp.add_argument("--vocab-size", type=int, default=None,
                     help="the tokenizer's vocabulary when config.json gives the padded one (Polyglot-Ko's say "
                          "30080; pass 30003 to match --model polyglot-ko-*); stored rows are kept")
    exp = sub.add_parser("export", help="megaglot checkpoint (any layout) -> Hugging Face directory")
    add_field_argument(exp, CheckpointConfig, "load", default=None, required=True,
                       help="checkpoint root (follows 'latest') or an iteration directory")
    exp.add_argument("--hf-dir", required=True, help="output directory (new or empty)")
    add_field_argument(exp, DataConfig, "tokenizer", default=None,
                       help="tokenizer.json, or a directory whose tokenizer files to copy (default: the one the "
                           "checkpoint records, its own copy)")
    exp.add_argument("--max-shard-size-mb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2 ** 20,
                     help="largest safetensors file; more files get model.safetensors.index.json (default 2048)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(msg):
        if not args.quiet:
            write(msg)  # stdout, without tearing the progress bar on stderr

    start = time.time()
    try:
        if args.command == "import":
            out = import_hf(args.hf_dir, args.save, args.tensor_model_parallel_size,
                            args.pipeline_model_parallel_size, args.num_layers_per_virtual_pipeline_stage,
                            vocab_size=args.vocab_size, log=log, quiet=args.quiet)
        else:
            out = export_hf(args.load, args.hf_dir, args.tokenizer,
                            max_shard_bytes=int(args.max_shard_size_mb * 2 ** 20), log=log, quiet=args.quiet)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log(f"{args.command}: wrote {out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
