"""Subject tuning (``genframe finetune finetune=subject``): does the token show the
subject, and does the rest of the model stay as it was?

    python bench/subject_tuning.py BASE_RUN TUNED_RUN [--samples 64] [--steps 20]
        [--guidance 3] [--every 4] [--out DIR]

TUNED_RUN is a ``finetune=subject`` run of BASE_RUN (a shapes text-to-image run); its
run.json names the token, the class word and the subject's folder. For the base model
and the tuned one, the script prints:

1. subject: for ``--samples`` images of the instance prompt ("a sks circle"), the share
   whose nearest neighbour among the subject's own images and real images of the class
   (the base run's training images whose caption names the class word) is a subject
   image. Distances are in pixels after moving each image's foreground centroid to the
   centre, so a subject drawn elsewhere on the canvas still counts. Beside it two plain
   readings of the same images: the share whose foreground is white (nearer white than
   any colour of the data) and the share that is hollow (foreground fills under 60% of
   its bounding box; a filled circle fills ~79%, the rings ~45%);
2. the class without the token: the same three shares for the base run's training
   captions that name the class ("a large red circle at the top left"; the subject
   should not leak into them) and their alignment (`genframe.metrics.alignment`: every
   attribute right);
3. ordinary prompts: alignment on the test split's held-out captions (every
   ``--every``-th; colour x shape pairs training never showed), as
   ``bench/text2image_alignment.py`` measures it, and on the validation split's captions
   (every ``--every``-th; pairs training showed, other images).

It also writes ``grid_before.png`` and ``grid_after.png`` (and both side by side,
``grids.png``) for a fixed prompt list, one row per prompt, one column per seed, into
``--out`` (default: TUNED_RUN/bench_subject).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

#: The fixed prompt list of the grids; {token} and {class_word} are filled in.
GRID_PROMPTS = (
    "a {token} {class_word}",  # replaced by the run's instance prompt
    "a large {token} {class_word} at the top left",
    "a large red {class_word} at the top left",
    "a small green {class_word} in the centre",
    "a large blue square in the centre",
    "a small yellow triangle at the bottom right",
)
WHITE = torch.tensor([1.0, 1.0, 1.0])
FOREGROUND = 0.3  # brightest channel above this: a foreground pixel
HOLLOW = 0.6      # foreground share of its bounding box below this: hollow


def centred(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] with each image rolled so that its foreground centroid sits
    at the centre (images without foreground stay as they are)."""
    out = images.clone()
    size = images.shape[-1]
    for i, image in enumerate(images):
        mask = image.max(0).values > FOREGROUND
        if mask.sum() < 2:
            continue
        ys, xs = torch.nonzero(mask, as_tuple=True)
        centre = size / 2 - 0.5
        dy, dx = round(centre - ys.float().mean().item()), round(centre - xs.float().mean().item())
        out[i] = torch.roll(image, shifts=(dy, dx), dims=(1, 2))
    return out


def readings(images: torch.Tensor, subject: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Shares of `images` nearer the `subject` images than the class `reference`, with
    white foreground, and hollow. Nearness is cosine similarity of the centred pixels
    (so a faint or empty image is not "near" a thin ring); an image without foreground
    is none of the three."""
    from genframe.data.shapes import COLOURS

    def unit(x: torch.Tensor) -> torch.Tensor:
        flat = centred(x).flatten(1)
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-6)

    pool = unit(torch.cat([subject, reference]))  # (S + R, D)
    nearest = (unit(images) @ pool.T).argmax(1) < len(subject)  # (N,)
    palette = torch.stack([WHITE, *(torch.tensor(c) for c in COLOURS.values())])  # (5, 3)
    near = white = hollow = both = 0
    for image, is_near in zip(images, nearest.tolist()):
        mask = image.max(0).values > FOREGROUND
        if mask.sum() < 2:
            continue
        near += int(is_near)
        rgb = image[:, mask].mean(1)
        w = ((palette - rgb) ** 2).sum(1).argmin().item() == 0
        ys, xs = torch.nonzero(mask, as_tuple=True)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        h = mask.sum().item() / box.item() < HOLLOW
        white, hollow, both = white + int(w), hollow + int(h), both + int(w and h)
    n = len(images)
    return {"subject": near / n, "white": white / n, "hollow": hollow / n, "both": both / n}


def generate(model, prompts: list[str], seed: int, options: dict) -> torch.Tensor:
    parts = []
    for b in range(0, len(prompts), 128):
        chunk = prompts[b:b + 128]
        parts.append(model.generate(len(chunk), condition={"prompt": chunk}, seed=seed + b,
                                    **options).images.cpu())
    return torch.cat(parts)


def grid(model, prompts: list[str], columns: int, options: dict) -> torch.Tensor:
    """(rows * H, columns * W, 3)-shaped grid, one row per prompt, seeds 0..columns-1."""
    rows = []
    for prompt in prompts:
        images = torch.cat([model.generate(1, condition={"prompt": prompt}, seed=s, **options).images
                            for s in range(columns)])  # (columns, 3, H, W)
        rows.append(torch.cat(list(images), dim=2))  # (3, H, columns * W)
    return torch.cat(rows, dim=1)  # (3, rows * H, columns * W)


def save(image: torch.Tensor, path: Path, scale: int = 3) -> None:
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    im = Image.fromarray(array)
    im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST).save(path)


def main() -> None:
    from genframe.data.base import split_captions
    from genframe.data.shapes import ShapesDataModule
    from genframe.data.subject import SubjectDataModule, _names
    from genframe.metrics.alignment import alignment_scores
    from genframe.samplers.ddim import DDIMSampler
    from genframe.weights import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("tuned")
    parser.add_argument("--samples", type=int, default=64, help="images of the instance prompt")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--every", type=int, default=4, help="use every N-th test caption")
    parser.add_argument("--columns", type=int, default=8, help="seeds per grid row")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    info = json.loads((Path(args.tuned) / "run.json").read_text())
    subject = info.get("subject")
    if not subject:
        parser.error(f"{args.tuned} is not a finetune=subject run (no 'subject' in run.json)")
    token, class_word = subject["token"], subject["class_word"]
    instance = subject["instance_prompt"]
    base, run, _ = load_model(args.base)
    tuned, _, _ = load_model(args.tuned)
    size = int(base.hparams.image_size)
    # The subject's images as the run read them (unreadable files skipped, with a warning).
    folder = SubjectDataModule(root=subject["root"], token=token, class_word=class_word,
                               image_size=size, channels=int(base.hparams.in_channels))
    subject_images = (folder.load_subject() + 1) / 2  # (N, C, H, W) in [0, 1]
    data = ShapesDataModule(**{k: v for k, v in run.data_config.items() if k != "name"})
    data.setup("fit")
    train = data.dataset("train")
    class_idx = [i for i in range(len(train)) if _names(train[i]["caption"], class_word)]
    reference = torch.stack([(train[i]["image"] + 1) / 2 for i in class_idx[:256]])
    class_prompts = sorted({train[i]["caption"] for i in class_idx})
    class_prompts = [class_prompts[i % len(class_prompts)] for i in range(args.samples)]
    test_prompts = split_captions(data, "test")[:: args.every]
    val_prompts = split_captions(data, "val")[:: args.every]
    options = {"sampler": DDIMSampler(steps=args.steps), "guidance": args.guidance}
    print(f"subject: {len(subject_images)} images under {subject['root']}; instance prompt "
          f"'{instance}'; class reference: {len(reference)} training images naming '{class_word}'; "
          f"DDIM-{args.steps}, guidance {args.guidance:g}")

    header = (f"{'model':<8} {'token: subject':>15} {'white':>6} {'hollow':>7} {'both':>5} | "
              f"{'class: subject':>15} {'white':>6} {'hollow':>7} {'align':>6} | "
              f"{'held-out align':>14} {'seen align':>10}  time")
    print(header)
    for name, model in (("base", base), ("tuned", tuned)):
        model.eval()
        start = time.perf_counter()
        token_images = generate(model, [instance] * args.samples, 1000, options)
        mine = readings(token_images, subject_images, reference)
        class_images = generate(model, class_prompts, 2000, options)
        prior = readings(class_images, subject_images, reference)
        prior_align = alignment_scores(class_images, class_prompts)["alignment"]
        ordinary = alignment_scores(generate(model, test_prompts, 3000, options), test_prompts)
        seen = alignment_scores(generate(model, val_prompts, 4000, options), val_prompts)
        print(f"{name:<8} {mine['subject']:>15.2f} {mine['white']:>6.2f} {mine['hollow']:>7.2f} "
              f"{mine['both']:>5.2f} | "
              f"{prior['subject']:>15.2f} {prior['white']:>6.2f} {prior['hollow']:>7.2f} "
              f"{prior_align:>6.2f} | {ordinary['alignment']:>14.3f} {seen['alignment']:>10.3f}  "
              f"{time.perf_counter() - start:.0f} s",
              flush=True)
    print(f"(held-out: {len(test_prompts)} test captions; seen: {len(val_prompts)} validation captions; "
          f"class: {len(class_prompts)} training captions naming '{class_word}'; token: "
          f"{args.samples} images of '{instance}')")
    own = readings(subject_images, subject_images, reference)
    real = readings(reference, subject_images, reference)
    print(f"reference: the subject images read as subject {own['subject']:.2f}, white {own['white']:.2f}, "
          f"hollow {own['hollow']:.2f}; the real class images as subject {real['subject']:.2f}, white "
          f"{real['white']:.2f}, hollow {real['hollow']:.2f}")

    out = Path(args.out) if args.out else Path(args.tuned) / "bench_subject"
    out.mkdir(parents=True, exist_ok=True)
    prompts = [p.format(token=token, class_word=class_word) for p in GRID_PROMPTS]
    prompts[0] = instance
    grids = {name: grid(model, prompts, args.columns, options) for name, model in
             (("before", base), ("after", tuned))}
    for name, image in grids.items():
        save(image, out / f"grid_{name}.png")
    gap = torch.ones(3, grids["before"].shape[1], 4)
    save(torch.cat([grids["before"], gap, grids["after"]], dim=2), out / "grids.png")
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    print(f"grids (rows: {'; '.join(prompts)}; left before, right after): {out / 'grids.png'}")


if __name__ == "__main__":
    main()
