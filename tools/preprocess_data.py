#!/usr/bin/env python
"""JSONL / text -> Megatron `.bin/.idx` with Korean PII masking: the command-line face of
megaglot.data.preprocess.

    python tools/preprocess_data.py --input 'corpus/*.jsonl.gz' --output-prefix data/ko \\
        --tokenizer polyglot-ko/tokenizer.json --append-eod --workers 8 --lang ko
"""

from __future__ import annotations

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaglot.config import DataConfig  # noqa: E402
from megaglot.config.cli import add_field_argument  # noqa: E402
from megaglot.data.indexed_dataset import IndexedDatasetError  # noqa: E402
from megaglot.data.preprocess import PreprocessConfig, PreprocessError, preprocess  # noqa: E402
from megaglot.data.tokenizer import TokenizerError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="JSONL or text files or globs (.gz allowed); text: one document per line or "
                        "blank-line separated (see --text-split)")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize (default: text)")
    p.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_{key}_document.bin/.idx and a .json sidecar")
    tok = p.add_mutually_exclusive_group()
    add_field_argument(tok, DataConfig, "tokenizer", default=None, help="Hugging Face tokenizer.json (or its directory)")
    tok.add_argument("--train-tokenizer", action="store_true",
                     help="train a byte-level BPE on the input, saved beside the output as tokenizer.json (an existing "
                          "identical one is reused; a different one is never overwritten)")
    p.add_argument("--vocab-size", type=int,
                   help="vocabulary size for --train-tokenizer (a small corpus learns fewer tokens; the log says so)")
    p.add_argument("--append-eod", action="store_true", help="append <|endoftext|> to every document")
    p.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    p.add_argument("--lang", help="language tag recorded in the sidecar (e.g. ko, en, ja)")
    p.add_argument("--no-mask-pii", dest="mask_pii", action="store_false",
                   help="keep phone, registration and account numbers (masking is on by default)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first malformed/undecodable line or missing key instead of skipping it")
    p.add_argument("--text-split", choices=("auto", "line", "blank"), default="auto",
                   help="plain text documents: one per line, blank-line separated, or auto-detect")
    p.add_argument("--batch-size", type=int, default=128, help="documents per encode batch")
    p.add_argument("--log-interval", type=float, default=10.0,
                   help="seconds between progress lines on stderr when it is not a terminal (a terminal gets a "
                        "live bar: input MB read, MB/s, documents, time left)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (no progress, no summary)")
    args = p.parse_args(argv)
    if args.vocab_size is not None and not args.train_tokenizer:
        p.error("--vocab-size only applies with --train-tokenizer")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = PreprocessConfig(input=args.input, output_prefix=args.output_prefix, json_keys=args.json_keys,
                           tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
                           vocab_size=args.vocab_size, append_eod=args.append_eod, workers=args.workers,
                           lang=args.lang, mask_pii=args.mask_pii, strict=args.strict,
                           text_split=args.text_split, batch_size=args.batch_size, log_interval=args.log_interval,
                           quiet=args.quiet)
    try:
        preprocess(cfg, log=io.StringIO() if args.quiet else sys.stderr)
    except (PreprocessError, TokenizerError, IndexedDatasetError, OSError) as error:  # OSError: disk full, rights
        print(f"preprocess_data.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preprocess_data.py: interrupted; no output was renamed into place", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
