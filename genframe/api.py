"""`genframe.load`: a trained model for an application, in one call.

    import genframe
    model = genframe.load("hub:digits-vae")          # or a run directory, a weights file
    samples = model.generate(8, condition={"label": 3}, seed=0)
    genframe.write_samples(samples, folder="threes")  # PNGs, grid.png, manifest.jsonl
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from genframe.errors import UserError

HUB_PREFIX = "hub:"
WEIGHT_SUFFIXES = (".safetensors", ".ckpt")


def load(source: str | os.PathLike, *, device: Any = "cpu", adapter: str | os.PathLike | None = None):
    """A trained model, rebuilt from `source` and ready for ``generate``.

    Args:
        source: a run directory (``"outputs/train/2026-12-01_10-00-00"``: its weights,
            checked against its run.json), a weights file (``.safetensors`` written by
            genframe, or a Lightning ``.ckpt``), the folder of ``genframe export``
            (format=safetensors), or a hub entry ``"hub:NAME"`` / ``"hub:NAME:VERSION"``
            (its checksums verified first).
        device: where the model runs (``"cpu"``, ``"cuda"``, a `torch.device`).
        adapter: an ``adapter.safetensors`` of LoRA adapters to add to the model.

    Returns:
        The model (a `genframe.GenerativeModule`) in eval mode on `device`, with its
        tokenizer (``model.tokenizer``, text models) and its constructor arguments
        (``model.hparams``). ``model.generate(num_samples, condition=..., seed=...,
        **sampling)`` returns `genframe.Samples`: images (N, C, H, W) in [0, 1] or
        texts; ``model.sampling_options()`` lists the sampling options.

    Raises:
        genframe.UserError: a missing or unreadable source, an unknown hub name or
            version, a damaged hub entry, an adapter that does not fit.
    """
    import torch

    from genframe.weights import load_model

    text = os.fspath(source)
    valid = ("give a run directory, a weights file (.safetensors or .ckpt) or "
             "'hub:NAME[:VERSION]'")
    if text.startswith(HUB_PREFIX):
        from genframe.hub import verified

        run, ckpt = str(verified(text[len(HUB_PREFIX):], key="source").path), None
    else:
        path = Path(text).expanduser()
        if not text.strip() or not path.exists():
            raise UserError(f"genframe.load({text!r}): no such run directory or weights file; {valid}")
        if path.is_dir() and (path / "export.json").is_file() and not (path / "model.safetensors").exists():
            raise UserError(f"genframe.load({text!r}): this is an ONNX/TorchScript export (export.json "
                            "lists its files): run them with onnxruntime or torch.jit.load; "
                            "genframe.load reads run directories and safetensors exports")
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
            raise UserError(f"genframe.load({text!r}): a {path.suffix or 'suffix-less'} file is not "
                            f"genframe weights; {valid}")
        run, ckpt = (str(path), None) if path.is_dir() else (None, str(path))
    model, _, _ = load_model(run, ckpt, None if adapter is None else os.fspath(adapter))
    try:
        target = torch.device(device)
        return model.to(target).eval()
    except (RuntimeError, AssertionError, ValueError) as exc:  # an unknown or absent device
        raise UserError(f"genframe.load(device={device!r}): {str(exc).splitlines()[0]}; "
                        "use 'cpu', or 'cuda' on a machine with a GPU") from None
