"""A run's settings, in sections: optimizer/schedule, data, checkpoint, logging, and the run itself.

Each field, its default and its one-line doc (the string right after it) are the only definition
of a setting: the command line (`megaglot.config.cli`) is derived from these classes, so a flag
cannot drift from the code that reads it. Flag names are Megatron's (`--lr`, `--eval-interval`...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megaglot.config.model import ConfigError

#: The one mapping from --precision (or --bf16/--fp16) to the parameters' dtype.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_DECAY_STYLES = ("cosine", "linear", "constant")
RECOMPUTE_GRANULARITIES = ("full", "selective")


@dataclass
class OptimizerConfig:
    """AdamW, its learning-rate schedule, fp16 loss scaling and data-parallel gradient reduction."""

    lr: float = 3e-4
    """Peak learning rate (0 is a learning rate of 0)."""
    min_lr: float = 3e-5
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 0
    """Linear warm-up iterations."""
    lr_decay_style: str = field(default="cosine", metadata={"choices": LR_DECAY_STYLES})
    """Shape of the decay from --lr to --min-lr."""
    lr_decay_iters: Optional[int] = None
    """Iterations of decay; None = --train-iters."""
    weight_decay: float = 0.01
    """Decoupled weight decay on matrices (never on biases and norms)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    initial_loss_scale: float = 2.0 ** 16
    """fp16: starting loss scale."""
    min_loss_scale: float = 1.0
    """fp16: the loss scale never backs off below this."""
    loss_scale_window: int = 1000
    """fp16: clean steps before the loss scale doubles."""
    hysteresis: int = 1
    """fp16: overflows before the loss scale halves (Megatron uses 2)."""
    use_distributed_optimizer: bool = False
    """Shard fp32 master weights and Adam state over DP (ZeRO-1)."""
    overlap_grad_reduce: bool = True
    """Start each gradient bucket's DP reduction as soon as its gradients are final."""
    bucket_size: int = 40_000_000
    """Gradient bucket size in elements."""

    def validate(self) -> None:
        """Raise a ConfigError naming the flag; `LRSchedule` checks --min-lr <= --lr."""
        for flag, value in (("--lr", self.lr), ("--min-lr", self.min_lr), ("--weight-decay", self.weight_decay),
                            ("--clip-grad", self.clip_grad), ("--lr-warmup-iters", self.lr_warmup_iters)):
            if value < 0:
                raise ConfigError(f"{flag} must be >= 0, got {value}")
        for flag, value in (("--bucket-size", self.bucket_size), ("--loss-scale-window", self.loss_scale_window),
                            ("--hysteresis", self.hysteresis), ("--initial-loss-scale", self.initial_loss_scale)):
            if not value > 0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        if self.lr_decay_iters is not None and self.lr_decay_iters <= 0:
            raise ConfigError(f"--lr-decay-iters must be positive, got {self.lr_decay_iters}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(f"--lr-decay-style must be one of {', '.join(LR_DECAY_STYLES)}, "
                              f"got {self.lr_decay_style!r}")


@dataclass
class DataConfig:
    """Where the training tokens come from and how samples are cut from them."""

    data_path: Optional[list] = None
    """Dataset prefixes of .bin/.idx, optionally weighted: 0.7 ko 0.3 en."""
    data_balance: Optional[str] = None
    """'temperature:ALPHA' to weight datasets by tokens**ALPHA (1 natural, 0 uniform)."""
    split: str = "969,30,1"
    """Train/valid/test split of documents."""
    tokenizer: Optional[str] = None
    """tokenizer.json the data was prepared with (recorded in checkpoints)."""
    data_cache_dir: Optional[str] = None
    """Where sample indices are cached; None = beside the data."""
    eod_mask_loss: bool = False
    """Zero the loss where the input token is the end-of-document token."""
    sft_data: Optional[str] = None
    """Instruction data prefix from tools/preprocess_sft.py (instead of --data-path): loss on response tokens only."""
    pack_sequences: bool = False
    """With --sft-data: pack several samples per sequence, positions and attention reset at each sample."""


@dataclass
class CheckpointConfig:
    """Saving and resuming."""

    save: Optional[str] = None
    """Checkpoint root to save into; None = do not save."""
    save_interval: int = 0
    """Save every this many iterations (0: only at the end)."""
    load: Optional[str] = None
    """Checkpoint root or iteration directory to resume from; a missing or empty root starts from scratch."""
    no_load_optim: bool = False
    """Keep the iteration, schedule and data position, but start a fresh optimizer (no optimizer shards read)."""
    finetune: bool = False
    """Load the model weights only and start at iteration 0 with a fresh optimizer and data position."""
    save_retain: Optional[int] = None
    """Keep only the newest N checkpoints in --save (older ones go after the new one is published); None keeps all."""


@dataclass
class LoggingConfig:
    """What the run reports while and after it trains."""

    log_interval: int = 10
    """Print and log scalars every this many iterations."""
    tensorboard_dir: Optional[str] = None
    """Write scalars for TensorBoard here; None = no TensorBoard."""
    generate_prompt: Optional[str] = None
    """Print a greedy continuation of this prompt at the end."""
    generate_tokens: int = 24
    """Tokens generated for --generate-prompt."""


@dataclass
class TrainConfig:
    """Everything about a run that is neither the model's shape nor the parallel layout."""

    micro_batch_size: int = 4
    """Sequences per microbatch per data-parallel rank."""
    global_batch_size: int = 16
    """Sequences per optimizer step over all DP ranks (a multiple of micro batch x DP)."""
    seq_length: int = 2048
    """Tokens per sample."""
    train_iters: int = 100
    """Optimizer steps to run (the run ends at this iteration)."""
    eval_interval: int = 100
    """Validate every this many iterations (0 disables evaluation)."""
    eval_iters: int = 4
    """Global batches per validation."""
    seed: int = 1234
    """Seed of initialization, dropout and data order."""
    precision: str = field(default="fp32", metadata={"choices": tuple(DTYPES),
                                                     "aliases": {"--bf16": "bf16", "--fp16": "fp16"}})
    """Parameter dtype; fp16 uses dynamic loss scaling (--bf16 / --fp16 are short for it)."""
    recompute_granularity: Optional[str] = field(default=None, metadata={"choices": RECOMPUTE_GRANULARITIES})
    """Activation recomputation: None, 'full' (every layer) or 'selective' (core attention)."""
    max_skipped_steps: int = 10
    """Stop after this many consecutive steps skipped for a non-finite loss or gradient (0: never stop)."""
    distributed_timeout_minutes: float = 10.0
    """How long a collective waits for its peers (raise it when loading a 12.8B checkpoint or building indices)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW, schedule, loss scaling, gradient reduction."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and tokenizer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and loading."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Log lines, TensorBoard, the closing sample."""

    def num_microbatches(self, data_parallel_size: int) -> int:
        """Microbatches per step on each DP rank (call `validate` first for a clear error)."""
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)

    def validate(self, data_parallel_size: int) -> None:
        """Raise a ConfigError naming the flag when the run's settings cannot work on this DP size."""
        if self.micro_batch_size <= 0 or self.global_batch_size <= 0:
            raise ConfigError("--micro-batch-size and --global-batch-size must be positive")
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by --micro-batch-size x "
                f"data-parallel size = {self.micro_batch_size} x {data_parallel_size} = {per_step}")
        if self.precision not in DTYPES:
            raise ConfigError(f"--precision must be one of {', '.join(DTYPES)}, got {self.precision!r}")
        for flag, value in (("--train-iters", self.train_iters), ("--seq-length", self.seq_length),
                            ("--log-interval", self.logging.log_interval)):
            if value <= 0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        for flag, value in (("--eval-interval", self.eval_interval), ("--eval-iters", self.eval_iters),
                            ("--save-interval", self.checkpoint.save_interval)):
            if value < 0:
                raise ConfigError(f"{flag} must be >= 0 (0 disables), got {value}")
        if self.max_skipped_steps < 0:
            raise ConfigError(f"--max-skipped-steps must be >= 0 (0: never stop), got {self.max_skipped_steps}")
        if self.checkpoint.save_retain is not None and self.checkpoint.save_retain <= 0:
            raise ConfigError(f"--save-retain must be positive (none keeps all), got {self.checkpoint.save_retain}")
        if self.data.sft_data and self.data.data_path:
            raise ConfigError("--sft-data and --data-path are exclusive: fine-tune on one or pretrain on the other")
        if self.data.pack_sequences and not self.data.sft_data:
            raise ConfigError("--pack-sequences packs instruction samples: it needs --sft-data")
        ckpt = self.checkpoint
        if ckpt.finetune and ckpt.no_load_optim:
            raise ConfigError("--finetune already starts a fresh optimizer at iteration 0; drop --no-load-optim")
        for flag, on in (("--finetune", ckpt.finetune), ("--no-load-optim", ckpt.no_load_optim)):
            if on and not ckpt.load:
                raise ConfigError(f"{flag} needs --load CHECKPOINT (the weights to start from)")
        if not self.distributed_timeout_minutes > 0:
            raise ConfigError(f"--distributed-timeout-minutes must be positive, got {self.distributed_timeout_minutes}")
        if self.recompute_granularity not in (None, *RECOMPUTE_GRANULARITIES):
            raise ConfigError(f"--recompute-granularity must be full or selective, got {self.recompute_granularity!r}")
        self.optimizer.validate()
