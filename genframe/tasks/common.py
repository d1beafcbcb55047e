"""Helpers every task shares: the device, the model's sampling options from the config,
where a task's model came from, and the metrics report printed at the end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError
from genframe.tasks.build import build_sampler, to_plain

log = logging.getLogger("genframe")


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
    for key in ("sampler", "guidance", "negative_prompt", "strength", "init_image"):
        value = to_plain(cfg.get(key))
        if value is None:
            continue
        if key not in accepted:
            shown = f"sampler={value.get('name')}" if key == "sampler" else f"{key}={value}"
            which = ("text-to-image models do" if key == "negative_prompt"
                     else "diffusion-style models do")
            raise UserError(f"{shown}: model '{model.registered_name}' takes no {key} "
                            f"(only {which})")
        if key == "sampler":
            value = build_sampler(value)
        elif key == "init_image":
            value = read_init_image(value, model)
        options[key] = value
    return options


def read_init_image(path: str, model) -> Any:
    """The image file `path` as a float tensor (C, H, W) in [0, 1] for `model`'s
    ``init_image``: decoded with Pillow as ``data=image_folder`` decodes (transparency
    onto white, the centre cropped to a square, resized to the model's ``image_size``).

    Raises:
        UserError: the file is missing or not an image Pillow can read, or its colours
            do not fit the model (a grey image for an RGB model, or the reverse).
    """
    import torch
    from PIL import Image

    from genframe.data.image_folder import decode_image

    hp = model.hparams
    channels, size = int(hp.in_channels), int(hp.image_size)
    p = Path(str(path)).expanduser()
    if p.is_dir():
        raise UserError(f"init_image={path}: a folder, not an image file")
    if not p.is_file():
        raise UserError(f"init_image={path}: no such file")
    try:
        with Image.open(p) as im:
            mode, (width, height) = im.mode, im.size
        array = decode_image(p, size, "L" if channels == 1 else "RGB")
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad bytes
        raise UserError(f"init_image={path}: not an image Pillow can read ({exc})") from None
    grey = mode in ("1", "L", "LA", "La", "I", "F") or mode.startswith("I;16")
    if grey != (channels == 1):
        have = f"a grey image (mode {mode})" if grey else f"a colour image (mode {mode})"
        want = "grey (1 channel)" if channels == 1 else "RGB (3 channels)"
        raise UserError(f"init_image={path}: {have}, but this model makes {want} images; "
                        f"give {'a grey' if channels == 1 else 'an RGB'} image")
    if "A" in mode or mode == "P":
        log.info("init_image %s: transparency (mode %s) composited onto white", p, mode)
    if (width, height) != (size, size):
        log.info("init_image %s: %dx%d, centre-cropped and resized to the model's %dx%d",
                 p, width, height, size, size)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0  # (C, H, W)


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


def source_record(run, weights: Path, hub: Any = None) -> dict[str, Any]:
    """What a task that reads a trained model records about where it came from: the run
    directory, the weights file and, for ``hub=``, the entry asked for."""
    record = {"run": str(run.path) if run is not None else None, "weights": str(weights)}
    if hub is not None:
        record["hub"] = str(hub)
    return record


def model_version(cfg, run, weights: Path) -> str:
    """What the feedback store records as the model's version: ``hub:NAME:VERSION`` for
    ``hub=`` (the entry resolved), else the run directory, else the weights file."""
    if cfg.get("hub") is not None and cfg.get("run") is not None:
        entry = Path(str(cfg.run))
        return f"hub:{entry.parent.name}:{entry.name}"
    return str(run.path) if run is not None else str(weights)


def feedback_store(cfg):
    """The `genframe.feedback.FeedbackStore` of ``cfg.feedback`` (None when
    ``feedback.record`` is false)."""
    node = cfg.get("feedback")
    if node is None or not node.get("record", True):
        return None
    from genframe.feedback import FeedbackStore

    return FeedbackStore(node.get("db"))


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


def parse_key_values(args: list[str], known: tuple[str, ...], where: str) -> tuple[dict[str, str], bool]:
    """The ``key=value`` arguments of a management command (``hub``, ``feedback``) and
    whether ``--json`` was given.

    Raises:
        UserError: an argument that is not key=value, or a key not in `known`.
    """
    from genframe.errors import did_you_mean

    opts: dict[str, str] = {}
    as_json = False
    for arg in args:
        if arg == "--json":
            as_json = True
            continue
        key, eq, value = arg.partition("=")
        if not eq or arg.startswith("-"):
            raise UserError(f"{where}: {arg!r} is not key=value; see `genframe {where.split()[0]} --help`")
        if key not in known:
            expected = ", ".join(f"{k}=" for k in known) or "no keys"
            raise UserError(f"{where}: unknown key {key!r}.{did_you_mean(key, known)} Expected {expected}")
        opts[key] = value
    return opts, as_json
