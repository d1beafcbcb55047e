"""Captioned shapes that genframe draws itself: a coloured circle, square or triangle on a
black canvas, with a caption such as "a large red circle at the top left".

The vocabularies, `render`, `caption_of` and `parse_caption` are public: the alignment
metric (`genframe.metrics.alignment`) reads the same attributes back from an image, and
text-to-image code uses the captions as prompts.

Splits test composition, not memory: a seeded choice of colour x shape pairs (for example
"red triangle" and "blue circle") is held out, and every image of a held-out pair, in every
size and position, is in the test split only. Training and validation images come from
the other pairs, so each held-out colour and shape is seen in training, but never
together.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping

import torch

from genframe.data.base import (
    CaptionTokenizer,
    DictDataset,
    GenerativeDataModule,
    check_fractions,
    split_indices,
)
from genframe.errors import UserError, did_you_mean, valid_list

__all__ = [
    "ATTRIBUTES", "COLOURS", "POSITIONS", "SHAPES", "SIZES", "SIZE_FRACTIONS",
    "ShapesDataModule", "caption_of", "check_attributes", "held_out_pairs", "parse_caption",
    "position_centre", "render", "side_pixels",
]

SHAPES = ("circle", "square", "triangle")
#: Colour name -> RGB in [0, 1]; pure primaries and yellow, far apart in RGB.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
SIZES = ("small", "large")
#: Side of the shape's bounding box as a share of the canvas side (8 and 14 px at 32).
SIZE_FRACTIONS = {"small": 0.25, "large": 0.4375}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "centre")
#: Position -> the shape's centre as (x, y) shares of the canvas (y grows downwards).
_CENTRES = {
    "top left": (0.25, 0.25), "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75),
    "centre": (0.5, 0.5),
}
#: Attribute name -> its vocabulary, in caption order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": SIZES, "colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS,
}
MIN_IMAGE_SIZE = 24


def check_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    """`attributes` as a plain dict, or a `UserError` naming a missing key or a bad value."""
    if not isinstance(attributes, Mapping):
        raise UserError(f"shape attributes must be a mapping with keys "
                        f"{', '.join(ATTRIBUTES)}, got {attributes!r}")
    unknown = set(attributes) - set(ATTRIBUTES)
    if unknown:
        raise UserError(f"unknown shape attribute(s) {valid_list(unknown)}: expected "
                        f"{', '.join(ATTRIBUTES)}")
    out = {}
    for key, vocab in ATTRIBUTES.items():
        if key not in attributes:
            raise UserError(f"shape attributes lack '{key}' (one of {', '.join(vocab)})")
        value = attributes[key]
        if value not in vocab:
            raise UserError(f"shape attribute {key}={value!r}: expected one of "
                            f"{', '.join(vocab)}.{did_you_mean(str(value), vocab)}")
        out[key] = value
    return out


def side_pixels(size: str, image_size: int) -> int:
    """Side of a `size` shape's bounding box in pixels on an `image_size` canvas."""
    # Even, so that a shape centred on a pixel corner covers whole pixels symmetrically.
    return 2 * max(1, round(SIZE_FRACTIONS[size] * image_size / 2))


def position_centre(position: str) -> tuple[float, float]:
    """The (x, y) centre of `position` as shares of the canvas side (y grows downwards)."""
    return _CENTRES[position]


def _check_image_size(image_size: int, key: str = "image_size") -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
            or image_size < MIN_IMAGE_SIZE:
        raise UserError(f"{key} must be an integer >= {MIN_IMAGE_SIZE} (smaller canvases "
                        f"blur the shapes into each other), got {image_size!r}")


def render(attributes: Mapping[str, str], image_size: int = 32,
           offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Draw one shape: a float tensor (3, image_size, image_size) in [0, 1], black background.

    Args:
        attributes: ``{"shape", "colour", "size", "position"}`` from the vocabularies.
        image_size: canvas side in pixels (at least 24).
        offset: (dx, dy) pixels to shift the shape from its position's centre.

    Pixels whose centre lies inside the shape take the colour (no anti-aliasing). The
    triangle points up, its base at the bottom of the bounding box.
    """
    attrs = check_attributes(attributes)
    _check_image_size(image_size)
    side = side_pixels(attrs["size"], image_size)
    fx, fy = _CENTRES[attrs["position"]]
    cx, cy = fx * image_size + offset[0], fy * image_size + offset[1]
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5  # pixel centres
    x, y = coords.view(1, -1), coords.view(-1, 1)  # (1, W), (H, 1)
    half = side / 2
    if attrs["shape"] == "square":
        mask = ((x - cx).abs() < half) & ((y - cy).abs() < half)
    elif attrs["shape"] == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 < half ** 2
    else:  # triangle: apex at the top, half-width growing linearly to `half` at the base
        depth = (y - (cy - half)) / side  # 0 at the apex row, 1 at the base
        mask = (depth > 0) & (depth < 1) & ((x - cx).abs() < depth * half)
    colour = torch.tensor(COLOURS[attrs["colour"]]).view(3, 1, 1)
    return mask.unsqueeze(0).float() * colour  # (3, H, W)


def caption_of(attributes: Mapping[str, str]) -> str:
    """The caption of a shape: "a large red circle at the top left", "... in the centre"."""
    a = check_attributes(attributes)
    where = "in the centre" if a["position"] == "centre" else f"at the {a['position']}"
    return f"a {a['size']} {a['colour']} {a['shape']} {where}"


_WORD = {"center": "centre", "middle": "centre", "grey": "gray"}
_CAPTION = re.compile(
    r"^(?:an? |the )?(?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) "
    r"(?:at|in) (?:the )?(?P<position>top left|top right|bottom left|bottom right|centre)$")


def parse_caption(text: str) -> dict[str, str] | None:
    """The attributes of a caption `caption_of` writes, or None if `text` is not one.

    Case, extra spaces, a final full stop, "center"/"middle" for "centre" and "at"/"in"
    are forgiven; any word outside the vocabularies gives None.
    """
    if not isinstance(text, str):
        return None
    words = re.sub(r"\s+", " ", text.strip().lower().rstrip(".").strip()).split(" ")
    match = _CAPTION.match(" ".join(_WORD.get(w, w) for w in words))
    if match is None:
        return None
    attrs = match.groupdict()
    if any(attrs[k] not in vocab for k, vocab in ATTRIBUTES.items()):
        return None
    return {k: attrs[k] for k in ATTRIBUTES}


def held_out_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """`count` (colour, shape) pairs held out of training, drawn from `seed`.

    Pairs are taken in a seeded random order, keeping one only while every colour still
    shows in training with at least two shapes and every shape with at least two colours;
    so at most one pair per colour (4) can be held out.
    """
    pairs = list(itertools.product(COLOURS, SHAPES))
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    chosen: list[tuple[str, str]] = []
    for i in order.tolist():
        colour, shape = pairs[i]
        if len(chosen) == count:
            break
        colour_left = len(SHAPES) - 1 - sum(c == colour for c, _ in chosen)
        shape_left = len(COLOURS) - 1 - sum(s == shape for _, s in chosen)
        if colour_left >= 2 and shape_left >= 2:
            chosen.append((colour, shape))
    return sorted(chosen)


MAX_HELD_OUT = len(COLOURS)


class ShapesDataModule(CaptionTokenizer, GenerativeDataModule):
    """Captioned shapes, drawn deterministically: images in [-1, 1] and their captions.

    Every combination of shape (3), colour (4), size (2) and position (5) -- 120 in all --
    is drawn `per_combination` times, each copy shifted by a seeded random offset of up to
    `jitter` pixels in x and y. The test split holds every image of `held_out` colour x
    shape pairs (`held_out_pairs`: 10 combinations each); the other combinations are split
    at random into training and validation images. With the defaults: 1,440 training, 160
    validation and 320 test images (2 held-out pairs).

    Args:
        batch_size: images per batch.
        val_fraction: share of the seen combinations' images held out for validation.
        held_out: colour x shape pairs held out for the test split (0 to 4; 0: no test
            split).
        seed: seed of the held-out pairs, the offsets and the train/validation split.
        image_size: canvas side in pixels (at least 24).
        channels: always 3 (RGB; kept in the config so models can read it).
        per_combination: images drawn of each attribute combination.
        jitter: largest shift in pixels of a shape from its position's centre.
        num_classes: always 0: shapes carry captions, not labels (kept in the config so
            that image models read it and train unconditionally).
        num_levels: levels per channel (256, as for 8-bit images; the drawn values are 0
            and 1 only), for models that score a grid of levels.
        num_workers: DataLoader worker processes.
        tokenizer: the captions' tokenizer for text-to-image models, ``"char"`` or
            ``"bpe"``, trained on the training captions (`CaptionTokenizer`).

    After ``setup``, ``held_out_pairs`` lists the test split's pairs and ``attributes``
    maps each split to its items' attribute dicts (in the order of the dataset).
    """

    provides = frozenset({"image", "caption"})

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        held_out: int = 2,
        seed: int = 0,
        image_size: int = 32,
        channels: int = 3,
        per_combination: int = 16,
        jitter: int = 1,
        num_classes: int = 0,
        num_levels: int = 256,
        num_workers: int = 0,
        tokenizer: str = "char",
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        check_fractions(val_fraction, None)
        self.check_tokenizer_kind(tokenizer)
        _check_image_size(image_size, "data.image_size")

        def integer(key: str, value, low: int, high: int | None, why: str = "") -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low \
                    or (high is not None and value > high):
                span = f"between {low} and {high}" if high is not None else f">= {low}"
                raise UserError(f"data.{key} must be an integer {span}{why}, got {value!r}")

        if channels != 3:
            raise UserError(f"data.channels is 3 for shapes (RGB), got {channels!r}")
        if num_classes != 0:
            raise UserError(f"data.num_classes is 0 for shapes (they carry captions, not "
                            f"labels), got {num_classes!r}")
        integer("num_levels", num_levels, 2, 256)
        integer("held_out", held_out, 0, MAX_HELD_OUT,
                " (colour x shape pairs for the test split; each colour and shape must "
                "keep two partners in training)")
        integer("per_combination", per_combination, 1, None)
        integer("seed", seed, 0, None)
        integer("jitter", jitter, 0, image_size // 32,
                f" (at image_size={image_size} a larger shift pushes shapes off the canvas)")
        self.val_fraction = val_fraction
        self.held_out = held_out
        self.seed = seed
        self.image_size = image_size
        self.channels = channels
        self.per_combination = per_combination
        self.jitter = jitter
        self.num_classes = num_classes
        self.num_levels = num_levels
        self.held_out_pairs: list[tuple[str, str]] = []
        self.attributes: dict[str, list[dict[str, str]]] = {}

    def _draw(self, combos: list[dict[str, str]], gen: torch.Generator):
        """Images in [-1, 1] (N, 3, H, W), captions and attributes of `combos` x copies."""
        items = [c for c in combos for _ in range(self.per_combination)]
        offsets = torch.randint(-self.jitter, self.jitter + 1, (len(items), 2), generator=gen)
        images = torch.stack([render(a, self.image_size, tuple(o.tolist()))
                              for a, o in zip(items, offsets)])
        return images * 2 - 1, [caption_of(a) for a in items], items

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.held_out_pairs = held_out_pairs(self.held_out, self.seed)
        held = set(self.held_out_pairs)
        combos = [dict(zip(ATTRIBUTES, values))
                  for values in itertools.product(*ATTRIBUTES.values())]
        seen = [c for c in combos if (c["colour"], c["shape"]) not in held]
        unseen = [c for c in combos if (c["colour"], c["shape"]) in held]
        gen = torch.Generator().manual_seed(self.seed)
        images, captions, items = self._draw(seen, gen)
        train_idx, val_idx, _ = split_indices(
            len(items), self.val_fraction, None, self.seed, what="images",
            where="the shapes data (seen combinations)")
        for split, idx in (("train", train_idx), ("val", val_idx)):
            idx = idx.tolist()
            setattr(self, f"{split}_set", DictDataset(
                {"image": images[idx], "caption": [captions[i] for i in idx]}))
            self.attributes[split] = [items[i] for i in idx]
            if split == "train":
                self.fit_caption_tokenizer([captions[i] for i in idx])
        if unseen:
            images, captions, items = self._draw(unseen, gen)
            self.test_set = DictDataset({"image": images, "caption": captions})
            self.attributes["test"] = items
        pairs = ", ".join(f"{c} {s}" for c, s in self.held_out_pairs) or "none"
        self.summarize_splits("images", detail=f"seed {self.seed}; test holds out {pairs}")
