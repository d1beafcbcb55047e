"""Fixed-noise sample grids written during training (any model that can `generate()`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from genframe.errors import UserError
from genframe.loggers import log_samples


class SampleGrid(pl.Callback):
    """Every `every_n_epochs` training epochs, generate `num_samples` samples with a fixed
    seed (the same noise every time, so epochs compare) and write them with
    `genframe.sample_writer.write_samples` into ``<root>/samples/epoch_XXX/``: one file
    per sample, ``grid.png`` and ``manifest.jsonl`` (seed, condition, model per sample).

    ``<root>`` is the trainer's ``default_root_dir`` (genframe sets it to the run
    directory). The grid (or the texts) also goes to every logger that takes images or
    texts (TensorBoard, W&B, MLflow) under ``samples/grid``, at the global step (see
    `genframe.loggers.log_samples`). Only rank zero writes and logs. Works for any
    `GenerativeModule`; a text model gets ``.txt`` files instead of a grid.

    Args:
        every_n_epochs: how often, in training epochs (epoch 0-based index + 1 divisible
            by it); must be >= 1.
        num_samples: samples per grid.
        seed: the seed passed to ``generate`` (fixed noise).
    """

    def __init__(self, every_n_epochs: int, num_samples: int = 64, seed: int = 0) -> None:
        checks = (("every_n_epochs", every_n_epochs, 1), ("num_samples", num_samples, 1),
                  ("seed", seed, 0))
        for key, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"SampleGrid.{key} must be an integer >= {low}, got {value!r}")
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.seed = seed
        #: The folders written so far (rank zero), oldest first.
        self.written: list[Path] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        # generate() runs on every rank (a model may sync inside it); only rank zero writes.
        from genframe.data.base import caption_condition

        condition = caption_condition(pl_module, trainer.datamodule, self.num_samples)
        samples = pl_module.generate(self.num_samples, condition=condition, seed=self.seed)
        samples.metadata = {**samples.metadata, "epoch": trainer.current_epoch}
        self._write(trainer, samples)

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, samples) -> None:
        from genframe.sample_writer import write_samples

        root = Path(trainer.default_root_dir) / "samples"
        target = root / f"epoch_{trainer.current_epoch:03d}"
        root.mkdir(parents=True, exist_ok=True)
        # Write into a temporary folder beside the target and rename it into place, so an
        # epoch folder is either complete or absent (a rerun of the same epoch after a
        # resume replaces it).
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
        try:
            write_samples(samples, folder=tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.written.append(target)
        log_samples(trainer.loggers, samples, trainer.global_step, key="samples/grid")
