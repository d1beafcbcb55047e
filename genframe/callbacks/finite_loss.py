"""Stop a run at the first non-finite training loss."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from genframe.errors import TrainingDiverged


class FiniteLossGuard(pl.Callback):
    """Stop at the first NaN or infinite training loss, keeping the last good checkpoint.

    On the CPU the loss is read every step (free: the step has finished). On an
    accelerator, reading it would make the host wait for the device every step, so the
    check runs on the device (a flag and the first bad step, no transfer) and the host
    reads the flag every `every` steps, at the end of each epoch and before any
    checkpoint is written, so a non-finite model is never saved.

    Args:
        every: steps between the host's reads of the flag on an accelerator.
        read_every_step_on: device types whose loss is read every step (those where the
            step has finished when it returns).
    """

    def __init__(self, every: int = 50, read_every_step_on: tuple[str, ...] = ("cpu",)) -> None:
        self.every = every
        self.read_every_step_on = read_every_step_on
        self._first_bad: torch.Tensor | None = None  # step of the first bad loss, or -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        if not torch.is_tensor(loss) or loss.device.type in self.read_every_step_on:
            value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
            if not math.isfinite(value):
                self._stop(trainer, value, trainer.global_step, batch_idx)
            return
        with torch.no_grad():
            step = torch.full((), trainer.global_step, device=loss.device, dtype=torch.long)
            bad = ~torch.isfinite(loss.detach().float())
            if self._first_bad is None:
                self._first_bad = torch.full((), -1, device=loss.device, dtype=torch.long)
            self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)
        if trainer.global_step % self.every == 0:
            self._read(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._read(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._read(trainer)

    def _read(self, trainer) -> None:
        """The host reads the device's flag (one transfer)."""
        if self._first_bad is None:
            return
        first = int(self._first_bad)
        if first >= 0:
            self._stop(trainer, float("nan"), first, None)

    def _stop(self, trainer, value: float, step: int, batch_idx: int | None) -> None:
        where = f"batch {batch_idx}" if batch_idx is not None else "read on the device"
        raise TrainingDiverged(
            f"training loss became {'non-finite' if batch_idx is None else value} at epoch "
            f"{trainer.current_epoch}, step {step} ({where}); the run stopped. "
            f"{_kept(trainer)}; try a lower learning rate or gradient clipping "
            "(trainer.gradient_clip_val=1.0)."
        )


def _kept(trainer) -> str:
    """What the run keeps: its last good checkpoint, when one was written before."""
    from pathlib import Path

    saved = sorted({Path(cb.last_model_path or cb.best_model_path) for cb in trainer.checkpoint_callbacks
                    if (cb.last_model_path or cb.best_model_path)
                    and Path(cb.last_model_path or cb.best_model_path).exists()})
    if saved:
        return "The last good checkpoint is kept: " + ", ".join(str(p) for p in saved)
    return "No checkpoint had been written yet, so there is nothing to keep"
