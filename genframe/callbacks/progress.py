"""One plain progress line every N optimizer steps, for output that is not a terminal.

Lightning's progress bars redraw one line in place: in CI, under ``nohup`` or with the
output sent to a log file, that shows nothing useful for minutes (or a wall of carriage
returns). `ProgressLine` prints whole lines instead, such as::

    [progress] epoch 0 | step 150/1000 (15%) | train/loss 0.4213 | 3.21 steps/s, 205 items/s | elapsed 0:00:47, left 0:04:25

Written by hand because no Lightning callback does this: its bars (tqdm, rich) only draw
in place, and loggers write files, not the console.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch

from genframe.errors import UserError, did_you_mean

WHEN = ("auto", "always", "never")
KEY = "callbacks.progress"  # the config node of conf/callbacks/default.yaml, for messages
MAX_VALUES = 4  # train/* values per line


class ProgressLine(pl.Callback):
    """Print a progress line every `every_n_steps` optimizer steps, and one at the end.

    Each line has the epoch, the step (of the total when it is known: ``max_steps`` or
    Lightning's ``estimated_stepping_batches``), the latest training losses the model
    logged (up to four ``train/*`` keys that name a loss, ``train/loss`` first: a GAN's
    ``train/d_loss`` and ``train/g_loss`` too; other ``train/*`` keys when none does), the
    speed in steps/s (and items/s over all ranks, when the batches' size can be read), the
    time elapsed and an estimate of the time left. Lines go to standard output, from the
    global rank zero only, and are flushed one by one.

    The values are the ones the model already logged, read from
    ``trainer.callback_metrics`` only on the steps that print: nothing is computed,
    gathered or synchronised on the other steps.

    Args:
        every_n_steps: optimizer steps between two lines (``trainer.global_step``, which
            counts every optimizer of a manually optimised model, e.g. a GAN's two).
        when: ``"auto"``: only when standard output is not a terminal (CI, ``nohup``, a
            log file; a terminal has Lightning's progress bar); ``"always"``; ``"never"``.
    """

    def __init__(self, every_n_steps: int = 50, when: str = "auto") -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise UserError(
                f"{KEY}.every_n_steps must be a whole number of optimizer steps, at least 1; "
                f"got {every_n_steps!r}"
            )
        if when not in WHEN:
            raise UserError(
                f"{KEY}.when={when}: expected one of {', '.join(WHEN)}.{did_you_mean(str(when), WHEN)}"
            )
        self.every_n_steps = every_n_steps
        self.when = when
        self._active = False
        self._reset()

    def _reset(self) -> None:
        self._start_time = 0.0
        self._start_step = 0
        self._last_printed = -1
        self._batches = 0
        self._epoch = 0  # of the latest batch: after the last one Lightning counts one more
        self._items: int | None = 0  # None once a batch's size could not be read

    # -- Lightning hooks ------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self._active = trainer.is_global_zero and self._wanted()
        self._start_time = time.monotonic()
        self._start_step = trainer.global_step
        self._epoch = trainer.current_epoch
        self._last_printed = trainer.global_step  # a resumed run prints from its next multiple

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._active:
            return
        self._batches += 1
        self._epoch = trainer.current_epoch
        if self._items is not None:
            n = batch_size_of(batch)
            self._items = None if n is None else self._items + n
        step = trainer.global_step
        # `//` rather than `%`: a step count may jump past a multiple (a GAN steps twice a batch).
        if step // self.every_n_steps > self._last_printed // self.every_n_steps:
            self._last_printed = step
            self._print(trainer, pl_module, final=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            self._print(trainer, pl_module, final=True)
        self._active = False

    # -- the line -----------------------------------------------------------------------

    def _wanted(self) -> bool:
        if self.when == "never":
            return False
        if self.when == "always":
            return True
        isatty = getattr(sys.stdout, "isatty", None)
        try:
            return not (isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def _print(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, final: bool) -> None:
        step = trainer.global_step
        elapsed = time.monotonic() - self._start_time
        done = step - self._start_step
        total = self._total_steps(trainer, pl_module)

        where = f"epoch {self._epoch} | step {step}"
        if total and not final:
            where += f"/{total} ({100 * step / total:.0f}%)"
        parts = ["[progress] " + ("done: " if final else "") + where]
        values = train_values(trainer.callback_metrics)
        if values:
            parts.append(", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        if elapsed > 0 and done > 0:
            speed = f"{done / elapsed:.3g} steps/s"
            if self._items:  # every rank reads batches of the same size
                speed += f", {self._items * trainer.world_size / elapsed:.4g} items/s"
            parts.append(speed)
        timing = f"elapsed {_duration(elapsed)}"
        if not final and total and done > 0 and total > step:
            timing += f", left {_duration((total - step) * elapsed / done)}"
        parts.append(timing)
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def _total_steps(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int | None:
        """The run's last optimizer step, or None when it cannot be known (no max_steps,
        no max_epochs or an iterable data set without length)."""
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if getattr(pl_module, "automatic_optimization", True):
            try:
                total = trainer.estimated_stepping_batches
            except Exception:  # noqa: BLE001 -- Lightning cannot estimate it for this setup
                total = max_steps
        else:
            # Lightning's estimate counts batches, while global_step counts every
            # optimizer.step() of a manually optimised model (a GAN's D and G steps):
            # scale the batches by the steps seen per batch so far.
            batches, epochs = trainer.num_training_batches, trainer.max_epochs
            total = None
            if self._batches and epochs is not None and epochs > 0 and math.isfinite(batches):
                per_batch = (trainer.global_step - self._start_step) / self._batches
                total = round(batches * epochs * per_batch)
            if max_steps is not None:
                total = min(total, max_steps) if total else max_steps
        if total is None or not math.isfinite(total) or total <= 0:
            return None
        return int(total)


def train_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The training values to show: ``train/*loss*`` keys (``train/loss`` first), else
    any ``train/*`` keys; a key logged per step and per epoch shows its latest step value."""
    values: dict[str, float] = {}
    # A key logged per step and per epoch is there three times (`k`, `k_step`, `k_epoch`):
    # the `_step` value, read last, is the latest.
    keys = sorted((k for k in metrics if k.startswith("train/") and not k.endswith("_epoch")),
                  key=lambda k: k.endswith("_step"))
    for key in keys:
        value = metrics[key]
        if torch.is_tensor(value):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)):
            values[key.removesuffix("_step")] = float(value)
    losses = {k: v for k, v in values.items() if "loss" in k}
    chosen = losses or values
    order = sorted(chosen, key=lambda k: (k != "train/loss", k))
    return {k: chosen[k] for k in order[:MAX_VALUES]}


def batch_size_of(batch: Any) -> int | None:
    """Items in a genframe batch (a dict of tensors and lists), or None if unknown."""
    if torch.is_tensor(batch):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, Mapping):
        for key in ("image", "tokens", "label", "caption"):  # the agreed keys first
            if key in batch:
                return batch_size_of(batch[key])
        for value in batch.values():
            n = batch_size_of(value)
            if n is not None:
                return n
        return None
    if isinstance(batch, (list, tuple)) and batch:
        return len(batch) if isinstance(batch[0], str) else batch_size_of(batch[0])
    return None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class SplitProgressBar(pl.callbacks.TQDMProgressBar):
    """Lightning's progress bar, naming the split a ``trainer.validate`` pass runs over
    (`genframe evaluate split=test` runs the validation step over the test split, which
    Lightning's own bar would call "Validation")."""

    def __init__(self, split: str) -> None:
        super().__init__()
        self.split = split

    @property
    def validation_description(self) -> str:
        return f"Evaluating ({self.split} split)"


class RichProgressBar(pl.callbacks.RichProgressBar):
    """Lightning's rich progress bar, without an epoch total when the epochs are
    unbounded (``max_epochs=-1``, a run limited by ``max_steps``): Lightning 2.6 shows
    ``Epoch 3/-2`` there (its fix, Lightning-AI/pytorch-lightning#21924, ships in 2.7)."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        # Padded to the validation bar's description, as Lightning's (no flicker).
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"
