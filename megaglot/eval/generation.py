"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling.

Tensor parallel (every TP rank runs the same steps; logits of the last position are gathered over
the TP group and the tokens chosen on TP rank 0 are broadcast), no pipeline parallelism (PP = 1).
With the cache (`megaglot.model.attention.KVCache`) the prompt is run once and every later step
feeds one token per sequence; without it (`use_cache=False`) every step reruns the whole sequence,
which is the reference the cache is tested against.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megaglot.config import ModelConfig
from megaglot.model.attention import KVCache
from megaglot.parallel import state
from megaglot.parallel.comm import all_gather_last_dim


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


def check_generation_layout() -> None:
    if state.is_initialized() and state.get_pipeline_parallel_world_size() > 1:
        raise ValueError("generation runs with --pipeline-model-parallel-size 1 (tensor parallel only); "
                         "the checkpoint loads at any layout, so pass PP=1")


def _last_logits(chunk, tokens: torch.Tensor, cfg: ModelConfig, cache: Optional[KVCache]) -> torch.Tensor:
    batch = {"tokens": tokens}
    if cache is not None:
        batch["kv_cache"] = cache
    logits = chunk(None, batch)  # [s, b, V/tp]
    if cache is not None:
        cache.advance(tokens.shape[1])
    last = logits[-1].float()  # [b, V/tp]
    if state.get_tensor_parallel_world_size() > 1:
        last = all_gather_last_dim(last.contiguous(), state.get_tensor_parallel_group())
    return last[:, :cfg.vocab_size]


@torch.no_grad()
def generate(chunks, cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             greedy: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eod: Optional[int] = None, seed: Optional[int] = None, use_cache: bool = True,
             device=None, bar=None) -> List[List[int]]:
    """New tokens for each prompt (up to max_new_tokens; the end token `eod` is included when it is
    generated, and ends that sequence). Prompts of different lengths run one after another.
    Generation also stops at the model's max_position_embeddings. `bar` (a megaglot.progress bar)
    advances by one per step."""
    check_generation_layout()
    if len(chunks) != 1:
        raise ValueError("generation needs the whole model on this rank (one chunk, PP = 1)")
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if not greedy and not 0.0 < top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    prompts = [list(map(int, p)) for p in prompts]
    if any(not p for p in prompts):
        raise ValueError("an empty prompt: give at least one token")
    if len({len(p) for p in prompts}) > 1:
        generator = SeededGenerator(seed) if seed is not None else None
        return [_generate(chunks[0], cfg, [p], max_new_tokens, greedy, temperature, top_k, top_p, eod,
                          generator, use_cache, device, bar)[0] for p in prompts]
    generator = SeededGenerator(seed) if seed is not None else None
    return _generate(chunks[0], cfg, prompts, max_new_tokens, greedy, temperature, top_k, top_p, eod, generator,
                     use_cache, device, bar)


def _generate(chunk, cfg, prompts, max_new_tokens, greedy, temperature, top_k, top_p, eod, generator,
              use_cache, device, bar=None):
    chunk.eval()
    device = device or torch.device("cpu")
    b, n = len(prompts), len(prompts[0])
    limit = cfg.max_position_embeddings
    if n > limit:
        raise ValueError(f"the prompt has {n} tokens, more than the model's {limit} positions")
    steps = min(max_new_tokens, limit - n)
    tokens = torch.tensor(prompts, dtype=torch.long, device=device)
    cache = KVCache(n + steps) if use_cache else None
    new = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    tp_group = state.get_tensor_parallel_group() if state.get_tensor_parallel_world_size() > 1 else None
    feed = tokens
    for _ in range(steps):
        logits = _last_logits(chunk, feed, cfg, cache)
        nxt = sample_next(logits, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator).to(torch.long)
        if tp_group is not None:  # sampling is identical on every TP rank by construction; make it certain
            dist.broadcast(nxt, src=state.get_tensor_parallel_src_rank(), group=tp_group)
        nxt = nxt.cpu()
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
