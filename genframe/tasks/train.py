"""`genframe train`: fit a model on data (or continue a run with ``resume=DIR``)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from genframe.tasks.build import build_data, build_model, check_fit, to_plain
from genframe.tasks.fit import Prepared, fit
from genframe.tasks.preflight import (
    check_data_choice,
    check_generation,
    check_monitor,
    check_task_config,
    resolved_model_config,
)
from genframe.tasks.resume import resolve_resume


def train(cfg: DictConfig, *, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train the configured model on the configured data.

    Args:
        cfg: the composed `train` config. ``cfg.resume`` (a run directory of `train` or
            `finetune`) starts a new run that continues that one from its ``last.ckpt``
            with its stored config (see `genframe.tasks.resume`); command-line
            ``key=value`` overrides still apply on top (e.g. a larger ``trainer.max_epochs``).
        overrides: the ``key=value`` overrides to apply when resuming; by default the
            command line's (from Hydra).

    Returns:
        dict with ``run_dir``, ``metrics``, ``objective`` (the ``monitor`` metric),
        ``model``, ``trainer`` and ``samples``.
    """
    if not cfg.get("resume"):
        return fit(cfg, prepare_training(cfg), task="train")
    resumed = resolve_resume(cfg, overrides)
    return fit(resumed.cfg, resumed.prepare(), task=resumed.task, ckpt_path=resumed.ckpt_path)


def prepare_training(cfg: DictConfig, *, tokenizer: Any = None) -> Prepared:
    """The data and a new model of a `train` config, checked against each other.

    Every check runs here, before any training: the config's values
    (`genframe.tasks.preflight.check_task_config`), the model's needs against the
    data, the sampling options and the ``monitor`` metric.

    Args:
        tokenizer: text data tokenises with this one instead of training its own (a
            resumed run keeps the ids its weights were trained on).
    """
    import pytorch_lightning as pl

    check_task_config(cfg, "train")  # every value, before anything is read or built
    check_data_choice(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data_cfg = to_plain(cfg.data)
    data = build_data(cfg.data)
    if tokenizer is not None:
        data.use_tokenizer(tokenizer)
    model = build_model(resolved_model_config(cfg), data)
    check_fit(model, data, data_cfg)
    check_reference = getattr(data, "check_reference", None)
    if check_reference is not None:  # preference pairs need the model training starts from
        check_reference()
    check_generation(cfg, model)  # sampling.* now, not after the whole training
    check_monitor(cfg, model, data)
    return Prepared(model=model, data=data, data_cfg=data_cfg)
