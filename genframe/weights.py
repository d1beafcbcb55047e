"""Saving, reading and rebuilding models without unpickling code.

Weights go to safetensors with the model's description (`genframe.spec.ModelSpec`) and
the environment they were made in, in the file's metadata; Lightning checkpoints carry
both too and are read with ``torch.load(weights_only=True)``. Either file alone rebuilds
the model (`build_from_spec`), and `load_model` does so from a run directory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from genframe.config import check_kwargs
from genframe.errors import UserError
from genframe.files import atomic_write_bytes, read_safetensors
from genframe.plugins import get_registry
from genframe.runs import Run, open_run
from genframe.spec import ModelSpec, environment

SPEC_KEY = "genframe"
ENVIRONMENT_KEY = "genframe_environment"


def instantiate_model(name: str, kwargs: Mapping[str, Any], *, where: str = "model",
                      source: Callable[[str], str] | None = None, migrate: bool = False):
    """Build the registered model `name` from checked constructor arguments.

    Args:
        name: a registered model name.
        kwargs: constructor arguments (plain values), checked against the signature.
        where: the config path used in messages (``"model"``).
        source: maps a key to where it was set, for messages.
        migrate: the arguments come from a saved run (weights, run.json, a resumed
            config): old argument names (the class's ``renamed_arguments``) are renamed.
            Otherwise an old name is refused with the new one.

    Returns:
        The model, with ``model.model_spec`` set.

    Raises:
        UserError: unknown name, unknown or mistyped argument, a value the model refuses.
    """
    registration = get_registry().model(name)
    _warn_api_problem(registration.plugin)
    cls = registration.load()
    kwargs = renamed_arguments(cls, kwargs, where=where, migrate=migrate)
    if migrate:  # saved before an argument existed: it had the behaviour of then
        for key, value in (getattr(cls, "added_arguments", None) or {}).items():
            kwargs.setdefault(key, value)
    kwargs = check_kwargs(cls, kwargs, where=where, source=source)
    model = cls(**kwargs)
    # Every constructor argument, defaults included, so a saved spec rebuilds this model
    # even after a default changes.
    hparams = dict(getattr(model, "hparams", {}) or {})
    model.model_spec = ModelSpec(name=name, kwargs={**hparams, **kwargs})
    return model


_WARNED: set[str] = set()


def _warn_api_problem(plugin: str) -> None:
    """Say once per process when a model's plugin was written for another plugin API."""
    info = get_registry().plugins.get(plugin)
    problem = info.api_problem if info is not None else None
    if problem and plugin not in _WARNED:
        _WARNED.add(plugin)
        logging.getLogger("genframe").warning("plugin '%s' %s", plugin, problem)


def renamed_arguments(cls: type, kwargs: Mapping[str, Any], *, where: str,
                      migrate: bool) -> dict[str, Any]:
    """`kwargs` with the class's old argument names (``renamed_arguments``) replaced."""
    kwargs = dict(kwargs)
    for old, new in (getattr(cls, "renamed_arguments", None) or {}).items():
        if old not in kwargs:
            continue
        if not migrate:
            raise UserError(f"{where}.{old}: renamed to {new}; use {where}.{new}=...")
        if new in kwargs:
            raise UserError(f"{where}: both {old} (its old name) and {new} are given; keep {new}")
        kwargs[new] = kwargs.pop(old)
    return kwargs


def save_weights(model: torch.nn.Module, path: Path, spec: ModelSpec | None = None) -> Path:
    """Write `model`'s weights, its spec (default ``model.model_spec``) and the environment
    to a safetensors file, atomically."""
    from safetensors.torch import save

    spec = spec if spec is not None else model.model_spec
    if spec is None:
        raise ValueError("save_weights: the model has no model_spec (build it with genframe)")
    device = next(iter(model.parameters()), torch.empty(0)).device
    # Clones break storage sharing (tied weights), which safetensors refuses to write.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {SPEC_KEY: json.dumps(spec.to_dict()), ENVIRONMENT_KEY: json.dumps(environment(device))}
    atomic_write_bytes(Path(path), save(state, metadata=meta))
    return Path(path)


def read_weights(path: str | Path, *, key: str = "ckpt") -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Return (spec, state_dict) from a .safetensors file or a Lightning .ckpt (any
    format so far; see `genframe.spec`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{key}={path}: no such file")
    if p.suffix == ".safetensors":
        meta, state = read_safetensors(p, key=f"{key}={path}")
        if SPEC_KEY not in meta:
            from genframe.lora import ADAPTER_KEY

            if ADAPTER_KEY in meta:
                raise UserError(
                    f"{key}={path}: a LoRA adapter file (adapter weights only, no base model); "
                    "use the model.safetensors of the run that wrote it"
                )
            raise UserError(f"{key}={path}: a safetensors file, but not genframe's (no model spec)")
        return ModelSpec.from_dict(json.loads(meta[SPEC_KEY]), where=f"{key}={path}"), state
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or foreign file
        raise UserError(
            f"{key}={path}: cannot be read as a checkpoint without unpickling code "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    if not isinstance(ckpt, dict) or SPEC_KEY not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{key}={path}: not a genframe checkpoint (no model spec inside)")
    return ModelSpec.from_dict(ckpt[SPEC_KEY], where=f"{key}={path}"), ckpt["state_dict"]


def build_from_spec(spec: ModelSpec, state: dict[str, torch.Tensor] | None = None, *,
                    where: str = "model"):
    """Instantiate the registered model of `spec` and load `state` into it (strictly).

    A spec with a tokenizer hands it to the model; a spec with ``lora`` (weights saved
    while LoRA adapters were applied) gets the same adapters before the state is loaded,
    so the state's keys fit. Old argument names are migrated (see `instantiate_model`).
    """
    model = instantiate_model(spec.name, spec.kwargs, where=where, migrate=True)
    if spec.tokenizer is not None:
        from genframe.text.tokenize import tokenizer_from_json

        model.set_tokenizer(tokenizer_from_json(spec.tokenizer, where="the model's spec"))
    if spec.lora is not None:
        from genframe.lora import apply_lora

        lora = spec.lora
        apply_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                   target_modules=lora["target_modules"])
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"the weights do not fit model '{spec.name}': missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
    return model


def load_model(run: str | None = None, ckpt: str | None = None,
               adapter: str | None = None) -> tuple[Any, Run | None, Path]:
    """Rebuild a model from a run directory (its best weights) or a checkpoint file,
    with the LoRA adapters of an ``adapter.safetensors`` file added when given.

    Returns (model, run or None, the weights file used).
    """
    if run is None and ckpt is None:
        raise UserError("give run=<run directory> or ckpt=<checkpoint file>")
    opened = open_run(run) if run is not None else None
    if ckpt is None:
        assert opened is not None
        path = opened.weights() or opened.checkpoint("best") or opened.checkpoint("last")
        if path is None:
            raise UserError(f"run={run}: the run has no weights or checkpoints (did it finish?)")
    else:
        path = Path(ckpt).expanduser()
    spec, state = read_weights(path)
    model = build_from_spec(spec, state)
    if adapter is not None:
        from genframe.lora import has_lora, load_adapter

        if has_lora(model):
            raise UserError(f"adapter={adapter}: the model of {path} already carries LoRA "
                            "adapters; give the base model's run or weights")
        load_adapter(model, Path(adapter).expanduser())
    return model, opened, Path(path).resolve()
