"""``genframe shards``: convert a data set into WebDataset shards that ``data=image_shards``
or ``data=text_shards`` stream (see `genframe.data.shards`)."""

from __future__ import annotations

import io
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from genframe.data.base import SPLIT_WORDS, SPLITS
from genframe.data.shards import INDEX, PRESETS, write_index, write_shards
from genframe.errors import UserError, plural

log = logging.getLogger("genframe")

USAGE = ("genframe shards data=NAME [data.KEY=VALUE ...] out=DIR [shard_size=N] "
         "[chunk_tokens=N] [overwrite=true]")
HELP = f"""usage: {USAGE}

Convert a data set into WebDataset tar shards, one set per split (train, val, test, as
the data module splits them), plus {INDEX} (what the folder holds) and, for text, the
tokenizer. Stream them with data=image_shards or data=text_shards data.path=DIR; under
DDP each rank reads its own shards, each loader worker its own part of those.

  data=image_folder data.root=DIR   images (with class labels from sub-folders), resized
                                    to data.image_size; any image data module works
  data=text [data.source=...]       token ids of the text data module (its tokenizer)
  out=DIR                           the shard folder (new or empty; overwrite=true
                                    replaces an earlier conversion there)
  shard_size=N                      samples per shard (default 1000 images, or 64 chunks)
  chunk_tokens=N                    text: tokens per sample (default 2048); data.block_size
                                    of the streaming run must be smaller
"""

_OWN_KEYS = ("out", "shard_size", "chunk_tokens", "overwrite")


def convert(args: list[str]) -> dict[str, Any]:
    """``genframe shards data=NAME [data.KEY=VALUE ...] out=DIR [shard_size=N]
    [chunk_tokens=N] [overwrite=true]``: write a data set's splits as tar shards.

    The data module is composed and built as ``genframe train`` would (so every
    ``data.*`` key and check applies), set up, and each split written: images as 8-bit
    PNGs at the data's size and channels (plus ``.cls`` labels), text as chunks of
    `chunk_tokens` token ids (``.npy``) with the data's tokenizer saved beside them. An
    image folder is read lazily (files Pillow cannot read are skipped and counted). The
    index is written last, so a folder whose conversion was interrupted has none and is
    refused by the readers.

    Returns:
        ``{"out": Path, "kind": "image" | "text", "counts": {split: samples}, "shards":
        int, "skipped": int}``.

    Raises:
        UserError: a missing ``data=`` or ``out=``, an unknown argument, a bad value, a
            data module that is neither images (without captions) nor token windows, an
            ``out`` folder that is not empty (without ``overwrite=true``, or holding
            other files).
    """
    opts, overrides = _parse(args)
    out = Path(opts["out"]).expanduser()
    data, data_cfg = _build(overrides)  # builds (lists files), reads nothing yet
    _prepare_out(out, opts["overwrite"])
    start = time.perf_counter()
    provides = set(data.provides)
    if "tokens" in provides:
        kind = "text"
        result = _convert_text(data, out, opts["shard_size"] or 64, opts["chunk_tokens"])
    elif "image" in provides and "caption" not in provides:
        kind = "image"
        result = _convert_images(data, out, opts["shard_size"] or 1000)
    else:
        raise UserError(f"data={data_cfg.get('name')}: provides {', '.join(sorted(provides))}; "
                        "genframe shards converts images (with or without labels) or text "
                        "token windows, e.g. data=image_folder or data=text")
    meta, splits, skipped = result
    index = write_index(out, {"kind": kind, "source": data_cfg, kind: meta, "splits": splits,
                              "skipped": skipped})
    counts = {s: e["count"] for s, e in splits.items()}
    n_shards = sum(len(e["shards"]) for e in splits.values())
    unit = "images" if kind == "image" else "chunks"
    print(f"wrote {' / '.join(f'{n} {s}' for s, n in counts.items())} {unit} in "
          f"{plural(n_shards, 'shard')} to {out} in {time.perf_counter() - start:.1f} s"
          + (f" ({plural(skipped, 'unreadable file')} skipped)" if skipped else ""))
    hint = (f" data.image_size={meta['image_size']} data.channels={meta['channels']}"
            if kind == "image" else "")
    print(f"index: {index}\nstream them: genframe train data={PRESETS[kind]} data.path={out}{hint}")
    return {"out": out, "kind": kind, "counts": counts, "shards": n_shards, "skipped": skipped}


def _parse(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """This command's own keys, and the ``data`` overrides for Hydra."""
    opts: dict[str, Any] = {"out": None, "shard_size": 0, "chunk_tokens": 2048,
                            "overwrite": False}
    overrides = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or arg.startswith("-"):
            raise UserError(f"shards: {arg!r} is not key=value; usage: {USAGE}")
        if key in _OWN_KEYS:
            opts[key] = value
        elif key == "data" or key.startswith("data.") or key.startswith("+data."):
            overrides.append(arg)
        else:
            from genframe.errors import did_you_mean

            raise UserError(f"shards: unknown key {key!r}.{did_you_mean(key, _OWN_KEYS)} "
                            f"Expected data=..., data.KEY=..., {', '.join(_OWN_KEYS)}; "
                            f"usage: {USAGE}")
    if not any(a.startswith("data=") for a in overrides):
        raise UserError(f"shards: give the data to convert, e.g. data=image_folder "
                        f"data.root=DIR; usage: {USAGE}")
    if not opts["out"]:
        raise UserError(f"shards: give the folder to write, out=DIR; usage: {USAGE}")
    for key, low in (("shard_size", 1), ("chunk_tokens", 2)):
        value = opts[key]
        if key == "shard_size" and value in (0, "auto"):
            opts[key] = 0
            continue
        try:
            opts[key] = int(value)
        except (TypeError, ValueError):
            opts[key] = None
        if opts[key] is None or opts[key] < low:
            raise UserError(f"shards: {key}={value}: expected an integer >= {low}")
    flag = str(opts["overwrite"]).lower()
    if flag not in ("true", "false"):
        raise UserError(f"shards: overwrite={opts['overwrite']}: expected true or false")
    opts["overwrite"] = flag == "true"
    return opts, overrides


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Make `out`, or clear an earlier conversion there (`overwrite`); refuse anything else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file; expected a new or empty folder")
    entries = sorted(out.iterdir()) if out.exists() else []
    if entries:
        ours = [e for e in entries if e.name in (INDEX, "tokenizer.json") or (
            e.suffix == ".tar" and e.name.split("-")[0] in SPLITS)]
        others = [e.name for e in entries if e not in ours]
        if not overwrite or others:
            why = (f"it holds other files ({', '.join(others[:3])})" if others
                   else "it holds an earlier conversion")
            raise UserError(f"out={out} is not empty: {why}; expected a new or empty folder"
                            + ("" if others else ", or overwrite=true to replace it"))
        (out / INDEX).unlink(missing_ok=True)  # first: a half-replaced folder has no index
        for entry in ours:
            entry.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _build(overrides: list[str]):
    """The data module the overrides describe, and its plain config."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from genframe.config import compose
    from genframe.hydra_errors import explain
    from genframe.tasks.build import build_data

    try:
        cfg = compose("train", overrides)
        data_cfg = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(explain(exc, "train", overrides) or str(exc)) from None
    data = build_data(cfg.data)
    if hasattr(data, "cached"):
        data.cached = False  # an image folder: read each file when it is written
    return data, data_cfg


def _convert_images(data, out: Path, shard_size: int) -> tuple[dict, dict, int]:
    from genframe.data.image_folder import LazyImages

    data.setup("fit")
    skipped = 0
    splits = {}
    for split in SPLITS:
        dataset = getattr(data, f"{split}_set", None)
        if dataset is None:
            continue
        lazy = isinstance(dataset, LazyImages)
        missing: list[int] = []

        def encode(i: int, dataset=dataset, lazy=lazy, missing=missing) -> dict | None:
            if lazy:
                array = dataset.read(i)
                if array is None:
                    missing.append(i)
                    return None
                label = None if dataset.labels is None else int(dataset.labels[i])
            else:
                item = dataset[i]
                # [-1, 1] -> 0..255; exact for 256 levels, and for fewer the reader's
                # num_levels snaps the values back onto the same grid.
                x = ((item["image"].clamp(-1, 1) + 1) * 127.5).round().byte()  # (C, H, W)
                array = x.permute(1, 2, 0).numpy()
                label = int(item["label"]) if "label" in item else None
            sample = {"__key__": f"{split}{i:09d}", "png": _png(array)}
            if label is not None:
                sample["cls"] = str(label).encode()
            return sample

        with ThreadPoolExecutor(4) as pool:  # Pillow releases the GIL while it (de)codes
            samples = (s for s in pool.map(encode, range(len(dataset)), chunksize=64) if s)
            shards = write_shards(out, split, samples, shard_size)
        if missing:
            log.warning("shards: skipped %s of the %s split (unreadable)",
                        plural(len(missing), "file"), SPLIT_WORDS[split])
        skipped += len(missing)
        if not shards:
            raise UserError(f"data: the {SPLIT_WORDS[split]} split has no readable image")
        splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards}
    meta = {"image_size": int(data.image_size), "channels": int(data.channels),
            "num_classes": int(getattr(data, "num_classes", 0) or 0)
            if "label" in data.provides else 0,
            "class_names": list(getattr(data, "class_names", []) or [])}
    return meta, splits, skipped


def _png(array: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes (grey for C = 1)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buf, "PNG")
    return buf.getvalue()


def _convert_text(data, out: Path, shard_size: int, chunk_tokens: int) -> tuple[dict, dict, int]:
    data.setup("fit")
    tokenizer = data.tokenizer
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.int32
    splits, totals = {}, {}
    for split in SPLITS:
        dataset = getattr(data, f"{split}_set", None)
        if dataset is None:
            continue
        tokens = getattr(dataset, "tokens", None)
        if tokens is None:
            raise UserError(f"data: the {SPLIT_WORDS[split]} split of {type(data).__name__} is "
                            "not one token stream (e.g. chat data with loss masks); genframe "
                            "shards converts data=text")
        tokens = np.asarray(tokens)
        totals[split] = int(len(tokens))

        def chunks(tokens=tokens, split=split):
            for k, a in enumerate(range(0, len(tokens), chunk_tokens)):
                chunk = tokens[a:a + chunk_tokens].astype(dtype)
                if len(chunk) < 2:  # no window fits one token
                    continue
                buf = io.BytesIO()
                np.save(buf, chunk)
                yield {"__key__": f"{split}{k:09d}", "npy": buf.getvalue(), "_tokens": len(chunk)}

        shards = write_shards(out, split, chunks(), shard_size)
        splits[split] = {"count": sum(s["count"] for s in shards), "shards": shards}
    tokenizer.save(out)
    meta = {"chunk_tokens": chunk_tokens, "tokenizer": tokenizer.kind,
            "vocab_size": int(tokenizer.vocab_size),
            "tokenizer_fingerprint": tokenizer.fingerprint(), "tokens": totals}
    return meta, splits, 0


def main(args: list[str]) -> int:
    """The CLI entry: ``--help`` prints the usage, otherwise `convert`."""
    if any(a in ("-h", "--help") for a in args):
        print(HELP)
        return 0
    convert(args)
    sys.stdout.flush()
    return 0

