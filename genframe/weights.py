"""Saving and loading model weights without unpickling code.

Weights go to safetensors with the model's spec (registered name and constructor
arguments) in the file's metadata; Lightning checkpoints are read with
``torch.load(weights_only=True)``. Either file alone is enough to rebuild the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from genframe.errors import UserError
from genframe.runs import Run, atomic_write_bytes, open_run

SPEC_KEY = "genframe"


def save_weights(model: torch.nn.Module, path: Path, spec: dict[str, Any]) -> Path:
    """Write `model`'s weights and `spec` to a safetensors file, atomically."""
    from safetensors.torch import save

    # Clones break storage sharing (tied weights), which safetensors refuses to write.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_bytes(Path(path), save(state, metadata={SPEC_KEY: json.dumps(spec)}))
    return Path(path)


def read_safetensors(path: Path, *, key: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; a `UserError` naming `key` if unreadable."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta, load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{key}: not a readable safetensors file ({exc})") from exc


def read_weights(path: str | Path, *, key: str = "ckpt") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Return (spec, state_dict) from a .safetensors file or a Lightning .ckpt."""
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
        return json.loads(meta[SPEC_KEY]), state
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or foreign file
        raise UserError(
            f"{key}={path}: cannot be read as a checkpoint without unpickling code "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from exc
    if not isinstance(ckpt, dict) or SPEC_KEY not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{key}={path}: not a genframe checkpoint (no model spec inside)")
    return ckpt[SPEC_KEY], ckpt["state_dict"]


def build_from_spec(spec: dict[str, Any], state: dict[str, torch.Tensor] | None = None):
    """Instantiate the registered model named in `spec` and load `state` into it.

    A spec with ``"lora"`` (weights saved while LoRA adapters were applied) gets the same
    adapters before the state is loaded, so the state's keys fit.
    """
    from genframe.tasks.build import instantiate_model

    model = instantiate_model(spec["name"], spec["kwargs"], where="model", source=None)
    if spec.get("tokenizer") is not None:
        from genframe.text.tokenize import tokenizer_from_json

        model.set_tokenizer(tokenizer_from_json(spec["tokenizer"], where="the model's spec"))
    if spec.get("lora") is not None:
        from genframe.lora import apply_lora

        lora = spec["lora"]
        apply_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                   target_modules=lora["target_modules"])
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise UserError(
                f"the weights do not fit model '{spec['name']}': missing {missing[:5]}, "
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
