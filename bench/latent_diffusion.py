"""Latent against pixel space: training-step and sampling time of two text-to-image runs,
side by side in one process.

    python bench/latent_diffusion.py PIXEL_RUN LATENT_RUN [--rounds 5] [--batch 64]
        [--samples 64] [--steps 50]

PIXEL_RUN is a `genframe train experiment=shapes_text2image` run, LATENT_RUN a
`genframe train experiment=shapes_text2image_latent model.autoencoder=...` run. Each round
times, for each model in turn: one optimizer step (forward, backward, AdamW) on a batch
of the shapes training images with their captions, the encoding into the latent included;
and DDIM sampling of `--samples` images at the model's guidance, the decoding included.
Prints the median over rounds, the spread (min-max) and the latent/pixel ratio; then the
first stage's ceiling: the alignment of the autoencoder's reconstructions of the held-out
test images (a latent model cannot draw better than its autoencoder decodes) and their
PSNR. Alignment of the two runs: `python bench/text2image_alignment.py RUN --tables guidance`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    from genframe.data.shapes import ShapesDataModule
    from genframe.samplers.ddim import DDIMSampler
    from genframe.weights import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pixel_run")
    parser.add_argument("latent_run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    args = parser.parse_args()

    models = {}
    for label, path in (("pixel", args.pixel_run), ("latent", args.latent_run)):
        model, run, _ = load_model(path)
        models[label] = (model, run)
    if models["latent"][0].autoencoder is None:
        parser.error(f"{args.latent_run} is not a latent model (no model.autoencoder)")
    _, run = models["pixel"]
    data = ShapesDataModule(**{k: v for k, v in run.data_config.items() if k != "name"})
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batch = {"image": batch["image"][: args.batch], "caption": list(batch["caption"][: args.batch])}
    prompts = [batch["caption"][i % len(batch["caption"])] for i in range(args.samples)]
    sampler = DDIMSampler(steps=args.steps)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"{args.samples} samples with DDIM-{args.steps}, {args.rounds} rounds")
    for label, (model, _) in models.items():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{label:>6}: U-Net input {tuple(model.net_shape)}, {trainable / 1e6:.2f} M trainable "
              f"parameters, guidance {model.hparams.guidance:g}")
    times: dict[str, dict[str, list[float]]] = {k: {"train step": [], "sampling": []} for k in models}
    optimizers = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                  for k, (m, _) in models.items()}
    for _ in range(args.rounds):
        for label, (model, _) in models.items():
            model.train()
            start = time.perf_counter()
            optimizers[label].zero_grad(set_to_none=True)
            model.training_step(batch, 0).backward()
            optimizers[label].step()
            times[label]["train step"].append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(args.samples, condition={"prompt": prompts}, seed=0, sampler=sampler)
            times[label]["sampling"].append(time.perf_counter() - start)

    print(f"{'':<12}{'pixel s':>22}{'latent s':>22}{'latent/pixel':>14}")
    for what in ("train step", "sampling"):
        cells = []
        for label in models:
            xs = times[label][what]
            cells.append(f"{statistics.median(xs):.3f} ({min(xs):.2f}-{max(xs):.2f})")
        ratio = statistics.median(times["latent"][what]) / statistics.median(times["pixel"][what])
        print(f"{what:<12}{cells[0]:>22}{cells[1]:>22}{ratio:>14.2f}")
    first_stage_ceiling(models["latent"][0], data)


def first_stage_ceiling(model, data) -> None:
    """Alignment and PSNR of the autoencoder's reconstructions of the test images."""
    from genframe.metrics.alignment import alignment_scores

    test = data.dataset("test")
    x = torch.stack([test[i]["image"] for i in range(len(test))])  # (N, 3, H, W) in [-1, 1]
    captions = [test[i]["caption"] for i in range(len(test))]
    model.eval()
    with torch.no_grad():
        recon = model.from_latent(model.to_latent(x)).clamp(-1, 1)
    mse = ((recon - x) / 2).pow(2).flatten(1).mean(1)
    psnr = float((-10 * torch.log10(mse.clamp_min(1e-10))).mean())
    scores = alignment_scores((recon + 1) / 2, captions)
    parts = " ".join(f"{scores[f'alignment_{a}']:.2f}" for a in ("colour", "shape", "size", "position"))
    print(f"autoencoder reconstructions of the {len(x)} held-out test images: PSNR {psnr:.1f} dB, "
          f"alignment {scores['alignment']:.3f} (colour shape size position: {parts})")


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*self.trainer.*")
    main()
