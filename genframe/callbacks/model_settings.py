"""Trainer settings that change how the model runs while it trains, not what it learns:
``trainer.compile`` (`TorchCompile`) and ``trainer.activation_checkpointing``
(`ActivationCheckpointing`). `genframe.tasks.build.build_trainer` adds them when set;
both undo themselves when training ends, so sampling and export see the plain model.
"""

from __future__ import annotations

import functools
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from genframe.errors import UserError

#: ``trainer.compile`` values: false, true (torch.compile's default mode) or a mode.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(value: Any) -> str | None:
    """The torch.compile mode of a ``trainer.compile`` value; None for false.

    Raises:
        UserError: a value other than true, false or one of `COMPILE_MODES`.
    """
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise UserError(f"trainer.compile={value!r}: expected true, false or a torch.compile mode "
                    f"({', '.join(COMPILE_MODES)})")


class TorchCompile(pl.Callback):
    """Compile the model's trainable networks with ``torch.compile`` while it trains.

    Each direct child module of the model that has trainable parameters (a U-Net, a GPT,
    an encoder and a decoder) is compiled in place (``nn.Module.compile``: parameter
    names and checkpoints stay as they are) when fitting starts and returned to eager
    mode when it ends. The first steps pay the compilation (tens of seconds on a CPU);
    it pays off for long runs of larger models. Frozen parts (a fixed text encoder, an
    EMA copy) stay eager.

    Args:
        mode: a torch.compile mode (`COMPILE_MODES`).
    """

    def __init__(self, mode: str = "default") -> None:
        self.mode = compile_mode(mode) or "default"
        self._compiled: list[nn.Module] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.utilities import rank_zero_info

        names = []
        for name, child in pl_module.named_children():
            if any(p.requires_grad for p in child.parameters()):
                child.compile(mode=None if self.mode == "default" else self.mode)
                self._compiled.append(child)
                names.append(name)
        rank_zero_info(f"trainer.compile: torch.compile (mode {self.mode}) of {', '.join(names)}; "
                       "the first steps (and a shorter last batch) compile, which takes a while")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for child in self._compiled:
            child._compiled_call_impl = None  # what nn.Module.compile set: eager again
        self._compiled = []


class ActivationCheckpointing(pl.Callback):
    """Recompute the activations of the model's repeated blocks during the backward pass
    instead of keeping them (Chen et al. 2016, "Training Deep Nets with Sublinear Memory
    Cost"): less memory for about one more forward pass of compute.

    The blocks are the module types the model names in
    ``activation_checkpointing_blocks()`` (a transformer's layers, a U-Net's residual and
    attention blocks); each one's forward runs under ``torch.utils.checkpoint`` (the
    non-reentrant kind, which keeps dropout's random draws the same in the recomputation)
    whenever gradients are on, and as before otherwise (sampling, validation).

    Raises:
        UserError: the model names no blocks (it does not support it).
    """

    def __init__(self, model: pl.LightningModule) -> None:
        blocks = tuple(getattr(model, "activation_checkpointing_blocks", lambda: ())())
        if not blocks:
            name = getattr(getattr(model, "model_spec", None), "name", type(model).__name__)
            raise UserError(
                f"trainer.activation_checkpointing=true: model '{name}' does not support it "
                "(it names no blocks to recompute); the transformer and the U-Net models "
                "(diffusion, text2image, upscaler) do. Set trainer.activation_checkpointing=false")
        self.blocks = blocks
        self._wrapped: list[nn.Module] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for module in pl_module.modules():
            if isinstance(module, self.blocks) and "forward" not in vars(module):
                module.forward = _checkpointed(module.forward)
                self._wrapped.append(module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for module in self._wrapped:
            del module.forward
        self._wrapped = []


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run
