#!/usr/bin/env python
"""Data-pipeline throughput: preprocessing MB/s and docs/s per worker count, and GPT sample-index
build time for 10^8 tokens in 10^6 documents (C++ and the numpy reference).

    python benchmarks/bench_data.py                 # quick: 8 MB corpus
    python benchmarks/bench_data.py --size-mb 50    # the figure the design asks for

The corpus is generated from the bundled Korean sample (sentences reshuffled into documents of
random length, with fake phone/account numbers planted), so PII masking is exercised too. Tokenizer
threads are pinned to one per process (TOKENIZERS_PARALLELISM=false) so "1 worker" means one core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megaglot.data.gpt_dataset import build_sample_idx_reference  # noqa: E402
from megaglot.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from megaglot.data.tokenizer import train_tokenizer  # noqa: E402
from megaglot.kernels import load_extension  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KO = os.path.join(ROOT, "examples", "data", "ko_sample.jsonl")


class _Null:
    def write(self, s):
        pass

    def flush(self):
        pass


def generate_corpus(path: str, size_mb: float, seed: int = 0) -> int:
    """JSONL of about size_mb MB; returns the document count."""
    texts = [json.loads(line)["text"] for line in open(KO, encoding="utf-8")]
    sentences = [s.strip() + "." for t in texts for s in t.replace("\n", " ").split(".") if len(s.strip()) > 5]
    rng = np.random.default_rng(seed)
    target = int(size_mb * 1e6)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            picked = rng.integers(0, len(sentences), size=int(rng.integers(3, 25)))
            body = " ".join(sentences[i] for i in picked)
            if rng.random() < 0.1:
                body += f" 문의 010-{rng.integers(1000, 9999)}-{rng.integers(1000, 9999)}"
            if rng.random() < 0.05:
                body += f" 입금 계좌 110-{rng.integers(100, 999)}-{rng.integers(100000, 999999)}"
            line = json.dumps({"text": body}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            docs += 1
    return docs


def bench_preprocess(size_mb: float, workers: list[int], vocab_size: int) -> list[tuple]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        docs = generate_corpus(corpus, size_mb)
        megabytes = os.path.getsize(corpus) / 1e6
        tokenizer = os.path.join(tmp, "tokenizer.json")
        train_tokenizer((json.loads(line)["text"] for line in open(KO, encoding="utf-8")), vocab_size, tokenizer)
        for n in workers:
            start = time.perf_counter()
            side = preprocess(PreprocessConfig(input=[corpus], output_prefix=os.path.join(tmp, f"w{n}"),
                                               tokenizer=tokenizer, append_eod=True, workers=n), log=_Null())
            seconds = time.perf_counter() - start
            rows.append((n, megabytes, docs, side["tokens"], seconds, megabytes / seconds, docs / seconds,
                         sum(side["masks"].values())))
    return rows


def bench_sample_index(num_tokens: int, num_docs: int, seq_length: int, repeats: int) -> list[tuple]:
    rng = np.random.default_rng(0)
    mean = num_tokens / num_docs
    sizes = rng.integers(1, int(2 * mean), size=num_docs).astype(np.int32)
    doc_idx = rng.permutation(num_docs).astype(np.int64)
    total = int(sizes.sum(dtype=np.int64))
    num_samples = (total - 1) // seq_length
    rows = []
    ext = load_extension()
    candidates = [("C++ build_sample_idx", lambda: ext.build_sample_idx(sizes, doc_idx, seq_length, num_samples))] \
        if ext is not None else []
    candidates.append(("numpy reference", lambda: build_sample_idx_reference(sizes, doc_idx, seq_length,
                                                                             num_samples)))
    results = []
    for name, fn in candidates:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - start)
        results.append(out)
        rows.append((name, total, num_docs, seq_length, num_samples, best))
    if len(results) == 2:
        assert np.array_equal(results[0], results[1]), "C++ and numpy sample indices differ"
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=float, default=8.0, help="generated corpus size (50 for the full figure)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--tokens", type=float, default=1e8, help="tokens for the sample-index build")
    p.add_argument("--docs", type=float, default=1e6, help="documents for the sample-index build")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    print(f"# bench_data on {os.cpu_count()} CPU cores, python {sys.version.split()[0]}")
    print("\n## preprocessing (JSONL -> PII mask -> byte-level BPE -> .bin/.idx)")
    print(f"{'workers':>7}  {'MB':>7}  {'docs':>8}  {'tokens':>11}  {'seconds':>8}  {'MB/s':>7}  {'docs/s':>8}  "
          f"{'masks':>6}")
    for n, mb, docs, tokens, seconds, mbs, dps, masks in bench_preprocess(args.size_mb, args.workers,
                                                                        args.vocab_size):
        print(f"{n:>7}  {mb:>7.1f}  {docs:>8}  {tokens:>11}  {seconds:>8.2f}  {mbs:>7.2f}  {dps:>8.0f}  {masks:>6}")
    print("\n## GPT sample index")
    print(f"{'builder':<22}  {'tokens':>12}  {'documents':>10}  {'seq':>5}  {'samples':>9}  {'seconds':>8}")
    for name, tokens, docs, seq, samples, seconds in bench_sample_index(int(args.tokens), int(args.docs),
                                                                         args.seq_length, args.repeats):
        print(f"{name:<22}  {tokens:>12}  {docs:>10}  {seq:>5}  {samples:>9}  {seconds:>8.4f}")


if __name__ == "__main__":
    main()
