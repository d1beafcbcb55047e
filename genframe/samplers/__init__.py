"""Noise schedules and samplers for diffusion models: small objects chosen at generate time.

The public names are imported lazily so the CLI can list samplers without importing torch.
"""

from __future__ import annotations

_LAZY = {
    "Sampler": "genframe.samplers.base",
    "Denoiser": "genframe.samplers.base",
    "NoiseSchedule": "genframe.samplers.schedules",
    "make_schedule": "genframe.samplers.schedules",
    "DDPMSampler": "genframe.samplers.ddpm",
    "DDIMSampler": "genframe.samplers.ddim",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'genframe.samplers' has no attribute {name!r}")
