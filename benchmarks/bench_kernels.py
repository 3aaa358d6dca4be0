"""Fused softmax / rotary kernels against eager PyTorch: median time, achieved GB/s, speedup.

    python benchmarks/bench_kernels.py                   # CUDA if present, else CPU on one thread
    python benchmarks/bench_kernels.py --device cpu --threads 1 --dtypes float32,bfloat16

GB/s counts the nominal traffic of the fused kernel (every input element read once, every output
written once; for the causal kernel the full square although it skips reading the upper triangle),
so it compares directly with the measured copy bandwidth (a read plus a write per byte) on CUDA.
Eager baselines: softmax((x * scale).masked_fill(mask, -inf)) with a prebuilt mask, softmax(x * scale),
and Hugging Face's slice-and-cat rotary on q and k. On CUDA the attention block (QK^T, fused causal
softmax, PV) is also compared with torch's scaled_dot_product_attention. Record GPU figures in
benchmarks/RESULTS.md with the device, date, commit and this command.

CPU memory. A fresh tensor above glibc's mmap threshold (at most 32 MB) is mapped anew on every
call and its first touch page-faults: on the 2-core dev VM that costs about 23 ms per 64 MB, more
than the softmax itself, and it hits a kernel and its eager baseline differently (eager allocates
two or three such tensors). By default (`--cpu-malloc reuse`) the benchmark therefore tells glibc
to keep freed memory for reuse, as the CUDA caching allocator does on GPU, so the table compares
the kernels' work; `--cpu-malloc default` measures with the page faults.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time

import torch

from megaglot.kernels import (apply_rotary_torch, available, fused_rotary, rotary_cos_sin, scaled_masked_softmax,
                              scaled_softmax, scaled_upper_triang_masked_softmax)


def timer(device: torch.device, repeat: int, warmup: int = 3, back_to_back: int = 10):
    """measure(fn, ...) -> the median seconds of each fn over `repeat` samples (CUDA events on GPU,
    perf_counter on CPU), one tuple entry per fn.

    The functions' samples are interleaved (a, b, a, b, ...), so a burst of load on a shared machine
    lands on both sides of a comparison instead of on whichever happened to run during it.
    On GPU each sample is the mean of `back_to_back` consecutive calls between two events, so the
    host's per-call Python and launch overhead (tens of microseconds) overlaps device work as it
    does in a training step instead of being timed as idle device time before a 0.1 ms kernel."""
    def sample(fn) -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(back_to_back):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / back_to_back
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def measure(*fns):
        for fn in fns:
            for _ in range(warmup):
                fn()
        samples = [[] for _ in fns]
        for _ in range(repeat):
            for fn, out in zip(fns, samples):
                out.append(sample(fn))
        return tuple(statistics.median(s) for s in samples)
    return measure


def fwd_bwd(fn, x: torch.Tensor, grad: torch.Tensor):
    def run():
        x.grad = None
        fn(x).backward(grad)
    return run


def softmax_cases(device, dtype, cpu: bool):
    if cpu:
        causal_shape, shape4 = (16, 1024, 1024), (2, 8, 1024, 1024)
    else:
        causal_shape, shape4 = (64, 2048, 2048), (4, 16, 2048, 2048)
    scale = 0.125
    gen = torch.Generator(device=device).manual_seed(0)
    xc = torch.randn(causal_shape, device=device, dtype=dtype, generator=gen)
    tri = torch.ones(causal_shape[1:], device=device, dtype=torch.bool).triu(1)
    x4 = torch.randn(shape4, device=device, dtype=dtype, generator=gen)
    mask = torch.rand((shape4[0], 1) + shape4[2:], device=device, generator=gen) < 0.1
    inf = float("-inf")
    yield ("causal softmax", causal_shape, xc, 2 * xc.numel() * xc.element_size(),
           lambda t: scaled_upper_triang_masked_softmax(t, scale),
           lambda t: torch.softmax((t * scale).masked_fill(tri, inf), dim=-1))
    yield ("masked softmax", shape4, x4, 2 * x4.numel() * x4.element_size() + mask.numel(),
           lambda t: scaled_masked_softmax(t, mask, scale),
           lambda t: torch.softmax((t * scale).masked_fill(mask, inf), dim=-1))
    yield ("softmax", shape4, x4, 2 * x4.numel() * x4.element_size(),
           lambda t: scaled_softmax(t, scale), lambda t: torch.softmax(t * scale, dim=-1))


def keep_freed_memory() -> bool:
    """Serve every allocation from glibc's heap and never give it back (mallopt), so large tensors
    are reused instead of mapped and page-faulted anew on each call. False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_max, m_trim_threshold = -4, -1
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def run(args) -> None:
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    malloc = "-"
    if cpu:
        torch.set_num_threads(args.threads)
        malloc = "reuse freed memory" if args.cpu_malloc == "reuse" and keep_freed_memory() else "glibc default"
    info = available()
    print(f"device: {torch.cuda.get_device_name(device) if not cpu else 'cpu'}; threads: "
          f"{torch.get_num_threads() if cpu else '-'}; malloc: {malloc}; torch {torch.__version__}; "
          f"extension {info['extension']} (cuda {info['cuda']})")
    measure = timer(device, args.repeat)
    copy_gbs = None
    if not cpu:
        src = torch.empty(256 * 2**20, device=device, dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy_gbs = 2 * src.numel() / measure(lambda: dst.copy_(src))[0] / 1e9
        print(f"measured copy bandwidth: {copy_gbs:.0f} GB/s (read + write)")
    header = "| kernel | shape | dtype | pass | fused ms | GB/s | % copy | eager ms | speedup |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    def row(name, shape, dtype, which, fused_s, eager_s, nbytes=None):
        gbs = f"{nbytes / fused_s / 1e9:.1f}" if nbytes else "-"
        pct = f"{100 * nbytes / fused_s / 1e9 / copy_gbs:.0f}%" if nbytes and copy_gbs else "-"
        print(f"| {name} | {'x'.join(map(str, shape))} | {str(dtype).replace('torch.', '')} | {which} | "
              f"{fused_s * 1e3:.2f} | {gbs} | {pct} | {eager_s * 1e3:.2f} | {eager_s / fused_s:.2f}x |", flush=True)

    for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
        for name, shape, x, nbytes, fused, eager in softmax_cases(device, dtype, cpu):
            row(name, shape, dtype, "fwd", *measure(lambda: fused(x), lambda: eager(x)), nbytes)
            xg = x.clone().requires_grad_(True)
            grad = torch.randn_like(x)
            row(name, shape, dtype, "fwd+bwd", *measure(fwd_bwd(fused, xg, grad), fwd_bwd(eager, xg, grad)))
        s, b, heads, hn, rd = (1024, 4, 16, 128, 64) if cpu else (2048, 8, 16, 128, 64)
        q = torch.randn(s, b, heads, hn, device=device, dtype=dtype)
        k = torch.randn_like(q)
        cos, sin = rotary_cos_sin(s, rd, 10000, device)
        nbytes = 4 * q.numel() * q.element_size()
        row("rotary q+k", (s, b, heads, hn), dtype, "fwd",
            *measure(lambda: fused_rotary(q, k, cos, sin),
                     lambda: (apply_rotary_torch(q, cos, sin), apply_rotary_torch(k, cos, sin))), nbytes)
        if not cpu:
            attention_vs_sdpa(device, dtype, measure)


def attention_vs_sdpa(device, dtype, measure) -> None:
    """Causal attention [b, np, s, hn]: QK^T + fused softmax + PV against SDPA (flash/efficient kernels)."""
    b, heads, s, hn = 4, 16, 2048, 128
    q, k, v = (torch.randn(b, heads, s, hn, device=device, dtype=dtype) for _ in range(3))
    scale = hn ** -0.5

    def fused_block():
        scores = torch.matmul(q.view(b * heads, s, hn), k.view(b * heads, s, hn).transpose(1, 2))
        probs = scaled_upper_triang_masked_softmax(scores, scale)
        return torch.bmm(probs, v.view(b * heads, s, hn))

    fused_s, sdpa_s = measure(fused_block,
                              lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"| attention block (QK^T+fused softmax+PV) vs SDPA | {b}x{heads}x{s}x{hn} | "
          f"{str(dtype).replace('torch.', '')} | fwd | {fused_s * 1e3:.2f} | - | - | {sdpa_s * 1e3:.2f} (SDPA) | "
          f"{sdpa_s / fused_s:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the issue's target is for 1)")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--cpu-malloc", choices=["reuse", "default"], default="reuse",
                        help="CPU: keep freed memory for reuse (default) or measure with glibc's page faults")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
