"""Every value that can be checked from the config is checked before any work starts, and
a model and data that do not fit are refused by their needs, in every task: exit status
2, one line naming the key, where it was set and the value, no run started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from genframe.cli import main
from genframe.errors import UserError

QUICK = ["trainer.max_steps=1", "trainer.enable_progress_bar=false", "num_samples=0",
         "model.latent_dim=2", "model.block_out_channels=[8,16]"]


def refused(capsys, tmp_path: Path, task: str, *args: str) -> str:
    """Run `genframe TASK ARGS` in this process; assert it was refused before any run
    started; return the error line."""
    run_dir = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    code = main([task, *args, f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("genframe: error:")]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    # Refused before the run started: no checkpoints, no weights, and a run.json (if the
    # failure is recorded) that never named a model or device.
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "model.safetensors").exists()
    if (run_dir / "run.json").exists():
        record = json.loads((run_dir / "run.json").read_text())
        assert "model" not in record and "device" not in record, record
    return lines[0]


def assert_names(line: str, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in line, (fragment, line)


# -- section 1: values checked before any work starts ----------------------------------

@pytest.mark.parametrize("arg", [
    "data.batch_size=0", "data.batch_size=-3", "data.num_workers=-1", "data.num_levels=1",
])
def test_data_numbers_refused_before_training(capsys, tmp_path, arg):
    key, value = arg.split("=")
    line = refused(capsys, tmp_path, "train", arg, *QUICK)
    assert_names(line, key, value, f"command line: {arg}")


@pytest.mark.parametrize("arg,expected", [
    ("seed=abc", "an integer"),
    ("seed=-1", "an integer from 0"),
    ("num_samples=-1", "an integer >= 0"),
    ("monitor_mode=mx", "min or max"),
    ("trainer.max_steps=0", "an integer >= 1, or -1"),
    ("trainer.max_epochs=-2", "0 (no training"),
    ("trainer.limit_train_batches=0", "0 would train nothing"),
    ("trainer.limit_val_batches=1.5", "a share in [0, 1]"),
    ("trainer.accumulate_grad_batches=0", "an integer >= 1"),
    ("trainer.check_val_every_n_epoch=0", "an integer >= 1"),
    ("trainer.gradient_clip_val=-1", "a number >= 0"),
    ("trainer.precision=17", "bf16-mixed"),
    ("trainer.min_epochs=5", "trainer.max_epochs"),
])
def test_top_level_and_trainer_values_refused_first(capsys, tmp_path, arg, expected):
    key = arg.split("=")[0]
    extra = ["trainer.max_epochs=2"] if key == "trainer.min_epochs" else []
    args = [a for a in QUICK if not a.startswith(key + "=")]
    if key == "trainer.max_epochs":
        args = [a for a in args if not a.startswith("trainer.max_steps")]
    line = refused(capsys, tmp_path, "train", *args, *extra, arg)
    assert_names(line, key, "command line", expected)


def test_seed_type_is_named_in_every_task(capsys, tmp_path):
    for task in ("finetune", "evaluate"):
        line = refused(capsys, tmp_path, task, "run=/nonexistent/run", "seed=abc")
        assert_names(line, "seed=abc", "command line")


def test_tpu_accelerator_blames_the_accelerator_not_the_preset(capsys, tmp_path):
    line = refused(capsys, tmp_path, "train", "trainer.accelerator=tpu", *QUICK)
    assert_names(line, "trainer.accelerator=tpu", "command line", "no TPU")
    assert "trainer=cpu:" not in line


def test_unknown_accelerator_lists_the_valid_ones(capsys, tmp_path):
    line = refused(capsys, tmp_path, "train", "trainer.accelerator=cpus", *QUICK)
    assert_names(line, "trainer.accelerator=cpus", "'cpu'")


def test_more_devices_than_the_machine_has(capsys, tmp_path):
    line = refused(capsys, tmp_path, "train", "trainer.devices=8", *QUICK)
    assert_names(line, "trainer.devices=8", "command line", "1 CPU device")


def test_monitor_the_model_never_logs(capsys, tmp_path):
    line = refused(capsys, tmp_path, "train", "monitor=val/los", *QUICK)
    assert_names(line, "monitor=val/los", "command line", "'val/loss'", "It logs:", "val/kl")


def test_monitor_checked_with_early_stopping(capsys, tmp_path):
    line = refused(capsys, tmp_path, "train", "callbacks=early_stopping", "monitor=val/nope", *QUICK)
    assert_names(line, "monitor=val/nope", "val/loss")


def test_callback_monitor_of_its_own(capsys, tmp_path):
    line = refused(capsys, tmp_path, "train", "callbacks.model_checkpoint.monitor=val/nope", *QUICK)
    assert_names(line, "callbacks.model_checkpoint.monitor=val/nope", "command line", "val/loss")


def test_monitor_on_a_training_metric_is_accepted(compose_task):
    from genframe.tasks.train import prepare_training

    cfg = compose_task("train", *QUICK, "monitor=train/loss")
    prepared = prepare_training(cfg)
    assert prepared.model is not None


def test_a_validation_monitor_is_found_without_a_training_step(compose_task, monkeypatch):
    """The usual val/* monitor is found by one validation batch; only a monitor that
    validation does not log (train/loss here) costs the probe a training step."""
    from genframe.tasks.train import prepare_training

    cfg = compose_task("train", *QUICK)
    model_cls = type(prepare_training(cfg).model)
    steps = []
    original = model_cls.training_step
    monkeypatch.setattr(model_cls, "training_step",
                        lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    prepare_training(compose_task("train", *QUICK, "monitor=val/loss"))
    assert steps == []
    prepare_training(compose_task("train", *QUICK, "monitor=train/loss"))
    assert steps == [1]


def test_a_validation_that_needs_fitting_set_up_is_probed_by_fitting(compose_task, monkeypatch):
    """A plugin whose validation needs what on_fit_start sets up still passes the monitor
    check: the validation-only probe fails, the fitting probe finds val/loss."""
    from genframe.tasks.train import prepare_training

    model_cls = type(prepare_training(compose_task("train", *QUICK)).model)
    validation_step = model_cls.validation_step

    def needs_fit(self, *args, **kwargs):
        assert self._fit_started, "on_fit_start has not run"
        return validation_step(self, *args, **kwargs)

    monkeypatch.setattr(model_cls, "_fit_started", False, raising=False)
    monkeypatch.setattr(model_cls, "on_fit_start", lambda self: setattr(self, "_fit_started", True))
    monkeypatch.setattr(model_cls, "validation_step", needs_fit)
    assert prepare_training(compose_task("train", *QUICK)).model is not None


def test_sampling_typo_refused_before_training(capsys, tmp_path):
    line = refused(capsys, tmp_path, "train", "sampling.temprature=1", *QUICK)
    assert_names(line, "sampling.temprature", "'temperature'", "command line")


def test_sampling_value_refused_before_training(capsys, tmp_path):
    line = refused(capsys, tmp_path, "train", "sampling.temperature=abc", *QUICK)
    assert_names(line, "sampling.temperature", "abc")


def test_finetune_lr_is_named(capsys, tmp_path):
    line = refused(capsys, tmp_path, "finetune", "run=/nonexistent/run", "finetune.lr=-1")
    assert_names(line, "finetune.lr=-1", "command line", "> 0")
    assert "hparams" not in line


@pytest.mark.parametrize("arg,expected", [
    ("metrics.num_samples=0", "integer >= 2"),
    ("metrics.batch_size=0", "integer >= 1"),
    ("metrics.k=0", "integer >= 1"),
    ("metrics.extractor=inception", "classifier, timm"),
    ("metrics.real=everything", "all, train, val, test"),
    ("split=train", "test"),
])
def test_evaluate_values_refused_before_loading(capsys, tmp_path, arg, expected):
    line = refused(capsys, tmp_path, "evaluate", "run=/nonexistent/run", arg)
    assert_names(line, arg.split("=")[0], "command line", expected)


def test_sampler_eta_checked_before_the_validation_loop(compose_task):
    from genframe.tasks.build import build_data, build_model
    from genframe.tasks.preflight import check_generation

    cfg = compose_task("evaluate", "sampler=ddim", "sampler.eta=2", "data=digits")
    model = build_model({"name": "diffusion", "in_channels": 1, "image_size": 8, "num_classes": 0,
                         "block_out_channels": [8, 16], "timesteps": 10,
                         "default_sampler_steps": 5},
                        build_data(cfg.data))
    with pytest.raises(UserError, match=r"sampler\.eta.*2"):
        check_generation(cfg, model, num_samples=1)


def test_sample_metrics_callback_values_checked(capsys, tmp_path):
    line = refused(capsys, tmp_path, "train", "callbacks=sample_metrics",
                   "callbacks.sample_metrics.k=0", *QUICK)
    assert_names(line, "callbacks.sample_metrics.k=0")


# -- section 2: a model and data that do not fit --------------------------------------

@pytest.mark.parametrize("args,fits", [
    (["model=transformer", "data=digits"], ["data=text", "experiment=pydoc_char_lm"]),
    (["model=vae", "data=text"], ["data=digits", "experiment=digits_vae"]),
    (["model=diffusion", "data=text"], ["data=digits", "experiment=digits_diffusion"]),
    (["model=transformer_mini", "data=digits"], ["data=text"]),
])
def test_train_refuses_data_by_the_model_needs(capsys, tmp_path, args, fits):
    line = refused(capsys, tmp_path, "train", *args)
    assert "Interpolation" not in line
    model, data = (a.split("=")[1] for a in args)
    assert_names(line, f"model '{model}' needs", f"data '{data}'", "missing", *fits)
