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
