"""Sharded data streamed from WebDataset tar files: images or tokens, a part per rank.

A shard folder is what ``genframe shards`` writes: per split, tar files in the WebDataset
layout (``train-000000.tar``, ...; one sample = files sharing a key: ``KEY.png`` +
``KEY.cls`` for images, ``KEY.npy`` for a chunk of token ids) and one index,
``genframe-shards.json``, written last, that says what the folder holds (kind, source,
image size and channels or the tokenizer, item counts, each shard's size) with a
fingerprint. Reading refuses a folder without an index (empty, or a conversion that did
not finish), with missing or changed shards, or of another kind or shape than the config
asks for.

Why WebDataset: tar shards are read front to back, which suits network and cluster file
systems, any tool can inspect them, and the library is small (it brings only
``braceexpand``); LitData's optimised format would also need boto3 and obstore. Its tar
reading is used here; which shards each rank and loader worker reads, and how many items,
is genframe's own (`rank_part`, `worker_quotas`), so that every rank takes the same number
of training batches per epoch (DDP would wait forever for a rank that stopped early).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from genframe.data.base import SPLIT_WORDS, SPLITS, GenerativeDataModule
from genframe.errors import UserError, plural

log = logging.getLogger("genframe")

INDEX = "genframe-shards.json"
FORMAT = "genframe-shards"
VERSION = 1
KINDS = ("image", "text")
#: The data preset that streams each kind.
PRESETS = {"image": "image_shards", "text": "text_shards"}

T = TypeVar("T")


# -- which part of the data each rank and worker reads ------------------------------------

def rank_part(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items (shards) rank `rank` of `world_size` reads: every `world_size`-th one
    from position `rank`. The parts of ranks 0..world_size-1 are disjoint and together
    hold every item; their sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of world size {world_size}")
    return list(items[rank::world_size])


def worker_quotas(counts: Sequence[int], batches: int, batch_size: int) -> list[int]:
    """How many items each of ``len(counts)`` loader workers yields so that together they
    make exactly `batches` full batches of `batch_size`.

    A worker batches only its own items, so each quota is a multiple of `batch_size` and
    at most what the worker holds (`counts`). Workers holding more get more (largest
    share first). Raises ValueError if the workers cannot fill `batches` batches.
    """
    full = [c // batch_size for c in counts]
    if sum(full) < batches:
        raise ValueError(f"{sum(full)} full batches, {batches} asked")
    quota = [0] * len(counts)
    left = batches
    while left:  # one batch at a time to the worker with the most unused full batches
        w = max(range(len(counts)), key=lambda i: (full[i] - quota[i], -i))
        quota[w] += 1
        left -= 1
    return [q * batch_size for q in quota]


def current_rank() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when it is initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """Items streamed from tar shards; one rank's part, split again between its workers.

    Each rank reads the shards `rank_part` gives it (`rank`/`world_size`, set by the data
    module from torch.distributed when the loader is made), and each DataLoader worker
    every ``num_workers``-th of those. Training streams (``shuffle=True``) change the
    order of their shards every epoch (seeded by `seed`, the rank, the worker and the
    epoch) and mix items through a buffer of `shuffle_buffer`; and every rank yields the
    same number of full batches (``len(self)`` items), the fewest any rank can fill, so
    DDP ranks stop together (up to a batch per worker and the ranks' difference are left
    out per epoch). Validation and test streams yield every item of their part in order.

    Args:
        shards: the shard files of one split.
        counts: the items each shard yields (after `decode`).
        decode: a picklable callable turning one WebDataset sample (``{"__key__", ext:
            bytes}``) into an iterator of items.
        batch_size: the loader's batch size (training quotas are whole batches).
        shuffle: training order (see above).
        seed: base seed of the order.
        shuffle_buffer: items mixed at a time when shuffling.
    """

    def __init__(self, shards: Sequence[Path], counts: Sequence[int], decode: Callable,
                 batch_size: int, shuffle: bool, seed: int = 0, shuffle_buffer: int = 1000,
                 ) -> None:
        self.shards = [str(s) for s in shards]
        self.counts = [int(c) for c in counts]
        self.decode = decode
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.rank, self.world_size = 0, 1
        self.num_workers = 0  # the loader's; set by the data module with the rank
        self.epoch = 0  # counts this copy's passes (workers persist between epochs)

    def set_rank(self, rank: int, world_size: int, num_workers: int) -> None:
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers

    def _parts(self, rank: int) -> list[list[int]]:
        """Shard indices of each worker of `rank`."""
        mine = rank_part(range(len(self.shards)), rank, self.world_size)
        workers = max(1, self.num_workers)
        return [mine[w::workers] for w in range(workers)]

    def batches(self) -> int:
        """Training: full batches every rank can fill, the same for all ranks."""
        return min(sum(sum(self.counts[i] for i in part) // self.batch_size
                       for part in self._parts(r)) for r in range(self.world_size))

    def __len__(self) -> int:
        if self.shuffle:
            return self.batches() * self.batch_size
        return sum(self.counts[i] for part in self._parts(self.rank) for i in part)

    def __iter__(self) -> Iterator[Any]:
        import webdataset as wds

        info = get_worker_info()
        worker = info.id if info is not None else 0
        parts = self._parts(self.rank)
        shards = list(parts[worker]) if worker < len(parts) else []
        limit = None
        if self.shuffle:
            counts = [sum(self.counts[i] for i in part) for part in parts]
            limit = worker_quotas(counts, self.batches(), self.batch_size)[worker]
            rng = random.Random(hash((self.seed, self.rank, worker, self.epoch)))
            rng.shuffle(shards)
        self.epoch += 1
        items = (item for sample in wds.tarfile_samples([{"url": self.shards[i]} for i in shards])
                 for item in self.decode(sample))
        if self.shuffle:
            items = _buffer_shuffle(items, self.shuffle_buffer, rng)
        for n, item in enumerate(items):
            if limit is not None and n >= limit:
                return
            yield item


def _buffer_shuffle(items: Iterator[T], size: int, rng: random.Random) -> Iterator[T]:
    """Items in a shuffled order, mixing `size` at a time (as WebDataset's shuffle)."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        buffer[j], item = item, buffer[j]
        yield item
    rng.shuffle(buffer)
    yield from buffer


# -- writing ------------------------------------------------------------------------------

def write_shards(out: Path, split: str, samples: Iterator[dict], shard_size: int) -> list[dict]:
    """Write WebDataset samples into ``out/SPLIT-000000.tar``, ``SPLIT-000001.tar``, ...

    Args:
        out: the shard folder.
        split: the split's name (the files' prefix).
        samples: ``{"__key__": str, EXT: bytes, ...}``; a ``"_tokens"`` entry is not
            written but recorded (its value in the shard's last sample) as ``last_tokens``.
        shard_size: samples per shard (the last one may hold fewer).

    Returns:
        one ``{"file", "count", "bytes"[, "last_tokens"]}`` per shard written.
    """
    import webdataset as wds

    shards: list[dict] = []
    writer, entry = None, None
    for sample in samples:
        if writer is None or entry["count"] == shard_size:
            if writer is not None:
                writer.close()
            entry = {"file": f"{split}-{len(shards):06d}.tar", "count": 0}
            shards.append(entry)
            writer = wds.TarWriter(str(Path(out) / entry["file"]), encoder=False)
        writer.write({k: v for k, v in sample.items() if k != "_tokens"})
        entry["count"] += 1
        if "_tokens" in sample:
            entry["last_tokens"] = int(sample["_tokens"])
    if writer is not None:
        writer.close()
    for entry in shards:
        entry["bytes"] = (Path(out) / entry["file"]).stat().st_size
    return shards


# -- the index ----------------------------------------------------------------------------

def fingerprint(index: dict[str, Any]) -> str:
    """sha256 of an index's content without its own fingerprint."""
    body = {k: v for k, v in index.items() if k != "fingerprint"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_index(out: Path, index: dict[str, Any]) -> Path:
    """Write `index` (with format, version and fingerprint added) as the folder's index,
    atomically: a folder has an index only once every shard is in place."""
    from genframe.files import atomic_write_json

    index = {"format": FORMAT, "version": VERSION, **index}
    index["fingerprint"] = fingerprint(index)
    path = Path(out) / INDEX
    atomic_write_json(path, index)
    return path


def read_index(path: str | Path, kind: str, key: str = "data.path") -> tuple[Path, dict]:
    """The checked index of the shard folder `path` for data of `kind`.

    Raises:
        UserError (naming `key`): the folder does not exist, is empty, has no index (not
            made by ``genframe shards``, or a conversion that did not finish), an index of
            another format or kind, or shards missing or of another size than recorded.
    """
    folder = Path(os.path.expanduser(str(path)))
    made = f"a folder written by `genframe shards data=... out={folder}`"
    if not folder.exists():
        raise UserError(f"{key}={path}: {folder} does not exist; expected {made}")
    if not folder.is_dir():
        raise UserError(f"{key}={path}: {folder} is a file; expected {made}")
    index_file = folder / INDEX
    if not index_file.is_file():
        entries = sorted(p.name for p in folder.iterdir())
        if not entries:
            raise UserError(f"{key}={path}: {folder} is empty; expected {made}")
        tars = [e for e in entries if e.endswith(".tar")]
        what = (f"{plural(len(tars), '.tar file')} but no {INDEX}: made by another tool, or "
                "a conversion that did not finish (the index is written last)"
                if tars else f"no {INDEX} (found {', '.join(entries[:3])}"
                f"{', ...' if len(entries) > 3 else ''})")
        raise UserError(f"{key}={path}: {folder} has {what}; expected {made}")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{key}={path}: {index_file} is not readable JSON ({exc}); expected "
                        f"the index of {made}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{key}={path}: {index_file} is not a genframe shard index; expected {made}")
    if index.get("version") != VERSION:
        raise UserError(f"{key}={path}: shard index version {index.get('version')!r}; this "
                        f"genframe reads version {VERSION}: convert the data again")
    if index.get("fingerprint") != fingerprint(index):
        raise UserError(f"{key}={path}: {index_file} was changed after it was written (its "
                        "fingerprint does not match); convert the data again")
    if index.get("kind") != kind:
        got = index.get("kind")
        raise UserError(
            f"{key}={path}: the shards hold {got} data (made from {_source(index)}), but "
            f"data={PRESETS[kind]} reads {kind} shards; expected data={PRESETS.get(got, '?')} "
            f"for this folder, or a folder of {kind} shards")
    for split, entry in index["splits"].items():
        for shard in entry["shards"]:
            file = folder / shard["file"]
            if not file.is_file():
                raise UserError(f"{key}={path}: the {SPLIT_WORDS.get(split, split)} shard "
                                f"{shard['file']} listed in {INDEX} is missing; copy the whole "
                                "folder, or convert the data again")
            if file.stat().st_size != shard["bytes"]:
                raise UserError(f"{key}={path}: shard {shard['file']} holds "
                                f"{file.stat().st_size} bytes, {INDEX} says {shard['bytes']} "
                                "(cut short or changed); copy it again, or convert the data again")
    if not index["splits"].get("train", {}).get("shards") or not index["splits"].get(
            "val", {}).get("shards"):
        raise UserError(f"{key}={path}: the shards have no training or no validation split; "
                        "expected both (convert again)")
    return folder, index


def _source(index: dict) -> str:
    source = index.get("source", {})
    name = source.get("name", "?")
    where = source.get("root") or source.get("path") or source.get("source") or ""
    return f"data={name}" + (f" {where}" if where else "")


# -- decoding (picklable: loader workers receive them) ------------------------------------

class DecodeImage:
    """A sample ``{"png", "cls"?}`` -> ``{"image": (C, H, W) float in [-1, 1], "label"?}``."""

    def __init__(self, num_levels: int, labels: bool) -> None:
        self.num_levels = num_levels
        self.labels = labels

    def __call__(self, sample: dict) -> Iterator[dict]:
        from PIL import Image

        with Image.open(io.BytesIO(sample["png"])) as im:
            array = np.asarray(im, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]  # (H, W) -> (H, W, 1)
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W) uint8
        if self.num_levels < 256:
            image = torch.round(image.float() * ((self.num_levels - 1) / 255.0))
        item = {"image": image.float() / ((self.num_levels - 1) / 2.0) - 1.0}
        if self.labels:
            item["label"] = torch.tensor(int(sample["cls"]), dtype=torch.long)
        yield item


class DecodeTokens:
    """A sample ``{"npy"}`` (one chunk of token ids) -> its windows of ``block_size + 1``
    tokens as ``{"tokens": (T + 1,) long}``, consecutive and non-overlapping; training
    windows start at a random offset inside the chunk (the chunk's spare tokens)."""

    def __init__(self, block_size: int, random_offsets: bool, seed: int = 0) -> None:
        self.block_size = block_size
        self.random_offsets = random_offsets
        self.rng = np.random.default_rng(seed)

    def __call__(self, sample: dict) -> Iterator[dict]:
        chunk = np.load(io.BytesIO(sample["npy"]))
        n = windows_in(len(chunk), self.block_size)
        spare = len(chunk) - 1 - n * self.block_size
        start = int(self.rng.integers(0, spare + 1)) if self.random_offsets else 0
        for k in range(n):
            a = start + k * self.block_size
            yield {"tokens": torch.from_numpy(chunk[a:a + self.block_size + 1].astype(np.int64))}


def windows_in(tokens: int, block_size: int) -> int:
    """Non-overlapping windows of ``block_size + 1`` tokens (sharing one) in a chunk."""
    return max(0, (tokens - 1) // block_size)


# -- data modules -------------------------------------------------------------------------

class ShardDataModule(GenerativeDataModule):
    """What the image and text shard modules share: the index, the streams, the loaders.

    Loaders are plain DataLoaders over `ShardStream` (workers persist between epochs). A
    stream has no random access, so a run continued from a mid-epoch checkpoint starts
    that epoch's stream again rather than at the exact batch.
    """

    kind = ""

    def __init__(self, path: str, batch_size: int, num_workers: int, seed: int,
                 shuffle_buffer: int) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
            raise UserError(f"data.shuffle_buffer must be an integer >= 1, got {shuffle_buffer!r}")
        self.folder, self.index = read_index(path, self.kind)
        self.path = path
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        #: Splits the shards hold (test may be missing: converted with test_fraction=0).
        self.test_fraction = 0 if not self.index["splits"].get("test", {}).get("shards") else None

    def _decoder(self, split: str) -> Callable:
        """What turns one stored sample of `split` into batch items (each subclass's own:
        `DecodeImage`, `DecodeTokens`)."""
        raise NotImplementedError(f"{type(self).__name__} must define _decoder()")

    def _counts(self, split: str) -> list[int]:
        return [s["count"] for s in self.index["splits"][split]["shards"]]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        for split in SPLITS:
            entry = self.index["splits"].get(split)
            if not entry or not entry["shards"]:
                continue
            setattr(self, f"{split}_set", ShardStream(
                [self.folder / s["file"] for s in entry["shards"]], self._counts(split),
                self._decoder(split), self.batch_size, shuffle=split == "train",
                seed=self.seed, shuffle_buffer=self.shuffle_buffer))
        self.summarize_splits(self.unit, {s: sum(self._counts(s)) for s in SPLITS
                                          if getattr(self, f"{s}_set") is not None},
                              detail=f"streamed from {len(self._all_shards())} shards in "
                              f"{self.folder}")

    def _all_shards(self) -> list[dict]:
        return [s for e in self.index["splits"].values() for s in e["shards"]]

    def dataloader(self, split: str) -> DataLoader:
        """A DataLoader streaming `split`: this rank's part (torch.distributed's rank and
        world size when initialised), each worker its own shards of it."""
        dataset = self.dataset(split)
        rank, world = current_rank()
        if world > len(dataset.shards):
            raise UserError(
                f"data.path={self.path}: the {SPLIT_WORDS[split]} split has "
                f"{plural(len(dataset.shards), 'shard')} for {world} ranks; expected at least "
                "one per rank: convert again with a smaller shard_size")
        dataset.set_rank(rank, world, self.num_workers)
        if split == "train" and dataset.batches() < 1:
            raise UserError(
                f"data.path={self.path}: rank {rank} of {world} cannot fill one training batch "
                f"of data.batch_size={self.batch_size} from its shards with "
                f"data.num_workers={self.num_workers}; expected a smaller batch size, fewer "
                "workers, or more data")
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)


class ImageShardsDataModule(ShardDataModule):
    """Images (and labels) streamed from shards ``genframe shards data=image_folder ...``
    wrote, as ``{"image": (B, C, H, W) float in [-1, 1], "label": (B,) long}``.

    Args:
        path: the shard folder (``~`` is expanded).
        image_size: must equal the shards' image size (the model is built for it).
        channels: must equal the shards' channels.
        num_classes: 0 takes the shards' class count; another value must equal it.
        num_levels: grey levels per channel, 2..256 (the shards hold 8-bit images).
        batch_size: images per batch.
        shuffle_buffer: training images mixed at a time.
        seed: seed of the training order.
        num_workers: DataLoader worker processes, each reading its own shards.

    Raises:
        UserError: see `read_index`; an image size or channel count other than the
            shards'; a class count that differs.
    """

    kind = "image"
    unit = "images"
    provides = frozenset({"image"})

    def __init__(self, path: str, image_size: int = 32, channels: int = 3, num_classes: int = 0,
                 num_levels: int = 256, batch_size: int = 64, shuffle_buffer: int = 1000,
                 seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(path, batch_size, num_workers, seed, shuffle_buffer)
        if not 2 <= num_levels <= 256:
            raise UserError(f"data.num_levels must be between 2 and 256, got {num_levels}")
        meta = self.index["image"]
        made = f"made from {_source(self.index)}"
        for key, value in (("image_size", image_size), ("channels", channels)):
            if value != meta[key]:
                raise UserError(
                    f"data.{key}={value}, but the shards in {self.folder} hold "
                    f"{meta['image_size']}x{meta['image_size']} images with {meta['channels']} "
                    f"channels ({made}); set data.{key}={meta[key]}, or convert again with "
                    f"data.{key}={value}")
        names = meta.get("class_names") or []
        count = meta.get("num_classes", 0)
        if num_classes and num_classes != count:
            raise UserError(f"data.num_classes={num_classes}, but the shards in {self.folder} "
                            f"hold {count} classes ({made}); set data.num_classes={count} or 0")
        self.image_size, self.channels, self.num_levels = image_size, channels, num_levels
        self.num_classes = count
        self.class_names: list[str] = list(names)
        self.provides = frozenset({"image", "label"} if count else {"image"})

    def _decoder(self, split: str) -> Callable:
        return DecodeImage(self.num_levels, labels=bool(self.num_classes))


class TextShardsDataModule(ShardDataModule):
    """Token windows streamed from shards ``genframe shards data=text ...`` wrote, as
    ``{"tokens": (B, T + 1) long}``; the tokenizer is the one saved with the shards.

    Args:
        path: the shard folder (``~`` is expanded).
        block_size: context length T; at most the shards' chunk length minus one.
        batch_size: windows per batch.
        shuffle_buffer: training windows mixed at a time.
        seed: seed of the training order.
        num_workers: DataLoader worker processes, each reading its own shards.

    Raises:
        UserError: see `read_index`; a block size the chunks cannot hold; a model's
            tokenizer (`use_tokenizer`) other than the shards'.
    """

    kind = "text"
    unit = "token windows"
    provides = frozenset({"tokens"})

    def __init__(self, path: str, block_size: int = 64, batch_size: int = 12,
                 shuffle_buffer: int = 1000, seed: int = 0, num_workers: int = 0) -> None:
        from genframe.text.tokenize import load_tokenizer

        super().__init__(path, batch_size, num_workers, seed, shuffle_buffer)
        meta = self.index["text"]
        if not 1 <= block_size < meta["chunk_tokens"]:
            raise UserError(f"data.block_size={block_size}: the shards in {self.folder} hold "
                            f"chunks of {meta['chunk_tokens']} tokens; expected 1 to "
                            f"{meta['chunk_tokens'] - 1}, or convert again with a larger chunk_tokens")
        self.block_size = block_size
        self.tokenizer = load_tokenizer(self.folder)
        self.tokenizer_kind = self.tokenizer.kind
        self.vocab_size = self.tokenizer.vocab_size

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Accept a model's tokenizer only if it is the shards' own (the tokens are fixed)."""
        if tokenizer.fingerprint() != self.tokenizer.fingerprint():
            raise UserError(
                f"data.path={self.path}: the shards were tokenised with another tokenizer "
                f"({self.tokenizer.kind}, {self.tokenizer.vocab_size} ids) than the model's "
                f"({tokenizer.kind}, {tokenizer.vocab_size} ids); convert the text again for "
                "this model, or use data=text")

    def save_tokenizer(self, directory) -> None:
        """Save the shards' tokenizer (``tokenizer.json``) into a run directory."""
        self.tokenizer.save(directory)

    def _counts(self, split: str) -> list[int]:
        chunk = self.index["text"]["chunk_tokens"]
        return [(s["count"] - 1) * windows_in(chunk, self.block_size)
                + windows_in(s["last_tokens"], self.block_size)
                for s in self.index["splits"][split]["shards"]]

    def _decoder(self, split: str) -> Callable:
        return DecodeTokens(self.block_size, random_offsets=split == "train", seed=self.seed)
