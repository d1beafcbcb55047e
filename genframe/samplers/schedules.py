"""Noise schedules for diffusion models: the forward (noising) process and its algebra.

A schedule fixes variances beta_t for t = 0 .. T-1 and everything derived from them:

    alpha_t     = 1 - beta_t
    alpha_bar_t = prod_{s <= t} alpha_s
    q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)

Timestep convention (the DDPM / improved-DDPM code's): t is an integer in [0, T) and x_t is
the data after t + 1 noising steps. So t = 0 is already ONE step of noise, alpha_bar_0 =
1 - beta_0 < 1, and not the clean data; for the linear schedule with T = 1000,
sqrt(alpha_bar_0) = 0.99995, so q(x_0 | x_data) is the identity up to 5e-5. The clean data
sits "before" t = 0; samplers treat it as alpha_bar_{-1} = 1 at their last step.

Everything is computed in float64 (alpha_bar is a long product, and 1 - alpha_bar near
t = 0 loses digits in float32) and stored as float64 CPU tensors; the per-timestep
coefficients are gathered, then cast to the dtype and device of the tensor they scale.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from genframe.errors import UserError, did_you_mean, valid_list

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
Prediction = Literal["eps", "v"]

# Cosine schedule: the offset s keeps beta_0 from being vanishingly small, and betas are
# clipped below 1 so the last steps do not blow up (Nichol & Dhariwal 2021, sec. 3.2).
COSINE_S = 0.008
MAX_BETA = 0.999


def linear_betas(num_steps: int) -> torch.Tensor:
    """DDPM's linear betas (1e-4 .. 0.02 at T = 1000, Ho et al. 2020), rescaled for T.

    As in improved-DDPM's ``get_named_beta_schedule``, both ends are multiplied by
    1000 / T so that any T gives about the same total noise as T = 1000. Below T = 20 the
    scaled end would pass 1; betas are clipped at 0.999 there.
    """
    scale = 1000.0 / num_steps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    return betas.clamp(max=MAX_BETA)


def cosine_betas(num_steps: int, s: float = COSINE_S) -> torch.Tensor:
    """The cosine schedule, alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).

    Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672 (eq. 17): beta_t =
    1 - alpha_bar(t+1)/alpha_bar(t), clipped at 0.999. It destroys information more slowly
    than the linear schedule, which matters for small images (8x8 digits, 32x32).
    """
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=MAX_BETA)


class NoiseSchedule:
    """A discrete noise schedule and the conversions between what a network predicts.

    Build one with :func:`make_schedule`. Tensors (all float64, CPU, shape (T,)):
    ``betas``, ``alphas``, ``alphas_cumprod``, ``alphas_cumprod_prev`` (with
    alpha_bar_{-1} = 1), ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``,
    ``posterior_variance`` (beta tilde_t, the variance of q(x_{t-1} | x_t, x_0)),
    ``posterior_mean_coef1`` / ``coef2``.

    Methods take integer timesteps ``t`` of shape (B,) (any device) and tensors shaped
    (B, ...); the per-timestep coefficients broadcast over the trailing dimensions.

    Args:
        betas: the variances beta_t, float64, shape (T,), each in (0, 1).
        kind: the schedule's name, for `describe`.
    """

    def __init__(self, betas: torch.Tensor, kind: str = "custom") -> None:
        betas = betas.to(torch.float64)
        if betas.dim() != 1 or len(betas) < 1:
            raise ValueError("betas must be a non-empty 1-D tensor")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("every beta must lie in (0, 1)")
        self.kind = kind
        self.num_steps = len(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        one = torch.ones(1, dtype=torch.float64)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t): Ho et al. 2020,
        # eq. 7. beta_tilde_0 = 0: the last reverse step adds no noise.
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
        self.posterior_mean_coef1 = betas * ab_prev.sqrt() / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * self.alphas.sqrt() / (1.0 - ab)

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_steps={self.num_steps})"

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "num_steps": self.num_steps}

    # -- indexing ---------------------------------------------------------------------

    def _check_t(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be integers, got {t.dtype}")
        return t

    def gather(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` shaped (B, 1, ..., 1) to broadcast against `like` (B, ...).

        The lookup runs on the CPU in float64 and only the result moves to `like`'s
        device and dtype (some devices have no float64).
        """
        t = self._check_t(t).reshape(-1)
        out = values[t.cpu().long()]  # (B,) float64
        out = out.to(device=like.device, dtype=like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    # -- the forward process ----------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        return (
            self.gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0.

        Salimans & Ho 2022, https://arxiv.org/abs/2202.00512 (sec. 4): v stays well scaled
        at both ends of the schedule, where predicting eps (near t = T) or x0 (near
        t = 0) is ill-conditioned.
        """
        return (
            self.gather(self.sqrt_alphas_cumprod, t, x0) * noise
            - self.gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str
    ) -> torch.Tensor:
        """What a network trained with `prediction` ("eps" or "v") should output."""
        check_prediction(prediction)
        return noise if prediction == "eps" else self.v_target(x0, noise, t)

    # -- from a network's output to x0 and eps ----------------------------------------

    def predict_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, model_out: torch.Tensor, prediction: str
    ) -> torch.Tensor:
        """The model's estimate of x_0 from its raw output at (x_t, t).

        eps: x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab);  v: x0 = sqrt(ab) x_t - sqrt(1 - ab) v.
        """
        check_prediction(prediction)
        a = self.gather(self.sqrt_alphas_cumprod, t, x_t)
        s = self.gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if prediction == "eps":
            return (x_t - s * model_out) / a
        return a * x_t - s * model_out

    def predict_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, model_out: torch.Tensor, prediction: str
    ) -> torch.Tensor:
        """The model's estimate of the noise in x_t: eps itself, or sqrt(1-ab) x_t + sqrt(ab) v."""
        check_prediction(prediction)
        if prediction == "eps":
            return model_out
        a = self.gather(self.sqrt_alphas_cumprod, t, x_t)
        s = self.gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return s * x_t + a * model_out

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes x0 to x_t: (x_t - sqrt(ab) x0) / sqrt(1 - ab).

        Samplers use it after clipping x0, so the eps they step with agrees with the
        clipped x0 (as DDIM and diffusers do).
        """
        a = self.gather(self.sqrt_alphas_cumprod, t, x_t)
        s = self.gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return (x_t - a * x0) / s

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7)."""
        return (
            self.gather(self.posterior_mean_coef1, t, x_t) * x0
            + self.gather(self.posterior_mean_coef2, t, x_t) * x_t
        )


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise UserError(
            f"prediction must be one of {valid_list(PREDICTIONS)}, got {prediction!r}."
            f"{did_you_mean(str(prediction), PREDICTIONS)}"
        )


def make_schedule(kind: str, num_steps: int) -> NoiseSchedule:
    """Build a named schedule.

    Args:
        kind: ``"linear"`` (DDPM, betas 1e-4 .. 0.02 scaled by 1000 / num_steps) or
            ``"cosine"`` (Nichol & Dhariwal 2021, s = 0.008, betas clipped at 0.999).
        num_steps: T, the number of training timesteps (t runs over 0 .. T-1).
    """
    if kind not in SCHEDULES:
        raise UserError(
            f"schedule must be one of {valid_list(SCHEDULES)}, got {kind!r}."
            f"{did_you_mean(str(kind), SCHEDULES)}"
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise UserError(f"timesteps must be an integer of at least 2, got {num_steps!r}")
    betas = linear_betas(num_steps) if kind == "linear" else cosine_betas(num_steps)
    return NoiseSchedule(betas, kind)
