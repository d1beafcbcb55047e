"""Diffusion sampling throughput: DDIM at 10, 25, 50 steps and full DDPM, in one run.

    python bench/sampling_throughput.py [--run outputs/train/<time>] [--num-samples 64]

Without --run it builds the `model=diffusion` network at its digits defaults with random
weights (throughput does not depend on what the weights are). Prints images per second
and seconds per denoising step for each sampler, and checks that the time grows linearly
with the number of steps: a least-squares line through (steps, seconds) and its R²,
and the spread of the per-step times (max / min).
"""

from __future__ import annotations

import argparse
import time

import torch

from genframe.tasks.build import build_sampler


def build_model(run: str | None):
    if run:
        from genframe.weights import load_model

        return load_model(run=run)[0]
    from genframe.config import compose
    from genframe.tasks.build import build_model as build

    return build(compose("train", ["model=diffusion"]).model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default=None)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.run).eval()
    timesteps = model.hparams.timesteps
    cases = [("ddim-10", {"name": "ddim", "steps": 10}), ("ddim-25", {"name": "ddim", "steps": 25}),
             ("ddim-50", {"name": "ddim", "steps": 50}), (f"ddpm-{timesteps}", {"name": "ddpm"})]
    model.generate(4, seed=0, sampler=build_sampler({"name": "ddim", "steps": 2}))  # warm-up
    rows = []
    for label, sampler in cases:
        steps = sampler.get("steps", timesteps)
        best = float("inf")
        for _ in range(args.repeat if steps < 100 else 1):
            start = time.perf_counter()
            model.generate(args.num_samples, seed=0, sampler=build_sampler(sampler))
            best = min(best, time.perf_counter() - start)
        rows.append((label, steps, best))
    print(f"{'sampler':<10} {'steps':>6} {'seconds':>9} {'images/s':>9} {'ms/step':>8}")
    for label, steps, secs in rows:
        print(f"{label:<10} {steps:>6} {secs:>9.2f} {args.num_samples / secs:>9.1f} {1000 * secs / steps:>8.1f}")
    x = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    y = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    A = torch.stack([torch.ones_like(x), x], dim=1)
    coef = torch.linalg.lstsq(A, y.unsqueeze(1)).solution.squeeze(1)
    pred = A @ coef
    r2 = 1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    per_step = y / x
    print(f"linear fit: seconds = {coef[0]:.3f} + {1000 * coef[1]:.2f} ms x steps, R^2 = {r2:.4f}; "
          f"per-step time max/min = {per_step.max() / per_step.min():.2f}")


if __name__ == "__main__":
    main()
