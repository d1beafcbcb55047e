"""Files on disk: atomic writes, and weights read from local files without unpickling code.

Everything that writes a file genframe later reads back (run records, weights, caches)
goes through `atomic_write_bytes`; every "weights from a local file" path (a run's
weights, LoRA adapters, a timm trunk for the GAN or for the image metrics) reads them
with `read_safetensors` / `read_state_dict` and loads them with `load_state_dict_strict`,
so a file for another architecture is refused instead of half-loaded.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO

from genframe.errors import UserError, plural


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a crash never leaves a half-written file (see
    `atomic_write`)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any], *, durable: bool = True) -> None:
    """Write a file through ``write(f)`` so a crash or a kill never leaves a torn file
    under `path`: it holds either the old content or the whole new one.

    ``write`` fills a temporary file in the target folder (the same filesystem, so the
    final rename is atomic; a temporary folder elsewhere would turn it into a copy), which
    is flushed and fsynced (`durable`; without it a killed process still leaves no torn
    file, but a power loss may), then renamed into place. The file gets the usual permissions
    (0666 less the umask, like ``open(path, "w")``), not mkstemp's 0600. A failure removes
    the temporary file and leaves `path` as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, obj: Any) -> None:
    """`obj` as indented, key-sorted JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def check_weights_file(path: Path, *, where: str) -> Path:
    """`path` (``~`` expanded) when it is a non-empty regular file.

    Raises:
        UserError: naming `where` (``ckpt=...``, ``run=...: model.safetensors``) when the
            path is missing, a directory or empty, with what to give instead.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{where}: a directory, not a weights file; give the file itself "
                        "(a .safetensors or .ckpt), or a run directory with run=")
    if not path.is_file():
        raise UserError(f"{where}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{where}: the file is empty (0 bytes; an interrupted copy or "
                        "write?); restore it or give another weights file")
    return path


def read_safetensors(path: Path, *, key: str) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata, tensors) of a safetensors file.

    Raises:
        UserError: naming `key` (the config key or file the path came from) when the file
            is missing, empty, a directory or not a readable safetensors file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = check_weights_file(path, where=key)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta, load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ValueError, ... for a bad file
        raise UserError(f"{key}: {_unreadable(exc, safetensors=True)}") from exc


def looks_like_safetensors(path: Path) -> bool:
    """Whether a file starts as safetensors files do (an 8-byte header length, then JSON),
    whatever its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def torch_load_weights(path: Path, *, where: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: never unpickles code.

    Raises:
        UserError: naming `where` when the file is missing, empty, a directory, damaged,
            carries Python objects other than tensors (a pickle with code), or is no torch
            file at all.
    """
    import warnings

    import torch

    path = check_weights_file(path, where=where)
    if looks_like_safetensors(path):
        raise UserError(f"{where}: a safetensors file, not a PyTorch checkpoint; give it where "
                        "weights are asked for (ckpt=<file>.safetensors)")
    try:
        with warnings.catch_warnings():  # "pickle protocol 4" and the like: not the user's
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or foreign file
        raise UserError(f"{where}: {_unreadable(exc, safetensors=False)}") from exc


def _unreadable(exc: BaseException, *, safetensors: bool) -> str:
    """What is wrong with a weights file that failed to load, and the fix, in one line."""
    import pickle

    first = (str(exc).splitlines() or [""])[0].strip()
    first = re.split(r"(?<=[.;])\s", first)[0][:160]  # the first sentence, not a cut one
    if safetensors:
        return (f"not a readable safetensors file ({first}); it is damaged (truncated or "
                "overwritten) or of another format: restore it or give another weights file")
    if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
        return ("cannot be read without unpickling code: it holds Python objects besides "
                "tensors (which genframe never unpickles), or it is not a checkpoint at all; "
                "give a checkpoint genframe wrote, or convert the file to safetensors where it "
                "was made")
    if isinstance(exc, (EOFError, OSError, RuntimeError)) or "zip" in first.lower():
        return (f"cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {first}); "
                "it is damaged (truncated or overwritten): restore it or give another weights file")
    return (f"not a PyTorch checkpoint readable without unpickling code ({type(exc).__name__}: "
            f"{first}); give a .ckpt or .safetensors file genframe wrote")


def read_state_dict(path: str | Path, *, where: str) -> dict[str, Any]:
    """A state dict (name -> tensor) from a ``.safetensors`` file or a torch file.

    Torch files are read with ``torch.load(weights_only=True)``, never unpickling code
    (written here rather than with ``timm.models.load_state_dict``, which older timm 1.0
    releases call without ``weights_only``). Checkpoints that wrap the weights
    (``state_dict_ema``, ``model_ema``, ``state_dict``, ``model``) are unwrapped,
    preferring EMA weights as timm's reader does, and DDP's ``module.`` prefix is removed.

    Raises:
        UserError: naming `where` (a key, or ``key=file``) and the file when it is
            missing, empty, unreadable or holds no state dict of tensors.
    """
    import torch

    path = Path(path).expanduser()
    label = where if "=" in where else f"{where}={path}"  # "key=file", named once
    if path.suffix == ".safetensors" or looks_like_safetensors(path):
        _, state = read_safetensors(path, key=label)
    else:
        state = torch_load_weights(path, where=label)
    if isinstance(state, dict):
        for wrapper in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UserError(f"{label}: holds no state dict of tensors (names -> tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_strict(module: Any, state: dict[str, Any], *, where: str,
                           what: str | None = None, ignore: Iterable[str] = (),
                           finite: str = "all") -> None:
    """Load `state` into `module`; every key must be there, with the module's shapes.

    Args:
        module: an ``nn.Module``.
        state: name -> tensor.
        where: the config key or file the state came from, for messages.
        what: how to name the module in messages (default: its class name).
        ignore: keys of `state` to drop first (a classifier head the module lacks).
        finite: which values must be finite: ``"all"``, or ``"parameters"`` (a model's
            buffers may hold an infinite mask on purpose).

    Raises:
        UserError: naming `where`, with counts and examples of missing, unexpected and
            wrongly shaped keys, or of non-finite values. Nothing is loaded then.
    """
    import torch

    state = {k: v for k, v in state.items() if k not in set(ignore)}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k}: {tuple(state[k].shape)} in the weights, {tuple(own[k].shape)} in the model"
                   for k in own if k in state and state[k].shape != own[k].shape]
    what = what or type(module).__name__
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{plural(len(missing), 'key')} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{plural(len(unexpected), 'key')} unexpected (e.g. {unexpected[:3]})")
        if wrong_shape:
            parts.append(f"{plural(len(wrong_shape), 'key')} of another shape (e.g. {wrong_shape[:2]})")
        raise UserError(f"{where}: the weights do not fit {what}: " + "; ".join(parts))
    checked = state if finite == "all" else dict(module.named_parameters())
    bad = [k for k, v in state.items()
           if k in checked and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{where}: non-finite values in {bad[:3]}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # a module's own load hook refusing a value
        raise UserError(f"{where}: the weights do not fit {what}: "
                        f"{(str(exc).splitlines() or [''])[-1].strip()[:200]}") from exc
