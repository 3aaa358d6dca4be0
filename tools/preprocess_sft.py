#!/usr/bin/env python
"""Instruction data (KoAlpaca or chat JSONL) -> tokens and a loss mask as Megatron `.bin/.idx` files,
with Korean PII masking: the command-line face of megaglot.data.sft.

    python tools/preprocess_sft.py --input examples/data/ko_instruct.jsonl --output-prefix data/ko_sft \\
        --tokenizer data/tokenizer.json --template koalpaca --workers 4

writes data/ko_sft_text_document.bin/.idx/.json and data/ko_sft_loss_mask_document.bin/.idx.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaglot.config.cli import add_field_argument  # noqa: E402
from megaglot.data.indexed_dataset import IndexedDatasetError  # noqa: E402
from megaglot.data.input_reader import PreprocessError  # noqa: E402
from megaglot.data.sft import SFTConfig, preprocess_sft  # noqa: E402
from megaglot.data.tokenizer import TokenizerError  # noqa: E402

REQUIRED = ("input", "output_prefix")


def parse_args(argv=None) -> argparse.Namespace:
    """Every SFTConfig field is a flag (its doc string is the help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(SFTConfig):
        if f.name in REQUIRED:
            add_field_argument(p, SFTConfig, f.name, required=True, shown_default="required")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            add_field_argument(p, SFTConfig, f.name, default=default)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = SFTConfig(**vars(args))
    try:
        preprocess_sft(cfg, log=io.StringIO() if cfg.quiet else sys.stderr)
    except (PreprocessError, TokenizerError, IndexedDatasetError) as error:
        print(f"preprocess_sft.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preprocess_sft.py: interrupted; no output was renamed into place", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
