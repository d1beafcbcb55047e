"""Hardware checks and the `auto` choices of the trainer presets."""

from __future__ import annotations

import functools
from typing import Any

from genframe.errors import UserError

CUDA_ONLY_STRATEGIES = ("fsdp", "deepspeed")


@functools.cache
def cpu_has_amx_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def resolve_trainer_kwargs(kwargs: dict[str, Any], num_parameters: int, choice: str) -> dict[str, Any]:
    """Check the machine can run `kwargs` and fill in ``precision: auto``."""
    import torch

    kwargs = dict(kwargs)
    accel = str(kwargs.get("accelerator", "auto"))
    has_cuda = torch.cuda.is_available()
    if accel in ("gpu", "cuda") and not has_cuda:
        raise UserError(
            f"trainer={choice} asks for a CUDA GPU (trainer.accelerator={accel}), but this "
            "machine has none (torch.cuda.is_available() is False). Use trainer=cpu or trainer=auto."
        )
    if accel == "tpu":
        raise UserError(f"trainer={choice}: no TPU runtime (torch_xla) on this machine")
    strategy = str(kwargs.get("strategy", "auto"))
    if any(strategy.startswith(s) for s in CUDA_ONLY_STRATEGIES) and not has_cuda:
        raise UserError(f"trainer.strategy={strategy} needs CUDA GPUs; this machine has none")
    if kwargs.get("precision") == "auto":
        kwargs["precision"] = auto_precision(accel, has_cuda, num_parameters)
    return kwargs


def auto_precision(accelerator: str, has_cuda: bool, num_parameters: int) -> str:
    """bf16-mixed where it pays off, else full precision.

    On CUDA GPUs with bf16 it always does. On CPUs with AMX a large bf16 matmul is ~6x
    faster than fp32, but for small models the casts cost more than they save; about
    2M parameters (width ~256) is where it starts to win.
    """
    import torch

    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and has_cuda)
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if cpu_has_amx_bf16() and num_parameters >= 2_000_000:
        return "bf16-mixed"
    return "32-true"
