"""The training loop shared by `train` and `finetune`: fit, export, sample, report."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from genframe.errors import TrainingDiverged, UserError
from genframe.files import atomic_write_json
from genframe.loggers import log_config, log_final_metrics, log_samples
from genframe.hardware import is_rank_zero
from genframe.runs import (
    METRICS,
    WEIGHTS,
    record_logger_runs,
    run_lock,
    start_run,
    update_run,
)
from genframe.sample_writer import write_samples
from genframe.tasks.build import build_trainer
from genframe.tasks.common import generation_options, report
from genframe.weights import read_weights, save_weights


@dataclass
class Prepared:
    """What a training task hands the shared loop.

    Attributes:
        model: the model to train (``model_spec`` set).
        data: its data module.
        data_cfg: the resolved data config recorded in run.json.
        lineage: what run.json records about where the run came from.
        before_save: ``before_save(model, out_dir)`` runs once the best weights are back
            in the model and before they are written (LoRA fine-tuning saves its adapters
            and merges there).
    """

    model: Any
    data: Any
    data_cfg: dict[str, Any]
    lineage: dict[str, Any] = field(default_factory=dict)
    before_save: Callable[[Any, Path], None] | None = None


def fit(cfg, prepared: Prepared, *, task: str, ckpt_path: str | None = None,
        continued: bool = False) -> dict[str, Any]:
    """Train the prepared model under `cfg` (from `ckpt_path` when continuing a run), then
    write the best weights, samples and metrics into the run directory.

    The run directory's lock (`genframe.runs.run_lock`) is held while training, so a
    `genframe resume` of a run still being written is refused.

    Args:
        continued: set by `genframe resume`, which continues the run in its own directory,
            holds its lock and has already recorded the continuation in run.json: no
            new run.json is started.

    Returns:
        dict with ``run_dir``, ``metrics``, ``objective`` (the ``monitor`` metric),
        ``model``, ``trainer`` and ``samples``.
    """
    out_dir = Path(cfg.paths.output_dir)
    lock = contextlib.nullcontext() if continued else run_lock(out_dir, key="hydra.run.dir")
    with lock:
        trainer = build_trainer(cfg, prepared.model)
        try:
            return _train_and_report(cfg, trainer, prepared, out_dir, task=task,
                                     ckpt_path=ckpt_path, continued=continued)
        finally:
            finish_logger_runs(trainer)


def finish_logger_runs(trainer) -> None:
    """End the W&B run this task opened (Lightning leaves it open): the next job of a
    sweep in this process, or a later `genframe resume` of this run, opens its own."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


def _train_and_report(cfg, trainer, prepared: Prepared, out_dir: Path, *, task: str,
                      ckpt_path: str | None, continued: bool) -> dict[str, Any]:
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    model, data, data_cfg = prepared.model, prepared.data, prepared.data_cfg
    lineage, before_save = prepared.lineage, prepared.before_save
    # In a multi-process run every rank trains, rank zero alone writes the run directory.
    writer = is_rank_zero()
    if writer and not continued:
        # run.json names the model; its tokenizer (in the spec too) goes to tokenizer.json.
        start_run(out_dir, cfg, task, device=trainer.strategy.root_device, model=model.model_spec,
                  data=data_cfg, **(lineage or {}))
        if getattr(model, "tokenizer", None) is not None:
            model.tokenizer.save(out_dir)
    if writer:
        record_logger_runs(out_dir, trainer)
    log_config(trainer, cfg)
    # A failure or Ctrl-C from here on is recorded in run.json by `genframe.tasks.run`.
    try:
        # weights_only: resuming never unpickles code (Lightning would default to False).
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except TrainingDiverged as exc:
        if writer:
            update_run(out_dir, status="diverged", error=str(exc))
        raise
    except MisconfigurationException as exc:
        raise UserError(f"{exc}".splitlines()[0] + f" (monitor={cfg.monitor})") from exc

    # Read before the final validation below logs it: was the monitor seen while training?
    monitor_seen = cfg.get("monitor") in trainer.callback_metrics
    best = _best_checkpoint(trainer, out_dir)
    if best is not None:  # export and sample from the best weights, not the last ones
        _, state = read_weights(best, where=f"the run's best checkpoint {best}")
        model.load_state_dict(state)
    if before_save is not None and writer:
        before_save(model, out_dir)
    if writer:
        save_weights(model, out_dir / WEIGHTS)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update(_final_validation(trainer, model, data))
    # Lightning also reports `x_step`/`x_epoch` copies of metrics logged both ways.
    metrics = {k: v for k, v in sorted(metrics.items())
               if not k.endswith("_step") and not (k.endswith("_epoch") and k[:-6] in metrics)}

    if not writer:  # the other ranks took part in the validation above; they are done
        return {"run_dir": out_dir, "metrics": metrics, "objective": metrics.get(cfg.get("monitor")),
                "model": model, "trainer": trainer, "samples": None}
    samples = None
    if cfg.num_samples > 0:
        model.eval()
        from genframe.data.base import caption_condition

        samples = model.generate(cfg.num_samples, seed=cfg.seed,
                                 condition=caption_condition(model, data, cfg.num_samples),
                                 **generation_options(cfg, model))
        write_samples(samples, out_dir)
        log_samples(trainer.loggers, samples, trainer.global_step, key="samples/final")
    atomic_write_json(out_dir / METRICS, metrics)
    update_run(out_dir, status="completed", best_checkpoint=str(best) if best else None,
               epochs=trainer.current_epoch, steps=trainer.global_step)
    weights_used = ("the best checkpoint's weights" if best is not None else
                    "the last weights: no checkpoint was chosen as best")
    title = f"final metrics (val/* measured with {weights_used}):"
    if best is None and not monitor_seen and cfg.get("monitor"):
        title = f"{_unseen_monitor(cfg, trainer)}\n{title}"
    report(out_dir, metrics, title)
    monitor = cfg.get("monitor")
    return {"run_dir": out_dir, "metrics": metrics, "objective": metrics.get(monitor),
            "model": model, "trainer": trainer, "samples": samples}


def _final_validation(trainer, model, data) -> dict[str, float]:
    """Validate `model` (the weights the run saved) once more and return its metrics.

    The loggers' curves keep what training measured: this pass (often with an earlier
    step's weights) is logged once as ``final/<key>`` instead of as one more point. Should
    it fail, the loggers are ended as failed, as Lightning ends them when fitting fails.
    """
    loggers, trainer.loggers = trainer.loggers, []
    try:
        val = trainer.validate(model, datamodule=data, verbose=False)
    except BaseException:
        for logger in loggers:
            logger.finalize("failed")
        raise
    finally:
        trainer.loggers = loggers
    final = {k: float(v) for k, v in (val[0] if val else {}).items()}
    log_final_metrics(loggers, final, trainer.global_step)
    return final


def _unseen_monitor(cfg, trainer) -> str:
    """Why no checkpoint was chosen: the monitor was never logged while training."""
    settings = cfg.trainer
    limit = settings.get("limit_val_batches")
    if limit is not None and not isinstance(limit, bool) and limit == 0:
        why = "validation was off (trainer.limit_val_batches=0)"
    elif str(cfg.monitor).startswith("val/"):
        why = (f"no validation ran before training ended at step {trainer.global_step} "
               f"(trainer.val_check_interval={settings.get('val_check_interval')}, "
               f"trainer.check_val_every_n_epoch={settings.get('check_val_every_n_epoch')}): "
               "validate more often or train longer")
    else:
        why = "the model logged no value under that name"
    return f"no best checkpoint: monitor={cfg.monitor} was never logged while training; {why}"


def _best_checkpoint(trainer, out_dir: Path) -> str | None:
    """The best checkpoint of this run; not one a run continued from (``train resume=``
    restores the source run's best path until this run validates)."""
    cb = getattr(trainer, "checkpoint_callback", None)
    path = getattr(cb, "best_model_path", "") if cb is not None else ""
    if not path or not Path(path).exists():
        return None
    return path if Path(path).resolve().is_relative_to(Path(out_dir).resolve()) else None
