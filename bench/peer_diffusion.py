"""genframe's diffusion U-Net against diffusers' `UNet2DModel` + `DDIMScheduler`, at equal
parameter count, side by side in one process.

    python bench/peer_diffusion.py [--rounds 3] [--warmup 2] [--train-steps 5]
        [--samples 64] [--ddim 10,50] [--threads N] [--smoke] [--profile] [--json FILE]

Needs the `bench` extra (`pip install -e ".[bench]"`: diffusers). Prints a markdown table
(median and min-max over rounds, the ratio genframe/diffusers of each round, the target);
`--json FILE` also writes it for `bench/run.py`. Results go in docs/BENCHMARKS.md.

The networks (1,623,169 parameters each, on 64 x 1 x 16 x 16 tensors, unconditional):

- genframe: `model=diffusion` built through its config (`experiment=digits_diffusion
  data.image_size=16 model.num_classes=0 model.block_out_channels=[32,64,64]
  model.blocks_per_level=2 model.attention_resolutions=[4] model.num_heads=4`): three
  levels (16, 8, 4), two residual blocks per level down and three up, self-attention at
  the 4x4 level and in the middle.
- diffusers: `UNet2DModel(block_out_channels=(32, 64, 64), layers_per_block=2,
  DownBlock2D, DownBlock2D, AttnDownBlock2D / AttnUpBlock2D, UpBlock2D, UpBlock2D,
  attention_head_dim=16)`: the same layout (4 heads of 16 at width 64), the same count.
  Differences: diffusers normalises with 32 groups everywhere, genframe with 8 at width
  32 (at least 4 channels a group); diffusers' GroupNorm eps is 1e-5, genframe's 1e-6.

What is timed, alternating which side goes first each round:

- training images/s: forward + MSE noise-prediction loss + backward + AdamW step (lr
  1e-3, no weight decay, genframe's `configure_optimizers()`), on one fixed batch of 64
  images; t ~ U{0..999} and the noise drawn each step, cosine schedule (diffusers:
  ``beta_schedule="squaredcos_cap_v2"``). genframe runs `Diffusion.diffusion_loss` on its
  online U-Net (no EMA update: that is the training loop's, see bench/family_overhead.py).
- DDIM-k images/s: genframe's own path, ``model.generate(64, seed=0,
  sampler=DDIMSampler(steps=k))`` (`genframe.samplers.ddim`, eta 0, trailing spacing,
  x0 clipped, from the EMA copy); diffusers' `DDIMScheduler` loop (``set_timesteps(k)``,
  ``unet(x, t).sample``, ``scheduler.step(...)``, the same spacing and clipping) under
  ``torch.no_grad()``.

`--profile` prints, instead, torch.profiler's operator tables of one DDIM-10 call and
one training step of each side, and cProfile's top Python functions of genframe's call.

Threads: torch's default (one per core) unless --threads. The cores are shared: each
round waits (up to 2 min) for other processes to go quiet, and the table's last column
says how busy they kept the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _suite  # noqa: E402

BATCH, SIZE = 64, 16
TARGETS = {"train": 1.5, 50: 1.5}  # the issue's: genframe / diffusers
GENFRAME = ["experiment=digits_diffusion", f"data.image_size={SIZE}", "model.num_classes=0",
            "model.block_out_channels=[32,64,64]", "model.blocks_per_level=2",
            "model.attention_resolutions=[4]", "model.num_heads=4"]


def genframe_model():
    from genframe.config import compose
    from genframe.tasks.build import build_model

    torch.manual_seed(0)
    return build_model(compose("train", GENFRAME).model)


def diffusers_model():
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
        layers_per_block=2, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), attention_head_dim=16,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              clip_sample=True, timestep_spacing="trailing")
    return unet, scheduler


def count(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class Sides:
    """Both sides, each with a `train_step()` and a `sample(n, steps)`."""

    def __init__(self) -> None:
        self.gf = genframe_model()
        self.gf_opt = self.gf.configure_optimizers()  # AdamW(lr 1e-3, weight decay 0)
        self.unet, self.scheduler = diffusers_model()
        self.hf_opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-3, weight_decay=0.0)
        gen = torch.Generator().manual_seed(0)
        self.x0 = torch.rand((BATCH, 1, SIZE, SIZE), generator=gen) * 2 - 1  # (B, 1, 16, 16)

    def genframe_train_step(self) -> float:
        self.gf.train()
        loss = self.gf.diffusion_loss(self.gf.unet, self.x0, None)
        loss.backward()
        self.gf_opt.step()
        self.gf_opt.zero_grad(set_to_none=True)
        return float(loss)

    def diffusers_train_step(self) -> float:
        self.unet.train()
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (BATCH,))
        noise = torch.randn_like(self.x0)
        x_t = self.scheduler.add_noise(self.x0, noise, t)
        loss = F.mse_loss(self.unet(x_t, t).sample, noise)
        loss.backward()
        self.hf_opt.step()
        self.hf_opt.zero_grad(set_to_none=True)
        return float(loss)

    def genframe_sample(self, n: int, steps: int) -> torch.Tensor:
        from genframe.samplers.ddim import DDIMSampler

        return self.gf.generate(n, seed=0, sampler=DDIMSampler(steps=steps, eta=0.0)).images

    @torch.no_grad()
    def diffusers_sample(self, n: int, steps: int) -> torch.Tensor:
        self.unet.eval()
        self.scheduler.set_timesteps(steps)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((n, 1, SIZE, SIZE), generator=gen)
        for t in self.scheduler.timesteps:
            eps = self.unet(x, t).sample
            x = self.scheduler.step(eps, t, x, eta=0.0).prev_sample
        return ((x + 1) / 2).clamp(0, 1)


def timed(fn, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return time.perf_counter() - start


def measure(args, sides: Sides) -> list[_suite.Comparison]:
    train = _suite.Comparison(
        f"diffusion {count(sides.gf.unet) / 1e6:.2f}M, {BATCH}x1x{SIZE}x{SIZE}: train images/s",
        "images/s", [], [], "diffusers", TARGETS["train"],
        note=f"parameters: genframe {count(sides.gf.unet):,}, diffusers {count(sides.unet):,}")
    sampling = {k: _suite.Comparison(f"diffusion: DDIM-{k} images/s ({args.samples} per call)",
                                     "images/s", [], [], "diffusers", TARGETS.get(k))
                for k in args.ddim}
    # Warm-up of every path and shape (first calls allocate, pick kernels).
    for _ in range(args.warmup):
        sides.genframe_train_step()
        sides.diffusers_train_step()
    sides.genframe_sample(args.samples, 2)
    sides.diffusers_sample(args.samples, 2)
    for r in range(args.rounds):
        order = ["genframe", "diffusers"] if r % 2 == 0 else ["diffusers", "genframe"]

        def one_round():
            got = {}
            for side in order:
                step = sides.genframe_train_step if side == "genframe" else sides.diffusers_train_step
                step()  # one untimed step right before: the other side's memory is cold
                got[("train", side)] = args.train_steps * BATCH / timed(step, args.train_steps)
            for k in args.ddim:
                for side in order:
                    fn = sides.genframe_sample if side == "genframe" else sides.diffusers_sample
                    got[(k, side)] = args.samples / timed(lambda: fn(args.samples, k), 1)
            return got

        got, foreign = _suite.quiet_round(one_round, max_wait=args.max_wait, retries=args.retries)
        for key, c in (("train", train), *sampling.items()):
            c.genframe.append(got[(key, "genframe")])
            c.peer.append(got[(key, "diffusers")])
            c.foreign_load.append(foreign)
        print(f"round {r + 1}: train genframe {train.genframe[-1]:.0f} / diffusers "
              f"{train.peer[-1]:.0f} images/s; " + "; ".join(
                  f"DDIM-{k} {c.genframe[-1]:.1f} / {c.peer[-1]:.1f}" for k, c in sampling.items())
              + f" (others' load {foreign:.2f})", flush=True)
    return [train, *sampling.values()]


def profile(args, sides: Sides) -> None:
    steps = min(args.ddim)
    sides.genframe_sample(args.samples, 2)
    sides.diffusers_sample(args.samples, 2)
    sides.genframe_train_step()
    sides.diffusers_train_step()
    n = args.samples
    for label, fn in [
        (f"genframe DDIM-{steps}, {n} images", lambda: sides.genframe_sample(n, steps)),
        (f"diffusers DDIM-{steps}, {n} images", lambda: sides.diffusers_sample(n, steps)),
        ("genframe train step", sides.genframe_train_step),
        ("diffusers train step", sides.diffusers_train_step),
    ]:
        seconds = timed(fn, 1)
        print(f"\n== torch.profiler: {label} ({seconds * 1000:.0f} ms unprofiled)")
        print(_suite.torch_profile(fn, rows=args.profile_rows))
    print(f"\n== cProfile: genframe DDIM-{steps} (Python time by function)")
    print(_suite.python_profile(lambda: sides.genframe_sample(n, steps), rows=args.profile_rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps a round")
    parser.add_argument("--samples", type=int, default=64, help="images per sampling call")
    parser.add_argument("--ddim", default="10,50", help="DDIM step counts, comma-separated")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="seconds a round waits for other processes to go quiet")
    parser.add_argument("--retries", type=int, default=2,
                        help="times a round is repeated when other processes loaded the machine")
    parser.add_argument("--smoke", action="store_true", help="1 round, 2 steps, DDIM-10 on 8 images")
    parser.add_argument("--profile", action="store_true", help="print profiles instead")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.ddim = [int(k) for k in args.ddim.split(",")]
    if args.smoke:
        args.rounds, args.warmup, args.train_steps, args.samples, args.ddim = 1, 1, 2, 8, [10]
        args.max_wait, args.retries = min(args.max_wait, 5.0), 0
    _suite.quiet_logs()
    _suite.set_threads(args.threads)
    print(_suite.same_allocator())
    sides = Sides()
    import diffusers

    print(f"genframe U-Net {count(sides.gf.unet):,} parameters, diffusers UNet2DModel "
          f"{count(sides.unet):,} (diffusers {diffusers.__version__}); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; batch {BATCH}x1x{SIZE}x{SIZE}")
    if args.profile:
        profile(args, sides)
        return
    comparisons = measure(args, sides)
    _suite.report(comparisons, args.json, "peer_diffusion")


if __name__ == "__main__":
    main()
