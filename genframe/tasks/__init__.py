"""The tasks: one table (`TASKS`) that the CLI, the configs and dispatch all read.

Each task function takes a composed config (from `genframe <task>` or
`genframe.config.compose`) and returns a dict with at least ``run_dir`` and
``metrics``; they are callable from tests and notebooks. A task's primary config is
``conf/<name>.yaml``. `run` dispatches on ``cfg.task_name`` and returns the value a Hydra
sweeper optimises. This module imports nothing heavy: the CLI reads the table at once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Task:
    """One task of the CLI.

    Attributes:
        name: the command (``genframe <name>``) and its primary config (``conf/<name>.yaml``).
        help: one line for ``genframe --help``.
        target: ``"module:function"`` of the task function.
        prepare_target: for tasks that train, ``"module:function"`` building the model and
            data from a config (`genframe.tasks.fit.Prepared`); ``train resume=`` uses the
            one of the task that made the run.
    """

    name: str
    help: str
    target: str
    prepare_target: str | None = None

    def function(self):
        return _load(self.target)

    def prepare(self):
        if self.prepare_target is None:
            raise ValueError(f"task '{self.name}' does not train")
        return _load(self.prepare_target)


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("train", "fit a model on data; writes checkpoints, weights, samples, metrics",
         "genframe.tasks.train:train", "genframe.tasks.train:prepare_training"),
    Task("finetune", "continue from a run's weights (new data, frozen parts, new lr, LoRA)",
         "genframe.tasks.finetune:finetune", "genframe.tasks.finetune:prepare_finetuning"),
    Task("generate", "sample from a trained run or checkpoint into a new run directory",
         "genframe.tasks.generate:generate"),
    Task("evaluate", "compute a trained model's metrics on its data's test split",
         "genframe.tasks.evaluate:evaluate"),
    Task("chat", "talk with a trained language model (interactive, or one turn per stdin line)",
         "genframe.tasks.chat:chat"),
    Task("export", "write a run's model to a self-contained folder (merge=true folds in LoRA)",
         "genframe.tasks.export:export"),
)}


def run(cfg) -> Any:
    """Run the task named by ``cfg.task_name``; return its ``objective`` (for sweepers)."""
    import warnings

    # A deprecation inside Lightning's own code, not actionable by users.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    _quiet_lightning_adverts()
    result = TASKS[cfg.task_name].function()(cfg)
    return result.get("objective")


class _NoAdverts:
    """A logging filter dropping Lightning's product tips ("Tip: ... try installing
    litlogger"): printed on every run, they say nothing about it."""

    def filter(self, record) -> bool:
        return "Tip:" not in record.getMessage()


def _quiet_lightning_adverts() -> None:
    import logging

    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in logger.filters):
        logger.addFilter(_NoAdverts())
