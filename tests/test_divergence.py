"""A non-finite loss stops the run with a clear message and keeps the last good checkpoint."""

from __future__ import annotations

import json

import pytest

from genframe import plugins
from genframe.errors import TrainingDiverged
from genframe.hookspecs import hookimpl
from tests.conftest import FAST


class _NaNPlugin:
    @staticmethod
    @hookimpl
    def genframe_register_models(register):
        register("nan_vae", "tests.support:NaNAfterFirstEpoch")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(compose_task):
    from genframe.tasks.train import train
    from genframe.weights import read_weights

    plugins.add_plugin("nan", _NaNPlugin)
    try:
        cfg = compose_task("train", "model.name=nan_vae", *FAST, "trainer.max_epochs=3")
        with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1"):
            train(cfg)
    finally:
        plugins.remove_plugin("nan")
    run_dir = cfg.paths.output_dir
    info = json.load(open(f"{run_dir}/run.json"))
    assert info["status"] == "diverged"
    spec, state = read_weights(f"{run_dir}/checkpoints/last.ckpt")
    assert spec.name == "nan_vae"
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())


def test_on_an_accelerator_the_loss_is_checked_on_the_device_and_read_before_saving():
    from types import SimpleNamespace

    import torch

    from genframe.callbacks import FiniteLossGuard

    guard = FiniteLossGuard(every=50, read_every_step_on=())  # the accelerator's path, on the CPU
    trainer = SimpleNamespace(global_step=0, current_epoch=0, checkpoint_callbacks=[])
    for step, value in enumerate([1.0, 0.5, float("nan"), 0.4, float("inf")], start=1):
        trainer.global_step = step
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(value)}, None, step)
    with pytest.raises(TrainingDiverged, match="step 3 "):  # the first bad one, read before saving
        guard.on_save_checkpoint(trainer, None, {})
    fine = FiniteLossGuard(every=2, read_every_step_on=())
    for step in range(1, 5):
        trainer.global_step = step
        fine.on_train_batch_end(trainer, None, {"loss": torch.tensor(1.0)}, None, step)
    fine.on_save_checkpoint(trainer, None, {})
    fine.on_train_epoch_end(trainer, None)
