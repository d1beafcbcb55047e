"""Every shipped choice of every group is composed and run (tiny and fast, on CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from genframe.config import conf_dir, config_groups
from tests.conftest import FAST, FAST_TRAINING

GROUPS = config_groups()


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_experiment_runs(experiment, compose_task):
    from genframe.tasks.train import prepare_training, train

    # The fast settings and the model's registered tiny preset come after the experiment,
    # so the run stays tiny while the experiment's choices (data, model, ...) hold.
    from genframe.config import compose
    from genframe.plugins import get_registry

    model = compose("train", [f"experiment={experiment}"]).model.name
    tiny = [f"model.{k}={_override(v)}" for k, v in (get_registry().model(model).tiny or {}).items()
            if k not in ("in_channels", "image_size", "num_classes", "num_levels",
                         "vocab_size", "block_size", "attention_resolutions")]
    overrides = [*FAST_TRAINING, *tiny]
    if "attention_resolutions" in (get_registry().model(model).tiny or {}):
        overrides.append("model.attention_resolutions=null")  # the lowest level of any size
    if "sample_metrics" in str(compose("train", [f"experiment={experiment}"]).get("callbacks")):
        overrides.append("callbacks.sample_metrics.num_samples=20")
    composed = compose("train", [f"experiment={experiment}"])
    needs_ae = "genframe.required" in str(OmegaConf.to_container(composed.model, resolve=False).get("autoencoder"))
    if needs_ae:  # a latent diffusion experiment: a tiny autoencoder on its data first
        ae = train(compose_task("train", f"data={composed.data.name}", "model=autoencoder",
                                "model.block_out_channels=[8,16]", "model.latent_channels=2",
                                *FAST_TRAINING))
        overrides.append(f"model.autoencoder={ae['run_dir']}")
    result = train(compose_task("train", f"experiment={experiment}", *overrides))
    # The same config and seed, built but not trained: the untrained weights.
    untrained = prepare_training(compose_task("train", f"experiment={experiment}", *overrides))
    # The run used the model and data the experiment's YAML pins (read here, not composed)...
    pinned = {}
    for entry in OmegaConf.load(conf_dir() / "experiment" / f"{experiment}.yaml").defaults:
        for key, choice in (entry.items() if isinstance(entry, DictConfig) else ()):
            pinned[key.removeprefix("override").strip().strip("/")] = choice
    info = json.loads((result["run_dir"] / "run.json").read_text())
    assert info["status"] == "completed"
    assert (info["model"]["name"], info["data"]["name"]) == (pinned["model"], pinned["data"]), info
    # ... and trained: its parameters moved away from the same seed's untrained ones (not
    # buffers: BatchNorm statistics move without training; not val/loss: a VAE's or GAN's
    # draws noise), and val/loss is finite.
    start = dict(untrained.model.named_parameters())
    end = dict(result["model"].named_parameters())
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start), "no parameter changed in training"
    assert math.isfinite(result["metrics"]["val/loss"]), result["metrics"]


def _override(value) -> str:
    """A Python value as Hydra override syntax."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return str(value)


@pytest.mark.parametrize("debug", GROUPS["debug"])
def test_debug_preset_runs(debug, compose_task):
    from genframe.tasks.train import train

    overrides = [o for o in FAST if not o.startswith("trainer.")] + ["trainer.enable_progress_bar=false"]
    if debug == "overfit":
        overrides.append("trainer.max_epochs=2")
    result = train(compose_task("train", f"debug={debug}", *overrides))
    assert (result["run_dir"] / "model.safetensors").exists()


@pytest.mark.parametrize("logger", GROUPS["logger"])
def test_logger_writes_under_the_run_dir(logger, compose_task):
    from genframe.tasks.train import train

    result = train(compose_task("train", f"logger={logger}", *FAST))
    logs = result["run_dir"] / "logs"
    expected = {"csv": ["csv/metrics.csv"], "tensorboard": ["tensorboard"],
                "many": ["csv/metrics.csv", "tensorboard", "mlflow/mlflow.db"],
                "mlflow": ["mlflow/mlflow.db"], "wandb": ["wandb"], "none": []}[logger]
    for rel in expected:
        assert (logs / rel).exists(), rel
    if logger == "none":
        assert not logs.exists()
    if "tensorboard" in expected:
        assert list((logs / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("callbacks", GROUPS["callbacks"])
def test_callbacks_preset_runs(callbacks, compose_task):
    from genframe.tasks.train import train

    bar = "true" if callbacks == "rich" else "false"  # the rich preset brings a progress bar
    run = FAST
    if callbacks == "alignment":  # text-to-image on shapes captions only
        from tests.test_text2image import TINY_DATA, TINY_T2I

        run = [*FAST_TRAINING, *TINY_DATA, *TINY_T2I, "callbacks.alignment.num_prompts=2",
               "callbacks.alignment.steps=2"]
    result = train(compose_task("train", f"callbacks={callbacks}", *run, f"trainer.enable_progress_bar={bar}"))
    has_ckpt = (result["run_dir"] / "checkpoints" / "last.ckpt").exists()
    assert has_ckpt == (callbacks != "none")
    assert (result["run_dir"] / "model.safetensors").exists()


@pytest.mark.parametrize("trainer", ["cpu", "auto"])
def test_trainer_preset_runs_on_cpu(trainer, compose_task):
    from genframe.tasks.train import train

    result = train(compose_task("train", f"trainer={trainer}", *FAST))
    assert result["trainer"].precision == "32-true"  # tiny model: no bf16 casts


def test_conflicting_trainer_settings_are_a_user_error(compose_task):
    from genframe.errors import UserError
    from genframe.tasks.train import train

    cfg = compose_task("train", "callbacks=rich", *FAST)  # FAST turns the progress bar off
    with pytest.raises(UserError, match="enable_progress_bar"):
        train(cfg)


@pytest.mark.parametrize("model", ["transformer", "transformer_mini", "transformer_small"])
def test_a_language_model_brings_text_data_unless_data_is_chosen(model, compose_task):
    """`genframe train model=transformer` trains on text (the model YAML's defaults list);
    a data choice on the command line wins, in either order."""
    assert compose_task("train", f"model={model}").data.name == "text"
    assert compose_task("train", f"model={model}", "data=chat").data.name == "chat"
    assert compose_task("train", "data=digits", f"model={model}").data.name == "digits"
    assert compose_task("train").data.name == "digits"  # the image models keep theirs
