"""Configuration: the one place where every setting, its default and its doc are defined.

The lowest floor of megaglot: everything imports this, it imports nothing else of megaglot.
`megaglot.config.cli` derives the command line from these dataclasses.
"""

from megaglot.config.model import (ACC_TOKEN_ID, ATTENTION_BACKENDS, EOD_TOKEN_ID, HIDDEN_ACTS, PAD_TOKEN_ID,
                                   RRN_TOKEN_ID, SEP_TOKEN_ID, TEL_TOKEN_ID, ConfigError, ModelConfig,
                                   get_model_preset, model_presets)
from megaglot.config.parallel import (ParallelConfig, check_pipeline_split, check_vocab_divisible,
                                      check_world_size)
from megaglot.config.train import (DTYPES, CheckpointConfig, DataConfig, LoggingConfig, OptimizerConfig,
                                   TrainConfig)

__all__ = ["ACC_TOKEN_ID", "ATTENTION_BACKENDS", "DTYPES", "EOD_TOKEN_ID", "HIDDEN_ACTS", "PAD_TOKEN_ID",
           "RRN_TOKEN_ID", "SEP_TOKEN_ID", "TEL_TOKEN_ID", "CheckpointConfig", "ConfigError", "DataConfig",
           "LoggingConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig", "TrainConfig",
           "check_pipeline_split", "check_vocab_divisible", "check_world_size", "get_model_preset",
           "model_presets"]
