"""Ancestral DDPM sampling over every training step (Ho et al. 2020).

https://arxiv.org/abs/2006.11239, Algorithm 2: from x_T ~ N(0, I), for t = T-1 .. 0 draw

    x_{t-1} ~ q(x_{t-1} | x_t, x_0 = x0_hat(x_t, t)) = N(mu_tilde, beta_tilde_t I)

with x0_hat the model's (clipped) estimate of the clean data. The variance is the
posterior's beta_tilde_t (the "small" choice of the paper's two); at t = 0 it is zero, so
the last step returns x0_hat itself, with no noise.
"""

from __future__ import annotations

from typing import Any

import torch

from genframe.samplers.base import Denoiser, Sampler
from genframe.samplers.schedules import NoiseSchedule, check_prediction


class DDPMSampler(Sampler):
    """Ancestral sampling over all T training steps: the slow reference sampler.

    Takes no arguments: the number of steps is the model's number of training timesteps.
    """

    name = "ddpm"

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        return list(range(schedule.num_steps - 1, -1, -1))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

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
        # x_T, or the given x_t at ts[start] (image-to-image): (B, C, H, W)
        x = self.starting_point(ts, shape, start=start, x_start=x_start,
                                generator=generator, device=device)
        batch = shape[0]
        for t in ts[start:]:
            t_batch = torch.full((batch,), t, dtype=torch.long, device=device)
            out = denoise(x, t_batch).float()
            x0 = schedule.predict_x0(x, t_batch, out, prediction)
            if clip_x0:
                x0 = x0.clamp(-1.0, 1.0)
            mean = schedule.posterior_mean(x0, x, t_batch)  # mu_tilde(x_t, x0_hat)
            if t > 0:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                std = schedule.gather(schedule.posterior_variance, t_batch, x).sqrt()
                x = mean + std * noise
            else:
                x = mean  # beta_tilde_0 = 0 and mean = x0_hat: the sample
        # Data in [-1, 1] ends there; a latent (clip_x0 off) is not bounded by 1.
        return x.clamp(-1.0, 1.0) if clip_x0 else x
