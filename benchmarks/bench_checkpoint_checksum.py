#!/usr/bin/env python
"""What self-checking checkpoints cost: per-part CRC-32 on write and on load, on a checkpoint of
polyglot-ko-1.3b's shapes (1.33 B parameters, bf16: 2.66 GB in --parts part files, one per
pipeline-stage-like half of the layers).

    python benchmarks/bench_checkpoint_checksum.py [--dir DIR] [--parts 2]

Measured, per part file and summed (markdown table on stdout):
- checksum alone: zlib.crc32 vs hashlib sha256 / blake2b over 16 MiB chunks (why CRC-32);
- write: `format.PieceWriter.write` as it was (save_file, then the index written and fsynced,
  which on ext4 may flush the part) vs now (the part streamed, its CRC taken as it is written,
  the index with the checksum), and
  the offline writers: `streaming.StreamingSafetensors` alone vs `streaming.StreamingPart`
  (checksum taken as it streams, plus the index);
- verify: the whole file against its checksum, from the page cache (warm) and after the file's
  pages were dropped (cold, posix_fadvise DONTNEED after fsync: what a restart reads);
- load: every tensor through `CheckpointReader` with the checks (checksum on first open, NaN/inf
  test per tensor) vs the same reader with no checksum recorded.
The fp32 optimizer state (master + 2 moments, 12 bytes a parameter: 16 GB) is estimated from the
measured rates. Files go to a temporary directory under --dir (default: the system's) and are
deleted at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from megaglot.checkpoint.format import MODEL, CheckpointReader, PieceWriter, write_json  # noqa: E402
from megaglot.checkpoint.integrity import CHUNK_BYTES, checksum_mismatch, file_checksum  # noqa: E402
from megaglot.checkpoint.streaming import StreamingPart, StreamingSafetensors, parameter_specs  # noqa: E402
from megaglot.config import get_model_preset  # noqa: E402

GB = 1e9


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def drop_cache(path: str) -> None:
    """Evict the file's (clean) pages so the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def hash_rates(nbytes: int = 1 << 30) -> dict:
    """GB/s of each checksum over `nbytes` of random data in CHUNK_BYTES chunks."""
    chunk = os.urandom(CHUNK_BYTES)
    n = nbytes // CHUNK_BYTES
    rates = {}
    for name, make in (("crc32", None), ("sha256", hashlib.sha256), ("blake2b", hashlib.blake2b)):
        def run():
            if make is None:
                value = 0
                for _ in range(n):
                    value = zlib.crc32(chunk, value)
                return value
            h = make()
            for _ in range(n):
                h.update(chunk)
            return h.digest()
        seconds, _ = timed(run)
        rates[name] = n * CHUNK_BYTES / GB / seconds
    return rates


def part_plans(parts: int):
    """[(part name, [(name, shape)])]: the layers split in `parts` halves (embedding with the
    first, final norm and output layer with the last), as pipeline stages hold them."""
    cfg = get_model_preset("polyglot-ko-1.3b")
    specs = parameter_specs(cfg)
    per = cfg.num_layers // parts
    plans = [(f"model_tp00_pp{p:02d}", []) for p in range(parts)]
    for name, (shape, _) in specs.items():
        if name.startswith("layers."):
            p = min(int(name.split(".")[1]) // per, parts - 1)
        else:
            p = 0 if name.startswith("embed_in.") else parts - 1
        plans[p][1].append((name, shape))
    return plans


def make_tensors(entries):
    generator = torch.Generator().manual_seed(0)
    return {name: torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=generator)
            for name, shape in entries}


def bench_part(directory: str, part: str, entries) -> dict:
    """Each writer twice, alternately, best of two (page-cache state and a shared machine make
    single runs order-dependent); then verify warm and cold."""
    tensors = make_tensors(entries)
    path = os.path.join(directory, f"{part}.safetensors")
    plan = [dict(kind=MODEL, name=n, global_shape=tuple(t.shape), partition_dim=None, tp_size=1, tp_rank=0,
                 start=0, end=t.numel(), dtype=t.dtype) for n, t in tensors.items()]

    def piecewriter(checksum: bool = True):
        writer = PieceWriter(directory, part)
        for name, t in tensors.items():
            writer.add(MODEL, name, t, global_shape=t.shape, partition_dim=None, tp_size=1, tp_rank=0)
        if checksum:  # collecting the pieces (a clone each) is not part of the write
            return timed(writer.write)[0]

        def old_write():  # PieceWriter.write before checksums: the same two files, no CRC
            save_file(writer.tensors, path)
            for entry in writer.index:
                entry["file"] = os.path.basename(path)
            write_json(os.path.join(directory, f"{part}.index.json"), {"pieces": writer.index})
        return timed(old_write)[0]

    def streaming(checksum: bool):
        if not checksum:
            out = StreamingSafetensors(path, [(f"{MODEL}/{n}/tp0/0", t.dtype, (t.numel(),)) for n, t in tensors.items()])
            for n, t in tensors.items():
                out.write(f"{MODEL}/{n}/tp0/0", t.reshape(-1))
            return out.close()
        out = StreamingPart(directory, part, [dict(e) for e in plan])
        for n, t in tensors.items():
            out.write(MODEL, n, t)
        out.close()

    writers = {"save_file": lambda: piecewriter(False), "piecewriter": piecewriter,
               "stream_plain": lambda: timed(lambda: streaming(False))[0],
               "streaming": lambda: timed(lambda: streaming(True))[0]}
    r = {key: float("inf") for key in writers}
    for _ in range(2):
        for key, write in writers.items():
            r[key] = min(r[key], write())
    piecewriter()  # the file the verify and load steps read
    r["bytes"] = os.path.getsize(path)
    r["verify_warm"], record = timed(lambda: file_checksum(path))
    drop_cache(path)
    r["verify_cold"], error = timed(lambda: checksum_mismatch(path, record))
    assert error is None, error
    return r


def bench_load(directory: str) -> dict:
    """Every tensor through the reader, checked and (same files, checksums dropped) unchecked,
    alternately, from the page cache after one warm-up pass; the best of two each (the machine
    may be shared)."""
    def load_all(checked: bool) -> float:
        reader = CheckpointReader(directory)
        if not checked:
            reader.files.checksums.clear()
        start = time.perf_counter()
        for name in reader.names(MODEL):
            reader.full_tensor(MODEL, name)
            reader.release()
        return time.perf_counter() - start

    load_all(False)  # warm-up: both variants then read from the page cache
    runs = [(checked, load_all(checked)) for checked in (False, True, False, True)]
    return {"load_unchecked": min(t for c, t in runs if not c), "load_checked": min(t for c, t in runs if c)}


def table(rates, results, load, parts) -> str:
    total = sum(r["bytes"] for r in results)

    def row(label, key, note=""):
        seconds = sum(r[key] for r in results)
        return f"| {label} | {seconds:.2f} | {total / GB / seconds:.2f} | {note} |"

    base = sum(r["save_file"] for r in results)
    extra = sum(r["piecewriter"] for r in results) - base
    opt_bytes = total * 6  # fp32 master + 2 moments = 12 bytes a parameter vs bf16's 2
    crc_only = total / GB / rates["crc32"]
    lines = [f"Checkpoint of polyglot-ko-1.3b shapes: {total / GB:.2f} GB bf16 in {parts} part files.", "",
             "| checksum alone (16 MiB chunks, in memory) | GB/s |", "|---|---|"]
    lines += [f"| {name} | {rate:.2f} |" for name, rate in rates.items()]
    lines += ["", "| step | seconds | GB/s | note |", "|---|---|---|---|",
              row("write: PieceWriter.write before (save_file + fsynced index)", "save_file"),
              row("write: PieceWriter.write now (streamed, CRC on the way out, index)", "piecewriter",
                  f"+{extra:.2f} s, +{100 * extra / base:.0f}%"),
              row("write: StreamingSafetensors (offline stream, no CRC)", "stream_plain"),
              row("write: StreamingPart (offline stream + CRC while streaming + index)", "streaming",
                  f"+{100 * (sum(r['streaming'] for r in results) / sum(r['stream_plain'] for r in results) - 1):.0f}%"),
              row("verify: whole file, warm (page cache)", "verify_warm"),
              row("verify: whole file, cold (pages dropped)", "verify_cold", "what a restart reads"),
              f"| load: CheckpointReader, no checksum recorded | {load['load_unchecked']:.2f} | "
              f"{total / GB / load['load_unchecked']:.2f} | NaN/inf test only, warm |",
              f"| load: CheckpointReader, checked | {load['load_checked']:.2f} | "
              f"{total / GB / load['load_checked']:.2f} | + CRC on first open, warm |",
              "", f"Estimated for the fp32 optimizer state ({opt_bytes / GB:.1f} GB): CRC adds about "
              f"{opt_bytes / total * extra:.1f} s to a save and {opt_bytes / GB / rates['crc32']:.1f} s of CPU to a "
              f"load (CRC alone on the bf16 model: {crc_only:.2f} s); spread over the ranks that write it."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where the temporary checkpoint goes (default: the system's temp)")
    p.add_argument("--parts", type=int, default=2, help="part files the model is split into (1 or 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    rates = hash_rates()
    directory = tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir)
    try:
        results = [bench_part(directory, part, entries) for part, entries in part_plans(args.parts)]
        with open(os.path.join(directory, "metadata.json"), "w") as f:
            f.write('{"format_version": 1}')
        load = bench_load(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, torch {torch.__version__}, zlib {zlib.ZLIB_RUNTIME_VERSION}\n")
    print(table(rates, results, load, args.parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
