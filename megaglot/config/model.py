"""Model shape: `ModelConfig` and the published Polyglot-Ko presets.

The lowest floor of megaglot (with the rest of megaglot.config): it imports nothing of megaglot.
Validation lives here so that a bad combination fails at start with one line that says which flag
to change, instead of a shape error deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

# Polyglot-Ko's special tokens (ids as its tokenizer.json assigns them).
PAD_TOKEN_ID = 0
EOD_TOKEN_ID = 2  # <|endoftext|>: document separator and end of sequence
SEP_TOKEN_ID = 3  # <|sep|>
ACC_TOKEN_ID = 30000  # <|acc|>
TEL_TOKEN_ID = 30001  # <|tel|>
RRN_TOKEN_ID = 30002  # <|rrn|>

ATTENTION_BACKENDS = ("sdpa", "fused", "torch")
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu")


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the flag to change."""


@dataclass
class ModelConfig:
    """Shape and numerics of a GPT-NeoX (Polyglot-Ko) model, independent of the parallel layout."""

    num_layers: int = 2
    """Number of transformer blocks."""
    hidden_size: int = 64
    """Width of the residual stream (h)."""
    num_attention_heads: int = 4
    """Attention heads; TP splits them."""
    ffn_hidden_size: Optional[int] = None
    """MLP inner width; None = 4 x hidden size (the one place this rule lives)."""
    vocab_size: int = 30003
    """Tokenizer vocabulary (unpadded)."""
    make_vocab_size_divisible_by: int = 128
    """The embedding is padded to a multiple of this, at every layout alike."""
    max_position_embeddings: int = 2048
    """Longest sequence the rotary cache is built for."""
    rotary_pct: float = 0.5
    """Fraction of each head's dimensions that rotary embedding rotates."""
    rotary_base: float = 10000.0
    """Rotary frequency base (theta)."""
    layernorm_epsilon: float = 1e-5
    """LayerNorm epsilon."""
    use_parallel_residual: bool = True
    """x + attn(ln1(x)) + mlp(ln2(x)) when True; sequential residual otherwise."""
    hidden_act: str = field(default="gelu", metadata={"choices": HIDDEN_ACTS})
    """Hugging Face's name of the MLP activation ('gelu' is the exact erf form)."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP outputs."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialization."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output layer (Polyglot-Ko keeps them separate)."""
    attention_backend: str = field(default="torch", metadata={"choices": ATTENTION_BACKENDS})
    """Attention implementation: 'sdpa', 'fused' (csrc kernels) or 'torch' (plain reference)."""
    name: str = field(default="custom", metadata={"flag": "--model"})
    """Preset to start from (polyglot-ko-1.3b|3.8b|5.8b|12.8b|tiny|tiny-test); its name is recorded in checkpoints."""

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        self.validate()

    # ---- derived sizes -------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_ndims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self) -> int:
        """Exact parameter count (padded vocabulary, untied embeddings unless tied)."""
        h, f, v = self.hidden_size, self.ffn_hidden_size, self.padded_vocab_size
        per_layer = 2 * 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + 2 * h

    def validate(self) -> None:
        positive = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                    "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                f"{self.num_attention_heads}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError(f"--rotary-pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_ndims % 2:
            raise ConfigError(
                f"rotary dimensions head_dim*rotary_pct = {self.head_dim}*{self.rotary_pct} = "
                f"{self.rotary_ndims} must be even")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"--attention-backend {self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ConfigError(f"--hidden-act {self.hidden_act!r} is not one of {', '.join(HIDDEN_ACTS)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _polyglot(name, hidden, layers, heads, rotary_pct) -> dict:
    # Every published shape has FFN = 4h: ffn_hidden_size stays None and ModelConfig resolves it.
    return dict(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, rotary_pct=rotary_pct,
                name=name, attention_backend="sdpa")


def _preset_fields() -> dict[str, dict]:
    """Each preset as constructor arguments, so an override of hidden_size also moves the 4h FFN."""
    return {
        "polyglot-ko-1.3b": _polyglot("polyglot-ko-1.3b", 2048, 24, 16, 0.5),
        "polyglot-ko-3.8b": _polyglot("polyglot-ko-3.8b", 3072, 32, 24, 0.5),
        "polyglot-ko-5.8b": _polyglot("polyglot-ko-5.8b", 4096, 28, 16, 0.25),
        "polyglot-ko-12.8b": _polyglot("polyglot-ko-12.8b", 5120, 40, 40, 0.5),
        # The CPU demo: small enough to train visibly on 2 cores in a couple of minutes, on the
        # fused CPU softmax and rotary kernels.
        "tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=4, vocab_size=1024,
                     max_position_embeddings=256, hidden_dropout=0.1, attention_dropout=0.1,
                     attention_backend="fused", name="tiny"),
        # Unit tests: the smallest shape that still exercises every code path.
        "tiny-test": dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=1000,
                          make_vocab_size_divisible_by=8, max_position_embeddings=64, name="tiny-test"),
    }


def model_presets() -> dict[str, ModelConfig]:
    """Published Polyglot-Ko shapes (from their Hugging Face config.json) and tiny test sizes."""
    return {name: ModelConfig(**kwargs) for name, kwargs in _preset_fields().items()}


def get_model_preset(preset: str, /, **overrides) -> ModelConfig:
    """The preset with `overrides` applied before construction (so FFN = 4h follows hidden_size);
    overrides may include name= to record a different name."""
    presets = _preset_fields()
    if preset not in presets:
        raise ConfigError(f"--model {preset!r} is unknown; choose one of {', '.join(presets)}")
    return ModelConfig(**{**presets[preset], **overrides})
