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
