"""Your own images from a folder tree; sub-folders of the root can become class labels."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
        num_classes: number of classes; 0 fills it in from the sub-folders. A value that
            differs from the number of sub-folders is an error.
        num_levels: grey levels per channel, 2..256; below 256 the pixel values are
            snapped to that many evenly spaced levels.
        batch_size: images per batch.
        val_fraction: share of `root`'s images held out for validation (not used with
            `val_root`).
        test_fraction: share of `root`'s images held out for testing (not used with
            `test_root`); 0 turns the test split off.
        seed: seed of the split.
        num_workers: DataLoader worker processes.
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
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
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
        self.labels = _label_mode(labels)
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

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
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

    def _to_tensor(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """(H, W, C) uint8 arrays -> one (N, C, H, W) uint8 tensor of level indices."""
        images = torch.from_numpy(np.stack(arrays))  # (N, H, W, C) uint8
        images = images.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
        if self.num_levels < 256:
            # Keep level indices 0..num_levels-1 (a grid such as 0, 63.75, ... is not exact
            # in uint8), so the served images lie exactly on the num_levels evenly spaced
            # values in [-1, 1] that discrete likelihoods (data.num_levels) assume.
            images = torch.round(images.float() * ((self.num_levels - 1) / 255.0)).to(torch.uint8)
        return images

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


def _label_mode(labels: str | bool) -> str:
    if isinstance(labels, bool):
        return "true" if labels else "false"
    mode = str(labels).strip().lower()
    if mode not in ("auto", "true", "false"):
        raise UserError(f"data.labels must be auto, true or false, got {labels!r}")
    return mode


def _list_images(root: Path, key: str = "data.root") -> list[Path]:
    """Image files under `root`, recursively, in a stable order; UserError (naming the
    config `key`) when there are none."""
    if not root.exists():
        raise UserError(f"{key}: {root} does not exist; expected a folder of images")
    if not root.is_dir():
        raise UserError(f"{key}: {root} is a file, not a folder; expected a folder of images")
    found: list[Path] = []
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
                found.append(Path(dirpath) / name)
            else:
                others.append(name)
    if not found:
        also = f"; found {plural(len(others), 'other file')}, e.g. {others[0]}" if others else ""
        raise UserError(
            f"{key}: no image files under {root} (looked recursively for "
            f"{' '.join(IMAGE_EXTENSIONS)}, in any case){also}"
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _expand(path: str) -> Path:
    return Path(os.path.expanduser(str(path)))


def _class_folders(files: list[Path], root: Path) -> list[str]:
    """The first-level sub-folder of `root` each file lies in ("" directly in root)."""
    return [parts[0] if len(parts) > 1 else "" for parts in
            (f.relative_to(root).parts for f in files)]


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
