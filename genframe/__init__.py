"""genframe: train, fine-tune, evaluate and sample generative models by editing YAML.

The public names below are imported lazily so that ``import genframe`` (and the CLI's
``--help``) stays fast; torch and Lightning load only when a task needs them.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load": "genframe.api",
    "write_samples": "genframe.sample_writer",
    "GenerativeModule": "genframe.module",
    "GenerativeDataModule": "genframe.data.base",
    "Samples": "genframe.samples",
    "hookimpl": "genframe.hookspecs",
    "UserError": "genframe.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'genframe' has no attribute {name!r}")
