"""Loading a run's checkpoint at start and saving it every --save-interval iterations and at the end.

One command line starts and resumes a run: `--save X --load X` starts from scratch while X holds
nothing yet and resumes from X's `latest` on every later launch. `latest` never moves backwards: a
run that would save into X from an older starting point is refused before it trains.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from megaglot.checkpoint.format import CheckpointError
from megaglot.checkpoint.retention import latest_iteration, nothing_saved_yet, prune
from megaglot.checkpoint.training_state import load_checkpoint, save_checkpoint
from megaglot.config import ConfigError
from megaglot.training.metrics import log0
from megaglot.training.run import Run


class Checkpointer:
    """The run's --load / --save / --save-interval / --no-load-optim / --finetune / --save-retain."""

    def __init__(self, run: Run):
        self.run, self.cfg = run, run.train_cfg.checkpoint

    def load(self) -> tuple:
        """(iteration, consumed samples) to start from: (0, 0) without --load or with --finetune.
        Refuses (ConfigError) a --save root whose `latest` is newer than that start."""
        iteration, consumed = self._load()
        if self.cfg.save:
            latest = latest_iteration(self.cfg.save)
            if latest is not None and latest > iteration:
                raise ConfigError(self._backwards(latest, f"this run starts at iteration {iteration}"))
        return iteration, consumed

    def _load(self) -> tuple:
        cfg, run = self.cfg, self.run
        fresh_optimizer = "--finetune" if cfg.finetune else "--no-load-optim" if cfg.no_load_optim else None
        if not cfg.load:  # (--finetune / --no-load-optim without --load: refused by TrainConfig.validate)
            return 0, 0
        if nothing_saved_yet(cfg.load):
            if fresh_optimizer:  # weights from nowhere: surely a wrong path, not a first launch
                raise CheckpointError(f"--load {cfg.load}: no checkpoint there, and {fresh_optimizer} needs one")
            log0(f"--load {cfg.load}: no checkpoint yet, starting from scratch")
            return 0, 0
        meta = load_checkpoint(cfg.load, chunks=run.chunks, optimizer=run.optimizer, model_cfg=run.model_cfg,
                               load_optimizer=fresh_optimizer is None)
        if cfg.finetune:  # weights only: iteration, schedule clock and data position start over
            run.optimizer.iteration = run.optimizer.num_skipped = 0
            log0(f"--finetune: loaded the weights of {cfg.load} (saved at iteration {meta['iteration']}); "
                 f"starting at iteration 0 with a fresh optimizer")
            return 0, 0
        iteration, consumed = meta["iteration"], meta["consumed_samples"]
        how = ("a fresh optimizer (--no-load-optim)" if cfg.no_load_optim else "its optimizer state"
               if meta.get("optimizer") else "a fresh optimizer (the checkpoint holds none)")
        log0(f"loaded {cfg.load} at iteration {iteration} ({consumed} samples consumed) with {how}")
        return iteration, consumed

    def _backwards(self, latest: int, what: str) -> str:
        """The one line refusing to move --save's `latest` back from iteration `latest`."""
        root = self.cfg.save
        resume = f"--load {root}" + (" without --finetune" if self.cfg.finetune else "")
        return (f"--save {root}: {root}/latest is at iteration {latest} and {what}; saving would move it "
                f"backwards. Resume with {resume}, or save into a new --save directory")

    def maybe_save(self, iteration: int, consumed: int) -> None:
        interval, last = self.cfg.save_interval, self.run.train_cfg.train_iters
        if self.cfg.save and ((interval and iteration % interval == 0) or iteration == last):
            self.save(iteration, consumed)

    def save(self, iteration: int, consumed: int) -> None:
        """Collective. Publishes iteration `iteration` into --save, then applies --save-retain."""
        run, root = self.run, self.cfg.save
        latest = latest_iteration(root)
        if latest is not None and latest > iteration:  # load() refuses this at start; never overwrite
            raise ConfigError(self._backwards(latest, f"this run is saving iteration {iteration}"))
        record = dataclasses.asdict(run.train_cfg)  # the run's settings, sections nested as in TrainConfig
        path = save_checkpoint(root, iteration=iteration, consumed_samples=consumed, chunks=run.chunks,
                               optimizer=run.optimizer, model_cfg=run.model_cfg,
                               tokenizer=run.train_cfg.data.tokenizer, extra={"train": record})
        log0(f"saved checkpoint {path}")
        if self.cfg.save_retain:
            if dist.get_rank() == 0:  # after the publish: the new checkpoint is complete before any goes
                removed = prune(root, self.cfg.save_retain)
                if removed:
                    log0(f"--save-retain {self.cfg.save_retain}: removed {', '.join(removed)} from {root}")
            dist.barrier()
