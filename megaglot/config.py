"""Configuration dataclasses: the model's shape and the parallel layout.

The lowest floor of megaglot: everything imports this, it imports nothing of megaglot.
Validation lives here so that a bad combination fails at start with one line that says
which flag to change, instead of a shape error deep inside a forward pass.
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
    """MLP inner width; 4h when None."""
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
    hidden_act: str = "gelu"
    """Hugging Face's name of the MLP activation ('gelu' is the exact erf form)."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP outputs."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialization."""
    tie_word_embeddings: bool = False
    """Polyglot-Ko keeps input and output embeddings separate."""
    attention_backend: str = "torch"
    """'sdpa', 'fused' (csrc kernels) or 'torch' (plain reference)."""
    name: str = "custom"
    """Preset name, recorded in checkpoints."""

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
            raise ConfigError(f"rotary_pct must be in [0, 1], got {self.rotary_pct}")
        if self.rotary_ndims % 2:
            raise ConfigError(
                f"rotary dimensions head_dim*rotary_pct = {self.head_dim}*{self.rotary_pct} = "
                f"{self.rotary_ndims} must be even")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(
                f"--attention-backend {self.attention_backend!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
        if self.hidden_act not in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu"):
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _polyglot(name, hidden, layers, heads, ffn, rotary_pct) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                       ffn_hidden_size=ffn, rotary_pct=rotary_pct, name=name,
                       attention_backend="sdpa")


def model_presets() -> dict[str, ModelConfig]:
    """Published Polyglot-Ko shapes (from their Hugging Face config.json) and tiny test sizes."""
    return {
        "polyglot-ko-1.3b": _polyglot("polyglot-ko-1.3b", 2048, 24, 16, 8192, 0.5),
        "polyglot-ko-3.8b": _polyglot("polyglot-ko-3.8b", 3072, 32, 24, 12288, 0.5),
        "polyglot-ko-5.8b": _polyglot("polyglot-ko-5.8b", 4096, 28, 16, 16384, 0.25),
        "polyglot-ko-12.8b": _polyglot("polyglot-ko-12.8b", 5120, 40, 40, 20480, 0.5),
        # The CPU demo: small enough to train visibly on 2 cores in a couple of minutes, on the
        # fused CPU softmax and rotary kernels.
        "tiny": ModelConfig(num_layers=4, hidden_size=128, num_attention_heads=4,
                            ffn_hidden_size=512, vocab_size=1024, max_position_embeddings=256,
                            hidden_dropout=0.1, attention_dropout=0.1, attention_backend="fused", name="tiny"),
        # Unit tests: the smallest shape that still exercises every code path.
        "tiny-test": ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4,
                                 ffn_hidden_size=256, vocab_size=1000,
                                 make_vocab_size_divisible_by=8, max_position_embeddings=64,
                                 name="tiny-test"),
    }


def get_model_preset(name: str, **overrides) -> ModelConfig:
    presets = model_presets()
    if name not in presets:
        raise ConfigError(f"--model {name!r} is unknown; choose one of {', '.join(presets)}")
    cfg = presets[name]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


@dataclass
class ParallelConfig:
    """How the model and the batch are split over the world: TP x PP x DP (+ virtual stages)."""

    tensor_model_parallel_size: int = 1
    """Ranks that split every layer (heads, FFN, vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Ranks that split the layer stack into stages."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers per model chunk for interleaved 1F1B; None = one chunk per stage."""
    sequence_parallel: bool = False
    """Split LayerNorm/dropout activations along the sequence over TP."""
    data_parallel_size: int = 1
    """Derived: world_size / (TP x PP)."""

    def virtual_pipeline_size(self, num_layers: int) -> Optional[int]:
        k = self.num_layers_per_virtual_pipeline_stage
        if k is None:
            return None
        return num_layers // (self.pipeline_model_parallel_size * k)

    def validate(self, model: ModelConfig, world_size: Optional[int] = None) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        for flag, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp)):
            if v <= 0:
                raise ConfigError(f"{flag} must be positive, got {v}")
        if world_size is not None:
            if world_size % (tp * pp):
                raise ConfigError(
                    f"world size {world_size} is not divisible by TP x PP = {tp} x {pp} = {tp * pp}; "
                    f"use sizes whose product divides {world_size}")
            self.data_parallel_size = world_size // (tp * pp)
        if model.num_attention_heads % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads "
                f"{model.num_attention_heads}")
        if model.ffn_hidden_size % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} does not divide --ffn-hidden-size {model.ffn_hidden_size}")
        check_vocab_divisible(model, tp)
        if model.num_layers % pp:
            raise ConfigError(
                f"--pipeline-model-parallel-size {pp} does not divide --num-layers {model.num_layers}")
        k = self.num_layers_per_virtual_pipeline_stage
        if k is not None:
            if pp == 1:
                raise ConfigError(
                    "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
            if k <= 0 or model.num_layers % (pp * k):
                raise ConfigError(
                    f"--num-layers {model.num_layers} is not divisible by --pipeline-model-parallel-size "
                    f"x --num-layers-per-virtual-pipeline-stage = {pp} x {k}")
        if self.sequence_parallel and tp == 1:
            self.sequence_parallel = False  # nothing to split; same maths


def check_vocab_divisible(model: ModelConfig, tp: int) -> None:
    padded = model.padded_vocab_size
    if padded % tp:
        working = model.make_vocab_size_divisible_by * tp // math.gcd(model.make_vocab_size_divisible_by, tp)
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} does not divide the padded vocabulary {padded} "
            f"(vocab {model.vocab_size} padded to a multiple of {model.make_vocab_size_divisible_by}); "
            f"set --make-vocab-size-divisible-by {working}")


@dataclass
class TrainConfig:
    """Everything about a run that is neither the model's shape nor the parallel layout."""

    micro_batch_size: int = 4
    """Sequences per microbatch per data-parallel rank."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all DP ranks (a multiple of micro batch x DP)."""
    seq_length: int = 128
    """Tokens per sample."""
    train_iters: int = 100
    """Optimizer steps to run (the run ends at this iteration)."""
    eval_interval: int = 50
    """Validate every this many iterations (0 disables)."""
    eval_iters: int = 4
    """Global batches per validation."""
    log_interval: int = 10
    """Print and log scalars every this many iterations."""
    seed: int = 1234
    """Seed of initialization, dropout and data order."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 0
    """Linear warm-up iterations."""
    lr_decay_style: str = "cosine"
    """cosine, linear or constant."""
    lr_decay_iters: Optional[int] = None
    """Iterations of decay (defaults to train_iters)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    precision: str = "fp32"
    """fp32, bf16 or fp16 (fp16 uses dynamic loss scaling)."""
    initial_loss_scale: float = 2.0 ** 16
    """fp16: starting loss scale."""
    loss_scale_window: int = 1000
    """fp16: clean steps before the scale grows."""
    use_distributed_optimizer: bool = False
    """Shard fp32 master weights and Adam state over DP (ZeRO-1)."""
    overlap_grad_reduce: bool = True
    """Start each gradient bucket's DP reduction as soon as it is final."""
    bucket_size: int = 40_000_000
    """Gradient bucket size in elements."""
    recompute_granularity: Optional[str] = None
    """None, 'full' (every layer) or 'selective' (core attention)."""
    data_path: Optional[list] = None
    """Dataset prefixes, optionally with weights: ['0.7', 'ko', '0.3', 'en']; None = the bundled corpus."""
    data_balance: Optional[str] = None
    """'temperature:ALPHA' to weight datasets by tokens**ALPHA."""
    split: str = "969,30,1"
    """Train/valid/test split of documents."""
    tokenizer: Optional[str] = None
    """Path of a Hugging Face tokenizer.json (recorded in checkpoints)."""
    data_cache_dir: Optional[str] = None
    """Where sample indices are cached (default: beside the data)."""
    save: Optional[str] = None
    """Checkpoint root to save into."""
    save_interval: int = 0
    """Save every this many iterations (0: only at the end)."""
    load: Optional[str] = None
    """Checkpoint root or iteration directory to resume from."""
    no_load_optim: bool = False
    """Load only the model weights (fine-tuning from a converted checkpoint)."""
    tensorboard_dir: Optional[str] = None
    """Write scalars for TensorBoard here."""
    generate_prompt: Optional[str] = None
    """Print a greedy continuation of this prompt at the end."""
    generate_tokens: int = 24
    """Tokens generated for generate_prompt."""
    distributed_timeout_minutes: float = 10.0
    """How long a collective waits for its peers (raise it when loading a 12.8B checkpoint or building indices)."""

    def validate(self, data_parallel_size: int) -> int:
        """Number of microbatches per step; a clear error when the batch sizes do not fit."""
        if self.micro_batch_size <= 0 or self.global_batch_size <= 0:
            raise ConfigError("--micro-batch-size and --global-batch-size must be positive")
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size x "
                f"data-parallel size = {self.micro_batch_size} x {data_parallel_size} = {per_step}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.train_iters <= 0:
            raise ConfigError(f"--train-iters must be positive, got {self.train_iters}")
        if not self.distributed_timeout_minutes > 0:
            raise ConfigError(f"--distributed-timeout-minutes must be positive, got {self.distributed_timeout_minutes}")
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ConfigError(f"--recompute-granularity must be full or selective, got {self.recompute_granularity!r}")
        return self.global_batch_size // per_step
