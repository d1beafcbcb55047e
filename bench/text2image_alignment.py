"""Text-image alignment of a text-to-image run on the held-out shapes pairs.

    python bench/text2image_alignment.py RUN_DIR [--guidance 1,2,3,4,6] [--steps 50]
        [--every 1] [--strengths 0.2,0.4,0.6,0.8,1.0] [--split test|val] [--no-untrained]

Prints, for the test split's captions (colour x shape pairs training never showed; or
with ``--split val`` the validation captions, pairs training showed):

1. alignment of the same architecture untrained (random weights, as the run's config
   builds it) and of the trained model at each guidance scale;
2. image-to-image: for each strength, alignment with the new prompt and the mean
   distance (RMSE of pixels in [0, 1]) to the init image. The init images are validation
   images whose caption differs from the prompt in colour and shape;
3. which words the model reads: its denoising loss on the validation images, at a few
   noise levels, with the true caption, with one attribute of the caption changed, and
   with no caption. An attribute whose change leaves the loss where it is, is ignored.

Everything comes from genframe's public API (`load_model`, `generate`,
`genframe.metrics.alignment`); run `genframe train experiment=shapes_text2image` first.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from genframe.data.base import split_captions
    from genframe.data.shapes import ShapesDataModule
    from genframe.samplers.ddim import DDIMSampler
    from genframe.weights import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--guidance", default="1,2,3,4,6")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--every", type=int, default=1, help="use every N-th test caption")
    parser.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1.0")
    parser.add_argument("--strength-guidance", type=float, default=None)
    parser.add_argument("--sensitivity-steps", default="500,900,990",
                        help="timesteps of the caption-sensitivity table")
    parser.add_argument("--split", default="test", choices=("test", "val"),
                        help="test: the held-out colour x shape pairs; val: seen pairs")
    parser.add_argument("--no-untrained", action="store_true",
                        help="leave the untrained row out of the guidance table")
    parser.add_argument("--tables", default="guidance,strength,sensitivity",
                        help="which tables to print (comma-separated)")
    args = parser.parse_args()
    tables = set(args.tables.split(","))
    unknown = tables - {"guidance", "strength", "sensitivity"}
    if unknown:
        parser.error(f"--tables: unknown {', '.join(sorted(unknown))}; "
                     "choose from guidance, strength, sensitivity")

    model, run, _ = load_model(args.run)
    model.eval()
    data = ShapesDataModule(**{k: v for k, v in run.data_config.items() if k != "name"})
    data.setup("fit")
    prompts = split_captions(data, args.split)[:: args.every]
    sampler = DDIMSampler(steps=args.steps)
    which = "held-out" if args.split == "test" else "validation (seen pairs)"
    print(f"{len(prompts)} {which} prompts (held out: {', '.join(f'{c} {s}' for c, s in data.held_out_pairs)}), "
          f"DDIM-{args.steps}")

    if "guidance" in tables:
        guidance_table(model, prompts, sampler, args.guidance, untrained=not args.no_untrained)
    if "strength" in tables:
        strength_table(model, data, prompts, sampler, args.strengths, args.strength_guidance)
    if "sensitivity" in tables:
        sensitivity(model, data, [int(t) for t in args.sensitivity_steps.split(",")])


def row(label: str, values: dict[str, float], seconds: float) -> None:
    parts = " ".join(f"{values[f'alignment_{a}']:.2f}" for a in ("colour", "shape", "size", "position"))
    print(f"{label:<22} alignment {values['alignment']:.3f}  (colour shape size position: {parts})"
          f"  {seconds:.0f} s")


def guidance_table(model, prompts, sampler, guidance: str, *, untrained: bool = True) -> None:
    """Alignment of the untrained architecture (unless `untrained` is False) and of the
    model at each guidance."""
    from genframe.metrics.model_metrics import model_alignment
    from genframe.weights import instantiate_model

    if untrained:
        fresh = instantiate_model(model.registered_name, model.model_spec.kwargs)
        fresh.set_tokenizer(model.tokenizer)
        start = time.perf_counter()
        row("untrained", model_alignment(fresh.eval(), prompts, batch_size=160, sampler=sampler),
            time.perf_counter() - start)
    for w in (float(g) for g in guidance.split(",")):
        start = time.perf_counter()
        row(f"guidance {w:g}", model_alignment(model, prompts, batch_size=160, sampler=sampler,
                                               guidance=w), time.perf_counter() - start)


def strength_table(model, data, prompts, sampler, strengths: str, guidance: float | None) -> None:
    """Image-to-image from validation images whose colour and shape differ from the
    prompt's: alignment with the prompt and distance to the init image per strength."""
    from genframe.data.shapes import parse_caption
    from genframe.metrics.alignment import alignment_scores

    val = data.dataset("val")
    inits = []
    for prompt in prompts:
        want = parse_caption(prompt)
        for i in range(len(val)):
            got = parse_caption(val[i]["caption"])
            if got["colour"] != want["colour"] and got["shape"] != want["shape"]:
                inits.append((val[i]["image"] + 1) / 2)
                break
    init = torch.stack(inits)  # (N, 3, H, W) in [0, 1]
    w = guidance
    print(f"image-to-image at guidance {w if w is not None else model.hparams.guidance:g}: "
          "init images differ from the prompt in colour and shape")
    for strength in (float(s) for s in strengths.split(",")):
        images = []
        for b in range(0, len(prompts), 160):
            options = {"guidance": w} if w is not None else {}
            images.append(model.generate(len(prompts[b:b + 160]), condition={"prompt": prompts[b:b + 160]},
                                         seed=b, sampler=sampler, init_image=init[b:b + 160],
                                         strength=strength, **options).images)
        images = torch.cat(images)
        scores = alignment_scores(images, prompts)
        distance = float(((images - init) ** 2).mean(dim=(1, 2, 3)).sqrt().mean())
        print(f"strength {strength:.1f}: alignment with the prompt {scores['alignment']:.3f} "
              f"(colour {scores['alignment_colour']:.2f}, shape {scores['alignment_shape']:.2f}, "
              f"position {scores['alignment_position']:.2f}), distance to the init image {distance:.3f}")


def sensitivity(model, data, steps: list[int]) -> None:
    """Print the denoising loss on the validation images per caption variant and step."""
    from genframe.data.shapes import ATTRIBUTES, caption_of, parse_caption

    val = data.dataset("val")
    x0 = torch.stack([val[i]["image"] for i in range(len(val))])
    captions = [val[i]["caption"] for i in range(len(val))]

    def changed(caption: str, key: str) -> str:
        attrs = parse_caption(caption)
        vocab = ATTRIBUTES[key]
        attrs[key] = vocab[(vocab.index(attrs[key]) + 1) % len(vocab)]
        return caption_of(attrs)

    variants = {"true caption": captions, "no caption": [""] * len(captions)}
    variants.update({f"{key} changed": [changed(c, key) for c in captions] for key in ATTRIBUTES})
    print(f"denoising loss on {len(captions)} validation images ({model.prediction} target) "
          "by caption and timestep:")
    print(f"{'':<16}" + "".join(f"{f't={t}':>10}" for t in steps))
    net = model.sampling_net
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        encoded = {name: model.encode(texts) for name, texts in variants.items()}
        for name, (context, mask) in encoded.items():
            cells = []
            for step in steps:
                t = torch.full((len(x0),), step, dtype=torch.long)
                x_t = model.schedule.q_sample(x0, t, noise)
                target = model.schedule.target(x0, noise, t, model.prediction)
                out = net(x_t, t, None, context=context, mask=mask)
                cells.append(f"{float(((out - target) ** 2).mean()):>10.4f}")
            print(f"{name:<16}" + "".join(cells))


if __name__ == "__main__":
    main()
