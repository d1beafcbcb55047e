"""The tasks: one table (`TASKS`) that the CLI, the configs and dispatch all read.

Each task function takes a composed config (from `genframe <task>` or
`genframe.config.compose`) and returns a dict with at least ``run_dir`` and
``metrics``; they are callable from tests and notebooks. A task's primary config is
``conf/<name>.yaml``. `run` dispatches on ``cfg.task_name`` and returns the value a Hydra
sweeper optimises. This module imports nothing heavy: the CLI reads the table at once.
"""

from __future__ import annotations

import contextlib
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
    Task("export", "write a model as safetensors, ONNX or TorchScript (verified) to a folder",
         "genframe.tasks.export:export"),
    Task("serve", "serve models over HTTP (API, OpenAI-compatible, a page to rate samples)",
         "genframe.tasks.serve:serve"),
)}


def run(cfg) -> Any:
    """Run the task named by ``cfg.task_name``; return its ``objective`` (for sweepers).

    However the task ends, its run.json does not stay ``running`` (see `guarded`).
    """
    result = guarded(cfg.task_name, _output_dir(cfg),
                     lambda: TASKS[cfg.task_name].function()(_with_hub(cfg)))
    return result.get("objective")


def _with_hub(cfg):
    """A task given ``hub=NAME[:VERSION]`` reads that verified entry as ``run=``."""
    if cfg.get("hub") is None:
        return cfg
    from genframe.tasks.build import resolve_hub

    return resolve_hub(cfg)


def guarded(task: str, out_dir, call) -> Any:
    """Return ``call()``, the work of `task` writing into `out_dir` (or None).

    An exception marks run.json ``failed`` (with the error), Ctrl-C or SIGTERM
    ``interrupted``, and either of those becomes `Interrupted` (exit status 130, or 143
    for SIGTERM) with a hint to continue the run when it has a checkpoint.
    """
    import warnings

    from genframe.errors import GenframeError, Interrupted

    # A deprecation inside Lightning's own code, not actionable by users.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*'set_vital' is deprecated.*")  # torchdata's
    # Validation under DDP pads the last batch of a rank by repeating items, on purpose
    # (every rank then logs means of equal-sized shares).
    warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders")
    # A continued run writes into its own checkpoints folder on purpose.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    _quiet_lightning_adverts()
    try:
        with _sigterm_as_interrupt():
            return call()
    except BaseException as exc:
        stop = _stop_signal(exc)
        if stop is not None:
            interrupted = _interrupted(task, out_dir, stop)
            raise interrupted from None
        if out_dir is not None:
            from genframe.runs import end_run

            detail = str(exc) if isinstance(exc, GenframeError) else f"{type(exc).__name__}: {exc}"
            status = "interrupted" if isinstance(exc, Interrupted) else "failed"
            end_run(out_dir, status, detail, task=task)
        raise


class Terminated(BaseException):
    """SIGTERM arrived (a cluster pre-empting the job, ``kill``): stop like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While a task runs, SIGTERM raises `Terminated` (Lightning installs its own handler
    during ``fit`` and turns it into ``SIGTERMException``). Signal handlers can only be
    set from the main thread; elsewhere SIGTERM keeps its handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_signal(exc: BaseException) -> str | None:
    """"SIGINT"/"SIGTERM" when `exc` is how a task ended on that signal, else None.

    Lightning turns Ctrl-C inside ``fit``/``validate`` into ``sys.exit(1)`` raised while
    handling the KeyboardInterrupt, and SIGTERM into ``SIGTERMException``.
    """
    if isinstance(exc, KeyboardInterrupt):
        return "SIGINT"
    if isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt):
        return "SIGINT"
    if isinstance(exc, Terminated) or type(exc).__name__ == "SIGTERMException":
        return "SIGTERM"
    return None


def _interrupted(task: str, out_dir, signal_name: str):
    from pathlib import Path

    from genframe.errors import Interrupted
    from genframe.runs import end_run

    how = "Ctrl-C" if signal_name == "SIGINT" else "SIGTERM"
    message = f"{task} was stopped by {how}"
    if out_dir is not None and end_run(out_dir, "interrupted", f"stopped by {how}", task=task):
        message += f"; {out_dir}/run.json is marked interrupted"
        last = Path(out_dir) / "checkpoints" / "last.ckpt"
        if last.exists():
            message += f". Continue it with `genframe resume run={out_dir}`"
        elif task in ("train", "finetune"):
            message += ". No checkpoint was saved yet, so there is nothing to resume"
    error = Interrupted(message)
    if signal_name == "SIGTERM":
        error.exit_code = 143
    return error


def _output_dir(cfg):
    """The task's run directory, or None when the config has none (a bare compose)."""
    from omegaconf import OmegaConf

    try:
        value = OmegaConf.select(cfg, "paths.output_dir", throw_on_missing=False)
    except Exception:  # an interpolation that cannot resolve outside Hydra
        return None
    return value or None


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
