"""`genframe generate`: sample from a trained model into a new run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from genframe.errors import UserError
from genframe.runs import atomic_write_json, start_run, update_run
from genframe.sample_writer import write_samples
from genframe.tasks.build import to_plain
from genframe.weights import load_model


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Generate ``num_samples`` samples from ``run`` or ``ckpt``.

    Samples are made in batches of ``batch_size``; batch ``b`` uses seed ``seed + b``, so
    the same seed and batch size give the same samples.

    Returns:
        dict with ``run_dir``, ``samples`` (a list of `Samples`, one per batch), ``metrics``.
    """
    if cfg.num_samples < 1:
        raise UserError(f"num_samples must be at least 1, got {cfg.num_samples}")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {cfg.batch_size}")
    device = _device(cfg.device)
    model, run, weights = load_model(cfg.get("run"), cfg.get("ckpt"))
    model.to(device).eval()
    out_dir = Path(cfg.paths.output_dir)
    start_run(out_dir, cfg, "generate", source={"run": str(run.path) if run else None,
                                               "weights": str(weights)})
    condition = {k: v for k, v in to_plain(cfg.condition).items() if v is not None}
    sampling = generation_options(cfg, model)
    batches = []
    for b, start in enumerate(range(0, cfg.num_samples, cfg.batch_size)):
        n = min(cfg.batch_size, cfg.num_samples - start)
        samples = model.generate(n, condition=condition or None, seed=cfg.seed + b, **sampling)
        samples.metadata.setdefault("model", model.genframe_spec["name"])
        batches.append(samples)
    folder = write_samples(batches, out_dir)
    update_run(out_dir, status="completed", num_samples=cfg.num_samples)
    atomic_write_json(out_dir / "metrics.json", {})
    print(f"run directory: {out_dir}\n  {cfg.num_samples} samples in {folder}", flush=True)
    return {"run_dir": out_dir, "samples": batches, "metrics": {}}


def generation_options(cfg: DictConfig, model) -> dict[str, Any]:
    """The keyword arguments for `model.generate`: ``sampling.*`` plus, for models whose
    `generate` takes them, the ``sampler`` config and the ``guidance`` scale."""
    import inspect

    options = to_plain(cfg.get("sampling") or {})
    params = inspect.signature(model.generate).parameters
    name = model.genframe_spec["name"]
    for key in ("sampler", "guidance"):
        value = to_plain(cfg.get(key))
        if value is None:
            continue
        if key not in params:
            shown = f"sampler={value.get('name')}" if key == "sampler" else f"guidance={value}"
            raise UserError(f"{shown}: model '{name}' takes no {key} (only diffusion-style models do)")
        options[key] = value
    return options


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"device: expected auto, cpu or cuda, got '{name}'")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name}: this machine has no CUDA GPU; use device=cpu")
    return torch.device(name)
