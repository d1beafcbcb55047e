"""The model's description (`ModelSpec`) and the record of where a file was made.

A `ModelSpec` is the one source of what a model is: its registered name, its constructor
arguments, its tokenizer (text models) and its LoRA adapters' config. `run.json`, the
metadata of ``model.safetensors`` and every checkpoint carry it (as `ModelSpec.to_dict`),
and `genframe.weights.build_model` rebuilds a model from it.

Files written by genframe carry a format version (`FORMAT_VERSION`) and the
`environment()` they were made in (genframe, Python, torch, Lightning and CUDA versions
and the device). Files of an older format are migrated when read (`ModelSpec.from_dict`,
`migrate_run_info`); a file of a newer format is refused with a message saying so.

Format history:

- 0: before versioning (no ``format_version`` key); a model's width list could be called
  ``channels`` (a model class maps old argument names with ``renamed_arguments``).
- 1: ``format_version`` and ``environment`` in run.json, weights and checkpoints.
"""

from __future__ import annotations

import copy
import platform
from dataclasses import dataclass, field, replace
from typing import Any

from genframe.errors import UserError

#: The format of run.json, weights metadata and checkpoints written by this genframe.
FORMAT_VERSION = 1


@dataclass
class ModelSpec:
    """What a model is, enough to rebuild it.

    Attributes:
        name: the registered model name (``model=<name>``).
        kwargs: the constructor arguments (plain Python values).
        tokenizer: a text model's tokenizer in its JSON form (`Tokenizer.to_json`).
        lora: the LoRA config (``r``, ``alpha``, ``dropout``, resolved
            ``target_modules``) when the weights carry adapters.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None

    def to_dict(self, *, tokenizer: bool = True) -> dict[str, Any]:
        """The JSON form. ``tokenizer=False`` leaves the tokenizer out (run.json names
        the model; the tokenizer has its own ``tokenizer.json``)."""
        out: dict[str, Any] = {"format_version": FORMAT_VERSION, "name": self.name,
                               "kwargs": copy.deepcopy(self.kwargs)}
        if self.lora is not None:
            out["lora"] = copy.deepcopy(self.lora)
        if tokenizer and self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer
        return out

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> ModelSpec:
        """Read (and migrate) the JSON form written by any genframe so far.

        Raises:
            UserError: naming `where` when the value is not a model description or was
                written by a newer genframe.
        """
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) \
                or not isinstance(data.get("kwargs", {}), dict):
            raise UserError(f"{where}: holds no genframe model description (name and arguments)")
        check_format(data.get("format_version", 0), where=where)
        return cls(name=data["name"], kwargs=copy.deepcopy(data.get("kwargs", {})),
                   tokenizer=data.get("tokenizer"), lora=copy.deepcopy(data.get("lora")))

    def with_kwargs(self, **changes: Any) -> ModelSpec:
        """A copy with some constructor arguments changed."""
        return replace(self, kwargs={**self.kwargs, **changes})


def check_format(version: Any, *, where: str) -> int:
    """The format version of a file, refused when newer than this genframe reads."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise UserError(f"{where}: format_version {version!r} is not a genframe format")
    if version > FORMAT_VERSION:
        from genframe import __version__

        raise UserError(
            f"{where}: written by a newer genframe (format {version}; genframe {__version__} "
            f"reads formats up to {FORMAT_VERSION}); upgrade genframe to read it"
        )
    return version


def migrate_run_info(info: dict[str, Any], *, where: str) -> dict[str, Any]:
    """run.json of any format so far, in today's form (the file is not rewritten).

    Format 0 had no ``format_version`` or ``environment``; its model description is read
    by `ModelSpec.from_dict`, which accepts both.
    """
    version = check_format(info.get("format_version", 0), where=where)
    info = dict(info)
    info["format_version_read"] = version
    info.setdefault("environment", None)
    if isinstance(info.get("model"), dict):
        info["model"] = ModelSpec.from_dict(info["model"], where=where).to_dict()
    return info


def environment(device: Any = None) -> dict[str, Any]:
    """Where a file is being made: versions of genframe, Python, torch, Lightning and
    CUDA (None on a CPU build), and the device (``"cpu"``, ``"cuda:0 (NVIDIA H200)"``)."""
    import pytorch_lightning as pl
    import torch

    from genframe import __version__

    device = str(device) if device is not None else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        device = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return {
        "format_version": FORMAT_VERSION,
        "genframe": __version__,
        "python": platform.python_version(),
        # str(): torch's version is a str subclass a weights-only checkpoint load refuses.
        "torch": str(torch.__version__),
        "pytorch_lightning": str(pl.__version__),
        "cuda": None if torch.version.cuda is None else str(torch.version.cuda),
        "device": device,
    }
