#!/usr/bin/env python
"""Write a megaglot checkpoint at another TP/PP/VP (and DP, for distributed-optimizer shards)
layout: the command-line face of megaglot.checkpoint.reshard. Offline, CPU, no torch.distributed,
one tensor at a time. Model, fp32 master weights, Adam moments, iteration, consumed samples,
scheduler, loss scale and the copied tokenizer carry over; RNG states only when the layout is
unchanged. Every source file is checked against its recorded checksum as it is read, every
written file gets one; --verify rereads both checkpoints (checksums, then tensors bit for bit).

    python tools/reshard_checkpoint.py --load ckpt/run --save ckpt/run-tp1pp4 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 4 [--verify]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaglot.checkpoint.format import CheckpointError  # noqa: E402
from megaglot.checkpoint.reshard import reshard  # noqa: E402
from megaglot.config import CheckpointConfig, ConfigError  # noqa: E402
from megaglot.config.cli import add_field_argument, add_layout_arguments  # noqa: E402
from megaglot.progress import write  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_field_argument(p, CheckpointConfig, "load", default=None, required=True,
                       help="source checkpoint root (follows 'latest') or an iteration directory")
    add_field_argument(p, CheckpointConfig, "save", default=None, required=True,
                       help="new checkpoint root (must not exist or be empty; gets iter_N and latest)")
    add_layout_arguments(p, virtual=True, target=True)  # --target-*: the training flags' docs and checks
    p.add_argument("--target-data-parallel-size", type=int, default=None,
                   help="DP parts of the distributed optimizer's state (default: the source's DP size); "
                        "the plain optimizer's state is written once whatever this is")
    p.add_argument("--verify", action="store_true",
                   help="reread source and target: every part file against its recorded checksum, then every "
                        "full tensor bit for bit")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing but errors (no progress bar on stderr, no summary lines on stdout)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def log(msg):
        if not args.quiet:
            write(msg)  # stdout, without tearing the progress bar on stderr

    try:
        reshard(args.load, args.save, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                args.num_layers_per_virtual_pipeline_stage, dp=args.target_data_parallel_size,
                verify=args.verify, log=log, quiet=args.quiet)
    except (ConfigError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
