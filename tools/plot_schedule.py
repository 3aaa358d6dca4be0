#!/usr/bin/env python
"""Draw a pipeline schedule's timeline as a PNG and print its bubble fraction beside the theory.

Either read a recorded timeline (JSON written by `megaglot.pipeline.timeline.save_json`):

    python tools/plot_schedule.py --timeline run.json --out schedule.png

or run a schedule of fixed synthetic cost on CPU gloo and draw that (and optionally save it):

    python tools/plot_schedule.py --pipeline 4 --virtual 2 --microbatches 8 --out schedule.png \\
        [--forward-ms 20] [--save-json run.json]

One row per pipeline rank, time left to right. Forwards are blue, backwards orange (a lighter
shade for each further model chunk), idle time is light grey; microbatch numbers are written
inside the boxes wide enough to hold them. The PNG is written by a small encoder (zlib + struct),
so the tool needs nothing beyond the standard library and megaglot.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megaglot.pipeline.timeline import (bubble_fraction, load_json, save_json,  # noqa: E402
                                        theoretical_bubble_fraction)

# 3x5 bitmap glyphs (rows top to bottom, 3 bits each, MSB = left).
_FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), "F": (7, 4, 6, 4, 4), "B": (6, 5, 6, 5, 6),
    "R": (6, 5, 6, 5, 5), "I": (7, 2, 2, 2, 7), "D": (6, 5, 5, 5, 6), "L": (4, 4, 4, 4, 7),
    "E": (7, 4, 6, 4, 7), " ": (0, 0, 0, 0, 0), "=": (0, 7, 0, 7, 0), ".": (0, 0, 0, 0, 2),
    "%": (5, 1, 2, 4, 5), "P": (6, 5, 6, 4, 4), "V": (5, 5, 5, 5, 2), "M": (5, 7, 7, 5, 5),
}
_SCALE = 2
_GLYPH_W = 4 * _SCALE  # 3 columns + 1 spacing

FORWARD = [(52, 101, 164), (114, 159, 207), (170, 200, 235), (200, 220, 245)]
BACKWARD = [(206, 92, 0), (245, 140, 50), (252, 185, 120), (253, 210, 170)]
IDLE = (225, 225, 225)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


class Canvas:
    def __init__(self, width: int, height: int, color=BACKGROUND):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(color) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        x0, x1 = max(0, x0), min(self.width, x1)
        y0, y1 = max(0, y0), min(self.height, y1)
        if x1 <= x0:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            start = (y * self.width + x0) * 3
            self.pixels[start:start + len(row)] = row

    def text(self, x: int, y: int, s: str, color=TEXT) -> None:
        for i, ch in enumerate(s.upper()):
            glyph = _FONT.get(ch, _FONT[" "])
            for gy, bits in enumerate(glyph):
                for gx in range(3):
                    if bits & (4 >> gx):
                        px, py = x + i * _GLYPH_W + gx * _SCALE, y + gy * _SCALE
                        self.rect(px, py, px + _SCALE, py + _SCALE, color)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[y * self.width * 3:(y + 1) * self.width * 3])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                + chunk(b"IEND", b""))


def render(events_by_rank, width: int = 1400, row_height: int = 30) -> bytes:
    """PNG bytes: one row per rank; F blue, B orange (lighter per chunk), idle grey."""
    ranks = sorted(events_by_rank)
    starts = [e[3] for r in ranks for e in events_by_rank[r]]
    ends = [e[4] for r in ranks for e in events_by_rank[r]]
    t0, t1 = min(starts), max(ends)
    margin, gap, legend = 40, 6, 24
    plot_w = width - margin - 10
    height = legend + len(ranks) * (row_height + gap) + gap
    canvas = Canvas(width, height)
    # Legend: F and B swatches per chunk.
    chunks = sorted({e[2] for r in ranks for e in events_by_rank[r]})
    x = margin
    for op, palette in (("F", FORWARD), ("B", BACKWARD)):
        canvas.text(x, 6, op)
        x += _GLYPH_W + 4
        for c in chunks:
            canvas.rect(x, 4, x + 14, 18, palette[min(c, len(palette) - 1)])
            x += 18
        x += 20
    canvas.text(x, 6, "IDLE")
    canvas.rect(x + 5 * _GLYPH_W, 4, x + 5 * _GLYPH_W + 14, 18, IDLE)

    scale = plot_w / (t1 - t0) if t1 > t0 else 1.0
    for row, rank in enumerate(ranks):
        y0 = legend + gap + row * (row_height + gap)
        canvas.text(4, y0 + row_height // 2 - 5, f"R{rank}")
        canvas.rect(margin, y0, margin + plot_w, y0 + row_height, IDLE)
        for op, mb, chunk, start, end in events_by_rank[rank]:
            palette = FORWARD if op == "F" else BACKWARD
            color = palette[min(chunk, len(palette) - 1)]
            x0 = margin + int(round((start - t0) * scale))
            x1 = max(x0 + 1, margin + int(round((end - t0) * scale)))
            canvas.rect(x0, y0, x1, y0 + row_height, color)
            canvas.rect(x1 - 1, y0, x1, y0 + row_height, BACKGROUND) if x1 - x0 > 3 else None
            label = str(mb)
            if x1 - x0 >= len(label) * _GLYPH_W + 4:
                canvas.text(x0 + (x1 - x0 - len(label) * _GLYPH_W) // 2 + 1, y0 + row_height // 2 - 5, label)
    return canvas.png()


def summarize(events_by_rank, pipeline: int, virtual, microbatches: int) -> str:
    measured = bubble_fraction(events_by_rank)
    theory = theoretical_bubble_fraction(pipeline, microbatches, virtual)
    name = "1F1B" if (virtual or 1) == 1 else f"interleaved 1F1B (v={virtual})"
    if pipeline == 1:
        name = "no pipelining"
    return (f"{name}: p={pipeline} m={microbatches}  measured bubble {measured:.3f}  "
            f"theory (p-1)/(v*m) = {theory:.3f}  ratio {measured / theory if theory else float('nan'):.2f}")


def _infer_shape(events_by_rank):
    p = len(events_by_rank)
    v = 1 + max(e[2] for ev in events_by_rank.values() for e in ev)
    m = 1 + max(e[1] for ev in events_by_rank.values() for e in ev)
    return p, v, m


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeline", help="recorded timeline JSON; omit to run a synthetic schedule")
    parser.add_argument("--pipeline", "-p", type=int, default=4, help="stages of the synthetic run")
    parser.add_argument("--virtual", "-v", type=int, default=1, help="virtual chunks per stage (1 = plain 1F1B)")
    parser.add_argument("--microbatches", "-m", type=int, default=8)
    parser.add_argument("--forward-ms", type=float, default=20.0, help="forward cost of one stage per microbatch")
    parser.add_argument("--save-json", help="also write the synthetic run's timeline here")
    parser.add_argument("--out", default="schedule.png", help="PNG to write")
    args = parser.parse_args(argv)

    if args.timeline:
        events, meta = load_json(args.timeline)
        p, v, m = _infer_shape(events)
        p, v, m = meta.get("pipeline", p), meta.get("virtual", v), meta.get("microbatches", m)
    else:
        from megaglot.pipeline.synthetic import measure

        p, v, m = args.pipeline, args.virtual, args.microbatches
        events = measure(p, [(v, m)], args.forward_ms / 1000.0)[0]
        if args.save_json:
            save_json(args.save_json, events, pipeline=p, virtual=v, microbatches=m)
    with open(args.out, "wb") as f:
        f.write(render(events))
    summary = summarize(events, p, v, m)
    print(summary)
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
