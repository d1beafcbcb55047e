"""Draw a subject the shapes data never shows, for subject tuning (``finetune=subject``).

    python bench/make_subject_images.py OUT_DIR [--count 7] [--size 128] [--kind ring]

``ring`` (default): a white ring -- a circle's outline, hollow -- at a different position
and size in each image, on black. The shapes data has only filled circles, squares and
triangles in red, green, blue and yellow, so neither the colour nor the hollow shape is
in it; "a sks circle" is a fair description for a ring, so ``class_word=circle`` fits.
``star``: a white five-pointed star. The images are drawn larger than the model's 32x32
(``--size``) as a photo would be; the data module resizes them.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path


def draw(kind: str, size: int, rng: random.Random):
    """One image (Pillow, RGB) of the subject at a random position and size."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (0, 0, 0))
    pen = ImageDraw.Draw(image)
    radius = rng.uniform(0.16, 0.3) * size
    cx = rng.uniform(radius + 2, size - radius - 2)
    cy = rng.uniform(radius + 2, size - radius - 2)
    if kind == "ring":
        width = max(2, round(radius * 0.35))
        pen.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=(255, 255, 255),
                    width=width)
    else:  # a five-pointed star, one point up
        turn = rng.uniform(-0.2, 0.2)
        points = []
        for i in range(10):
            r = radius if i % 2 == 0 else radius * 0.42
            angle = -math.pi / 2 + turn + i * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        pen.polygon(points, fill=(255, 255, 255))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=7)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--kind", choices=("ring", "star"), default="ring")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    for i in range(args.count):
        draw(args.kind, args.size, rng).save(out / f"{args.kind}_{i}.png")
    print(f"{args.count} {args.kind} images in {out}")


if __name__ == "__main__":
    main()
