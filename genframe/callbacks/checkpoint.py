"""Checkpoints a run can be continued from exactly.

- `LastCheckpoint`: ``checkpoints/last.ckpt`` after every epoch, and also every N
  optimizer steps or N minutes, so a long run killed mid-epoch loses little.
- `ResumeState`: what Lightning does not keep in a checkpoint but an exact continuation
  needs (the random number generators), and the run's configured optimiser settings put
  back after Lightning restored the old ones (a new ``model.lr``, a longer schedule).
- `AtomicCheckpointIO`: every ``.ckpt`` written aside in its own folder, flushed and
  renamed into place, so a kill never leaves a torn checkpoint under its name.

The data loader's position inside an epoch is saved by Lightning itself when the training
loader is stateful (`genframe.data.base.GenerativeDataModule` uses torchdata's
``StatefulDataLoader``).
"""

from __future__ import annotations

import copy
import logging
import random
import time
import types
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from genframe.errors import UserError
from genframe.files import atomic_write

log = logging.getLogger("genframe")

#: What the training loader's saved position is (`genframe.data.base.EpochShuffle` in
#: torchdata's ``StatefulDataLoader``); a checkpoint with another is not restored into it.
LOADER_STATE = "StatefulDataLoader+EpochShuffle/1"


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``: the state after the latest epoch (what Lightning's
    ModelCheckpoint saves with ``monitor=None``) and at the end of training, and also
    every `every_n_steps` optimizer steps and every `every_n_minutes` minutes of
    training, whichever comes first. A checkpoint saved mid-epoch holds the data loader's position, so a run
    continued from it sees the same batches as one that never stopped.

    Args:
        dirpath: the folder (``<run dir>/checkpoints``).
        every_n_steps: also save after every N optimizer steps (a positive integer), or
            None.
        every_n_minutes: also save when this many minutes (> 0) have passed since the last
            save, checked after each step, or None.
        filename: the checkpoint's name without ``.ckpt``.

    Raises:
        UserError: `every_n_steps` or `every_n_minutes` out of range.
    """

    def __init__(self, dirpath: str, every_n_steps: int | None = None,
                 every_n_minutes: float | None = None, filename: str = "last") -> None:
        if every_n_steps is not None and (isinstance(every_n_steps, bool)
                                          or not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise UserError("callbacks.checkpoint.every_n_steps must be a positive integer or "
                            f"null, got {every_n_steps!r}")
        if every_n_minutes is not None and (isinstance(every_n_minutes, bool) or not isinstance(
                every_n_minutes, (int, float)) or not every_n_minutes > 0):
            raise UserError("callbacks.checkpoint.every_n_minutes must be a number > 0 or null, "
                            f"got {every_n_minutes!r}")
        super().__init__(dirpath=dirpath, filename=filename, monitor=None, save_top_k=1,
                         enable_version_counter=False)
        self.every_n_steps = every_n_steps
        self.every_n_minutes = every_n_minutes
        self._last_time = time.monotonic()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(filename=self.filename)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_time = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if step == self._last_global_step_saved or trainer.sanity_checking:
            return
        due = bool(self.every_n_steps and step % self.every_n_steps == 0)
        if self.every_n_minutes:
            elapsed = time.monotonic() - self._last_time >= 60 * self.every_n_minutes
            # Every rank must agree, or only some would enter the collective save.
            due = due or bool(trainer.strategy.broadcast(elapsed))
        if due:
            self._save_checkpoint(trainer, self.format_checkpoint_name({}))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run that stops on trainer.max_steps mid-epoch has no epoch end to save at.
        if trainer.global_step != self._last_global_step_saved and not trainer.sanity_checking:
            self._save_checkpoint(trainer, self.format_checkpoint_name({}))

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # What the loggers buffered up to here reaches disk with the checkpoint, so a run
        # killed later and continued from it keeps its log up to this step.
        for logger in trainer.loggers:
            logger.save()
        super()._save_checkpoint(trainer, filepath)
        self._last_time = time.monotonic()


class ResumeState(pl.Callback):
    """Makes a continued run follow the uninterrupted one, and lets new settings given on
    resume take effect. Every genframe trainer has it (added by `build_trainer`).

    - Saves the random number generators (Python, NumPy, torch CPU and CUDA) in every
      checkpoint and restores them when training continues, after Lightning's sanity
      check, so noise draws (a VAE's sampling, a diffusion model's timesteps, dropout) go
      on as if the run never stopped. Single-process runs only: in a multi-process run
      each rank is seeded with the run's seed and its rank when training starts
      (`seed_rank`), so the ranks draw different noise; a continued multi-process run
      seeds them so again (its noise is not the uninterrupted run's).
    - Lightning restores the optimisers' hyperparameters and the schedulers' state from
      the checkpoint, which would silently keep the old ``lr`` and an old schedule length
      (a warm-up/cosine schedule built for the old ``trainer.max_steps``). The settings
      the model's ``configure_optimizers`` made for this run are put back instead,
      keeping the restored step counts and moment estimates; for schedules of the
      ``LambdaLR`` kind the learning rate is recomputed for the restored step.
    """

    def __init__(self) -> None:
        self._rng: dict[str, Any] | None = None
        self._configured: list[dict[str, Any]] = []
        self._train_size: int | None = None
        self._world_size = 1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._train_size = _train_size(trainer)
        self._world_size = trainer.world_size

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # The loader's saved position only means something for the same training set: a
        # run resumed on other data (a new run from `train resume=`) starts its epoch anew.
        # A position saved by another kind of loader (an older genframe's) cannot be read
        # by this one either.
        saved = checkpoint.get("callbacks", {}).get(self.state_key) or {}
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
        if "combined_loader" not in fit_loop:
            return
        processes = saved.get("world_size", 1)
        if processes != self._world_size:
            # Each rank's position counts its own share of the epoch's order: with another
            # number of processes the shares differ, and so does the global batch.
            log.warning("the run trained on %d process(es) and continues on %d: the global "
                        "batch changes, and the continuation is not the uninterrupted run",
                        processes, self._world_size)
        if saved.get("loader") != LOADER_STATE:
            why = "was saved by another kind of data loader"
        elif processes != self._world_size:
            why = f"is a share of the epoch for {processes} process(es), now {self._world_size}"
        elif saved.get("train_size") != self._train_size:
            why = (f"is of other training data ({saved.get('train_size')} items, now "
                   f"{self._train_size})")
        else:
            return
        del fit_loop["combined_loader"]
        log.warning("the checkpoint's data-loader position %s: the loader starts a new pass "
                    "of the training data", why)

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {"train_size": self._train_size, "world_size": self._world_size,
                "loader": LOADER_STATE, "rng": {
            "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      int(np_state[2]), int(np_state[3]), float(np_state[4])),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng = state_dict.get("rng")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Optimisers are configured, the checkpoint's training state not yet restored.
        self._configured = [_settings(opt) for opt in trainer.optimizers]
        for config in trainer.lr_scheduler_configs:
            for entry, opt in zip(self._configured, trainer.optimizers):
                if config.scheduler.optimizer is opt:
                    entry["scheduler"] = _scheduler_settings(config.scheduler)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            seed_rank(trainer.global_rank)
        if trainer.ckpt_path is None:
            return
        for opt, settings in zip(trainer.optimizers, self._configured):
            _restore_settings(opt, settings)
        self._configured = []
        # One process's generators are saved (rank zero's); restoring them on every rank
        # of a multi-process run would make the ranks draw the same noise.
        if self._rng is not None and trainer.world_size == 1:
            rng, self._rng = self._rng, None
            random.setstate(_tuples(rng["python"]))
            kind, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])


def seed_rank(rank: int) -> None:
    """Seed Python's, NumPy's and torch's generators with the run's seed + `rank`.

    Every process of a distributed run was seeded with the same ``seed`` (so all build
    the same initial weights); for training each must draw its own noise (a VAE's
    samples, a diffusion model's timesteps and noise, dropout masks), or the ranks would
    repeat one another's draws on different items. Called once the data loaders exist,
    whose order comes from the seed itself (`genframe.data.base.EpochShuffle`).
    """
    import os

    seed = (int(os.environ.get("PL_GLOBAL_SEED", "0")) + 1_000_003 * rank) % 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

def _train_size(trainer: pl.Trainer) -> int | None:
    dataset = getattr(getattr(trainer, "datamodule", None), "train_set", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # an iterable dataset
        return None


def _tuples(value: Any) -> Any:
    """`random.setstate` wants tuples; a checkpoint may hand lists back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def _settings(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
              for g in optimizer.param_groups]
    return {"groups": groups, "scheduler": None}


def _scheduler_settings(scheduler: Any) -> dict[str, Any]:
    lambdas = getattr(scheduler, "lr_lambdas", None) or []
    return {
        "base_lrs": list(getattr(scheduler, "base_lrs", [])),
        # A callable object's attributes (a schedule's total steps) are what LambdaLR's
        # load_state_dict overwrites; plain functions keep no state.
        "lambdas": [None if isinstance(fn, types.FunctionType) or not hasattr(fn, "__dict__")
                    else copy.deepcopy(vars(fn)) for fn in lambdas],
        "object": scheduler,
    }


def _restore_settings(optimizer: torch.optim.Optimizer, settings: dict[str, Any]) -> None:
    """Put the configured hyperparameters back into `optimizer` (after Lightning loaded the
    checkpoint's), and its scheduler's base rates and schedule; recompute ``lr``."""
    if len(settings["groups"]) != len(optimizer.param_groups):
        return  # another grouping: the checkpoint's state is all there is
    for group, configured in zip(optimizer.param_groups, settings["groups"]):
        group.update({k: v for k, v in configured.items() if k != "lr"})
    sched = settings["scheduler"]
    if sched is None:  # a constant rate: the configured one
        for group, configured in zip(optimizer.param_groups, settings["groups"]):
            group["lr"] = configured["lr"]
        return
    scheduler = sched["object"]
    if sched["base_lrs"]:
        scheduler.base_lrs = list(sched["base_lrs"])
    for fn, attrs in zip(getattr(scheduler, "lr_lambdas", []), sched["lambdas"]):
        if attrs is not None:
            fn.__dict__.update(attrs)
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        rates = [base * fn(scheduler.last_epoch)
                 for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    elif hasattr(scheduler, "_get_closed_form_lr"):
        rates = scheduler._get_closed_form_lr()
    else:  # a chained schedule: its restored rate is the only one known
        return
    for group, lr in zip(optimizer.param_groups, rates):
        group["lr"] = lr
    scheduler._last_lr = list(rates)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing each ``.ckpt`` aside in the target folder,
    fsynced and renamed into place (`genframe.files.atomic_write`): Lightning's own writer
    stages the file in the system's temporary folder, and when that is another
    filesystem the final move is a copy that a kill can tear."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))
