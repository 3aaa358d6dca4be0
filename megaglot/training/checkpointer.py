"""Loading a run's checkpoint at start and saving it every --save-interval iterations and at the end."""

from __future__ import annotations

import dataclasses

from megaglot.checkpoint.training_state import load_checkpoint, save_checkpoint
from megaglot.training.metrics import log0
from megaglot.training.run import Run


class Checkpointer:
    """The run's --load / --save / --save-interval / --no-load-optim."""

    def __init__(self, run: Run):
        self.run, self.cfg = run, run.train_cfg.checkpoint

    def load(self) -> tuple:
        """(iteration, consumed samples) to start from: (0, 0) without --load."""
        if not self.cfg.load:
            return 0, 0
        run = self.run
        meta = load_checkpoint(self.cfg.load, chunks=run.chunks, optimizer=run.optimizer, model_cfg=run.model_cfg,
                               load_optimizer=not self.cfg.no_load_optim)
        iteration, consumed = meta["iteration"], meta["consumed_samples"]
        log0(f"loaded {self.cfg.load} at iteration {iteration} ({consumed} samples consumed)")
        return iteration, consumed

    def maybe_save(self, iteration: int, consumed: int) -> None:
        interval, last = self.cfg.save_interval, self.run.train_cfg.train_iters
        if self.cfg.save and ((interval and iteration % interval == 0) or iteration == last):
            self.save(iteration, consumed)

    def save(self, iteration: int, consumed: int) -> None:
        run = self.run
        record = dataclasses.asdict(run.train_cfg)  # the run's settings, sections nested as in TrainConfig
        path = save_checkpoint(self.cfg.save, iteration=iteration, consumed_samples=consumed, chunks=run.chunks,
                               optimizer=run.optimizer, model_cfg=run.model_cfg,
                               extra={"tokenizer": run.train_cfg.data.tokenizer, "train": record})
        log0(f"saved checkpoint {path}")
