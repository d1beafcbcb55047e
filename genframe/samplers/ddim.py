"""DDIM sampling with any number of steps and stochasticity eta in [0, 1].

Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models",
https://arxiv.org/abs/2010.02502, eq. 12. On a subsequence of timesteps
tau_S > ... > tau_1, with ab = alpha_bar:

    x0_hat = the model's (clipped) estimate of x_0 at (x_t, t)
    eps_hat = the noise consistent with x0_hat and x_t
    sigma   = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
    x_prev  = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_hat + sigma z

eta = 0 is the deterministic DDIM (the only randomness is x_T); eta = 1 with every
timestep is exactly ancestral DDPM with the posterior variance (sigma^2 = beta_tilde_t).
After the last step ab_prev = 1 (the clean data), so the result is x0_hat.

Timestep spacing is "trailing" (Lin et al. 2024, https://arxiv.org/abs/2305.08891,
Table 2): tau_i = floor(T i / S) - 1 for i = S .. 1, so the first step always starts from
the noisiest training timestep T-1 (pure noise, where x_T is drawn), and S = T visits every
step. The "leading" spacing of the DDIM paper (0, T/S, 2T/S, ...) starts below T-1 and so
begins from a noise level the model never saw paired with x_T ~ N(0, I).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from genframe.errors import UserError
from genframe.samplers.base import Denoiser, Sampler
from genframe.samplers.schedules import NoiseSchedule, check_prediction


class DDIMSampler(Sampler):
    """DDIM: S evenly spaced ("trailing") steps; eta = 0 is deterministic given the seed.

    Args:
        steps: number of denoising steps (model calls), 1 .. the model's training
            timesteps.
        eta: stochasticity, 0 (deterministic DDIM) .. 1 (DDPM-like noise at every step).
    """

    name = "ddim"

    def __init__(self, steps: int = 50, eta: float = 0.0) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UserError(f"sampler.steps must be a positive integer, got {steps!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise UserError(f"sampler.eta must be in [0, 1], got {eta!r}")
        self.steps = steps
        self.eta = float(eta)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "eta": self.eta}

    def _check_steps(self, schedule: NoiseSchedule) -> None:
        # The upper bound is the model's number of training timesteps, known only here.
        if self.steps > schedule.num_steps:
            raise UserError(
                f"sampler.steps must be between 1 and {schedule.num_steps} (the model's "
                f"training timesteps), got {self.steps}"
            )

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        self._check_steps(schedule)
        T, S = schedule.num_steps, self.steps
        # Integer arithmetic: distinct and strictly decreasing whenever S <= T.
        return [T * i // S - 1 for i in range(S, 0, -1)]

    @torch.no_grad()
    def sample(
        self,
        denoise: Denoiser,
        schedule: NoiseSchedule,
        shape: tuple[int, ...],
        *,
        prediction: str,
        generator: torch.Generator,
        device: torch.device | str,
        clip_x0: bool = True,
        start: int = 0,
        x_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_prediction(prediction)
        ts = self.timesteps(schedule)
        ab = schedule.alphas_cumprod  # float64, (T,)
        # x_T, or the given x_t at ts[start] (image-to-image): (B, C, H, W)
        x = self.starting_point(ts, shape, start=start, x_start=x_start,
                                generator=generator, device=device)
        ts = ts[start:]
        batch = shape[0]
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            ab_t = float(ab[t])
            ab_prev = float(ab[t_prev]) if t_prev >= 0 else 1.0  # alpha_bar_{-1} = 1

            t_batch = torch.full((batch,), t, dtype=torch.long, device=device)
            out = denoise(x, t_batch).float()
            x0 = schedule.predict_x0(x, t_batch, out, prediction)
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
                # Step with the noise that agrees with the clipped x0, else the update
                # would undo part of the clipping.
                eps = schedule.eps_from_x0(x, t_batch, x0)
            else:
                eps = schedule.predict_eps(x, t_batch, out, prediction)

            # Scalars in float64: the same noise level for the whole batch.
            sigma = self.eta * math.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
            dir_coef = math.sqrt(max(1 - ab_prev - sigma**2, 0.0))
            x = math.sqrt(ab_prev) * x0 + dir_coef * eps
            if sigma > 0:  # never at the last step, nor for eta = 0: no draw, no RNG use
                x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # Data in [-1, 1] ends there; a latent (clip_x0 off) is not bounded by 1.
        return x.clamp(-1.0, 1.0) if clip_x0 else x
