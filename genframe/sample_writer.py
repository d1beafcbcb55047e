"""Write a `Samples` value into a run directory: files, a grid and a manifest."""

from __future__ import annotations

import json
import math
from pathlib import Path

from genframe.files import atomic_write_bytes
from genframe.samples import Samples


def write_samples(samples: Samples | list[Samples], out_dir: Path, *, grid_min_px: int = 256) -> Path:
    """Write one file per sample, `grid.png` (images) and `manifest.jsonl`; return the folder.

    `samples` may be a list of batches. Each manifest line names the file, the sample's
    index, its condition, and its batch's metadata (seed, model, sampling options).
    """
    import torch

    batches = samples if isinstance(samples, list) else [samples]
    folder = Path(out_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    i = 0
    for batch in batches:
        for j in range(len(batch)):
            if batch.kind == "image":
                name = f"{i:06d}.png"
                _to_pil(batch.images[j]).save(folder / name)
            else:
                name = f"{i:06d}.txt"
                (folder / name).write_text(batch.texts[j], encoding="utf-8")
            record = {"file": name, "index": i, "condition": batch.conditions[j], **batch.metadata,
                      **{k: column[j] for k, column in batch.per_sample.items()}}
            lines.append(json.dumps(record, default=str))
            i += 1
    if batches and batches[0].kind == "image":
        images = torch.cat([b.images.detach().cpu() for b in batches])
        _grid(images, grid_min_px).save(folder / "grid.png")
    atomic_write_bytes(folder / "manifest.jsonl", ("\n".join(lines) + "\n").encode())
    return folder


def _to_pil(image):
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().byte().cpu()
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0].numpy(), mode="L")
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def _grid(images, min_px: int):
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
