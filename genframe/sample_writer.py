"""Write `Samples` into a folder: one file per sample, a grid and a manifest.

`SampleWriter` writes batch by batch as a model makes them, so a long generation never
holds more than one batch (and the few samples of the grid) in memory, and an interrupted
one leaves the samples already made with a manifest that lists exactly those.
`write_samples` is the one-call form for samples already in memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from genframe.files import atomic_write
from genframe.samples import Samples

GRID_MAX = 256  # samples in grid.png: the first ones, at most this many ...
GRID_MAX_BYTES = 64 * 2**20  # ... and at most this many bytes of 8-bit pixels kept for it
MANIFEST = "manifest.jsonl"


class SampleWriter:
    """Writes samples into `folder` as they are made.

    Each `add` writes one file per sample (``000000.png`` or ``000000.txt``, numbered on
    from the previous batch) and then appends one line per sample to ``manifest.jsonl``
    (its file, index, condition, its batch's metadata and its `per_sample` entries). A
    batch is in the manifest only once all its files are written; a batch whose writing
    fails or is interrupted has its files removed, so the files and the manifest always
    match. `close` writes ``grid.png`` from the first image samples (at most `GRID_MAX`).
    Use it as a context manager to close it however the block ends.

    Args:
        folder: the exact folder to write into (created if missing; an existing manifest
            there is replaced).
        grid_min_px: small images are scaled up so the grid is at least this wide.
        grid_max: the most samples the grid shows.
    """

    def __init__(self, folder: Path, *, grid_min_px: int = 256, grid_max: int = GRID_MAX) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.grid_min_px = grid_min_px
        self.grid_max = grid_max
        #: Samples written so far (files and manifest lines).
        self.count = 0
        self._grid: list[Any] = []  # uint8 (n, C, H, W) tensors of the first images
        self._grid_count = 0
        self._grid_full = False
        self._manifest = open(self.folder / MANIFEST, "w", encoding="utf-8")
        self._closed = False

    def add(self, batch: Samples) -> None:
        """Write one batch's files, then its manifest lines."""
        written: list[Path] = []
        lines = []
        try:
            for j in range(len(batch)):
                i = self.count + j
                if batch.kind == "image":
                    name = f"{i:06d}.png"
                    written.append(self.folder / name)
                    image = _to_pil(batch.images[j])
                    atomic_write(self.folder / name, lambda f: image.save(f, format="PNG"),
                                 durable=False)
                else:
                    name = f"{i:06d}.txt"
                    written.append(self.folder / name)
                    text = batch.texts[j].encode("utf-8")
                    atomic_write(self.folder / name, lambda f: f.write(text), durable=False)
                record = {"file": name, "index": i, "condition": batch.conditions[j], **batch.metadata,
                          **{k: column[j] for k, column in batch.per_sample.items()}}
                lines.append(json.dumps(record, default=str) + "\n")
            self._manifest.write("".join(lines))
            self._manifest.flush()
        except BaseException:  # Ctrl-C or a full disk: leave no file the manifest lacks
            self._manifest.flush()
            for path in written:
                path.unlink(missing_ok=True)
            raise
        self.count += len(batch)
        if batch.kind == "image":
            self._keep_for_grid(batch.images)

    def _keep_for_grid(self, images) -> None:
        if self._grid_full:
            return
        per_image = max(1, images[0].numel())
        room = min(self.grid_max - self._grid_count,
                   GRID_MAX_BYTES // per_image - self._grid_count)
        take = images[:max(0, room)]
        if len(take):
            self._grid.append(_to_uint8(take))
            self._grid_count += len(take)
        self._grid_full = len(take) < len(images) or self._grid_count >= self.grid_max

    def close(self) -> Path:
        """Close the manifest and write ``grid.png`` (image samples); return the folder."""
        if not self._closed:
            self._closed = True
            self._manifest.close()
            if self._grid:
                import torch

                images = torch.cat(self._grid).float() / 255
                self._grid = []
                grid = grid_image(images, self.grid_min_px)
                atomic_write(self.folder / "grid.png", lambda f: grid.save(f, format="PNG"))
        return self.folder

    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_samples(samples: Samples | list[Samples], out_dir: Path | None = None, *,
                  folder: Path | None = None, grid_min_px: int = 256) -> Path:
    """Write one file per sample, `grid.png` (images) and `manifest.jsonl`; return the folder.

    Args:
        samples: one `Samples` value or a list of batches (numbered on across batches).
        out_dir: a run directory: the files go to ``<out_dir>/samples/``.
        folder: the exact folder to write into instead (give `out_dir` or `folder`).
        grid_min_px: small images are scaled up so the grid is at least this wide.

    Each manifest line names the file, the sample's index, its condition, and its batch's
    metadata (seed, model, sampling options). The grid shows the first `GRID_MAX` images.
    """
    if (out_dir is None) == (folder is None):
        raise TypeError("write_samples: give out_dir (writes to out_dir/samples) or folder, not both")
    target = Path(folder) if folder is not None else Path(out_dir) / "samples"
    batches = samples if isinstance(samples, list) else [samples]
    with SampleWriter(target, grid_min_px=grid_min_px) as writer:
        for batch in batches:
            writer.add(batch)
    return target


def png_bytes(image) -> bytes:
    """One image (C, H, W, floats in [0, 1]) encoded as the PNG file `SampleWriter` writes."""
    import io

    buffer = io.BytesIO()
    _to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _to_uint8(images):
    return (images.detach().float().clamp(0, 1) * 255).round().byte().cpu()


def _to_pil(image):
    from PIL import Image

    arr = _to_uint8(image)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0].numpy(), mode="L")
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def grid_image(images, min_px: int):
    """A PIL image of `images` (float N×C×H×W in [0, 1]) in a square-ish grid with 1-pixel
    white gaps (torchvision's ``make_grid``), scaled up by a whole factor (nearest
    neighbour) until its longer side is at least `min_px` pixels."""
    from PIL import Image
    from torchvision.utils import make_grid

    n = images.shape[0]
    nrow = max(1, math.ceil(math.sqrt(n)))
    grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=1, pad_value=1.0)
    img = _to_pil(grid)
    # Small images (8x8 digits) are scaled up with nearest-neighbour so the grid is legible.
    scale = max(1, math.ceil(min_px / max(img.size)))
    if scale > 1:
        img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
    return img
