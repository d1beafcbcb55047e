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
from genframe.files import (
    atomic_write_bytes,
    load_state_dict_strict,
    looks_like_safetensors,
    read_safetensors,
    torch_load_weights,
)
from genframe.plugins import get_registry
from genframe.runs import Run, open_run
from genframe.spec import ModelSpec, environment

SPEC_KEY = "genframe"
ENVIRONMENT_KEY = "genframe_environment"
log = logging.getLogger(__name__)


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
    resolved = dict(getattr(model, "resolved_arguments", None) or {})
    model.model_spec = ModelSpec(name=name, kwargs={**hparams, **kwargs, **resolved})
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


def read_weights(path: str | Path, *, key: str = "ckpt",
                 where: str | None = None) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Return (spec, state_dict) from a .safetensors file or a Lightning .ckpt (any
    format so far; see `genframe.spec`), never unpickling code.

    Args:
        path: the file.
        key: the config key the path came from (``ckpt``, ``resume``, ...).
        where: how messages name the file (default ``key=path``).

    Raises:
        UserError: naming `where` when the file is missing, a directory, empty, damaged
            (truncated), a pickle carrying code, of another framework or not genframe's
            (no model spec), with what to do instead.
    """
    where = where or f"{key}={path}"
    p = Path(path).expanduser()
    if p.suffix == ".safetensors" or looks_like_safetensors(p):
        meta, state = read_safetensors(p, key=where)
        if SPEC_KEY not in meta:
            from genframe.lora import ADAPTER_KEY

            if ADAPTER_KEY in meta:
                raise UserError(
                    f"{where}: a LoRA adapter file (adapter weights only, no base model); "
                    "use the model.safetensors of the run that wrote it, and give this file "
                    "as adapter="
                )
            raise UserError(f"{where}: a safetensors file, but not genframe's (no model spec in "
                            "its metadata); give a model.safetensors genframe wrote (a run's, "
                            "or one made by `genframe export`)")
        try:
            data = json.loads(meta[SPEC_KEY])
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: the model spec in its metadata is not valid JSON ({exc}); "
                            "the file is damaged") from exc
        return ModelSpec.from_dict(data, where=where), state
    ckpt = torch_load_weights(p, where=where)
    if not isinstance(ckpt, dict) or SPEC_KEY not in ckpt or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"{where}: not a genframe checkpoint (no model spec and state_dict "
                        "inside); give a .ckpt or model.safetensors genframe wrote")
    state = ckpt["state_dict"]
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{where}: its state_dict holds values that are not tensors; the file "
                        "is damaged or not genframe's")
    return ModelSpec.from_dict(ckpt[SPEC_KEY], where=where), state


def build_from_spec(spec: ModelSpec, state: dict[str, torch.Tensor] | None = None, *,
                    where: str = "model", source: str | None = None):
    """Instantiate the registered model of `spec` and load `state` into it (strictly).

    A spec with a tokenizer hands it to the model; a spec with ``lora`` (weights saved
    while LoRA adapters were applied) gets the same adapters before the state is loaded,
    so the state's keys fit. Old argument names are migrated (see `instantiate_model`).

    Args:
        where: the config path used in messages about arguments (``"model"``).
        source: the file the spec and state came from (``ckpt=...``), named in messages
            when they do not build a model or do not fit it.

    Raises:
        UserError: the spec names an unknown model or arguments it refuses, or the state's
            keys or shapes do not fit the model the spec builds (nothing half-loaded).
    """
    try:
        model = instantiate_model(spec.name, spec.kwargs, where=where, migrate=True)
    except UserError as exc:
        if source is None:
            raise
        raise UserError(f"{source}: its model spec does not build a model: {exc}") from exc
    if spec.tokenizer is not None:
        from genframe.text.tokenize import tokenizer_from_json

        model.set_tokenizer(tokenizer_from_json(spec.tokenizer, where=source or "the model's spec"))
    if spec.lora is not None:
        from genframe.lora import apply_lora

        lora = spec.lora
        apply_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                   target_modules=lora["target_modules"])
    if state is not None:
        load_state_dict_strict(model, state, where=source or f"the weights of model '{spec.name}'",
                               what=f"model '{spec.name}' as its spec describes it",
                               finite="parameters")
    return model


#: The files of a run directory `run_weights` tries, in order.
RUN_WEIGHTS = ("model.safetensors", "checkpoints/best.ckpt", "checkpoints/last.ckpt")


def run_weights(run: Run, *, key: str = "run") -> tuple[Path, ModelSpec, dict[str, torch.Tensor]]:
    """The weights of a run directory, checked against the model its run.json records.

    The files of `RUN_WEIGHTS` are tried in order (``model.safetensors``, the best, then the
    last checkpoint). One that is **missing or damaged** (empty, truncated, unreadable) is
    skipped with a warning that names it and why -- a damaged ``model.safetensors`` falls
    back to the checkpoints exactly as a missing one does. The first readable file must
    hold the run's model (the name and constructor arguments run.json records): a file of
    another model is refused, not skipped, since the run directory was changed and using
    another of its files would hide that.

    Returns:
        (the file used, its spec, its state dict).

    Raises:
        UserError: naming `key`, the run and the file: no file is usable (each one's
            problem listed), or the first readable one holds another model.
    """
    label = f"{key}={run.path}"
    problems: list[str] = []  # every file's
    skipped: list[str] = []  # what the warning says: a missing best.ckpt is usual
    for name in RUN_WEIGHTS:
        path = run.path / name
        if not path.exists():
            problems.append(f"{name} is missing")
            if name == RUN_WEIGHTS[0]:
                skipped.append(problems[-1])
            continue
        try:
            spec, state = read_weights(path, where=f"{label}: {name}")
        except UserError as exc:
            problems.append(str(exc).removeprefix(f"{label}: "))
            skipped.append(problems[-1])
            continue
        check_run_model(run, spec, where=f"{label}: {name}")
        if skipped:
            log.warning("%s: %s; using %s instead", label, "; ".join(skipped), name)
        return path, spec, state
    status = run.info.get("status")
    hint = (" (the run did not finish)" if status not in (None, "completed") else "")
    raise UserError(
        f"{label}: the run has no usable weights{hint}: " + "; ".join(problems)
        + ". Restore a file from a copy, or train again"
    )


def check_run_model(run: Run, spec: ModelSpec, *, where: str) -> None:
    """Refuse weights whose spec is not the model `run` records in run.json.

    Compared: the registered name and the constructor arguments (old argument names
    migrated, arguments added since filled in); the tokenizer and LoRA adapters are not
    (a run that merged its adapters records the merged model, its checkpoints the
    adapted one).

    Raises:
        UserError: naming `where` and what differs.
    """
    recorded = run.model_spec
    if recorded.name != spec.name:
        raise UserError(
            f"{where}: holds weights of model '{spec.name}', but the run's run.json records "
            f"model '{recorded.name}': the file belongs to another run. Put the run's own "
            "file back, or use the file alone with ckpt=<file>"
        )
    ours, theirs = _comparable_kwargs(recorded), _comparable_kwargs(spec)
    unset = "(unset)"
    diffs = [f"{k}={theirs.get(k, unset)!r} (run.json: {ours.get(k, unset)!r})"
             for k in sorted(set(ours) | set(theirs)) if ours.get(k, unset) != theirs.get(k, unset)]
    if diffs:
        raise UserError(
            f"{where}: holds model '{spec.name}' with other arguments than the run's run.json "
            f"records: {', '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}; the file "
            "belongs to another run. Put the run's own file back, or use the file alone with "
            "ckpt=<file>"
        )


def _comparable_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """A spec's constructor arguments as today's class names them, in JSON form."""
    kwargs = dict(spec.kwargs)
    try:
        cls = get_registry().model(spec.name).load()
    except UserError:  # an unknown model: building it fails later with its own message
        cls = None
    if cls is not None:
        kwargs = renamed_arguments(cls, kwargs, where="model", migrate=True)
        for key, value in (getattr(cls, "added_arguments", None) or {}).items():
            kwargs.setdefault(key, value)
    return json.loads(json.dumps(kwargs, sort_keys=True, default=str))


def load_model(run: str | None = None, ckpt: str | None = None,
               adapter: str | None = None) -> tuple[Any, Run | None, Path]:
    """Rebuild a model from a run directory or a checkpoint file, with the LoRA adapters
    of an ``adapter.safetensors`` file added when given.

    - ``run`` alone: the run's weights (`run_weights`: checked against run.json's model; a
      missing or damaged ``model.safetensors`` falls back to the checkpoints with a warning).
    - ``ckpt`` alone: that file (its own spec builds the model).
    - both: ``ckpt`` must be a file of that run directory holding the run's model (a
      checkpoint other than the default one); otherwise refused, so the lineage a task
      records (run and weights) is never wrong.

    Returns (model, run or None, the weights file used).

    Raises:
        UserError: naming the key (``run=``, ``ckpt=``, ``adapter=``) and the file.
    """
    if run is None and ckpt is None:
        raise UserError("give the model: run=<run directory>, ckpt=<checkpoint file> or "
                        "hub=NAME[:VERSION] (genframe hub list shows the entries)")
    opened = open_run(run) if run is not None else None
    if opened is not None:
        from genframe.hub import entry_at, verify

        entry = entry_at(opened.path)
        if entry is not None:  # a hub entry given by its path: checked as hub= is
            verify(entry)
    if opened is None:
        path = Path(ckpt).expanduser()
        where = f"ckpt={ckpt}"
        spec, state = read_weights(path, where=where)
    elif ckpt is None:
        path, spec, state = run_weights(opened)
        where = f"run={run}: {path.relative_to(opened.path)}"
    else:
        path = Path(ckpt).expanduser()
        where = f"ckpt={ckpt}"
        if not path.resolve().is_relative_to(opened.path):
            raise UserError(
                f"ckpt={ckpt} is not a file of run={run}: give run= alone (its own weights) "
                "or ckpt= alone (that file; add data=... where the task needs data), not both"
            )
        spec, state = read_weights(path, where=where)
        check_run_model(opened, spec, where=where)
    model = build_from_spec(spec, state, source=where)
    if adapter is not None:
        from genframe.lora import has_lora, load_adapter

        if has_lora(model):
            raise UserError(f"adapter={adapter}: the model of {path} already carries LoRA "
                            "adapters; give the base model's run or weights")
        load_adapter(model, Path(adapter).expanduser(), where=f"adapter={adapter}")
    return model, opened, Path(path).resolve()


def borrowed_model(run: str | None, spec: Mapping[str, Any] | None, *, run_key: str,
                   spec_key: str) -> tuple[dict[str, Any], Any] | None:
    """(description, model) of a trained model another model composes (a text-to-image
    model's language model, a latent diffusion model's autoencoder), or None.

    From `spec`, the description recorded when the composing model was first built (its
    weights then come with the composing model's own, so the other run is no longer
    needed), or else from the run directory `run`, weights loaded, on the CPU.

    Args:
        run_key, spec_key: the config keys of `run` and `spec` (``model.autoencoder``),
            named in messages.

    Raises:
        UserError: `run` is not a readable run directory, or `spec` builds no model.
    """
    if spec is not None:
        model = build_from_spec(ModelSpec.from_dict(dict(spec), where=spec_key), where=spec_key)
    elif run is not None:
        try:
            model, _, _ = load_model(str(run))
        except UserError as exc:  # its messages name run=; here the user's key is run_key
            text = str(exc).replace(f"run={run}", f"{run_key}={run}")
            raise UserError(text if text.startswith(f"{run_key}=") else f"{run_key}={run}: {text}") from exc
        model = model.cpu()
    else:
        return None
    return model.model_spec.to_dict(), model
