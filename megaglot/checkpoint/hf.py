"""Hugging Face GPT-NeoX <-> megaglot: configs, names and vocabulary padding.

megaglot's global parameter names are GPT-NeoX's without the `gpt_neox.` prefix, and the fused
QKV keeps GPT-NeoX's per-head [q, k, v] rows, so conversion is renaming plus padding the
vocabulary rows of the two embeddings.
"""

from __future__ import annotations

import re

import torch

from megaglot.config import ConfigError, ModelConfig

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


def hf_config_from_model_config(cfg: ModelConfig, *, bos_token_id: int = 0, eos_token_id: int = 2) -> dict:
    """A config.json that transformers' GPTNeoXConfig reads (both old and new field names)."""
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
        "hidden_dropout": cfg.hidden_dropout, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "torch_dtype": "float32", "use_cache": True,
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
