"""Continuation log-likelihoods through the parallel model (forward-only pipeline schedule).

A request is (context token ids, continuation token ids). Its score is the sum over the
continuation of log p(token | everything before it), and whether every continuation token is the
model's argmax ("is_greedy"), as lm-evaluation-harness's `loglikelihood` defines them. The input
is `(context + continuation)[:-1]`, left-truncated to `max_length`.

Batching: requests are sorted longest first, cut into microbatches of `batch_size` rows, and
`microbatches_per_call` of them (the pipeline depth, so stages overlap) go through one
`forward_backward(forward_only=True)` call, right-padded to the call's longest input (causal
attention: padding on the right never changes earlier positions). The last stage turns the
vocab-parallel logits into per-token log-probabilities with the vocab-parallel cross entropy
(no gathering of [s, b, V]), and the argmax through a TP all-gather of per-rank maxima; the
results go to every pipeline stage by broadcast. Data-parallel replicas split the calls and
share the results, so every rank returns every score.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megaglot.config import ModelConfig
from megaglot.parallel import state
from megaglot.parallel.cross_entropy import vocab_parallel_cross_entropy
from megaglot.pipeline.schedules import forward_backward
from megaglot.progress import progress

PAD_ID = 0


def encode_pair(tokenizer, context: str, continuation: str, prefix_token: Optional[int] = None):
    """Token ids as lm-evaluation-harness's HFLM makes them: trailing spaces of the context move to
    the continuation, the continuation's ids are those of `context + continuation` after the
    context's. An empty context becomes `[prefix_token]` (the end-of-text token)."""
    if context == "":
        if prefix_token is None:
            raise ValueError("an empty context needs a prefix token (the tokenizer's <|endoftext|>)")
        return [prefix_token], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_length: int) -> List[Tuple[list, list]]:
    """Disjoint windows scoring every token of `tokens` once (lm-evaluation-harness's
    loglikelihood_rolling): each predicts up to max_length tokens after as much preceding context
    as fits; the first is conditioned on `prefix_token`."""
    tokens = list(tokens)
    windows, start = [], 0
    while start < len(tokens):
        end = min(start + max_length, len(tokens))
        cont = tokens[start:end]
        context = ([prefix_token] + tokens[:start])[-(max_length + 1 - len(cont)):]
        windows.append((context, cont))
        start = end
    return windows


class Scorer:
    """Scores requests with this rank's chunks. Every model-parallel rank must make the same calls.
    `show_progress`: a bar of requests scored on stderr (rank 0; tools/evaluate.py without --quiet)."""

    def __init__(self, chunks, cfg: ModelConfig, *, device=None, dtype=torch.float32, batch_size: int = 8,
                 max_length: Optional[int] = None, microbatches_per_call: Optional[int] = None,
                 show_progress: bool = False):
        if batch_size < 1:
            raise ValueError(f"--batch-size must be positive, got {batch_size}")
        self.chunks, self.cfg = list(chunks), cfg
        self.device = device or torch.device("cpu")
        self.dtype, self.batch_size, self.show_progress = dtype, batch_size, show_progress
        self.max_length = max_length or cfg.max_position_embeddings
        if self.max_length > cfg.max_position_embeddings:
            raise ValueError(f"--max-length {self.max_length} exceeds the model's max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        pp = state.get_pipeline_parallel_world_size()
        self.microbatches_per_call = microbatches_per_call or pp
        if pp > 1 and (state.get_virtual_pipeline_world_size() or 1) > 1 and self.microbatches_per_call % pp:
            raise ValueError(f"interleaved pipelines need a multiple of {pp} microbatches per call")
        for c in self.chunks:
            c.eval()

    # ---- requests -> scores ----------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood_tokens(self, requests: Sequence[Tuple[Sequence[int], Sequence[int]]], *,
                             desc: str = "scoring", bar=None) -> List[Tuple[float, bool]]:
        """[(sum of continuation log-probs, is_greedy)] in request order, on every rank. Progress:
        `bar` (a megaglot.progress bar to advance) or a bar of its own over this rank's share."""
        prepared = []
        for i, (context, continuation) in enumerate(requests):
            continuation = list(continuation)
            if not continuation:
                raise ValueError(f"request {i}: empty continuation")
            if len(continuation) > self.max_length:
                raise ValueError(f"request {i}: continuation of {len(continuation)} tokens is longer than the "
                                 f"model's context of {self.max_length}")
            full = (list(context) + continuation)[-(self.max_length + 1):]
            prepared.append((full[:-1], full[1:], len(continuation)))
        order = sorted(range(len(prepared)), key=lambda i: (-len(prepared[i][0]), i))
        per_call = self.batch_size * self.microbatches_per_call
        calls = [order[k:k + per_call] for k in range(0, len(order), per_call)]
        dp, dp_rank = state.get_data_parallel_world_size(), state.get_data_parallel_rank()
        results = {}
        mine = [call for c, call in enumerate(calls) if c % dp == dp_rank]
        shown = bar if bar is not None else progress(sum(map(len, mine)), desc, unit="req",
                                                     quiet=not self.show_progress)
        for call in mine:
            logprobs, greedy = self._run_call([prepared[i] for i in call])
            for row, i in enumerate(call):
                n = prepared[i][2]
                length = len(prepared[i][0])
                results[i] = (float(logprobs[row, length - n:length].double().sum()),
                              bool(greedy[row, length - n:length].all()))
            if bar is None:
                shown.update(len(call))
        if bar is None:
            shown.close()
        else:  # every replica's tokens: the bar counts the whole run's progress
            bar.update(sum(p[2] for p in prepared))
        if dp > 1:
            gathered = [None] * dp
            dist.all_gather_object(gathered, results, group=state.get_data_parallel_group())
            for part in gathered:
                results.update(part)
        return [results[i] for i in range(len(prepared))]

    def _run_call(self, rows):
        """Forward a list of (input, target, n) rows; returns ([rows, L] log-probs, [rows, L] greedy)."""
        m, b = self.microbatches_per_call, self.batch_size
        length = max(len(r[0]) for r in rows)
        tokens = torch.full((m * b, length), PAD_ID, dtype=torch.long)
        targets = torch.full((m * b, length), PAD_ID, dtype=torch.long)
        for j, (inp, tgt, _) in enumerate(rows):
            tokens[j, :len(inp)] = torch.tensor(inp, dtype=torch.long)
            targets[j, :len(tgt)] = torch.tensor(tgt, dtype=torch.long)
        microbatches = [{"index": k, "tokens": tokens[k * b:(k + 1) * b].to(self.device),
                         "targets": targets[k * b:(k + 1) * b].to(self.device)} for k in range(m)]
        out_lp = torch.zeros(m, b, length, dtype=torch.float32, device=self.device)
        out_greedy = torch.zeros(m, b, length, dtype=torch.float32, device=self.device)
        vocab = self.cfg.vocab_size

        def step(chunk, input_tensor, mb):
            out = chunk(input_tensor, {"tokens": mb["tokens"]})
            if not chunk.post_process:
                return out
            lp, greedy = token_scores(out, mb["targets"], vocab)
            out_lp[mb["index"]] = lp
            out_greedy[mb["index"]] = greedy.float()
            return out.new_zeros(())

        forward_backward(self.chunks, microbatches, step, tensor_shape=(length, b, self.cfg.hidden_size),
                         dtype=self.dtype, forward_only=True, device=self.device)
        if state.get_pipeline_parallel_world_size() > 1:
            group = state.get_pipeline_parallel_group()
            src = state.get_state().pp_ranks[-1]
            dist.broadcast(out_lp, src=src, group=group)
            dist.broadcast(out_greedy, src=src, group=group)
        n = len(rows)
        return out_lp.view(m * b, length)[:n].cpu(), out_greedy.view(m * b, length)[:n].cpu().bool()

    # ---- perplexity --------------------------------------------------------------------------------
    def perplexity_windows(self, windows: Iterable[Sequence[int]], chunk_size: int = 256,
                           total_tokens: Optional[int] = None) -> Tuple[float, int]:
        """(total negative log-likelihood, predicted tokens) over token windows, each scoring its
        tokens 1.. given the ones before (token-weighted). Progress: tokens scored, of
        `total_tokens` when known."""
        total, count, pending = 0.0, 0, []
        bar = progress(total_tokens, "perplexity", unit="tok", unit_scale=True, quiet=not self.show_progress)

        def flush():
            nonlocal total, count
            for lp, _ in self.loglikelihood_tokens(pending, bar=bar):
                total -= lp
            count += sum(len(c) for _, c in pending)
            pending.clear()

        for window in windows:
            window = [int(t) for t in window]
            if len(window) < 2:
                continue
            pending.append((window[:1], window[1:]))
            if len(pending) >= chunk_size:
                flush()
        if pending:
            flush()
        bar.close()
        return total, count


def token_scores(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int):
    """Vocab-parallel logits `[s, b, V/tp]` and targets `[b, s]` -> (log p(target) `[b, s]`,
    target is the argmax over the real vocabulary `[b, s]`), collective over the TP group."""
    logprob = -vocab_parallel_cross_entropy(logits, targets.t(), vocab_size=vocab_size).t()
    tp = state.get_tensor_parallel_world_size()
    per_rank = logits.shape[-1]
    start = state.get_tensor_parallel_rank() * per_rank
    local = logits.float()
    columns = torch.arange(start, start + per_rank, device=logits.device)
    if (columns >= vocab_size).any():
        local = local.masked_fill(columns >= vocab_size, float("-inf"))
    values, index = local.max(dim=-1)  # [s, b]
    index = index + start
    if tp > 1:
        group = state.get_tensor_parallel_group()
        all_values = [torch.empty_like(values) for _ in range(tp)]
        all_index = [torch.empty_like(index) for _ in range(tp)]
        dist.all_gather(all_values, values.contiguous(), group=group)
        dist.all_gather(all_index, index.contiguous(), group=group)
        stacked = torch.stack(all_values)  # [tp, s, b]; the first rank holding the maximum wins,
        best = stacked.argmax(dim=0)       # as torch.argmax over the full row would choose
        index = torch.stack(all_index).gather(0, best.unsqueeze(0)).squeeze(0)
    return logprob, index.t() == targets


def indexed_dataset_windows(prefix: str, seq_length: int, max_tokens: Optional[int] = None):
    """Windows of seq_length + 1 tokens over the dataset's sequences laid end to end, stride
    seq_length (each token after the first is predicted exactly once); the last may be shorter."""
    from megaglot.data.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    buffer = np.zeros(0, dtype=np.int64)
    used = 0
    for i in range(len(dataset)):
        buffer = np.concatenate([buffer, np.asarray(dataset.get(i), dtype=np.int64)])
        while len(buffer) >= seq_length + 1:
            if max_tokens is not None and used >= max_tokens:
                return
            yield buffer[:seq_length + 1].tolist()
            used += seq_length
            buffer = buffer[seq_length:]
    if len(buffer) >= 2 and (max_tokens is None or used < max_tokens):
        yield buffer.tolist()


__all__ = ["Scorer", "encode_pair", "rolling_windows", "token_scores", "indexed_dataset_windows"]
