"""Task functions: `train`, `finetune`, `generate`, `evaluate`, `export`.

Each takes a composed config (from `genframe <task>` or `genframe.config.compose`) and
returns a dict with at least ``run_dir`` and ``metrics``; they are callable from tests
and notebooks. `run` dispatches on ``cfg.task_name`` and returns the value a Hydra
sweeper optimises.
"""

from __future__ import annotations

from typing import Any


def run(cfg) -> Any:
    import warnings

    # A deprecation inside Lightning's own code, not actionable by users.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    _quiet_lightning_adverts()
    from genframe.tasks.chat import chat
    from genframe.tasks.evaluate import evaluate
    from genframe.tasks.export import export
    from genframe.tasks.finetune import finetune
    from genframe.tasks.generate import generate
    from genframe.tasks.train import train

    tasks = {"train": train, "finetune": finetune, "generate": generate, "evaluate": evaluate, "export": export,
             "chat": chat}
    result = tasks[cfg.task_name](cfg)
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
