"""Text-image alignment on captioned shapes: does a generated image show what its prompt
asked for?

Each image is read by analysing its pixels, with no learned part, so the metric cannot
drift with a classifier's training: the shape is the largest bright blob, and its colour,
size, position and outline are measured against the vocabularies and geometry of
`genframe.data.shapes`. On the shapes data's own images it reads every attribute right
(see ``tests/test_alignment.py``); on generated images it tells how often a prompt's
attributes all came out.

    scores = alignment_scores(samples.images, samples.conditions)
    # -> {"alignment": 0.83, "alignment_colour": 0.97, "alignment_shape": 0.88,
    #     "alignment_size": 0.95, "alignment_position": 0.99, "alignment_no_shape": 0.01,
    #     "alignment_unread_prompts": 0.0}

Keys are bare, as elsewhere in `genframe.metrics`; the caller adds the stage prefix
(``val/alignment``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from genframe.data.shapes import (
    COLOURS,
    POSITIONS,
    SIZE_FRACTIONS,
    parse_caption,
    position_centre,
)
from genframe.errors import UserError

__all__ = ["ASPECTS", "alignment_scores", "read_attributes"]

log = logging.getLogger("genframe")

#: The attributes compared, in the order they are reported.
ASPECTS = ("colour", "shape", "size", "position")

# A pixel is foreground when its brightest channel is this much above the background's
# (the median brightness: shapes cover at most a fifth of the canvas).
FOREGROUND_MARGIN = 0.3
# Fill ratio (blob area / bounding-box area) thresholds. The renderer gives squares 1.0,
# circles 0.78-0.89 and triangles 0.52-0.60 at every canvas from 24 to 64 pixels (its
# triangle's bounding box is one row short of the side): the cuts sit between.
SQUARE_FILL = 0.94
TRIANGLE_FILL = 0.69
# Below this fill the blob is no shape at all (scattered noise, a thin line).
MIN_FILL = 0.3
# Bounding-box side as a share of the canvas: small shapes are 0.25, large 0.42-0.44.
SIZE_CUT = (SIZE_FRACTIONS["small"] + SIZE_FRACTIONS["large"]) / 2
# A blob smaller than this share of a small triangle's area is no shape.
MIN_AREA_SHARE = 0.4

_PALETTE = np.array(list(COLOURS.values()))  # (K, 3)
_CENTRES = np.array([position_centre(p) for p in POSITIONS])  # (P, 2) as (x, y)
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity: a small triangle's apex touches diagonally


def read_attributes(image: torch.Tensor) -> dict[str, str] | None:
    """The shape attributes one image shows, or None if it shows no shape.

    Args:
        image: float (3, H, W) in [0, 1], H == W.

    Returns:
        ``{"colour", "shape", "size", "position"}`` read from the largest 8-connected blob
        of foreground pixels (brightest channel at least `FOREGROUND_MARGIN` above the
        median): colour = the vocabulary colour nearest its mean RGB; position = the
        region centre nearest its centroid; size = its bounding-box side against
        `SIZE_CUT`; shape = its fill of the bounding box (square ~1, circle ~pi/4,
        triangle ~1/2). None when the blob is too small or too sparse to be a shape.
    """
    return _read(image.detach().float().cpu().clamp(0, 1).numpy())


def _read(image: np.ndarray) -> dict[str, str] | None:
    """`read_attributes` of a (3, H, W) float array in [0, 1]."""
    size = image.shape[-1]
    bright = image.max(axis=0)  # (H, W)
    mask = bright > np.median(bright) + FOREGROUND_MARGIN
    labels, count = ndimage.label(mask, structure=_EIGHT)
    if count == 0:
        return None
    areas = np.bincount(labels.ravel())[1:]
    blob = labels == (int(areas.argmax()) + 1)
    area = int(areas.max())
    small = SIZE_FRACTIONS["small"] * size
    if area < MIN_AREA_SHARE * small * small / 2:
        return None
    ys, xs = np.nonzero(blob)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = area / float(height * width)
    if fill < MIN_FILL:
        return None
    shape = "square" if fill >= SQUARE_FILL else "circle" if fill >= TRIANGLE_FILL else "triangle"
    rgb = image[:, blob].mean(axis=1)  # (3,)
    colour = list(COLOURS)[int(((_PALETTE - rgb) ** 2).sum(1).argmin())]
    centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / size
    position = POSITIONS[int(((_CENTRES - centroid) ** 2).sum(1).argmin())]
    extent = max(height, width) / size
    return {"colour": colour, "shape": shape,
            "size": "large" if extent >= SIZE_CUT else "small", "position": position}


def alignment_scores(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """How often generated shapes show what their prompts asked for.

    Args:
        images: float (N, 3, H, W) in [0, 1] (as `Samples.images`), square, H >= 24.
        prompts: N captions in the shapes data's words ("a large red circle at the top
            left"); `genframe.data.shapes.parse_caption` reads them.

    Returns:
        Shares in [0, 1] over the images whose prompt could be read:
        ``alignment`` (every attribute right), ``alignment_colour``, ``alignment_shape``,
        ``alignment_size``, ``alignment_position`` (that attribute right; an image with no
        shape is wrong on all), ``alignment_no_shape`` (no shape found, see
        `read_attributes`); and ``alignment_unread_prompts``, the number of prompts
        `parse_caption` could not read (left out of the shares, and logged).

    Raises:
        UserError: images of the wrong shape, a count that differs from the prompts', or
            no prompt that could be read.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 \
            or images.shape[2] != images.shape[3]:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise UserError(f"alignment: images must be a float tensor (N, 3, H, W) with H == W, "
                        f"got {got}")
    if images.shape[-1] < 24:
        raise UserError(f"alignment: images must be at least 24 pixels wide to read shapes, "
                        f"got {images.shape[-1]}")
    if isinstance(prompts, str) or len(prompts) != len(images):
        raise UserError(f"alignment: expected one prompt per image ({len(images)}), got "
                        f"{1 if isinstance(prompts, str) else len(prompts)} prompt(s)")
    wanted = [parse_caption(p) for p in prompts]
    unread = [p for p, w in zip(prompts, wanted) if w is None]
    if unread:
        log.warning("alignment: %d of %d prompts are not shapes captions and are left out "
                    "(first: %r)", len(unread), len(prompts), unread[0])
    if len(unread) == len(prompts):
        raise UserError(f"alignment: none of the {len(prompts)} prompts is a shapes caption "
                        f"(first: {prompts[0]!r}); expected e.g. 'a large red circle at the "
                        "top left'")
    right = {a: 0 for a in ASPECTS}
    all_right = no_shape = n = 0
    pixels = images.detach().float().cpu().clamp(0, 1).numpy()
    for image, want in zip(pixels, wanted):
        if want is None:
            continue
        n += 1
        got = _read(image)
        if got is None:
            no_shape += 1
            continue
        hits = [got[a] == want[a] for a in ASPECTS]
        for a, hit in zip(ASPECTS, hits):
            right[a] += hit
        all_right += all(hits)
    return {
        "alignment": all_right / n,
        **{f"alignment_{a}": right[a] / n for a in ASPECTS},
        "alignment_no_shape": no_shape / n,
        "alignment_unread_prompts": float(len(unread)),
    }
