"""Stop a run at the first non-finite training loss."""

from __future__ import annotations

import math

import pytorch_lightning as pl

from genframe.errors import TrainingDiverged


class FiniteLossGuard(pl.Callback):
    """Stop at the first NaN or infinite training loss, keeping the last good checkpoint."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
        if not math.isfinite(value):
            raise TrainingDiverged(
                f"training loss became {value} at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step} (batch {batch_idx}); the run stopped. "
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
