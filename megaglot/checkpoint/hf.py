"""Hugging Face GPT-NeoX <-> megaglot: configs, names, vocabulary padding and the tokenizer.

megaglot's global parameter names are GPT-NeoX's without the `gpt_neox.` prefix, and the fused
QKV keeps GPT-NeoX's per-head [q, k, v] rows, so conversion is renaming plus padding the
vocabulary rows of the two embeddings.

The tokenizer goes with the model twice: a checkpoint records it (`recorded_tokenizer` finds it
again, also after the checkpoint was moved), and an export writes it as a complete Hugging Face
tokenizer (`plan_hf_tokenizer`, `write_hf_tokenizer`): tokenizer.json, tokenizer_config.json and
special_tokens_map.json whose special tokens are the tokenizer's own, so that
`AutoTokenizer.from_pretrained` pads with a real id (<pad>, 0) that config.json also names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from megaglot.checkpoint.format import CheckpointError, write_json
from megaglot.config import EOD_TOKEN_ID, PAD_TOKEN_ID, ConfigError, ModelConfig

HF_PREFIX = "gpt_neox."
# Buffers older GPT-NeoX checkpoints carry that are not parameters.
_IGNORED = re.compile(r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)$")
VOCAB_PADDED = ("embed_in.weight", "embed_out.weight")


def is_ignored_hf_tensor(hf_name: str) -> bool:
    return bool(_IGNORED.search(hf_name))


def hf_name(global_name: str) -> str:
    """The name megaglot writes: Polyglot-Ko's own (`embed_out.weight`), which transformers 4
    reads as is and transformers >= 5 renames to `lm_head.weight` on load."""
    return global_name if global_name == "embed_out.weight" else HF_PREFIX + global_name


def hf_names(global_name: str) -> tuple:
    """Every name a GPT-NeoX checkpoint may store this tensor under."""
    return ("embed_out.weight", "lm_head.weight") if global_name == "embed_out.weight" else (hf_name(global_name),)


def global_name(hf: str) -> str:
    if hf == "lm_head.weight":
        return "embed_out.weight"
    return hf[len(HF_PREFIX):] if hf.startswith(HF_PREFIX) else hf


def lookup(tensors, name: str, source: str = "checkpoint"):
    """tensors[HF name of `name`] under any of its aliases; a clear error when it is absent."""
    for candidate in hf_names(name):
        if candidate in tensors:
            return tensors[candidate]
    raise KeyError(f"{source}: missing tensor {' or '.join(hf_names(name))}")


def model_config_from_hf(hf: dict, source: str = "config.json", **overrides) -> ModelConfig:
    """Accepts both the older form (rotary_pct, rotary_emb_base; Polyglot-Ko's files) and the
    transformers >= 5 form (rope_parameters.partial_rotary_factor / rope_theta)."""
    model_type = hf.get("model_type")
    if model_type != "gpt_neox":
        raise ConfigError(f"{source}: model_type is {model_type!r}, not 'gpt_neox'; only GPT-NeoX models convert")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rotary_pct = hf.get("rotary_pct")
    if rotary_pct is None:
        rotary_pct = rope.get("partial_rotary_factor", 0.25)
    rotary_base = hf.get("rotary_emb_base")
    if rotary_base is None:
        rotary_base = rope.get("rope_theta", 10000.0)
    try:
        fields = dict(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"], max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rotary_pct=float(rotary_pct), rotary_base=float(rotary_base),
            layernorm_epsilon=hf.get("layer_norm_eps", 1e-5),
            use_parallel_residual=hf.get("use_parallel_residual", True),
            hidden_act=hf.get("hidden_act", "gelu"),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            init_method_std=hf.get("initializer_range", 0.02),
            name=hf.get("_name_or_path") or "hf-gpt-neox")
    except KeyError as missing:
        raise ConfigError(f"{source}: missing field {missing} of a GPT-NeoX config") from None
    if fields["tie_word_embeddings"]:
        raise ConfigError(f"{source}: tied input/output embeddings are not supported (Polyglot-Ko unties them)")
    if hf.get("attention_bias", True) is False:
        raise ConfigError(f"{source}: GPT-NeoX without biases is not supported")
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_config_from_model_config(cfg: ModelConfig, *, bos_token_id: int = 0, eos_token_id: int = EOD_TOKEN_ID,
                                pad_token_id: Optional[int] = PAD_TOKEN_ID) -> dict:
    """A config.json that transformers' GPTNeoXConfig reads (both old and new field names). The
    token ids are the exported tokenizer's (`HFTokenizerPlan.ids`); the pad id is dropped when it
    is not a row of the embedding (padding with it would index past the vocabulary)."""
    ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if pad_token_id is not None and 0 <= pad_token_id < cfg.vocab_size:
        ids["pad_token_id"] = pad_token_id
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.ffn_hidden_size,
        "hidden_act": cfg.hidden_act, "rotary_pct": cfg.rotary_pct, "rotary_emb_base": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base,
                            "partial_rotary_factor": cfg.rotary_pct},
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": cfg.init_method_std,
        "layer_norm_eps": cfg.layernorm_epsilon, "use_parallel_residual": cfg.use_parallel_residual,
        "tie_word_embeddings": False, "attention_dropout": cfg.attention_dropout,
        "hidden_dropout": cfg.hidden_dropout, **ids, "torch_dtype": "float32", "use_cache": True,
    }


def pad_vocab(tensor: torch.Tensor, name: str, cfg: ModelConfig) -> torch.Tensor:
    """Embedding rows from the tokenizer's vocabulary to the model's padded vocabulary (zeros)."""
    if name not in VOCAB_PADDED or tensor.shape[0] == cfg.padded_vocab_size:
        return tensor
    if tensor.shape[0] != cfg.vocab_size:
        raise ValueError(f"{name}: {tensor.shape[0]} rows, expected the vocabulary size {cfg.vocab_size}")
    padded = tensor.new_zeros((cfg.padded_vocab_size,) + tuple(tensor.shape[1:]))
    padded[: cfg.vocab_size] = tensor
    return padded


def unpad_vocab(tensor: torch.Tensor, name: str, cfg: ModelConfig) -> torch.Tensor:
    return tensor[: cfg.vocab_size] if name in VOCAB_PADDED else tensor


# ---- the tokenizer ---------------------------------------------------------------------------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
GENERATED = ("tokenizer_config.json", "special_tokens_map.json")


def _is_tokenizer(path: str) -> bool:
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, "tokenizer.json"))


def recorded_tokenizer(meta: dict, directory: str) -> Tuple[Optional[str], Optional[str]]:
    """(the tokenizer to use or None, the name metadata.json records or None) for the checkpoint
    iteration `directory`. Checkpoints carry a copy of their tokenizer recorded relative to the
    iteration directory ("tokenizer.json"), so a moved checkpoint still finds it; older ones record
    an absolute path (or {"path": ...}), tried as given. Last: tokenizer.json in the iteration
    directory, then in the checkpoint root."""
    tok = meta.get("tokenizer")
    if isinstance(tok, dict):
        tok = tok.get("path")
    recorded = tok if isinstance(tok, str) and tok else None
    directory = os.path.abspath(directory)
    candidates = []
    if recorded is not None:
        if not os.path.isabs(recorded):
            candidates.append(os.path.join(directory, recorded))
        candidates.append(recorded)
    candidates += [os.path.join(directory, "tokenizer.json"), os.path.join(os.path.dirname(directory), "tokenizer.json")]
    return next((path for path in candidates if _is_tokenizer(path)), None), recorded


def missing_tokenizer_message(source: str, recorded: Optional[str], flag: str = "--tokenizer") -> str:
    """Says whether the checkpoint records no tokenizer or one that is gone (a moved old checkpoint)."""
    if recorded is None:
        return f"{source}: the checkpoint records no tokenizer; pass {flag} PATH (tokenizer.json)"
    return (f"{source}: the checkpoint records tokenizer {recorded}, which does not exist; "
            f"pass {flag} PATH (tokenizer.json)")


@dataclass
class HFTokenizerPlan:
    """What an export writes for the tokenizer, decided and checked before any weight is written."""
    copies: List[Tuple[str, str]]
    """(source file, name in the export) of every file copied as is."""
    configs: Dict[str, dict] = field(default_factory=dict)
    """tokenizer_config.json and special_tokens_map.json as written (completed or made up)."""
    ids: Dict[str, int] = field(default_factory=dict)
    """bos_token_id, eos_token_id and pad_token_id for config.json (empty: the defaults)."""
    note: str = ""
    """One line for the log."""


def _read_tokenizer_json(path: Optional[str]) -> dict:
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    return obj if isinstance(obj, dict) else {}


def _content(value) -> Optional[str]:
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _special_tokens(tok, given: dict) -> Dict[str, tuple]:
    """{name: (value as written, id)}: the value the source's files give when it is in the vocabulary
    (kept as is, AddedToken dicts included), else the tokenizer's own: <|endoftext|> for bos and
    eos, <unk>, and <pad> for padding (<|endoftext|> when there is no <pad>). Never a new token."""
    eod = tok.backend.id_to_token(tok.eod) if tok.eod is not None else None
    defaults = {"bos_token": eod, "eos_token": eod, "unk_token": "<unk>",
                "pad_token": "<pad>" if tok.token_to_id("<pad>") is not None else eod}
    found = {}
    for name in SPECIAL_TOKENS:
        for value in (given.get(name), defaults[name]):
            content = _content(value)
            if content is not None and tok.token_to_id(content) is not None:
                found[name] = (value, tok.token_to_id(content))
                break
    return found


def plan_hf_tokenizer(tokenizer: str, cfg: ModelConfig, flag: str = "--tokenizer") -> HFTokenizerPlan:
    """The files that make `tokenizer` (a tokenizer.json, or a directory of tokenizer files) load with
    `AutoTokenizer.from_pretrained` and pad with a real token: the source's files, with
    tokenizer_config.json and special_tokens_map.json completed from the tokenizer's own special
    tokens. A tokenizer.json the `tokenizers` library cannot read is copied as is."""
    from megaglot.data.tokenizer import TokenizerError, load_tokenizer

    if os.path.isdir(tokenizer):
        names = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer, f))]
        if not names:
            raise CheckpointError(f"{tokenizer}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        copies = [(os.path.join(tokenizer, f), f) for f in names]
    elif os.path.isfile(tokenizer):
        copies = [(tokenizer, "tokenizer.json")]
    else:
        raise CheckpointError(f"{tokenizer}: no such tokenizer file or directory")
    source = {name: path for path, name in copies}
    if "tokenizer.json" not in source:
        return HFTokenizerPlan(copies, note=f"{tokenizer}: no tokenizer.json; tokenizer files copied as is")
    try:
        tok = load_tokenizer(source["tokenizer.json"])
    except TokenizerError:
        return HFTokenizerPlan(copies, note=f"{source['tokenizer.json']}: not readable by the tokenizers "
                                            f"library; tokenizer files copied as is")
    if tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{flag} {tok.path}: {tok.vocab_size} tokens, but the model's vocabulary is "
                              f"{cfg.vocab_size}; pass the tokenizer the model was trained with")
    config = _read_tokenizer_json(source.get("tokenizer_config.json"))
    special_map = _read_tokenizer_json(source.get("special_tokens_map.json"))
    special = _special_tokens(tok, {**config, **special_map})
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **config,
              "model_max_length": cfg.max_position_embeddings}
    for name, (value, _) in special.items():
        config[name] = special_map[name] = value
    ids = {f"{name}_id": i for name, (_, i) in special.items() if name != "unk_token"}
    return HFTokenizerPlan([c for c in copies if c[1] not in GENERATED],
                           {"tokenizer_config.json": config, "special_tokens_map.json": special_map}, ids,
                           note=", ".join(f"{name} {_content(v)!r} ({i})" for name, (v, i) in special.items()))


def write_hf_tokenizer(plan: HFTokenizerPlan, out: str) -> List[str]:
    """Writes the planned files into `out`; returns their names."""
    for path, name in plan.copies:
        shutil.copy2(path, os.path.join(out, name))
    for name, content in plan.configs.items():
        write_json(os.path.join(out, name), content)
    return sorted([name for _, name in plan.copies] + list(plan.configs))
