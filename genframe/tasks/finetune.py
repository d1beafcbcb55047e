"""`genframe finetune`: continue from trained weights, optionally on new data."""

from __future__ import annotations

import fnmatch
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError, valid_list
from genframe.tasks.build import to_plain, trained_model_and_data
from genframe.tasks.fit import fit


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune a trained model.

    Args:
        cfg: the composed `finetune` config: ``run`` or ``ckpt`` to start from, ``data``
            (default: the data of that run), ``finetune.lr`` (a new learning rate) and
            ``finetune.freeze`` (parameter-name patterns such as ``"encoder.*"``).

    Returns:
        As `genframe.tasks.train.train`; the run records where it started from.
    """
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model, run, weights, data, data_cfg = trained_model_and_data(cfg, "finetune")

    lr = cfg.finetune.lr
    if lr is not None:
        if "lr" not in model.hparams:
            raise UserError(f"finetune.lr: model '{model.genframe_spec['name']}' has no lr argument")
        model.hparams["lr"] = float(lr)
        model.genframe_spec["kwargs"]["lr"] = float(lr)
    frozen = freeze(model, list(cfg.finetune.freeze))
    lineage = {
        "started_from": {"run": str(run.path) if run else None, "weights": str(weights)},
        "frozen_parameters": frozen,
        "finetune": to_plain(cfg.finetune),
    }
    return fit(cfg, model, data, data_cfg, task="finetune", lineage=lineage)


def freeze(model, patterns: list[str]) -> int:
    """Freeze parameters whose names match any glob pattern; return how many tensors."""
    if not patterns:
        return 0
    names = [n for n, _ in model.named_parameters()]
    count = 0
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            top = sorted({n.split(".")[0] + ".*" for n in names})
            raise UserError(
                f"finetune.freeze: pattern '{pattern}' matches no parameter. "
                f"Top-level modules: {valid_list(top)}"
            )
        count += len(hits)
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)
    return count
