#!/usr/bin/env python
"""Measured bubble fraction of 1F1B and interleaved 1F1B against the theory (p-1)/(v*m).

CPU gloo, p ranks, stages of fixed synthetic cost (`megaglot.pipeline.synthetic`: each stage
sleeps --forward-ms per microbatch in forward, twice that in backward, split evenly over its v
chunks). Bubble = (span - busy) / busy per rank, averaged over ranks (see
`megaglot.pipeline.timeline`). Target: within 10% of theory at m >= 4p.

The theory leaves out the cost of each exchange. What the measurement holds beyond it is printed
as "excess/op": (measured - theory) x busy time / (forwards + backwards per rank). On the 2-core
VM it is about 0.4 ms per op (posting and waiting on gloo messages right after an idle sleep;
the same calls take 0.04 ms after a 2 ms sleep), a fixed cost that grows with m while the theory's
idle time does not. The default 200 ms stages keep it under 10% of theory up to m = 32 at v = 2;
at 100 ms the v = 2, m = 32 run measures about 1.12x theory.

    python benchmarks/bench_pipeline.py [--pipeline 4] [--virtual 1 2] [--microbatches 4 8 16 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaglot.pipeline.synthetic import measure  # noqa: E402
from megaglot.pipeline.timeline import bubble_fraction, theoretical_bubble_fraction  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", "-p", type=int, default=4)
    parser.add_argument("--virtual", "-v", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--microbatches", "-m", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--forward-ms", type=float, default=200.0)
    args = parser.parse_args(argv)
    p = args.pipeline
    runs = [(v, m) for v in args.virtual for m in args.microbatches if v == 1 or (m % p == 0 and m >= p)]
    start = time.perf_counter()
    timelines = measure(p, runs, args.forward_ms / 1000.0)
    rows = []
    print(f"p = {p}, forward {args.forward_ms:g} ms / backward {2 * args.forward_ms:g} ms per stage and microbatch, "
          f"CPU gloo ({time.perf_counter() - start:.0f} s incl. spawn)")
    print(f"{'schedule':<18} {'v':>2} {'m':>4} {'theory':>8} {'measured':>9} {'ratio':>6} {'excess/op':>10} "
          f"{'m>=4p':>6} {'within 10%':>10}")
    for (v, m), events in zip(runs, timelines):
        theory = theoretical_bubble_fraction(p, m, v)
        measured = bubble_fraction(events)
        ratio = measured / theory
        busy = sum(e[4] - e[3] for ev in events.values() for e in ev) / len(events)
        excess_ms = (measured - theory) * busy / (2 * m * v) * 1000.0
        name = "1F1B" if v == 1 else "interleaved 1F1B"
        ok = abs(ratio - 1) <= 0.10
        rows.append((name, v, m, theory, measured, ratio, m >= 4 * p, ok))
        print(f"{name:<18} {v:>2} {m:>4} {theory:>8.3f} {measured:>9.3f} {ratio:>6.2f} {excess_ms:>7.2f} ms "
              f"{'yes' if m >= 4 * p else 'no':>6} {'yes' if ok else 'NO':>10}")
    return rows


if __name__ == "__main__":
    main()
