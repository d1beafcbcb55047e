"""Image + caption pairs from a folder: a ``captions.jsonl`` or a ``.txt`` beside each image."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from genframe.data.base import SPLITS, CaptionTokenizer, split_counts, split_indices
from genframe.data.image_folder import ImageFolderDataModule, LazyImages
from genframe.errors import UserError, plural
from genframe.text.sources import jsonl_records, read_text

log = logging.getLogger("genframe")

#: The captions file looked for directly in the root.
CAPTIONS_FILE = "captions.jsonl"
CAPTION_SOURCES = ("auto", "jsonl", "txt")

# How many file names a warning lists before it says "and N more".
_MAX_NAMED = 5


class _CaptionedImages(Dataset):
    """uint8 images (N, C, H, W) and their captions, served as ``{"image", "caption"}``.

    The cache stays uint8 (a quarter of a float cache) and each item is scaled to float
    [-1, 1] when served; the default collate stacks the images to (B, C, H, W) and keeps
    the captions a list of str.
    """

    def __init__(self, images: torch.Tensor, captions: list[str], num_levels: int) -> None:
        self.images = images  # (N, C, H, W) uint8 level indices 0..num_levels-1
        self.captions = captions
        self.half = (num_levels - 1) / 2.0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i].float() / self.half - 1.0, "caption": self.captions[i]}


class _LazyCaptioned(LazyImages):
    """Image files decoded when read (`LazyImages`) with their captions, served as
    ``{"image", "caption"}``; an unreadable image is replaced, with its caption, by the
    next readable one of the split."""

    def __init__(self, files: list[Path], captions: list[str], image_size: int, channels: int,
                 num_levels: int, split: str) -> None:
        super().__init__(files, None, image_size, channels, num_levels, split)
        self.captions = captions

    def item(self, j: int, array: np.ndarray) -> dict:
        return {**super().item(j, array), "caption": self.captions[j]}


class CaptionedFolderDataModule(CaptionTokenizer, ImageFolderDataModule):
    """Images from a folder tree with a caption each, for text-to-image models.

    Images are found, decoded, resized and centre-cropped exactly as ``data=image_folder``
    does (it is that data module without labels or split folders). Captions come from

    - ``captions.jsonl`` directly in `root`: one ``{"file": "relative/path.png",
      "caption": "..."}`` object per line, paths relative to `root` with ``/``; or
    - a ``.txt`` file beside each image with the same stem (``cat.png`` + ``cat.txt``).

    Images without a caption (no entry, no ``.txt``, or an empty caption) and captions
    naming an image that is not there are skipped, counted (``missing_captions``,
    ``missing_images``) and reported in one warning each; so are files Pillow cannot read
    (``skipped``). Nothing usable left is a `UserError` naming ``data.root``. Captions keep
    their text as written, only leading and trailing spaces and line ends are dropped.

    Args:
        root: the folder of images (``~`` is expanded).
        captions: ``auto`` (``captions.jsonl`` if `root` has one, else ``.txt`` files),
            ``jsonl`` or ``txt``.
        image_size: side length; the shorter side is resized to it and the centre cropped.
        channels: 3 (RGB) or 1 (grey).
        num_classes: always 0: captions are the condition, not labels (kept in the config
            so image models read it and stay unconditional on labels).
        num_levels: grey levels per channel, 2..256.
        batch_size: images per batch.
        val_fraction: share of the captioned images held out for validation.
        test_fraction: share held out for testing; 0 turns the test split off.
        seed: seed of the split.
        num_workers: DataLoader worker processes (they decode lazily read images).
        tokenizer: the captions' tokenizer for text-to-image models, ``"char"`` or
            ``"bpe"``, trained on the training captions (`CaptionTokenizer`).
        cache: ``auto``, ``true`` or ``false``, as for ``data=image_folder``: decode every
            image at set-up (up to 10,000 files by default) or each when it is read.
    """

    #: The class says it too: the model/data check reads it before building the data.
    provides = frozenset({"image", "caption"})

    def __init__(
        self,
        root: str,
        captions: str = "auto",
        image_size: int = 32,
        channels: int = 3,
        num_classes: int = 0,
        num_levels: int = 256,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str = "char",
        cache: str | bool = "auto",
    ) -> None:
        self.check_tokenizer_kind(tokenizer)
        if captions not in CAPTION_SOURCES:
            raise UserError(f"data.captions must be one of {', '.join(CAPTION_SOURCES)}, "
                            f"got {captions!r}")
        if isinstance(num_classes, bool) or num_classes != 0:
            raise UserError(f"data.num_classes is 0 for captioned_folder (images carry "
                            f"captions, not labels), got {num_classes!r}")
        for key, value in (("image_size", image_size), ("channels", channels),
                           ("num_levels", num_levels), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"data.{key} must be an integer, got {value!r}")
        super().__init__(root=root, image_size=image_size, channels=channels, labels=False,
                         num_classes=0, num_levels=num_levels, batch_size=batch_size,
                         val_fraction=val_fraction, test_fraction=test_fraction, seed=seed,
                         num_workers=num_workers, cache=cache)
        self.provides = frozenset({"image", "caption"})
        jsonl = self.root / CAPTIONS_FILE
        if captions == "auto":
            captions = "jsonl" if jsonl.is_file() else "txt"
        if captions == "jsonl" and not jsonl.is_file():
            raise UserError(f"data.captions=jsonl, but data.root {self.root} has no "
                            f"{CAPTIONS_FILE}; expected one, or data.captions=txt for a .txt "
                            "beside each image")
        #: Where the captions came from: "jsonl" or "txt".
        self.caption_source = captions
        by_file, named = (self._read_jsonl(jsonl) if captions == "jsonl" else self._read_txt())
        #: Images without a (non-empty) caption, skipped.
        self.missing_captions: list[Path] = [f for f in self.files if not by_file.get(f)]
        #: Captions (jsonl entries or .txt files) whose image is not there, skipped.
        self.missing_images: list[str] = named
        self.files = [f for f in self.files if by_file.get(f)]
        self.captions: list[str] = [by_file[f] for f in self.files]
        self._warn("image", "without a caption", self.missing_captions)
        self._warn("caption", f"({'in ' + CAPTIONS_FILE if captions == 'jsonl' else '.txt file'})"
                   " naming no image", self.missing_images)
        if not self.files:
            also = (f"; {plural(len(self.missing_images), 'caption')} named images that are "
                    f"not there (e.g. {self.missing_images[0]})" if self.missing_images else "")
            where = (f"entries of {CAPTIONS_FILE}" if captions == "jsonl"
                     else "a .txt file with the same stem beside each image")
            raise UserError(
                f"data.root: none of the {plural(len(self.missing_captions), 'image')} under "
                f"{self.root} has a non-empty caption{also}; expected {where}")
        split_counts(len(self.files), self.val_fraction, self.test_fraction,
                     what="captioned images", where=f"data.root {self.root}")
        log.info("captioned_folder: %d captioned images under %s (captions from %s)",
                 len(self.files), self.root, CAPTIONS_FILE if captions == "jsonl" else ".txt files")

    def _read_jsonl(self, path: Path) -> tuple[dict[Path, str], list[str]]:
        """Caption of each image file named in `path`, and the names with no image."""
        images = {f.relative_to(self.root).as_posix(): f for f in self.files}
        by_file: dict[Path, str] = {}
        seen: dict[str, str] = {}
        missing: list[str] = []
        for where, row in jsonl_records(path):
            if not isinstance(row, dict):
                raise UserError(f"{where}: expected a JSON object {{\"file\": ..., \"caption\": "
                                f"...}}, got {type(row).__name__}")
            for field in ("file", "caption"):
                if not isinstance(row.get(field), str):
                    got = "no such field" if field not in row else type(row[field]).__name__
                    raise UserError(f"{where}: field {field!r} must be a string ({got}); "
                                    f"expected {{\"file\": \"relative/path.png\", "
                                    f"\"caption\": \"...\"}}")
            name = Path(os.path.normpath(row["file"].replace("\\", "/"))).as_posix()
            if name in seen:
                raise UserError(f"{where}: {row['file']!r} already has a caption "
                                f"({seen[name]}); expected one line per image")
            seen[name] = where
            if name in images:
                by_file[images[name]] = _clean(row["caption"])
            else:
                missing.append(row["file"])
        return by_file, missing

    def _read_txt(self) -> tuple[dict[Path, str], list[str]]:
        """Caption of each image from the .txt beside it, and the .txt files with no image."""
        by_file = {f: _clean(read_text(f.with_suffix(".txt")))
                   for f in self.files if f.with_suffix(".txt").is_file()}
        stems = {f.with_suffix("") for f in self.files}
        missing = [t.relative_to(self.root).as_posix() for t in sorted(self.root.rglob("*.txt"))
                   if t.with_suffix("") not in stems
                   and not any(p.startswith(".") for p in t.relative_to(self.root).parts)]
        return by_file, missing

    def _warn(self, noun: str, what: str, items: list) -> None:
        """One warning: how many `noun`s `what` were skipped, naming the first few."""
        if not items:
            return
        names = [p.relative_to(self.root).as_posix() if isinstance(p, Path) else str(p)
                 for p in items]
        more = f", and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
        counted = f"{plural(len(names), noun)} {what}".strip()
        log.warning("captioned_folder: skipped %s under %s: %s%s", counted, self.root,
                    ", ".join(names[:_MAX_NAMED]), more)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.cached:
            self._setup_lazy_captioned()
            return
        start = time.perf_counter()
        # Pillow releases the GIL while it decodes; map keeps the order, so splits repeat.
        workers = max(1, min(8, os.cpu_count() or 1, len(self.files)))
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(self._load, self.files))
        self.skipped = [(f, why) for f, (a, why) in zip(self.files, results) if a is None]
        keep = [i for i, (a, _) in enumerate(results) if a is not None]
        if self.skipped:
            self._warn("unreadable image", "", [f for f, _ in self.skipped])
        if not keep:
            path, why = self.skipped[0]
            raise UserError(f"data.root: none of the {len(self.files)} captioned images under "
                            f"{self.root} could be read (e.g. {path.name}: {why}); expected "
                            "images Pillow can decode")
        images = self._to_tensor([results[i][0] for i in keep])
        captions = [self.captions[i] for i in keep]
        idx = split_indices(len(keep), self.val_fraction, self.test_fraction, self.seed,
                            what="readable captioned images", where=f"data.root {self.root}")
        for split, split_idx in zip(SPLITS, idx):
            if len(split_idx):
                split_captions = [captions[i] for i in split_idx.tolist()]
                setattr(self, f"{split}_set", _CaptionedImages(
                    images[split_idx], split_captions, self.num_levels))
                if split == "train":
                    self.fit_caption_tokenizer(split_captions)
        self.summarize_splits("captioned images", detail=f"seed {self.seed}")
        log.info("captioned_folder: decoded %d images at %dx%d in %.1f s", len(keep),
                 self.image_size, self.image_size, time.perf_counter() - start)

    def _setup_lazy_captioned(self) -> None:
        """List-only set-up: the splits of the captioned files, each image decoded when
        read (`_LazyCaptioned`); the tokenizer learns the training captions now."""
        self._probe("data.root", self.root, self.files)
        idx = split_indices(len(self.files), self.val_fraction, self.test_fraction, self.seed,
                            what="captioned images", where=f"data.root {self.root}")
        for split, split_idx in zip(SPLITS, idx):
            if len(split_idx):
                order = split_idx.tolist()
                captions = [self.captions[i] for i in order]
                setattr(self, f"{split}_set", _LazyCaptioned(
                    [self.files[i] for i in order], captions, self.image_size, self.channels,
                    self.num_levels, split))
                if split == "train":
                    self.fit_caption_tokenizer(captions)
        self.summarize_splits("captioned images, decoded when read", detail=f"seed {self.seed}")


def _clean(caption: str) -> str:
    """A caption without leading/trailing spaces and line ends; "" if it is only space.

    Only ASCII space, tab and line ends are stripped: ``str.strip`` would also drop a
    U+2028 that is part of the caption's text."""
    text = caption.strip(" \t\r\n")
    return text if text.strip() else ""
