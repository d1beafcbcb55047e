"""Tokens prepared once, stored as a memory-mapped array keyed by text and tokenizer.

Entries live in ``tokens/`` of genframe's cache folder (`genframe.cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from genframe.cache import TOKENS
from genframe.cache import cache_dir as cache_root
from genframe.files import atomic_write_bytes, atomic_write_json

log = logging.getLogger("genframe")

FORMAT = "genframe-tokens/1"


def default_cache_dir() -> Path:
    """``tokens/`` of genframe's cache folder (``$GENFRAME_CACHE``, see `genframe.cache`)."""
    return cache_root(TOKENS)


def docs_fingerprint(docs: Sequence[str]) -> str:
    """A hash of the documents (order and boundaries included)."""
    h = hashlib.sha256(FORMAT.encode())
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def token_cache(docs: Sequence[str], tokenizer, cache_dir: str | Path | None = None,
                *, separator: int | None = None) -> tuple[np.memmap, bool]:
    """The documents tokenised and concatenated into one read-only memory-mapped array.

    The key is a hash of the documents, the tokenizer's vocabulary and `separator` (an id
    placed between documents, or none). Returns ``(tokens, hit)``: `hit` is True when the
    array was opened from the cache instead of being tokenised now.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(
        f"{FORMAT}|{docs_fingerprint(docs)}|{tokenizer.fingerprint()}|{separator}".encode()
    ).hexdigest()[:32]
    dtype = dtype_for(tokenizer.vocab_size)
    data_path = cache_dir / f"{key}.bin"
    meta_path = cache_dir / f"{key}.json"
    from genframe.cache import entry_lock

    # One process tokenises; others wanting the same entry (DDP ranks) wait, then read it.
    with entry_lock(data_path):
        if meta_path.is_file() and data_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
                if (meta.get("format") == FORMAT and meta.get("dtype") == dtype.name
                        and data_path.stat().st_size == meta["length"] * dtype.itemsize):
                    log.info("tokens from cache %s (%d tokens)", data_path, meta["length"])
                    return _open(data_path, dtype, meta["length"]), True
            except (OSError, ValueError, KeyError):
                pass  # a damaged entry is rebuilt below
        if hasattr(tokenizer, "encode_batch"):
            pieces = tokenizer.encode_batch(list(docs))
        else:
            pieces = [tokenizer.encode(d) for d in docs]
        parts = []
        for i, ids in enumerate(pieces):
            if separator is not None and i:
                parts.append(np.array([separator], dtype=dtype))
            parts.append(np.asarray(ids, dtype=dtype))
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)

        atomic_write_bytes(data_path, tokens.tobytes())
        atomic_write_json(meta_path, {"format": FORMAT, "dtype": dtype.name,
                                      "length": int(tokens.size), "kind": tokenizer.kind,
                                      "vocab_size": tokenizer.vocab_size, "documents": len(docs)})
        log.info("tokenised %d documents into %d tokens, cached at %s", len(docs), tokens.size,
                 data_path)
        return _open(data_path, dtype, int(tokens.size)), False


def _open(path: Path, dtype: np.dtype, length: int) -> np.memmap:
    if length == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)  # type: ignore[return-value]
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))
