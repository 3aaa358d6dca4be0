"""Training (floor 8), one job per module:

- `run`: the model chunks, optimizer and layout built once (`Run`, `build_run`) and one step (`train_step`);
- `data`: the training data, checked against the model and built rank 0 first;
- `metrics`: the log line, FLOPs/MFU and TensorBoard;
- `validator`: forward-only loss on the held-out split;
- `checkpointer`: `--load` at start (or from scratch), `maybe_save(iteration)` after each step, retention;
- `loop`: `pretrain`, which wires them together.
Process-group start-up and teardown live in `megaglot.parallel.launch` (re-exported here for the tools).
"""

from megaglot.parallel.launch import init_distributed, shutdown
from megaglot.training.checkpointer import Checkpointer
from megaglot.training.data import build_datasets, check_data_fits_model
from megaglot.training.loop import pretrain
from megaglot.training.metrics import H100_BF16_PEAK, Metrics, model_flops_per_iteration, peak_memory_gb
from megaglot.training.run import Run, TrainingDiverged, build_run, global_batches, train_step
from megaglot.training.validator import Validator, evaluate

__all__ = ["init_distributed", "shutdown", "Checkpointer", "build_datasets", "check_data_fits_model", "pretrain",
           "H100_BF16_PEAK", "Metrics", "model_flops_per_iteration", "peak_memory_gb", "Run", "build_run",
           "global_batches", "train_step", "TrainingDiverged", "Validator", "evaluate"]
