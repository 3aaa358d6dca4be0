"""Text generation: greedy, temperature, top-k and top-p sampling; the one generator (tools, lm-eval
adapter and the training demo's `--generate-prompt`).

Every rank runs the same steps; logits of the last position are gathered over the TP group, and
the tokens chosen on TP rank 0 of the last pipeline stage are broadcast to every rank. With the
cache (`megaglot.model.attention.KVCache`, PP = 1 without sequence parallelism) the prompt is run
once and every later step feeds one token per sequence; without it (`use_cache=False`) every step
reruns the whole sequence through the forward-only pipeline schedule, at any TP x PP layout (not
interleaved); that is also the reference the cache is tested against.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megaglot.config import ConfigError, ModelConfig
from megaglot.model.attention import KVCache
from megaglot.parallel import state
from megaglot.parallel.comm import all_gather_last_dim
from megaglot.pipeline.schedules import forward_backward


def make_generator(seed: int, device) -> torch.Generator:
    """A torch.Generator seeded with `seed` on `device`: torch.multinomial rejects one on another device."""
    return torch.Generator(device=device).manual_seed(seed)


class SeededGenerator:
    """A seed whose generator is made on the device of the first logits sampled (the model's device,
    which generate() learns only then) and reused after, so a seeded run draws one stream on any device."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator: Optional[torch.Generator] = None

    def on(self, device) -> torch.Generator:
        if self.generator is None:
            self.generator = make_generator(self.seed, device)
        return self.generator


def sample_next(logits: torch.Tensor, *, greedy: bool = True, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0,
                generator: Optional[Union[torch.Generator, SeededGenerator]] = None) -> torch.Tensor:
    """Next token ids `[b]` from float logits `[b, V]` (the real vocabulary only); a SeededGenerator
    makes its generator on the logits' device."""
    if greedy or temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # probability mass ahead of each token
        remove_sorted = before > top_p  # the smallest set whose mass reaches top_p stays (never empty)
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if isinstance(generator, SeededGenerator):
        generator = generator.on(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sequence_parallel(chunks) -> bool:
    return any(getattr(chunk, "sequence_parallel", False) for chunk in chunks)


def check_generation_layout(chunks, use_cache: bool) -> None:
    """Refuse what the generator cannot run: interleaved stages (one microbatch cannot fill their
    schedule), and the KV cache anywhere but a whole, not sequence-parallel model on each rank."""
    if state.is_initialized() and state.get_virtual_pipeline_world_size():
        raise ConfigError("generation through interleaved virtual stages is not supported; "
                          "generate with tools/generate.py from the saved checkpoint")
    if len(chunks) != 1:
        raise ValueError(f"generation runs one model chunk per rank, got {len(chunks)}")
    pipelined = state.is_initialized() and state.get_pipeline_parallel_world_size() > 1
    if use_cache and (pipelined or _sequence_parallel(chunks)):
        raise ValueError("the KV cache needs the whole model on each rank (--pipeline-model-parallel-size 1, "
                         "no --sequence-parallel); pass use_cache=False (--no-kv-cache) to rerun the sequence")


def _vocab_logits(last: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Float logits `[b, V]` of the real vocabulary from this TP rank's `[b, V/tp]`."""
    last = last.float()
    if state.get_tensor_parallel_world_size() > 1:
        last = all_gather_last_dim(last.contiguous(), state.get_tensor_parallel_group())
    return last[:, :cfg.vocab_size]


def _cached_logits(chunk, tokens: torch.Tensor, cfg: ModelConfig, cache: KVCache) -> torch.Tensor:
    """Logits `[b, V]` after `tokens` `[b, s]` (the new ones only: the cache holds the rest)."""
    logits = chunk(None, {"tokens": tokens, "kv_cache": cache})  # [s, b, V/tp]
    cache.advance(tokens.shape[1])
    return _vocab_logits(logits[-1], cfg)


def _full_sequence_logits(chunks, tokens: torch.Tensor, cfg: ModelConfig, pad: int) -> Optional[torch.Tensor]:
    """Logits `[b, V]` after the whole sequences `tokens` `[b, n]`, run through the pipeline schedule;
    None except on the last stage."""
    b, n = tokens.shape
    tp = state.get_tensor_parallel_world_size()
    sp = _sequence_parallel(chunks)
    length = math.ceil(n / tp) * tp if sp else n  # sequence parallelism splits s over the TP ranks
    if length > n:  # causal attention: right padding never changes the logits of position n - 1
        tokens = torch.cat([tokens, tokens.new_full((b, length - n), pad)], dim=1)
    captured = {}

    def step(chunk, input_tensor, microbatch):
        out = chunk(input_tensor, {"tokens": microbatch["tokens"]})  # [s(/tp), b, h]; last chunk [s, b, V/tp]
        if not chunk.post_process:
            return out
        captured["logits"] = _vocab_logits(out[n - 1], cfg)
        return out.new_zeros(())

    if state.get_pipeline_parallel_world_size() == 1:  # the whole model here (megaglot.parallel perhaps not set up)
        step(chunks[0], None, {"tokens": tokens})
    else:
        shape = (length // tp if sp else length, b, cfg.hidden_size)  # [s(/tp), b, h] between stages
        dtype = next(chunks[0].parameters()).dtype
        forward_backward(chunks, [{"tokens": tokens}], step, tensor_shape=shape, dtype=dtype, forward_only=True,
                         device=tokens.device)
    return captured.get("logits")


def _next_tokens(logits: Optional[torch.Tensor], b: int, device, sampling: dict, generator) -> torch.Tensor:
    """The next token of each sequence `[b]` (CPU), the same on every rank: chosen where the logits
    are (the last stage), then broadcast over its TP group and along the pipeline."""
    if logits is not None:
        nxt = sample_next(logits, generator=generator, **sampling).to(torch.long)
        if state.get_tensor_parallel_world_size() > 1:  # identical on every TP rank by construction; make it certain
            dist.broadcast(nxt, src=state.get_tensor_parallel_src_rank(), group=state.get_tensor_parallel_group())
    else:
        nxt = torch.zeros(b, dtype=torch.long, device=device)
    if state.is_initialized() and state.get_pipeline_parallel_world_size() > 1:
        dist.broadcast(nxt, src=state.get_state().pp_ranks[-1], group=state.get_pipeline_parallel_group())
    return nxt.cpu()


@torch.no_grad()
def generate(chunks, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             greedy: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eod: Optional[int] = None, seed: Optional[int] = None, use_cache: bool = True,
             device=None, bar=None) -> List[List[int]]:
    """New tokens for each prompt (up to max_new_tokens; the end token `eod` is included when it is
    generated, and ends that sequence). Prompts of different lengths run one after another.
    Generation also stops at the model's max_position_embeddings. `bar` (a megaglot.progress bar)
    advances by one per step. Every rank of the model's TP x PP group calls it with the same prompts."""
    check_generation_layout(chunks, use_cache)
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not greedy and not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    prompts = [list(map(int, p)) for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("an empty prompt: give at least one token")
    groups = [[p] for p in prompts] if len({len(p) for p in prompts}) > 1 else [prompts]
    generator = SeededGenerator(seed) if seed is not None else None
    sampling = dict(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    new = []
    for group in groups:
        new += _generate(chunks, cfg, group, max_new_tokens, sampling=sampling, eod=eod, generator=generator,
                         use_cache=use_cache, device=device or torch.device("cpu"), bar=bar)
    return new


def _generate(chunks, cfg, prompts, max_new_tokens, *, sampling, eod, generator, use_cache, device, bar):
    """generate() for prompts of one length, run as one batch."""
    for chunk in chunks:
        chunk.eval()
    b, n = len(prompts), len(prompts[0])
    limit = cfg.max_position_embeddings
    if n > limit:
        raise ValueError(f"the prompt has {n} tokens, more than the model's {limit} positions")
    steps = min(max_new_tokens, limit - n)
    tokens = torch.tensor(prompts, dtype=torch.long, device=device)  # [b, n]
    cache = KVCache(n + steps) if use_cache else None
    new = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    feed = tokens
    for _ in range(steps):
        if cache is not None:
            logits = _cached_logits(chunks[0], feed, cfg, cache)
        else:
            logits = _full_sequence_logits(chunks, feed, cfg, pad=eod if eod is not None else 0)
        nxt = _next_tokens(logits, b, device, sampling, generator)
        if eod is not None:
            nxt = torch.where(done, torch.full_like(nxt, eod), nxt)
        for i in range(b):
            if not done[i]:
                new[i].append(int(nxt[i]))
        if bar is not None:
            bar.update(1)
        if eod is not None:
            done |= nxt == eod
            if bool(done.all()):
                break
        step_tokens = nxt.to(device).unsqueeze(1)
        tokens = torch.cat([tokens, step_tokens], dim=1)
        feed = step_tokens if use_cache else tokens
    return new


__all__ = ["generate", "sample_next", "check_generation_layout", "make_generator", "SeededGenerator"]
