"""A cascade's second stage against bilinear upscaling: FD and PSNR at the high resolution.

    python bench/upscaler_quality.py BASE_RUN UPSCALER_RUN [--num 320] [--steps 50]
        [--base-steps 50] [--levels 0,0.1,0.25] [--guidance G]

The real high-resolution images are the test split of the upscaler run's data (for the
shapes: the held-out colour x shape pairs, at the upscaler's size). Two tables:

1. the base model's images (one per test caption for a text-to-image base; otherwise
   unconditional or cycling through the classes), upscaled (a) bilinearly and (b) by the
   upscaler at each noise-augmentation level: FD against the real high-resolution images
   (sets, not pairs) and, for shapes, the alignment with the caption;
2. each real image area-downsampled to the base model's size and upscaled again by (a)
   and (b): PSNR against its own original (paired), and FD.

FD is genframe's (`genframe.metrics.frechet`) in the feature space of genframe's small
classifier (`genframe.metrics.classifier`), trained here (and cached) on the upscaler
data's training split at the high resolution; for shapes its labels are the caption's
(shape, colour, size, position) combination, since shapes have no class labels. The row
"real, validation split" compares other real images, as many: for shapes these show the
seen colour x shape pairs, so it is a reference, not a floor.
Run `genframe train experiment=shapes_text2image` and `experiment=shapes_upscaler` first.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F


def main() -> None:
    from genframe.samplers.ddim import DDIMSampler
    from genframe.weights import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("upscaler")
    parser.add_argument("--num", type=int, default=320, help="test images (at most the split's)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the upscaler")
    parser.add_argument("--base-steps", type=int, default=50, help="DDIM steps of the base model")
    parser.add_argument("--levels", default="0,0.1,0.25",
                        help="noise-augmentation levels of the upscaler's input (fractions of T)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="the base model's guidance (default: its own)")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    levels = [float(v) for v in args.levels.split(",")]

    base, _, _ = load_model(args.base)
    upscaler, up_run, _ = load_model(args.upscaler)
    base.eval(), upscaler.eval()
    low, high = int(base.hparams.image_size), int(upscaler.hparams.image_size)
    if upscaler.low_res_size != low:
        parser.error(f"the upscaler reads {upscaler.low_res_size}x{upscaler.low_res_size} images, "
                     f"the base model makes {low}x{low}")

    data, real, captions, features = real_data(up_run.data_config, args.num)
    n = len(real)
    print(f"{n} real {high}x{high} test images; base {low}x{low} ({base.registered_name}, "
          f"DDIM-{args.base_steps}), upscaler DDIM-{args.steps}; FD in {features.name}", flush=True)

    def upscaled(images: torch.Tensor, level: float) -> torch.Tensor:
        out = []
        for b in range(0, n, args.batch):
            out.append(upscaler.generate(len(images[b:b + args.batch]),
                                         condition={"low_res": images[b:b + args.batch]},
                                         seed=b, noise_augmentation=level,
                                         sampler=DDIMSampler(steps=args.steps)).images)
        return torch.cat(out)

    real_features = feats(features, real)
    print(f"\n{'':<34}{'FD':>8}{'PSNR dB':>9}{'align':>7}{'time s':>8}")
    floor = data.get("val")
    if floor is not None:
        row("real, validation split", fd(real_features, feats(features, floor)), None,
            alignment(floor, data.get("val_captions")), 0.0)

    # 1. The base model's images.
    start = time.perf_counter()
    made = base_images(base, n, captions, args)
    seconds = time.perf_counter() - start
    print(f"-- base model's {low}x{low} images ({seconds:.0f} s)", flush=True)
    if captions is not None:
        row(f"base {low}x{low} as made", None, None, alignment(made, captions), 0.0)
    candidates = {"bilinear": lambda: bilinear(made, high)}
    candidates.update({f"upscaler, noise aug {v:g}": (lambda v=v: upscaled(made, v)) for v in levels})
    for name, make in candidates.items():
        start = time.perf_counter()
        images = make()
        row(name, fd(real_features, feats(features, images)), None, alignment(images, captions),
            time.perf_counter() - start)

    # 2. The real images, downsampled and upscaled again: paired PSNR.
    small = F.interpolate(real, size=(low, low), mode="area")
    print(f"-- real images area-downsampled to {low}x{low}", flush=True)
    candidates = {"bilinear": lambda: bilinear(small, high)}
    candidates.update({f"upscaler, noise aug {v:g}": (lambda v=v: upscaled(small, v)) for v in levels})
    for name, make in candidates.items():
        start = time.perf_counter()
        images = make()
        row(name, fd(real_features, feats(features, images)), psnr(images, real),
            alignment(images, captions), time.perf_counter() - start)


def real_data(data_config: dict, num: int):
    """(extras, the real test images (N, C, H, W) in [0, 1], their captions or None, the
    feature extractor). extras holds the validation images (the FD floor)."""
    from genframe.data.base import split_captions
    from genframe.tasks.build import build_data

    data = build_data(data_config)
    data.setup("fit")
    test = data.dataset("test")
    count = min(num, len(test))
    real = torch.stack([(test[i]["image"] + 1) / 2 for i in range(count)])
    captioned = "caption" in test[0]
    captions = split_captions(data, "test", count) if captioned else None

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
        ds = data.dataset(name)
        images = torch.stack([(ds[i]["image"] + 1) / 2 for i in range(len(ds))])
        texts = [str(ds[i]["caption"]) for i in range(len(ds))] if captioned else None
        labels = (torch.tensor([int(ds[i]["label"]) for i in range(len(ds))])
                  if "label" in ds[0] else None)
        return images, labels, texts

    train_images, train_labels, train_texts = split("train")
    val_images, val_labels, val_texts = split("val")
    if captioned:
        train_labels, val_labels = attribute_labels(train_texts), attribute_labels(val_texts)
    features = classifier_features(dict(data_config), train_images, train_labels,
                                   val_images, val_labels)
    extras = {"val": val_images[:count], "val_captions": val_texts[:count] if val_texts else None}
    return extras, real, captions, features


def attribute_labels(captions: list[str]) -> torch.Tensor:
    """Shapes captions as one class per (shape, colour, size, position) combination."""
    from genframe.data.shapes import ATTRIBUTES, parse_caption

    labels = []
    for caption in captions:
        attrs = parse_caption(caption)
        index = 0
        for key, vocab in ATTRIBUTES.items():
            index = index * len(vocab) + list(vocab).index(attrs[key])
        labels.append(index)
    return torch.tensor(labels)


def classifier_features(data_key: dict, train_images, train_labels, val_images, val_labels):
    from genframe.data.shapes import ATTRIBUTES
    from genframe.metrics.classifier import load_or_train_classifier

    num_classes = math.prod(len(v) for v in ATTRIBUTES.values()) if data_key.get("name") == "shapes" \
        else int(max(train_labels.max(), val_labels.max())) + 1
    key = {**data_key, "labels": "attributes" if data_key.get("name") == "shapes" else "label",
           "num_classes": num_classes}
    start = time.perf_counter()
    cached = load_or_train_classifier(key, train_images, train_labels, val_images, val_labels,
                                      epochs=10, seed=0)
    print(f"feature classifier: validation accuracy {cached.val_accuracy:.3f} "
          f"({'cached' if cached.from_cache else f'trained in {time.perf_counter() - start:.0f} s'})",
          flush=True)
    return cached.extractor()


def base_images(base, n: int, captions: list[str] | None, args) -> torch.Tensor:
    from genframe.samplers.ddim import DDIMSampler

    out = []
    for b in range(0, n, args.batch):
        m = min(args.batch, n - b)
        options = {"sampler": DDIMSampler(steps=args.base_steps)}
        condition = None
        if captions is not None and "prompt" in base.condition_keys:
            condition = {"prompt": captions[b:b + m]}
            if args.guidance is not None:
                options["guidance"] = args.guidance
        out.append(base.generate(m, condition=condition, seed=b, **options).images)
    return torch.cat(out)


def bilinear(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


@torch.no_grad()
def feats(extractor, images: torch.Tensor) -> torch.Tensor:
    from genframe.metrics.features import extract_features

    return extract_features(extractor, images)


def fd(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    from genframe.metrics.frechet import frechet_distance

    return frechet_distance(real_features, fake_features)


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE), pixels in [0, 1] (8-bit rounded first, as
    the files would hold them)."""
    quantise = lambda x: (x.clamp(0, 1) * 255).round() / 255  # noqa: E731
    mse = (quantise(images) - quantise(reference)).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def alignment(images: torch.Tensor, captions: list[str] | None) -> float | None:
    if captions is None or images.shape[1] != 3:
        return None
    from genframe.metrics.alignment import alignment_scores

    return alignment_scores(images, captions[: len(images)])["alignment"]


def row(name: str, fd_value, psnr_value, align, seconds: float) -> None:
    def cell(value, width: int, digits: int) -> str:
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    print(f"{name:<34}{cell(fd_value, 8, 2)}{cell(psnr_value, 9, 2)}{cell(align, 7, 3)}{seconds:>8.0f}",
          flush=True)


if __name__ == "__main__":
    main()
