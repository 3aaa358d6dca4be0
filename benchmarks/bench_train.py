#!/usr/bin/env python
"""Training throughput of megaglot's real train step: tokens/s, TFLOP/s per GPU, MFU, peak memory.

Builds the run with `megaglot.training.build_run` (the same model, gradient buffer, fp32-master
optimizer and pipeline schedule as `pretrain`) and times `train_step` on synthetic random-token
microbatches shaped like the data loader's (`tokens`, `labels`, `loss_mask`, `position_ids`,
int64/float32 `[b, s]` CPU tensors, moved to the device by the forward step as in training).

    # one GPU, polyglot-ko-1.3b at s = 2048, bf16: sweep micro-batch sizes (OOM is reported, not fatal)
    python benchmarks/bench_train.py --micro-batch-size 4,8,16
    # side by side with Hugging Face GPTNeoXForCausalLM on the same GPU, config and batch
    python benchmarks/bench_train.py --micro-batch-size 4,8 --compare hf
    # kernel profile of 3 steps after the timed ones: top-25 CUDA kernels + a chrome trace per config
    python benchmarks/bench_train.py --micro-batch-size 8 --profile /tmp/prof
    # 8 GPUs: TP 2 x PP 2 x DP 2, 8 microbatches per step per DP rank
    torchrun --nproc_per_node 8 benchmarks/bench_train.py --model polyglot-ko-5.8b \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --sequence-parallel \\
        --micro-batch-size 2 --global-batch-size 32
    # CPU smoke test with a tiny model
    python benchmarks/bench_train.py --num-layers 2 --hidden-size 64 --num-attention-heads 4 \\
        --seq-length 64 --micro-batch-size 2,4 --iters 2 --warmup 1 --compare hf --precision fp32

Measurement. `--warmup` untimed steps, then `--iters` steps each timed by perf_counter between
two `torch.cuda.synchronize()` calls (median and mean reported; tokens/s and TFLOP/s use the
median). FLOPs per step are `megaglot.training.model_flops_per_iteration`, the docs/design.md formula
72 B s L h^2 (1 + s/(6h) + V/(12 L h)) with the padded vocabulary; recomputation is not counted,
so --recompute-granularity full lowers TFLOP/s by the extra forward it runs. MFU is given against
the H100 SXM datasheet dense BF16 peak (989 TFLOP/s) and against a square matmul ceiling measured
in the same process (8192^3 in the run's dtype on random data, median of 20 after warm-up; on CPU
a 512^3 matmul, which only gives the CPU figures a scale). Peak memory is
torch.cuda.max_memory_allocated, reset per configuration, the maximum over ranks (on CPU: the
process's RSS high-water mark, which never resets). The loss of the last step must be finite
(near ln(vocab) at initialization); the exit status is 1 when it is not.

--compare hf builds transformers' GPTNeoXForCausalLM with the same shape (vocabulary = megaglot's
padded vocabulary, so both do the same FLOPs; rotary fraction and base, parallel residual,
max positions, use_cache=False, attn_implementation="sdpa") with parameters in the run's dtype,
torch.optim.AdamW(fused=True) with megaglot's hyper-parameters and gradient clipping at the same
--clip-grad. Unlike megaglot it keeps no fp32 master weights and no fp32 gradient buffer (its Adam
states are in the parameter dtype too), so it needs less memory per parameter. Each megaglot
model is freed before the next configuration (and before Hugging Face's) is built. --compare hf
runs in a single process only (no torchrun).

Output (rank 0 only): a header (device, torch, git commit, date, the exact command), one line per
configuration, and a markdown table to paste into benchmarks/RESULTS.md.

Out of memory with several ranks. An OOM on one rank only (say the first pipeline stage) must not
let that rank skip ahead while its peers wait in a collective. So every rank meets after building
the model and after every step, OOM or not: one MAX all-reduce of an OOM flag on a separate gloo
group (CPU, outside the timed interval), after which either all ranks report the configuration as
OOM or none does. A rank that ran out in the middle of a step may leave its peers inside one of
that step's collectives, which no later message can release; they never reach the meeting, so
after --oom-wait seconds the ranks waiting there print one `error:` line and exit (status 3), and
torchrun stops the rest: a clear failure instead of a hang. Because ranks that ran out at
different points may leave unmatched messages on the NCCL communicator, a multi-rank sweep stops
at its first OOM configuration (the smaller sizes before it are reported); one GPU goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megaglot.config import (DTYPES, ConfigError, LoggingConfig, ModelConfig, OptimizerConfig,  # noqa: E402
                             ParallelConfig, TrainConfig, get_model_preset)
from megaglot.config.cli import add_field_argument, add_layout_arguments  # noqa: E402
from megaglot.parallel import state  # noqa: E402
from megaglot.training import (H100_BF16_PEAK, peak_memory_gb, build_run, init_distributed,  # noqa: E402
                               model_flops_per_iteration, shutdown, train_step)

PROFILE_STEPS = 3
PROFILE_ROWS = 25
CEILING_REPEAT = 20


# ---- command line --------------------------------------------------------------------------------
def bench_preset() -> tuple:
    """(model preset, TrainConfig) the benchmark starts from: bf16 Polyglot-Ko 1.3B, no evaluation."""
    return "polyglot-ko-1.3b", TrainConfig(precision="bf16", eval_interval=0, logging=LoggingConfig(log_interval=1))


def parse_args(argv=None) -> argparse.Namespace:
    """Flags shared with the trainer come from megaglot.config's dataclasses (doc and type); their
    defaults are the bench preset's values. --micro-batch-size takes a comma list to sweep."""
    model_name, train = bench_preset()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    add_field_argument(g, ModelConfig, "name", dest="model", default=model_name)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "attention_backend"):
        add_field_argument(g, ModelConfig, name, default=None, shown_default="the --model preset's")
    g = p.add_argument_group("batch and precision")
    add_field_argument(g, TrainConfig, "seq_length", default=train.seq_length)
    g.add_argument("--micro-batch-size", default="4", help="an integer, or a comma list to sweep: 4,8,16")
    add_field_argument(g, TrainConfig, "global_batch_size", default=None,
                       shown_default="micro-batch x DP, one microbatch per step")
    for name in ("precision", "recompute_granularity", "seed"):
        add_field_argument(g, TrainConfig, name, default=getattr(train, name))
    for name in ("clip_grad", "use_distributed_optimizer", "overlap_grad_reduce", "bucket_size"):
        add_field_argument(g, OptimizerConfig, name, default=getattr(train.optimizer, name))
    add_layout_arguments(p, virtual=True)
    add_field_argument(p, ParallelConfig, "sequence_parallel", default=False)
    g = p.add_argument_group("measurement")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    g.add_argument("--iters", type=int, default=10, help="timed steps per configuration")
    g.add_argument("--compare", choices=("hf",), help="also time Hugging Face GPTNeoXForCausalLM")
    g.add_argument("--profile", metavar="DIR", help="profile 3 steps per configuration; chrome traces into DIR")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    g.add_argument("--matmul-size", type=int, help="side of the ceiling matmul (default 8192 on CUDA, 512 on CPU)")
    g.add_argument("--oom-wait", type=float, default=300.0, metavar="SECONDS",
                   help="with several ranks: how long the ranks that finished a step (or ran out of memory in it) "
                        "wait for the others before stopping every rank (default 300)")
    return p.parse_args(argv)


def parse_micro_batches(text: str) -> list:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--micro-batch-size {text!r}: expected an integer or a comma list like 4,8,16") from None
    if not sizes or min(sizes) <= 0:
        raise ConfigError(f"--micro-batch-size {text!r}: sizes must be positive integers")
    return sizes


def check_args(args) -> None:
    if args.warmup < 0 or args.iters <= 0:
        raise ConfigError(f"--warmup must be >= 0 and --iters > 0, got {args.warmup} and {args.iters}")
    if args.seq_length <= 0:
        raise ConfigError(f"--seq-length must be positive, got {args.seq_length}")
    if not args.oom_wait > 0:
        raise ConfigError(f"--oom-wait must be positive, got {args.oom_wait}")


# ---- configuration -------------------------------------------------------------------------------
def build_model_config(args):
    """The --model preset with the shape flags given on top (FFN = 4h follows --hidden-size)."""
    overrides = {k: getattr(args, k) for k in ("num_layers", "hidden_size", "num_attention_heads",
                                                "ffn_hidden_size", "attention_backend")
                 if getattr(args, k) is not None}
    if any(k in overrides for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")):
        overrides["name"] = f"{args.model} (overridden)"
    return get_model_preset(args.model, **overrides)


def build_parallel_config(args, model_cfg, world: int) -> ParallelConfig:
    cfg = ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size,
                         pipeline_model_parallel_size=args.pipeline_model_parallel_size,
                         num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
                         sequence_parallel=args.sequence_parallel)
    cfg.validate(model_cfg, world)
    return cfg


def build_train_config(args, micro: int, dp: int) -> TrainConfig:
    """The bench preset with this sweep point's micro batch and the flags given."""
    _, train = bench_preset()
    optimizer = dataclasses.replace(train.optimizer, lr_warmup_iters=0, clip_grad=args.clip_grad,
                                    use_distributed_optimizer=args.use_distributed_optimizer,
                                    overlap_grad_reduce=args.overlap_grad_reduce, bucket_size=args.bucket_size)
    cfg = dataclasses.replace(train, micro_batch_size=micro, global_batch_size=args.global_batch_size or micro * dp,
                              seq_length=args.seq_length, train_iters=args.warmup + args.iters + PROFILE_STEPS,
                              seed=args.seed, precision=args.precision,
                              recompute_granularity=args.recompute_granularity, optimizer=optimizer)
    cfg.validate(dp)
    return cfg


# ---- environment ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(device_arg: str) -> torch.device:
    """torchrun's world, or a world of one on a free port; gloo when running on CPU."""
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device")
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not use_cuda and not dist.is_initialized():
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        dist.init_process_group("gloo")
    device = init_distributed()
    return device if use_cuda else torch.device("cpu")


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def say(msg: str = "") -> None:
    if is_rank0():
        print(msg, flush=True)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, capture_output=True, timeout=10).returncode
        return (sha + ("+dirty" if dirty == 1 else "")) if sha else "unknown"
    except Exception:
        return "unknown"


def command_line() -> str:
    world, local = int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("LOCAL_WORLD_SIZE")
    launcher = f"torchrun --nproc_per_node {local or world}" if world > 1 else "python"
    if world > 1 and local and int(local) != world:
        launcher += f" --nnodes {world // int(local)}"
    return f"{launcher} {shlex.join(sys.argv)}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(exc: BaseException, device: torch.device) -> bool:
    """torch.OutOfMemoryError anywhere; on CUDA also errors that say "out of memory" (cuBLAS, NCCL)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return device.type == "cuda" and "out of memory" in str(exc).lower()


# ---- measurement ---------------------------------------------------------------------------------
def time_steps(step, device: torch.device, warmup: int, iters: int, meet=None):
    """(seconds of each timed step, value of the last step); the device is idle when each timer starts.
    meet(fn) runs each step (meet: OOMMeeting.run); its own work falls outside the timed interval."""
    meet = meet or (lambda fn: fn())

    def timed():
        start = time.perf_counter()
        out = step()
        sync(device)
        return out, time.perf_counter() - start

    value = None
    for _ in range(warmup):
        value = meet(step)
    sync(device)
    times = []
    for _ in range(iters):
        value, seconds = meet(timed)
        times.append(seconds)
    return times, value


def ceiling_repeat(device: torch.device) -> int:
    return CEILING_REPEAT if device.type == "cuda" else 5


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of an n x n x n matmul on random data: median of CEILING_REPEAT after warm-up."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    times, _ = time_steps(lambda: torch.matmul(a, b, out=out), device, warmup=3, iters=ceiling_repeat(device))
    a = b = out = None  # free the operands (a `del` would leave the lambda's names undefined to ruff's F821)
    release_memory(device)
    return 2.0 * size ** 3 / statistics.median(times)


def synthetic_microbatches(train_cfg: TrainConfig, num: int, vocab_size: int, seed: int) -> list:
    """`num` microbatches shaped like gpt_dataset's: tokens/labels from one (s+1)-token window per sample."""
    gen = torch.Generator().manual_seed(seed)
    b, s = train_cfg.micro_batch_size, train_cfg.seq_length
    batches = []
    for _ in range(num):
        window = torch.randint(0, vocab_size, (b, s + 1), generator=gen, dtype=torch.int64)
        batches.append({"tokens": window[:, :-1].contiguous(), "labels": window[:, 1:].contiguous(),
                        "loss_mask": torch.ones(b, s, dtype=torch.float32),
                        "position_ids": torch.arange(s, dtype=torch.int64).repeat(b, 1)})
    return batches


def profile_steps(step, device: torch.device, out_dir: str, tag: str) -> None:
    """PROFILE_STEPS steps under torch.profiler on rank 0 (the others step alongside): table + trace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    ctx = profile(activities=activities) if is_rank0() else nullcontext()
    with ctx as prof:
        for _ in range(PROFILE_STEPS):
            step()
        sync(device)
    if not is_rank0():
        return
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{tag}.json")
    prof.export_chrome_trace(path)
    say(kernel_table(prof, device, tag))
    say(f"chrome trace: {path}")


def kernel_table(prof, device: torch.device, tag: str) -> str:
    """Top PROFILE_ROWS CUDA kernels by self CUDA time (CPU ops by self CPU time on CPU), per step."""
    from torch.autograd import DeviceType

    on_cuda = device.type == "cuda"
    if on_cuda:
        key = "self_device_time_total"
        timed = [e for e in prof.key_averages() if e.self_device_time_total > 0]
        events = [e for e in timed if e.device_type == DeviceType.CUDA] or timed  # kernels, else ops
    else:
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        key = "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    what = "CUDA kernels by self CUDA time" if on_cuda else "CPU ops by self CPU time (no CUDA)"
    lines = [f"\nprofile {tag}: top {PROFILE_ROWS} {what}, per step over {PROFILE_STEPS} steps "
             f"(total {total / 1e3 / PROFILE_STEPS:.2f} ms/step)",
             f"| {'kernel':<90} | calls/step | ms/step | % |", f"|{'-' * 92}|-----------:|--------:|--:|"]
    for e in events[:PROFILE_ROWS]:
        name = e.key if len(e.key) <= 90 else e.key[:87] + "..."
        t = getattr(e, key)
        lines.append(f"| {name:<90} | {e.count / PROFILE_STEPS:10.1f} | {t / 1e3 / PROFILE_STEPS:7.3f} | "
                     f"{100 * t / total:.1f} |")
    return "\n".join(lines)


def max_over_ranks(device: torch.device, value: float) -> float:
    """The maximum of `value` over ranks (peak memory): one MAX all-reduce every rank joins."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


class StepOOM(Exception):
    """Some rank ran out of memory; raised on every rank at the same meeting."""


class OOMMeeting:
    """Where every rank meets after each model build and each step, out of memory or not.

    The meeting is a MAX all-reduce of an OOM flag on its own gloo group: a rank whose step stopped
    half-way can never be matched against a collective of that step that its peers are still in.
    Ranks that wait there longer than `wait_s` exit (see the module docstring)."""

    def __init__(self, device: torch.device, wait_s: float):
        self.device, self.wait_s, self.group = device, wait_s, None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_s))

    def run(self, fn):
        """fn()'s value; StepOOM on every rank when fn ran out of memory on any rank."""
        oom, value = False, None
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is recovered from
            if not is_oom(exc, self.device):
                raise
            oom = True  # raised below, outside this handler: the traceback's tensors are freed now
        if self.any_rank(oom):
            raise StepOOM()
        return value

    def any_rank(self, oom: bool) -> bool:
        if self.group is None:
            return oom
        flag = torch.tensor([1 if oom else 0], dtype=torch.int32)
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        except RuntimeError:  # a peer is still inside a collective of the step and never comes
            what = "ran out of memory in the middle of a step" if oom else "finished a step"
            print(f"error: rank {dist.get_rank()} {what}, but other ranks did not reach the end of that step within "
                  f"--oom-wait {self.wait_s:g}s (they wait inside one of its collectives); stopping every rank "
                  f"instead of hanging: rerun without the micro-batch size that ran out", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(3)
        return bool(flag.item())


# ---- the two frameworks --------------------------------------------------------------------------
def bench_megaglot(args, model_cfg, parallel_cfg, train_cfg, device: torch.device, meeting: OOMMeeting) -> dict:
    """One configuration; {"oom": True} on every rank when any rank ran out of memory."""
    result = {"framework": "megaglot", "micro": train_cfg.micro_batch_size, "global": train_cfg.global_batch_size}
    run = microbatches = None
    release_memory(device)
    try:
        run = meeting.run(lambda: build_run(model_cfg, dataclasses.replace(parallel_cfg), train_cfg, device))
        microbatches = synthetic_microbatches(train_cfg, run.num_microbatches, model_cfg.vocab_size,
                                              seed=args.seed + state.get_data_parallel_rank())

        def step():
            return train_step(run, microbatches)["loss"]

        result["times"], result["loss"] = time_steps(step, device, args.warmup, args.iters, meeting.run)
        result["peak_gb"] = peak_memory_gb(device)
        if args.profile:
            profile_steps(lambda: meeting.run(step), device, args.profile,
                          f"megaglot_mb{train_cfg.micro_batch_size}_rank{dist.get_rank()}")
    except StepOOM:
        result["oom"] = True
    finally:
        run = microbatches = None
        release_memory(device)
    if result.get("oom"):
        return result
    return {**result, "oom": False, "peak_gb": max_over_ranks(device, result["peak_gb"])}


def build_hf_model(model_cfg, dtype: torch.dtype, device: torch.device, recompute=None):
    """GPTNeoXForCausalLM of the same shape; vocabulary = megaglot's padded vocabulary (same FLOPs).
    recompute 'full': Hugging Face's per-layer gradient checkpointing (it has no selective form)."""
    import transformers
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from megaglot.checkpoint.hf import hf_config_from_model_config

    transformers.logging.set_verbosity_error()
    fields = hf_config_from_model_config(model_cfg)
    fields.update(vocab_size=model_cfg.padded_vocab_size, use_cache=False)
    config = GPTNeoXConfig.from_dict(fields)
    rope = getattr(config, "rope_parameters", None) or {}
    if abs(rope.get("partial_rotary_factor", model_cfg.rotary_pct) - model_cfg.rotary_pct) > 1e-9:
        raise ConfigError(f"transformers read rotary fraction {rope} instead of {model_cfg.rotary_pct}")
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    if recompute == "full":
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train()


def make_hf_optimizer(model, train_cfg: TrainConfig):
    """AdamW with megaglot's hyper-parameters and decay groups (matrices decay, biases/norms do not)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": train_cfg.optimizer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = train_cfg.optimizer
    kwargs = dict(lr=opt.lr, betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # fused not available for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def hf_step_fn(model, optimizer, microbatches: list, clip_grad: float, device: torch.device):
    """Forward (labels = input ids; HF shifts them) + backward per microbatch, clip, step, zero_grad."""
    params = [p for p in model.parameters()]

    def step():
        total = 0.0
        for mb in microbatches:
            ids = mb["tokens"].to(device, non_blocking=True)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / len(microbatches)).backward()
            total = total + loss.detach() / len(microbatches)
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    return step


def bench_hf(args, model_cfg, train_cfg, device: torch.device) -> dict:
    result = {"framework": "hf", "micro": train_cfg.micro_batch_size, "global": train_cfg.global_batch_size}
    model = optimizer = step = None
    release_memory(device)
    try:
        model = build_hf_model(model_cfg, DTYPES[train_cfg.precision], device, train_cfg.recompute_granularity)
        optimizer = make_hf_optimizer(model, train_cfg)
        num = train_cfg.global_batch_size // train_cfg.micro_batch_size
        microbatches = synthetic_microbatches(train_cfg, num, model_cfg.vocab_size, seed=args.seed)
        step = hf_step_fn(model, optimizer, microbatches, train_cfg.optimizer.clip_grad, device)
        times, loss = time_steps(step, device, args.warmup, args.iters)
        result.update(times=times, loss=float(loss), peak_gb=peak_memory_gb(device), oom=False)
        if args.profile:
            profile_steps(step, device, args.profile, f"hf_mb{train_cfg.micro_batch_size}")
    except Exception as exc:  # noqa: BLE001 - only CUDA OOM is recovered from
        if not is_oom(exc, device):
            raise
        result["oom"] = True
    finally:
        model = optimizer = step = None
        release_memory(device)
    return result


# ---- report --------------------------------------------------------------------------------------
def summarize(result: dict, model_cfg, seq: int, world: int, device: torch.device, ceiling: float) -> dict:
    """Adds ms/step, tokens/s, TFLOP/s per GPU and the two MFUs (from the median step time)."""
    if result["oom"]:
        return result
    median, mean = statistics.median(result["times"]), statistics.mean(result["times"])
    flops = model_flops_per_iteration(model_cfg, result["global"], seq)
    per_gpu = flops / median / world
    return {**result, "ms": 1e3 * median, "ms_mean": 1e3 * mean, "tokens_s": result["global"] * seq / median,
            "tflops": per_gpu / 1e12,
            "mfu_peak": per_gpu / H100_BF16_PEAK if device.type == "cuda" else None,
            "mfu_ceiling": per_gpu / ceiling if ceiling else None}


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.1f}"
    return f"{x:.{digits}g}"


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def result_line(r: dict) -> str:
    head = f"{r['framework']:<8} micro-batch {r['micro']:>3} (global {r['global']})"
    if r["oom"]:
        return f"{head}: OOM"
    return (f"{head}: {r['ms']:.1f} ms/step median (mean {r['ms_mean']:.1f}), {r['tokens_s']:,.0f} tokens/s, "
            f"{fmt(r['tflops'])} TFLOP/s/GPU, MFU {pct(r['mfu_peak'])} vs 989 / {pct(r['mfu_ceiling'])} vs matmul, "
            f"peak {r['peak_gb']:.2f} GB, last loss {r['loss']:.4f}")


def markdown_table(results: list) -> str:
    lines = ["| framework | micro-batch | tokens/s | TFLOP/s/GPU | MFU vs 989 | MFU vs measured matmul | peak GB | "
             "ms/step | loss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["oom"]:
            lines.append(f"| {r['framework']} | {r['micro']} | OOM | OOM | | | | | |")
        else:
            lines.append(f"| {r['framework']} | {r['micro']} | {r['tokens_s']:,.0f} | {fmt(r['tflops'])} | "
                         f"{pct(r['mfu_peak'])} | {pct(r['mfu_ceiling'])} | {r['peak_gb']:.2f} | {r['ms']:.1f} | "
                         f"{r['loss']:.4f} |")
    return "\n".join(lines)


def largest_fit(results: list, framework: str) -> str:
    fits = [r["micro"] for r in results if r["framework"] == framework and not r["oom"]]
    return str(max(fits)) if fits else "none"


def throughput_ratios(results: list) -> str:
    ours = {r["micro"]: r for r in results if r["framework"] == "megaglot" and not r["oom"]}
    parts = [f"micro-batch {r['micro']}: {ours[r['micro']]['tokens_s'] / r['tokens_s']:.2f}x"
             for r in results if r["framework"] == "hf" and not r["oom"] and r["micro"] in ours]
    return "; ".join(parts) if parts else "n/a (no size fit both)"


def header(args, device, model_cfg, parallel_cfg, world: int) -> str:
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    dp = world // (parallel_cfg.tensor_model_parallel_size * parallel_cfg.pipeline_model_parallel_size)
    layout = (f"TP {parallel_cfg.tensor_model_parallel_size} x PP {parallel_cfg.pipeline_model_parallel_size} x "
              f"DP {dp}" + (" +SP" if parallel_cfg.sequence_parallel else "")
              + (f" VP {parallel_cfg.num_layers_per_virtual_pipeline_stage} layers/chunk"
                 if parallel_cfg.num_layers_per_virtual_pipeline_stage else "")
              + (" +distributed optimizer" if args.use_distributed_optimizer else ""))
    m = model_cfg
    return "\n".join([
        "# bench_train: megaglot training throughput",
        f"device: {device_name(device)} x {world} ({layout}) | torch {torch.__version__}{cuda} | "
        f"commit {git_commit()} | {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"command: {command_line()}",
        f"model: {m.name}: {m.num_parameters():,} parameters, L={m.num_layers} h={m.hidden_size} "
        f"heads={m.num_attention_heads} ffn={m.ffn_hidden_size} vocab {m.vocab_size} (padded {m.padded_vocab_size}), "
        f"rotary_pct {m.rotary_pct}; seq {args.seq_length}, {args.precision}, attention {m.attention_backend}, "
        f"recompute {args.recompute_granularity}",
        f"timing: {args.warmup} warm-up + {args.iters} timed steps per configuration (synchronize + perf_counter "
        f"around each step); FLOPs = 72 B s L h^2 (1 + s/(6h) + V/(12 L h)), recomputation not counted",
    ])


# ---- main ----------------------------------------------------------------------------------------
def run_benchmark(args, model_cfg, sizes: list, device: torch.device) -> int:
    world = dist.get_world_size()
    parallel_cfg = build_parallel_config(args, model_cfg, world)
    dp = parallel_cfg.data_parallel_size_for(world)
    train_cfgs = [build_train_config(args, micro, dp) for micro in sizes]  # every size checked up front
    if args.compare and world > 1:
        raise ConfigError("--compare hf runs in a single process; run without torchrun (TP = PP = 1)")
    if args.seq_length > model_cfg.max_position_embeddings:
        raise ConfigError(f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings "
                          f"{model_cfg.max_position_embeddings}")
    say(header(args, device, model_cfg, parallel_cfg, world))

    dtype = DTYPES[args.precision]
    size = args.matmul_size or (8192 if device.type == "cuda" else 512)
    ceiling = matmul_ceiling(device, dtype, size)
    where = "" if device.type == "cuda" else " (CPU: a small matmul, for scale only; no datasheet MFU)"
    say(f"matmul ceiling: {size}x{size}x{size} {str(dtype).replace('torch.', '')} on random data, median of "
        f"{ceiling_repeat(device)}: {ceiling / 1e12:.4g} TFLOP/s{where}; datasheet peak "
        f"{H100_BF16_PEAK / 1e12:.0f} TFLOP/s (H100 SXM dense BF16)\n")

    results = []
    meeting = OOMMeeting(device, args.oom_wait)
    for i, train_cfg in enumerate(train_cfgs):
        r = summarize(bench_megaglot(args, model_cfg, parallel_cfg, train_cfg, device, meeting), model_cfg,
                      args.seq_length, world, device, ceiling)
        say(result_line(r))
        results.append(r)
        if r["oom"] and world > 1 and i + 1 < len(train_cfgs):
            say(f"stopping the sweep after an OOM with {world} ranks (collectives may be left unmatched); not run: "
                f"micro-batch {', '.join(str(c.micro_batch_size) for c in train_cfgs[i + 1:])}")
            break
    if args.compare == "hf":
        say("\nhf: transformers GPTNeoXForCausalLM, attn_implementation=sdpa, vocabulary = megaglot's padded "
            f"{model_cfg.padded_vocab_size}, {args.precision} parameters, AdamW(fused) states in {args.precision}, "
            f"clip {args.clip_grad}; no fp32 master weights or fp32 gradient buffer (megaglot keeps both)"
            + {"full": "; gradient checkpointing per layer", "selective": "; no recomputation (HF has no "
               "selective form)"}.get(args.recompute_granularity, ""))
        for train_cfg in train_cfgs:
            r = summarize(bench_hf(args, model_cfg, train_cfg, device), model_cfg, args.seq_length, world, device,
                          ceiling)
            say(result_line(r))
            results.append(r)

    say(f"\nlargest micro-batch that fit: megaglot {largest_fit(results, 'megaglot')}"
        + (f", hf {largest_fit(results, 'hf')}" if args.compare else ""))
    if args.compare:
        say(f"megaglot/hf throughput: {throughput_ratios(results)}")
    bad = [r for r in results if not r["oom"] and not math.isfinite(r["loss"])]
    for r in bad:
        say(f"error: {r['framework']} micro-batch {r['micro']}: the last loss is {r['loss']} (not finite)")
    say("\n" + markdown_table(results))
    return 1 if bad else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    started = False
    try:
        check_args(args)
        model_cfg = build_model_config(args)  # bad presets and sizes fail before any process group
        sizes = parse_micro_batches(args.micro_batch_size)
        started = True
        device = setup_distributed(args.device)
        return run_benchmark(args, model_cfg, sizes, device)
    except ConfigError as exc:
        if is_rank0():
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if started:
            shutdown()


if __name__ == "__main__":
    sys.exit(main())
