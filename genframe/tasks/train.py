"""`genframe train`: fit a model on data (or resume a run)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from genframe.errors import UserError
from genframe.runs import open_run
from genframe.tasks.build import build_data, build_model, check_fit, to_plain
from genframe.tasks.fit import fit

GROUPS = ("data", "model", "trainer", "logger", "callbacks", "experiment", "debug", "paths",
          "finetune")


def train(cfg: DictConfig, *, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train the configured model on the configured data.

    Args:
        cfg: the composed `train` config. ``cfg.resume`` (a run directory of `train` or
            `finetune`) continues that run from its ``last.ckpt`` with its stored config; command-line ``key=value``
            overrides still apply on top (e.g. a larger ``trainer.max_epochs``).
        overrides: the ``key=value`` overrides to apply when resuming; by default the
            command line's (from Hydra).

    Returns:
        dict with ``run_dir``, ``metrics``, ``objective`` (the ``monitor`` metric),
        ``model``, ``trainer`` and ``samples``.
    """
    import pytorch_lightning as pl

    ckpt_path = None
    lineage: dict[str, Any] = {}
    if cfg.get("resume"):
        task = open_run(cfg.resume, key="resume").info.get("task")
        cfg, ckpt_path = _resumed_config(cfg, overrides)
        lineage["resumed_from"] = str(ckpt_path)
        if task == "finetune":  # the same fine-tuning (model, adapters, data), continued
            from genframe.tasks.finetune import finetune

            return finetune(cfg, ckpt_path=ckpt_path, lineage=lineage)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data_cfg = to_plain(cfg.data)
    data = build_data(cfg.data)
    model = build_model(cfg.model, data)
    check_fit(model, data, data_cfg)
    return fit(cfg, model, data, data_cfg, task="train", ckpt_path=ckpt_path, lineage=lineage)


def _resumed_config(cfg: DictConfig, overrides: list[str] | None) -> tuple[DictConfig, str]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run = open_run(cfg.resume, key="resume")
    last = run.checkpoint("last")
    if last is None:
        raise UserError(f"resume={cfg.resume}: the run has no checkpoints/last.ckpt to resume from")
    stored = run.config
    if overrides is None:
        try:
            overrides = list(HydraConfig.get().overrides.task)
        except ValueError:  # not inside a Hydra run
            overrides = []
    overrides = [o for o in overrides if not o.startswith("resume=")]
    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.key_or_group
        if key in GROUPS:
            raise UserError(
                f"resume keeps the run's config groups; '{ov.input_line}' would change them. "
                "Change values with key=value (e.g. trainer.max_epochs=200)."
            )
        if ov.is_delete():
            OmegaConf.update(stored, key, None, force_add=True)
        else:
            OmegaConf.update(stored, key, ov.value(), force_add=ov.is_add() or ov.is_force_add())
    stored.paths = cfg.paths  # the new run directory
    stored.resume = str(run.path)
    return stored, str(last)
