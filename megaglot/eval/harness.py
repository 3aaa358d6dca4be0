"""lm-evaluation-harness model adapter `megaglot` (lm-eval >= 0.4, an optional extra).

    pip install lm-eval
    python -m megaglot.eval.harness --model megaglot --model_args load=ckpt/run --tasks kobest_copa \
        --num_fewshot 5 --batch_size 8
    torchrun --nproc_per_node 4 -m megaglot.eval.harness --model megaglot \
        --model_args load=ckpt/run,tp=2,pp=2 --tasks kobest

`python -m megaglot.eval.harness ARGS` is lm-eval's own command line (`lm_eval ARGS`) with the
`megaglot` model registered; in Python, importing this module registers it for
`lm_eval.simple_evaluate(model="megaglot", model_args="load=...")`.

model_args: `load=CKPT` or `hf_dir=DIR`, `tokenizer=PATH`, `tp=`, `pp=` (model parallel sizes,
run under torchrun with tp x pp x dp ranks), `precision=fp32|bf16|fp16`, `max_length=`,
`max_gen_toks=` (default 256), `batch_size=` (lm-eval's --batch_size also sets it).

Under torchrun every model-parallel rank must run the same requests in the same order, so the
adapter reports rank 0 of a world of 1 to lm-eval on every process (lm-eval's own data-parallel
splitting is not used; extra data-parallel replicas split the scoring inside megaglot). Every
process prints the same results; read rank 0's.

Requests: `loglikelihood` (context, continuation) -> (sum of log-probs, is_greedy);
`loglikelihood_rolling` (text,) -> log-likelihood of the whole text in disjoint windows, the
first conditioned on <|endoftext|>; `generate_until` (context, {until, max_gen_toks, do_sample,
temperature, top_k, top_p}) -> the continuation cut at the first stop string (PP = 1 only).

The tests run it against a stand-in of lm-eval's base class and registry (lm-eval is not a test
dependency); it was also checked by hand with lm-eval 0.4.13's own `LM`, registry
(`get_model('megaglot').create_from_arg_string(...)`) and `Instance` objects.
"""

from __future__ import annotations

import sys
from typing import List, Optional

try:  # lm-eval is optional: without it the class still works on anything shaped like its Instance
    from lm_eval.api.model import LM as _Base
    from lm_eval.api.registry import register_model as _register

    HAVE_LM_EVAL = True
except ImportError:  # pragma: no cover - exercised when lm-eval is absent
    _Base, _register, HAVE_LM_EVAL = object, None, False

DEFAULT_MAX_GEN_TOKS = 256


def _int(value, name: str) -> Optional[int]:
    if value is None or value == "" or value == "auto":
        return None
    try:
        return int(str(value).split(":")[0])
    except ValueError:
        raise ValueError(f"--model_args {name}={value!r}: expected an integer") from None


class MegaglotLM(_Base):
    """A megaglot checkpoint as an lm-eval language model."""

    def __init__(self, load: Optional[str] = None, hf_dir: Optional[str] = None, tokenizer: Optional[str] = None,
                 tp=1, pp=1, precision: str = "fp32", batch_size=8, max_length=None,
                 max_gen_toks=DEFAULT_MAX_GEN_TOKS, attention_backend: Optional[str] = None, **ignored):
        if HAVE_LM_EVAL:
            super().__init__()
        from megaglot.eval.loading import init_parallel, load_inference_model, load_tokenizer_for
        from megaglot.eval.scoring import Scorer
        from megaglot.parallel.launch import init_distributed

        device = init_distributed()
        init_parallel(_int(tp, "tp") or 1, _int(pp, "pp") or 1)
        self.model = load_inference_model(load, hf_dir, precision=precision, attention_backend=attention_backend,
                                          device=device, tokenizer=tokenizer)
        self.tokenizer = load_tokenizer_for(self.model, "tokenizer=")
        if self.tokenizer.eod is None:
            raise ValueError(f"tokenizer {self.tokenizer.path} has no <|endoftext|> token")
        self._device = device
        self.batch_size = _int(batch_size, "batch_size") or 8
        self.max_gen_toks = _int(max_gen_toks, "max_gen_toks") or DEFAULT_MAX_GEN_TOKS
        self.scorer = Scorer(self.model.chunks, self.model.cfg, device=device, dtype=self.model.dtype,
                             batch_size=self.batch_size, max_length=_int(max_length, "max_length"))
        self.max_length = self.scorer.max_length

    # lm-eval asks these of every model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path or "megaglot")

    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    def tok_encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def _cache(self, kind, args, result):
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, args, result)

    # ---- the three request types ------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        from megaglot.eval.scoring import encode_pair

        pairs = [encode_pair(self.tokenizer, *req.args[:2], prefix_token=self.eot_token_id) for req in requests]
        results = self.scorer.loglikelihood_tokens(pairs)
        for req, res in zip(requests, results):
            self._cache("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from megaglot.eval.scoring import rolling_windows

        windows, owners = [], []
        for r, req in enumerate(requests):
            for w in rolling_windows(self.tok_encode(req.args[0]), self.eot_token_id, self.max_length):
                windows.append(w)
                owners.append(r)
        scores = self.scorer.loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owners, scores):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self._cache("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False):
        from megaglot.eval.generation import generate

        outputs = []
        for req in requests:
            context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            eot_text = self.tok_decode([self.eot_token_id])
            if eot_text not in until:
                until.append(eot_text)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
            greedy = not do_sample or temperature == 0.0
            ids = self.tok_encode(context) or [self.eot_token_id]
            ids = ids[-max(1, self.max_length - max_new):]
            (new,) = generate(self.model.chunks, self.model.cfg, [ids], max_new, greedy=greedy,
                              temperature=temperature or 1.0, top_k=int(kwargs.pop("top_k", 0) or 0),
                              top_p=float(kwargs.pop("top_p", 1.0) or 1.0), eod=self.eot_token_id,
                              seed=kwargs.pop("seed", 1234), device=self._device)
            text = self.tok_decode(new)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self._cache("generate_until", req.args, text)
            outputs.append(text)
        return outputs


if HAVE_LM_EVAL:
    try:
        _register("megaglot")(MegaglotLM)
    except ValueError:  # already registered (module imported twice under different names)
        pass


def main(argv=None) -> int:
    """lm-eval's command line with the `megaglot` model registered."""
    if not HAVE_LM_EVAL:
        print("error: lm-evaluation-harness is not installed (pip install lm-eval); tools/evaluate.py runs "
              "the KOBEST tasks without it", file=sys.stderr)
        return 2
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("error: this lm-eval has no lm_eval.__main__.cli_evaluate; use lm_eval.simple_evaluate("
              "model='megaglot', ...) after importing megaglot.eval.harness", file=sys.stderr)
        return 2
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
