"""Run directories: what a run writes, and how a later task reads it back.

A run directory holds::

    config.yaml           the composed config (interpolations kept, as Hydra composed it)
    .hydra/               Hydra's own copy, the overrides and Hydra's settings
    run.json              format version, environment (genframe, Python, torch, Lightning,
                          CUDA versions, device), plugin versions, git revision, the
                          model's description (`ModelSpec`), the resolved data config,
                          lineage
    checkpoints/          last.ckpt and best.ckpt (train and finetune)
    model.safetensors     the weights of the best checkpoint
    samples/              PNGs (or .txt), grid.png, manifest.jsonl
    metrics.json          final metrics
    logs/                 logger output (csv/, tensorboard/, ...)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genframe.errors import UserError
from genframe.files import atomic_write_bytes, atomic_write_json
from genframe.spec import FORMAT_VERSION, ModelSpec, environment, migrate_run_info

RUN_INFO = "run.json"
CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"
# What genframe and Hydra write into a run directory: a folder holding any of these is a
# run, and no new task may write into it.
RUN_OUTPUTS = (RUN_INFO, CONFIG, ".hydra", "checkpoints", WEIGHTS, "samples", METRICS, "logs")
# run.json's ``status``: "running" while the task runs, then one of the others.
STATUSES = ("running", "completed", "failed", "interrupted", "diverged")

log = logging.getLogger("genframe")


def git_revision() -> str | None:
    """The git commit of the current directory's repository (with '-dirty'), if any."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def plugin_versions() -> dict[str, dict[str, str]]:
    from genframe.plugins import get_registry

    return {
        name: {"distribution": p.distribution, "version": p.version}
        for name, p in get_registry().plugins.items()
    }


def start_run(out_dir: Path, cfg, task: str, *, device: Any = None, **info: Any) -> dict[str, Any]:
    """Write config.yaml and run.json at the start of a task; returns the info dict.

    run.json gets the format version and the environment (versions and `device`, the
    device the task runs on) besides `info`; a ``model`` value may be a `ModelSpec`.
    """
    from omegaconf import OmegaConf

    from genframe import __version__

    out_dir = Path(out_dir)
    if (out_dir / RUN_INFO).exists() and not never_started(out_dir):
        raise UserError(
            f"run directory {out_dir} already holds a run; choose another hydra.run.dir "
            "(nothing was overwritten)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("run directory: %s", out_dir)
    atomic_write_bytes(out_dir / CONFIG, OmegaConf.to_yaml(cfg).encode())
    if isinstance(info.get("model"), ModelSpec):
        info["model"] = info["model"].to_dict(tokenizer=False)
    record = {
        "format_version": FORMAT_VERSION,
        "environment": environment(device),
        "genframe_version": __version__,
        "task": task,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_revision": git_revision(),
        "plugins": plugin_versions(),
        "status": "running",
        **info,
    }
    atomic_write_json(out_dir / RUN_INFO, record)
    return record


def update_run(out_dir: Path, **info: Any) -> None:
    """Add or change keys of a run's run.json (a ``model`` may be a `ModelSpec`)."""
    path = Path(out_dir) / RUN_INFO
    if isinstance(info.get("model"), ModelSpec):
        info["model"] = info["model"].to_dict(tokenizer=False)
    record = json.loads(path.read_text())
    record.update(info)
    atomic_write_json(path, record)


def end_run(out_dir: Path, status: str, error: str, *, task: str | None = None) -> bool:
    """Mark a run that is still ``running`` as ``failed`` or ``interrupted`` with `error`.

    Called for every task that ends by an exception, so run.json never says ``running``
    for a run that has stopped. A run already marked otherwise (``diverged``, or a
    finished run a refused command pointed at) keeps its record. When the task stopped
    before writing run.json (a check failed) but its folder exists, a short run.json
    with the `task`, status and error is written, so every run directory says how it
    ended. Returns whether run.json was written. Only rank zero of a multi-process
    run writes it (a failure on another rank reaches rank zero as its own).
    """
    from genframe.hardware import is_rank_zero

    if not is_rank_zero():
        return False
    out_dir = Path(out_dir)
    path = out_dir / RUN_INFO
    ended = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if not path.exists() or never_started(out_dir):
        if task is None or not out_dir.is_dir():
            return False
        atomic_write_json(path, {"format_version": FORMAT_VERSION, "task": task,
                                 "status": status, "error": error, "ended": ended})
        return True
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("status") != "running":
        return False
    update_run(out_dir, status=status, error=error, ended=ended)
    return True


def never_started(out_dir: Path) -> bool:
    """Whether `out_dir` holds only a task refused by its checks before it started (the
    short run.json `end_run` writes, Hydra's files): such a folder may be used again, so
    fixing a typo and repeating the command with the same ``hydra.run.dir`` works."""
    out_dir = Path(out_dir)
    try:
        record = json.loads((out_dir / RUN_INFO).read_text())
    except (OSError, ValueError):
        return False
    made = ("checkpoints", WEIGHTS, "samples", METRICS, "logs", CONFIG)
    return (isinstance(record, dict) and "started" not in record
            and record.get("status") in ("failed", "interrupted")
            and not any((out_dir / name).exists() for name in made))


def run_dir_problem(path: Path, key: str) -> str | None:
    """Why `path` cannot become a new run directory (None if it can).

    A folder already holding a run (any of `RUN_OUTPUTS`), a path that is or lies below
    a regular file, and a missing folder whose first existing parent is not writable are
    refused, so a refused command changes no file of an existing run.
    """
    path = Path(path).expanduser()
    for parent in path.absolute().parents:
        if (parent / RUN_INFO).is_file():
            return (f"{key}={path} lies inside the run directory {parent}; give a folder "
                    "outside it (nothing was changed)")
    if path.is_dir():
        taken = [name for name in RUN_OUTPUTS if (path / name).exists()]
        if taken and not never_started(path):
            return (f"{key}={path} already holds a run ({', '.join(taken)}); give a new "
                    f"folder, or leave {key} out for a fresh one (nothing was changed)")
        return None if os.access(path, os.W_OK | os.X_OK) else f"{key}={path}: the folder is not writable"
    for parent in [path, *path.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                what = "is" if parent == path else f"lies below {parent}, which is"
                return f"{key}={path} {what} a file, not a folder; give a folder path"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{key}={path}: cannot create it, {parent} is not writable"
            return None
    return None


# Base path -> directory claimed for it in this command (Hydra resolves the run directory
# more than once; every resolution must give the same folder).
_CLAIMED: dict[str, str] = {}


def fresh_run_dir(base: str) -> str:
    """Create and return a new, empty run directory named `base` (``base_1``, ``base_2``,
    ... when that name is taken), so two runs started in the same second never share one.

    This is the ``genframe.fresh_dir`` resolver of the default ``hydra.run.dir`` and
    ``hydra.sweep.dir``; the folder is claimed with an exclusive ``mkdir``, which is
    atomic across processes.

    Raises:
        UserError: the folder cannot be created (below a regular file, read-only, ...).
    """
    if base in _CLAIMED:
        return _CLAIMED[base]
    path = Path(base)
    for n in itertools.count():
        candidate = path if n == 0 else path.with_name(f"{path.name}_{n}")
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(
                f"cannot create the run directory {candidate}: {exc.strerror or exc}; "
                "set paths.root=<a writable folder> (or GENFRAME_OUTPUT_ROOT)"
            ) from exc
        _CLAIMED[base] = str(candidate)
        return str(candidate)


def claimed_run_dirs() -> dict[str, str]:
    """The folders `fresh_run_dir` created in this process: the resolver's argument ->
    the folder it made (a copy)."""
    return dict(_CLAIMED)


def adopt_run_dirs(claimed: dict[str, str]) -> None:
    """Make `fresh_run_dir` answer with these folders (`claimed_run_dirs` of another
    process): a sweep's worker processes resolve ``hydra.sweep.dir`` to the folder the
    command created, not to new ones."""
    _CLAIMED.update(claimed)


def register_run_dir_resolver() -> None:
    """Register ``${genframe.fresh_dir:...}`` (see `fresh_run_dir`) and forget the
    folders claimed by an earlier command in this process."""
    from omegaconf import OmegaConf

    _CLAIMED.clear()
    OmegaConf.register_new_resolver("genframe.fresh_dir", fresh_run_dir, replace=True)


@dataclass
class Run:
    """A finished (or interrupted) run directory, read back."""

    path: Path
    info: dict[str, Any]

    @property
    def config(self):
        from omegaconf import OmegaConf

        return OmegaConf.load(self.path / CONFIG)

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.info["model"], where=f"{self.path / RUN_INFO}")

    @property
    def data_config(self) -> dict[str, Any] | None:
        return self.info.get("data")

    def checkpoint(self, which: str = "last") -> Path | None:
        path = self.path / "checkpoints" / f"{which}.ckpt"
        return path if path.exists() else None

    def weights(self) -> Path | None:
        path = self.path / WEIGHTS
        return path if path.exists() else None


def open_run(path: str | os.PathLike, *, key: str = "run") -> Run:
    """Read a run directory; a clear `UserError` if it is missing or not genframe's."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{key}={path}: no such directory")
    if not p.is_dir():
        holder = next((d for d in p.resolve().parents if (d / RUN_INFO).is_file()), None)
        where = f"; the run directory holding it is {holder}" if holder is not None else ""
        raise UserError(f"{key}={path}: not a directory{where} (tasks that read one checkpoint "
                        "file, such as generate and export, take it as ckpt=)")
    info_path = p / RUN_INFO
    if not info_path.exists():
        raise UserError(
            f"{key}={path}: not a genframe run directory (it has no {RUN_INFO}); "
            "give the directory a `genframe train` run printed at its end"
        )
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{key}={path}: {RUN_INFO} is not valid JSON ({exc})") from exc
    if not isinstance(info, dict) or "model" not in info:
        record = info if isinstance(info, dict) else {}
        task = record.get("task") or "unknown"
        message = f"{key}={path}: this '{task}' run holds no model"
        if never_started(p):  # `end_run`'s short record of a task its checks refused
            how = "failed" if record.get("status") == "failed" else "was stopped"
            message += (f": it {how} before it started ({record.get('error') or 'no error recorded'});"
                        " correct that and run its command again (the folder may be reused)")
        else:  # a run of a task that makes no model: generate, evaluate, chat, ...
            message += "; runs of train and finetune hold one"
            source = record.get("source")
            if isinstance(source, dict) and source.get("run"):
                message += f" (this one read its model from run={source['run']})"
        raise UserError(message)
    return Run(p.resolve(), migrate_run_info(info, where=f"{key}={path}"))


LOCK = "run.lock"


@contextlib.contextmanager
def run_lock(out_dir: Path, *, key: str = "run"):
    """Hold the run directory's lock (``run.lock``) while a task writes into it.

    The lock is an OS file lock (`filelock`): the kernel drops it when its process dies,
    even by SIGKILL, so a lock that cannot be taken means a live process is writing the
    run. Only the global rank zero takes it (the other ranks of a multi-process run write
    nothing of their own into the run directory).

    Raises:
        UserError: another live process holds the lock (named by `key` and the folder).
    """
    from filelock import FileLock, Timeout

    from genframe.hardware import is_rank_zero

    if not is_rank_zero():
        yield
        return
    lock = FileLock(str(Path(out_dir) / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"{key}={out_dir}: the run is still being written by another process (its "
            f"{LOCK} is held); wait for it to finish, or stop it first (nothing was changed)"
        ) from None
    except OSError as exc:  # a read-only folder: nothing can be written there
        raise UserError(f"{key}={out_dir}: cannot write the run directory ({exc.strerror or exc}); "
                        "a run is continued in its own folder, which must be writable "
                        "(nothing was changed)") from None
    try:
        yield
    finally:
        lock.release()


def continue_run_record(out_dir: Path, cfg, entry: dict[str, Any]) -> None:
    """Mark a run that `genframe resume` continues in place: config.yaml gets `cfg` (with
    the values changed on resume; None keeps it), run.json is ``running`` again and its
    ``resumes`` list gets `entry` (when, from which step, the changed values)."""
    from omegaconf import OmegaConf

    out_dir = Path(out_dir)
    record = json.loads((out_dir / RUN_INFO).read_text())
    if cfg is not None:
        atomic_write_bytes(out_dir / CONFIG, OmegaConf.to_yaml(cfg).encode())
    record.pop("error", None)
    record.pop("ended", None)
    record["status"] = "running"
    record["resumes"] = [*record.get("resumes", []), entry]
    atomic_write_json(out_dir / RUN_INFO, record)


def record_logger_runs(out_dir: Path, trainer: Any) -> None:
    """Keep in run.json the ids of logger runs that a continued run must reopen to go on
    with the same run (W&B's run id, MLflow's run id), under ``logger_runs``."""
    from pytorch_lightning.loggers import MLFlowLogger, WandbLogger

    ids = {}
    for lg in trainer.loggers if trainer.is_global_zero else ():
        if isinstance(lg, WandbLogger):
            ids["wandb"] = str(lg.experiment.id)
        elif isinstance(lg, MLFlowLogger):
            ids["mlflow"] = str(lg.run_id)
    if ids:
        record = json.loads((Path(out_dir) / RUN_INFO).read_text())
        if record.get("logger_runs") != ids:
            update_run(out_dir, logger_runs={**record.get("logger_runs", {}), **ids})
