"""genframe's cache folder: what it computes once and reuses across runs.

The folder is ``$GENFRAME_CACHE`` if set, else ``$XDG_CACHE_HOME/genframe``, else
``~/.cache/genframe``. Each user of the cache has a subfolder of its own:

- ``classifiers/``: the data classifiers of the image metrics, as safetensors
  (`genframe.metrics.classifier.load_or_train_classifier`);
- ``tokens/``: tokenised text as memory-mapped arrays (`genframe.text.cache.token_cache`).

Every entry is keyed by a hash of what made it and is written atomically, so runs that
share the folder never read each other's half-written files. Deleting the folder, or any
entry in it, is always safe: what is missing is computed again on next use.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CLASSIFIERS", "TOKENS", "cache_dir"]

CLASSIFIERS = "classifiers"
TOKENS = "tokens"


def cache_dir(subfolder: str | None = None) -> Path:
    """Where genframe caches what it computes once, or one of its subfolders.

    Args:
        subfolder: e.g. `CLASSIFIERS` or `TOKENS`; None for the cache folder itself.

    The folder is not created here; writers create what they write into.
    """
    env = os.environ.get("GENFRAME_CACHE")
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "genframe"
    return root / subfolder if subfolder else root


def entry_lock(path: Path | str):
    """A lock on one cache entry (``<path>.lock``, an OS file lock from `filelock`) for
    the check-compute-write of that entry: processes that want the same entry at once
    (the ranks of a DDP run, the jobs of a sweep) compute it once, the others wait and
    read it. The kernel drops the lock when its holder dies."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")
