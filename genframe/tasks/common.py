"""Helpers every task shares: the device, the model's sampling options from the config,
where a task's model came from, and the metrics report printed at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError
from genframe.tasks.build import build_sampler, to_plain


def resolve_device(name: str):
    """``device``: ``auto`` (a CUDA GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        UserError: another value, or CUDA asked for on a machine without it.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not str(name).startswith("cuda:"):
        raise UserError(f"device: expected auto, cpu or cuda, got '{name}'")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name}: this machine has no CUDA GPU; use device=cpu")
    return torch.device(name)


def generation_options(cfg: DictConfig, model) -> dict[str, Any]:
    """The keyword arguments for `model.generate`: ``sampling.*`` plus, for models whose
    `sample` takes them, the ``sampler`` (built here from its config) and ``guidance``.

    Raises:
        UserError: ``sampler``/``guidance`` given to a model that takes neither.
    """
    options = mapping_of(cfg, "sampling", "sampling.temperature=0.8")
    accepted = set(model.sampling_options())
    for key in ("sampler", "guidance"):
        value = to_plain(cfg.get(key))
        if value is None:
            continue
        if key not in accepted:
            shown = f"sampler={value.get('name')}" if key == "sampler" else f"guidance={value}"
            raise UserError(f"{shown}: model '{model.registered_name}' takes no {key} "
                            "(only diffusion-style models do)")
        options[key] = build_sampler(value) if key == "sampler" else value
    return options


def mapping_of(cfg: DictConfig, key: str, example: str) -> dict[str, Any]:
    """``cfg[key]`` as a plain dict ({} when unset).

    Raises:
        UserError: the key holds a single value (``condition=3``) instead of keys.
    """
    value = to_plain(cfg.get(key))
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{key}={value!r}: expected keys under {key}, e.g. {example}")
    return dict(value)


def source_record(run, weights: Path) -> dict[str, Any]:
    """What a task that reads a trained model records about where it came from."""
    return {"run": str(run.path) if run is not None else None, "weights": str(weights)}


def report(out_dir: Path, metrics: dict[str, float], title: str) -> None:
    """Print where the run is and its metrics under `title`, and keep the same lines in
    the run's log file (``<task>.log``)."""
    lines = [f"run directory: {out_dir}", title]
    for key, value in metrics.items():
        lines.append(f"  {key:<32} {value:.4f}")
    text = "\n".join(lines)
    print(text, flush=True)
    log_to_files(text)


def log_to_files(text: str) -> None:
    """Write `text` (already printed to the terminal) to the log files only: the file
    handlers Hydra gave the root logger, so it is not printed a second time."""
    import logging

    record = logging.LogRecord("genframe", logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
