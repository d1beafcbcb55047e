"""Your own images from a folder tree; sub-folders of the root can become class labels.

Small folders are decoded once at set-up into a uint8 cache (`_ImageDataset`); large ones
are only listed at set-up and decoded one image at a time when a loader asks for it
(`LazyImages`), in the DataLoader's worker processes (``data.num_workers``), so start-up
is a directory listing and memory stays flat however many files there are.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from genframe.data.base import (
    SPLIT_WORDS,
    SPLITS,
    GenerativeDataModule,
    check_fractions,
    split_counts,
    split_indices,
)
from genframe.errors import UserError, plural

log = logging.getLogger("genframe")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# How many unreadable file names the warning lists before it says "and N more".
_MAX_NAMED = 5

CACHE_MODES = ("auto", "true", "false")
# data.cache=auto decodes at set-up (and keeps the uint8 images in memory) up to this many
# files and this many bytes of decoded images. Measured (bench/image_folder_scale.py, two
# cores): decoding costs about 0.15 ms per small PNG, so 10,000 files start in about a
# second with the cache, while reading them lazily without workers adds that second to
# every epoch; past this size start-up time and memory matter more.
AUTO_CACHE_FILES = 10_000
AUTO_CACHE_BYTES = 1 << 30
# Lazy set-up decodes up to this many files of each folder to refuse one Pillow cannot
# read at all before training starts.
_PROBE_FILES = 32


class _ImageDataset(Dataset):
    """uint8 images (N, C, H, W) and optional labels, served as ``{"image", "label"}`` dicts.

    The cache stays uint8 and each item is scaled to float [-1, 1] when it is served: that
    keeps the memory a quarter of a float cache (100k RGB images at 64x64 are 1.2 GB as
    uint8, 4.9 GB as float32), and the per-item conversion costs next to nothing next to a
    model step. Returning 0-dim tensors lets the default collate stack them into
    ``{"image": (B, C, H, W) float, "label": (B,) long}``.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor | None, num_levels: int = 256
    ) -> None:
        self.images = images  # (N, C, H, W) uint8 level indices 0..num_levels-1
        self.labels = labels  # (N,) long, or None
        self.half = (num_levels - 1) / 2.0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        # Level 0 -> -1 and the top level -> +1 exactly (255 / 127.5 == 2.0 in float32).
        item = {"image": self.images[i].float() / self.half - 1.0}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


class LazyImages(Dataset):
    """Image files decoded one at a time when asked, served as ``{"image", "label"}``.

    Item ``i`` decodes file ``i`` with `decode_image` (resized, centre-cropped) and scales
    it to float [-1, 1], shaped (C, H, W); nothing is kept, so memory does not grow with
    the number of files. The file names live in one numpy bytes array rather than a list of
    Python objects: DataLoader workers forked from the main process would otherwise copy
    the list's pages as they touch its reference counts, growing with every epoch.

    A file Pillow cannot decode is never fatal: it is marked in ``bad`` (a shared-memory
    flag per file, so every worker and the main process see it), a warning names it (the
    first few, then at every power of two of the count), and the item is the next readable
    file of this split instead (``i + 1``, ``i + 2``, ... wrapping around), which depends
    only on which files are unreadable, so the order of a run stays reproducible.
    `ImageFolderDataModule.report_unreadable` reports the total.

    Args:
        files: the image files of this split.
        labels: the class of each file, or None.
        image_size: side length of the served images.
        channels: 1 (grey) or 3 (RGB).
        num_levels: grey levels per channel, 2..256 (see `ImageFolderDataModule`).
        split: the split's name, for messages.

    Raises:
        UserError: from ``__getitem__``, when no file of the split can be read.
    """

    def __init__(self, files: list[Path], labels: list[int] | None, image_size: int,
                 channels: int, num_levels: int, split: str = "train") -> None:
        self.paths = np.array([os.fsencode(f) for f in files])  # (N,) bytes
        self.labels = None if labels is None else torch.tensor(labels, dtype=torch.long)
        self.image_size = image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.num_levels = num_levels
        self.half = (num_levels - 1) / 2.0
        self.split = split
        self.bad = torch.zeros(len(files), dtype=torch.uint8).share_memory_()  # (N,) 0/1
        #: Why each unreadable file failed, as far as this process saw it (index -> reason).
        self.reasons: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> Path:
        return Path(os.fsdecode(self.paths[i]))

    def read(self, i: int) -> np.ndarray | None:
        """File `i` as an (H, W, C) uint8 array, or None (marked and warned) if unreadable."""
        path = self.path(i)
        try:
            return decode_image(path, self.image_size, self.mode)
        except Exception as exc:  # noqa: BLE001 -- any decoder error is bad data (see _load)
            self.reasons[i] = _reason(exc, path)
            self.bad[i] = 1
            return None

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item(*self.readable(i))

    def item(self, j: int, array: np.ndarray) -> dict[str, Any]:
        """The served item of file `j`, decoded as `array` ((H, W, C) uint8)."""
        image = _levels(torch.from_numpy(np.array(array)).permute(2, 0, 1), self.num_levels)
        item: dict[str, Any] = {"image": image.float() / self.half - 1.0}  # (C, H, W) in [-1, 1]
        if self.labels is not None:
            item["label"] = self.labels[j]
        return item

    def readable(self, i: int) -> tuple[int, np.ndarray]:
        """The first readable file from `i` on (wrapping around) and its (H, W, C) array."""
        n = len(self.paths)
        for step in range(n):
            j = (i + step) % n
            if self.bad[j]:
                continue
            array = self.read(j)
            if array is not None:
                return j, array
            count = int(self.bad.sum())
            if count <= _MAX_NAMED or count & (count - 1) == 0:
                log.warning("image_folder: cannot read %s (%s); serving the next readable %s "
                            "image instead (%d unreadable in that split so far)", self.path(j),
                            self.reasons[j], SPLIT_WORDS.get(self.split, self.split), count)
        raise UserError(f"data: none of the {n} image files of the "
                        f"{SPLIT_WORDS.get(self.split, self.split)} split could be read (e.g. "
                        f"{self.path(0)}: {self.reasons.get(0, 'unreadable')}); expected "
                        "images Pillow can decode")


class ImageFolderDataModule(GenerativeDataModule):
    """Every image file under a folder, resized, centre-cropped and scaled to [-1, 1].

    Files are found recursively by extension (.png .jpg .jpeg .bmp .gif .webp .tif
    .tiff, any case); hidden files and folders (names starting with ".") are ignored.
    Images are decoded once in `setup` with Pillow and kept in memory as uint8. EXIF
    rotation is applied, transparent pixels are composited onto white, 16-bit images are
    scaled (not clipped) to 8 bits, animated files use their first frame. Files Pillow
    cannot read are skipped, counted in ``self.skipped`` and reported in one warning per
    folder.

    With labels, the class of an image is the first-level sub-folder of `root` it lies
    in (deeper folders belong to that class); classes are the sorted sub-folder names,
    numbered 0..K-1 (``self.class_names``).

    Splits: the images under `root` are split at random (seeded, see `split_indices`)
    into training, validation and test images by `val_fraction` and `test_fraction`. A
    user with a ready split names its folders instead: every image under `val_root` is a
    validation image, every image under `test_root` a test image, and the fraction of that
    split is not used (with both, every image under `root` is a training image). Labelled
    data must use the same class folders in every root: `root`'s sub-folders define the
    classes; a class may be missing from `val_root` or `test_root` (a small test set need
    not hold every class), but a class folder `root` does not have is refused, since no
    model trained on `root` can know that label.

    Args:
        root: the folder of images (``~`` is expanded).
        val_root: a folder of validation images, or None to hold out `val_fraction` of
            `root`.
        test_root: a folder of test images, or None to hold out `test_fraction` of `root`.
        image_size: side length; the shorter side is resized to it (Lanczos) and the
            centre is cropped to a square.
        channels: 3 (RGB) or 1 (grey).
        labels: ``"auto"`` uses the sub-folders as labels when every image lies in one
            and there are at least 2 of them; ``true`` always does (an error if images
            lie directly in `root`); ``false`` never does. YAML booleans are accepted.
        num_classes: number of classes; 0 fills it in from the sub-folders (or from
            `classes`). A value that differs from that number is an error.
        classes: the class names in label order (label k is ``classes[k]``), for labelled
            data whose folders do not hold every class (a class with no images keeps its
            number); None: the sorted sub-folder names. A sub-folder not in the list is
            an error. Implies labels.
        num_levels: grey levels per channel, 2..256; below 256 the pixel values are
            snapped to that many evenly spaced levels.
        batch_size: images per batch.
        val_fraction: share of `root`'s images held out for validation (not used with
            `val_root`).
        test_fraction: share of `root`'s images held out for testing (not used with
            `test_root`); 0 turns the test split off.
        seed: seed of the split.
        num_workers: DataLoader worker processes; they decode lazily read images in
            parallel (kept alive between epochs).
        cache: ``"auto"`` decodes every image at set-up and keeps them in memory as
            uint8 when the folders hold at most 10,000 files and 1 GiB of decoded images,
            and reads them lazily otherwise; ``true`` always caches, ``false`` always
            reads lazily. YAML booleans are accepted.

    Reading lazily (`LazyImages`), set-up only lists the files and decodes the first
    readable one of each folder (a folder with nothing Pillow can read is refused there);
    the splits are cut from the listed files, and a file found unreadable later is
    replaced by the next readable one of its split, warned about, and counted
    (`report_unreadable`, also at the end of each stage). With the cache, unreadable files
    are skipped at set-up instead, before the split, and ``self.skipped`` lists them.
    """

    provides = frozenset({"image"})

    def __init__(
        self,
        root: str,
        val_root: str | None = None,
        test_root: str | None = None,
        image_size: int = 32,
        channels: int = 3,
        labels: str | bool = "auto",
        num_classes: int = 0,
        num_levels: int = 256,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        cache: str | bool = "auto",
        classes: list[str | int] | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if classes is not None:
            classes = [str(c) for c in classes]
            if not classes or len(set(classes)) != len(classes):
                raise UserError(f"data.classes must be a list of distinct class names, got {classes}")
            if _choice(labels, "data.labels", ("auto", "true", "false")) == "false":
                raise UserError("data.classes names the classes of labelled data; data.labels=false "
                                "turns labels off (remove one of them)")
            labels = "true"
        self.cache = _choice(cache, "data.cache", CACHE_MODES)
        if channels not in (1, 3):
            raise UserError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels}")
        if image_size < 4:
            raise UserError(f"data.image_size must be at least 4, got {image_size}")
        if not 2 <= num_levels <= 256:
            raise UserError(f"data.num_levels must be between 2 and 256, got {num_levels}")
        if num_classes < 0:
            raise UserError(f"data.num_classes must be 0 (fill in) or positive, got {num_classes}")
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}")
        self.root = _expand(root)
        #: The folders of the held-out splits that have their own (split name -> folder).
        self.split_roots: dict[str, Path] = {
            split: _expand(path) for split, path in (("val", val_root), ("test", test_root))
            if path not in (None, "")}
        self.val_root = self.split_roots.get("val")
        self.test_root = self.split_roots.get("test")
        # A split read from its own folder ignores its fraction (None: not checked, not used).
        self.val_fraction = None if self.val_root else val_fraction
        self.test_fraction = None if self.test_root else test_fraction
        check_fractions(self.val_fraction, self.test_fraction)
        self.image_size = image_size
        self.channels = channels
        self.labels = _choice(labels, "data.labels", ("auto", "true", "false"))
        self.num_levels = num_levels
        self.seed = seed
        self.skipped: list[tuple[Path, str]] = []

        self.files = _list_images(self.root, "data.root")
        self.split_files = {split: _list_images(path, f"data.{split}_root")
                            for split, path in self.split_roots.items()}
        _check_separate(self.root, self.split_roots)
        # Refuse too few files now, before any model is built (setup checks again after
        # unreadable files are skipped).
        split_counts(len(self.files), self.val_fraction, self.test_fraction,
                     what="image files", where=f"data.root {self.root}")

        # Class of each file = its first-level sub-folder ("" for files directly in root).
        folders = _class_folders(self.files, self.root)
        in_root = [f for f, d in zip(self.files, folders) if not d]
        # Only sub-folders that hold images become classes: an empty folder would be a
        # label that never occurs.
        names = sorted({d for d in folders if d})
        if self.labels == "true":
            if in_root:
                raise UserError(
                    f"data.labels=true, but {plural(len(in_root), 'image')} "
                    f"{'lies' if len(in_root) == 1 else 'lie'} directly in data.root "
                    f"{self.root} (e.g. {in_root[0].name}); expected every image in a sub-folder "
                    "named after its class. Move them, or set data.labels=false."
                )
            use_labels = True
        elif self.labels == "auto":
            use_labels = not in_root and len(names) >= 2
        else:
            use_labels = False

        if use_labels and classes is not None:
            unknown = [n for n in names if n not in classes]
            if unknown:
                raise UserError(f"data.root {self.root}: class folders {_short_list(unknown)} are not in "
                                f"data.classes ({_short_list(classes)}); add them or remove the folders")
            names = classes
        self.class_names: list[str] = names if use_labels else []
        #: Per split folder: the label of each file (None without labels).
        self._split_labels: dict[str, list[int] | None] = {}
        if use_labels:
            if num_classes == 0:
                num_classes = len(names)
            elif num_classes != len(names):
                raise UserError(
                    f"data.num_classes={num_classes}, but data.root {self.root} has "
                    f"{len(names)} class sub-folders ({_short_list(names)}); set "
                    f"data.num_classes={len(names)} or 0 to fill it in."
                )
            self.provides = frozenset({"image", "label"})
            index = {n: i for i, n in enumerate(names)}
            self._file_labels: list[int] | None = [index[d] for d in folders]
            for split, path in self.split_roots.items():
                self._split_labels[split] = _labels_in(
                    self.split_files[split], path, f"data.{split}_root", index, self.root)
            log.info("image_folder: %d image files under %s, %d classes: %s",
                     len(self.files), self.root, len(names), _short_list(names))
        else:
            self.provides = frozenset({"image"})
            self._file_labels = None
            self._split_labels = {split: None for split in self.split_roots}
            why = " (some lie directly in root)" if self.labels == "auto" and names else ""
            log.info("image_folder: %d image files under %s, no labels%s",
                     len(self.files), self.root, why)
        for split, path in self.split_roots.items():
            log.info("image_folder: %d %s image files under %s", len(self.split_files[split]),
                     SPLIT_WORDS[split], path)
        self.num_classes = num_classes
        n_files = len(self.files) + sum(len(f) for f in self.split_files.values())
        #: Decode everything at set-up (True) or each image when it is read (False).
        self.cached = self.cache == "true" or (
            self.cache == "auto" and n_files <= AUTO_CACHE_FILES
            and n_files * channels * image_size ** 2 <= AUTO_CACHE_BYTES)
        self._reported_unreadable = 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.cached:
            self._setup_lazy()
            return
        start = time.perf_counter()
        sources = [("root", self.root, self.files, self._file_labels)] + [
            (split, self.split_roots[split], self.split_files[split], self._split_labels[split])
            for split in self.split_roots]
        every_file = [f for _, _, files, _ in sources for f in files]
        # Pillow releases the GIL while it decodes and resamples, so threads give a real
        # speed-up on big folders; map keeps the files' order, so splits stay reproducible.
        workers = max(1, min(8, os.cpu_count() or 1, len(every_file)))
        with ThreadPoolExecutor(workers) as pool:
            results = iter(list(pool.map(self._load, every_file)))

        self.skipped = []
        decoded: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name, folder, files, file_labels in sources:
            key = "data.root" if name == "root" else f"data.{name}_root"
            arrays, keep, skipped = [], [], []
            for i, (path, (array, reason)) in enumerate(zip(files, results)):
                if array is None:
                    skipped.append((path, reason))
                else:
                    arrays.append(array)
                    keep.append(i)
            self.skipped += skipped
            if skipped:
                named = ", ".join(f"{p.relative_to(folder)} ({r})" for p, r in skipped[:_MAX_NAMED])
                more = (f", and {len(skipped) - _MAX_NAMED} more"
                        if len(skipped) > _MAX_NAMED else "")
                log.warning("image_folder: skipped %d of %d files under %s (unreadable): %s%s",
                            len(skipped), len(files), folder, named, more)
            if not arrays:
                raise UserError(
                    f"{key}: none of the {len(files)} image files under {folder} could "
                    f"be read (e.g. {skipped[0][0].name}: {skipped[0][1]}); expected images "
                    "Pillow can decode"
                )
            labels = None
            if file_labels is not None:
                labels = torch.tensor([file_labels[i] for i in keep], dtype=torch.long)
            decoded[name] = (self._to_tensor(arrays), labels)

        images, labels = decoded.pop("root")
        idx = split_indices(len(images), self.val_fraction, self.test_fraction, self.seed,
                            what="readable images", where=f"data.root {self.root}")
        for split, split_idx in zip(SPLITS, idx):
            # From its own folder, or data.test_fraction=0: no index from the fraction.
            if split in decoded or not len(split_idx):
                continue
            decoded[split] = (images[split_idx],
                              labels[split_idx] if labels is not None else None)
        for split, (split_images, split_labels) in decoded.items():
            setattr(self, f"{split}_set", _ImageDataset(split_images, split_labels,
                                                        self.num_levels))
        where = ", ".join(f"{SPLIT_WORDS[s]} images from {p}" for s, p in self.split_roots.items())
        self.summarize_splits("images", detail=f"{where}; " * bool(where) + f"seed {self.seed}")
        log.info("image_folder: decoded %d images at %dx%d in %.1f s",
                 sum(self.split_sizes.values()), self.image_size, self.image_size,
                 time.perf_counter() - start)

    def _setup_lazy(self) -> None:
        """List-only set-up: `LazyImages` per split, after checking each folder has at
        least one readable image among its first files."""
        start = time.perf_counter()
        self._probe("data.root", self.root, self.files)
        for split, folder in self.split_roots.items():
            self._probe(f"data.{split}_root", folder, self.split_files[split])
        sets = {split: (self.split_files[split], self._split_labels[split])
                for split in self.split_roots}
        idx = split_indices(len(self.files), self.val_fraction, self.test_fraction, self.seed,
                            what="image files", where=f"data.root {self.root}")
        for split, split_idx in zip(SPLITS, idx):
            if split in sets or not len(split_idx):
                continue
            order = split_idx.tolist()
            sets[split] = ([self.files[i] for i in order],
                           None if self._file_labels is None
                           else [self._file_labels[i] for i in order])
        for split, (files, labels) in sets.items():
            setattr(self, f"{split}_set", LazyImages(files, labels, self.image_size,
                                                     self.channels, self.num_levels, split))
        where = ", ".join(f"{SPLIT_WORDS[s]} images from {p}" for s, p in self.split_roots.items())
        self.summarize_splits("image files, decoded when read",
                              detail=f"{where}; " * bool(where) + f"seed {self.seed}")
        log.info("image_folder: listed %d image files in %.1f s; each is decoded at %dx%d when "
                 "read (data.num_workers=%d worker processes)", sum(self.split_sizes.values()),
                 time.perf_counter() - start, self.image_size, self.image_size,
                 self.num_workers)

    def _probe(self, key: str, folder: Path, files: list[Path]) -> None:
        """Refuse (naming `key`) a folder none of whose first files Pillow can read."""
        probed = []
        for path in files[:_PROBE_FILES]:
            array, reason = self._load(path)
            if array is not None:
                return
            probed.append((path, reason))
        first = "none of the" if len(probed) == len(files) else "the first"
        raise UserError(f"{key}: {first} {len(probed)} image files under {folder} could be "
                        f"read (e.g. {probed[0][0].name}: {probed[0][1]}); expected images "
                        "Pillow can decode")

    def unreadable_files(self) -> list[tuple[Path, str]]:
        """The files lazy reading found unreadable so far (every process), with the reason
        where this process saw it; empty with the cache (see ``self.skipped``)."""
        found = []
        for split in SPLITS:
            dataset = getattr(self, f"{split}_set", None)
            if isinstance(dataset, LazyImages):
                for i in torch.nonzero(dataset.bad).flatten().tolist():
                    found.append((dataset.path(i), dataset.reasons.get(
                        i, "unreadable; a loader worker's warning gives the reason")))
        return found

    def report_unreadable(self) -> int:
        """Warn once about the files lazy reading found unreadable since the last report
        (how many, the first few names); ``self.skipped`` becomes the full list. Returns
        the count so far."""
        if self.cached:
            return len(self.skipped)
        self.skipped = self.unreadable_files()
        count = len(self.skipped)
        if count > self._reported_unreadable:
            total = sum(self.split_sizes.values())
            named = ", ".join(f"{p.name} ({r})" for p, r in self.skipped[:_MAX_NAMED])
            more = f", and {count - _MAX_NAMED} more" if count > _MAX_NAMED else ""
            log.warning("image_folder: %d of %d files under %s were unreadable; each was "
                        "replaced by the next readable image of its split: %s%s", count,
                        total, self.root, named, more)
            self._reported_unreadable = count
        return count

    def teardown(self, stage: str | None = None) -> None:
        self.report_unreadable()

    def _to_tensor(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """(H, W, C) uint8 arrays -> one (N, C, H, W) uint8 tensor of level indices."""
        images = torch.from_numpy(np.stack(arrays))  # (N, H, W, C) uint8
        return _levels(images.permute(0, 3, 1, 2).contiguous(), self.num_levels)  # (N, C, H, W)

    def _load(self, path: Path) -> tuple[np.ndarray | None, str]:
        """One file as an (H, W, C) uint8 array, or (None, why it could not be read)."""
        try:
            return decode_image(path, self.image_size, "L" if self.channels == 1 else "RGB"), ""
        except Exception as exc:  # noqa: BLE001
            # Pillow's decoders raise a zoo of types for bad bytes (UnidentifiedImageError,
            # OSError for truncated files, SyntaxError, ValueError, EOFError, struct.error,
            # DecompressionBombError): any of them means this file is bad data, which is
            # skipped and reported, never fatal.
            return None, _reason(exc, path)


def decode_image(path: Path, size: int, mode: str) -> np.ndarray:
    """One image file as a (size, size, C) uint8 array, C = 1 for `mode` "L", 3 for "RGB".

    Decoded with Pillow: EXIF rotation applied, 16-bit and float images scaled to 8 bits,
    transparency composited onto white, converted to `mode`, the centre cropped to a
    square and resized to `size` (Lanczos). Pillow's errors pass through (bad bytes raise
    one of several types; callers catch them).
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        # Let the JPEG decoder shrink by 1/2..1/8 while both sides stay >= size: big photos
        # decode several times faster. A no-op for other formats.
        im.draft(None, (size, size))
        im.load()
        # Phone photos are stored sideways with an EXIF rotation tag.
        im = ImageOps.exif_transpose(im)
        im = _to_8bit(im)
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
            # Dropping alpha would expose whatever colour the transparent pixels happen to
            # store (often black noise); composite onto white like a viewer does.
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        im = im.convert(mode)
        # fit = crop the centre to a square, then resize: the same as resizing the shorter
        # side to `size` and cropping, with fewer pixels to resample.
        im = ImageOps.fit(im, (size, size), method=Image.Resampling.LANCZOS)
        array = np.asarray(im, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W) -> (H, W, 1)
    return array


def _to_8bit(im):
    """Scale 16-bit and float images to 8 bits; Pillow's own convert() clips them at 255."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im, dtype=np.float64)
        # Mode "I" may hold 8-bit data too; only rescale when values exceed 8 bits.
        if im.mode != "I" or a.max(initial=0) > 255:
            a = a / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if np.nanmax(a, initial=0) <= 1.0:  # float images are usually 0..1
            a = a * 255.0
        a = np.clip(np.round(np.nan_to_num(a)), 0, 255)
        return Image.fromarray(a.astype(np.uint8), mode="L")
    return im


def _reason(exc: Exception, path: Path) -> str:
    """A short reason without the file's path (the warning names the file already)."""
    text = str(exc)
    for p in (repr(str(path)), str(path)):
        text = text.replace(p, "")
    text = text.strip().rstrip(":").strip()
    return text or type(exc).__name__


def _levels(images: torch.Tensor, num_levels: int) -> torch.Tensor:
    """uint8 pixel values (any shape) -> uint8 level indices 0..num_levels-1.

    Level indices rather than a grid such as 0, 63.75, ... (not exact in uint8) keep the
    served images exactly on the num_levels evenly spaced values in [-1, 1] that discrete
    likelihoods (data.num_levels) assume."""
    if num_levels >= 256:
        return images
    return torch.round(images.float() * ((num_levels - 1) / 255.0)).to(torch.uint8)


def _choice(value: str | bool, key: str, modes: tuple[str, ...]) -> str:
    """An auto/true/false switch as one of `modes`; YAML booleans are accepted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    mode = str(value).strip().lower()
    if mode not in modes:
        raise UserError(f"{key} must be {', '.join(modes[:-1])} or {modes[-1]}, got {value!r}")
    return mode


def _list_images(root: Path, key: str = "data.root") -> list[Path]:
    """Image files under `root`, recursively, in a stable order; UserError (naming the
    config `key`) when there are none."""
    if not root.exists():
        raise UserError(f"{key}: {root} does not exist; expected a folder of images")
    if not root.is_dir():
        raise UserError(f"{key}: {root} is a file, not a folder; expected a folder of images")
    # Strings, not Path objects, until the end: for 100k files Path's parsing took seconds.
    prefix = os.path.join(str(root), "")
    found: list[tuple[str, str]] = []  # (path relative to root with "/", full path)
    others: list[str] = []
    seen: set[str] = set()
    # followlinks: class folders are often symlinks to data kept elsewhere; `seen` guards
    # against a link that points back up the tree.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        # Hidden folders (.git, .ipynb_checkpoints, macOS ._ files) are not data.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                full = os.path.join(dirpath, name)
                found.append((full[len(prefix):].replace(os.sep, "/"), full))
            else:
                others.append(name)
    if not found:
        also = f"; found {plural(len(others), 'other file')}, e.g. {others[0]}" if others else ""
        raise UserError(
            f"{key}: no image files under {root} (looked recursively for "
            f"{' '.join(IMAGE_EXTENSIONS)}, in any case){also}"
        )
    found.sort()
    return [Path(full) for _, full in found]


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(str(path)))


def _class_folders(files: list[Path], root: Path) -> list[str]:
    """The first-level sub-folder of `root` each file lies in ("" directly in root)."""
    prefix = os.path.join(str(root), "")
    folders = []
    for f in files:
        text = str(f)
        rel = text[len(prefix):] if text.startswith(prefix) else str(f.relative_to(root))
        head, sep, _ = rel.partition(os.sep)
        folders.append(head if sep else "")
    return folders


def _check_separate(root: Path, split_roots: dict[str, Path]) -> None:
    """Refuse split folders that are the same as, or nested in, another one: their images
    would be in two splits at once (a test image also trained on)."""
    folders = {"data.root": root, **{f"data.{s}_root": p for s, p in split_roots.items()}}
    real = {key: Path(os.path.realpath(p)) for key, p in folders.items()}
    keys = list(real)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if real[a] == real[b] or real[b] in real[a].parents or real[a] in real[b].parents:
                raise UserError(
                    f"{b}: {folders[b]} overlaps {a} {folders[a]} (the same folder, or one "
                    "inside the other), so some images would be in two splits; expected "
                    "separate folders, e.g. data/train, data/val and data/test")


def _labels_in(files: list[Path], folder: Path, key: str, index: dict[str, int],
               root: Path) -> list[int]:
    """The label of each file of a split folder, by its class sub-folder's name in
    `index` (data.root's classes). Refuses images outside a class folder and class
    folders data.root does not have; a class with no folder here is fine."""
    folders = _class_folders(files, folder)
    loose = [f for f, d in zip(files, folders) if not d]
    if loose:
        raise UserError(
            f"{key}: {plural(len(loose), 'image')} {'lies' if len(loose) == 1 else 'lie'} directly "
            f"in {folder} (e.g. {loose[0].name}), "
            f"but data.root {root} is labelled by its sub-folders; expected every image in "
            f"a sub-folder named after its class ({_short_list(sorted(index))})")
    unknown = sorted({d for d in folders if d not in index})
    if unknown:
        raise UserError(
            f"{key}: {'class folder' if len(unknown) == 1 else 'class folders'} {_short_list(unknown)} under {folder} are not classes of "
            f"data.root {root}; expected sub-folders named after its classes "
            f"({_short_list(sorted(index))}). Rename or remove them (a class may be missing).")
    return [index[d] for d in folders]


def _short_list(names: list[str], limit: int = 10) -> str:
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
