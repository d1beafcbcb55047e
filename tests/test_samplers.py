"""Noise schedules and samplers: known properties, checked with oracle denoisers.

The oracles are the exact minimum-MSE denoisers of simple data distributions, so the
samplers can be tested for correctness without training anything:

- a single point x*: the optimal eps prediction is (x_t - sqrt(ab) x*) / sqrt(1 - ab), and
  any correct sampler must return x* exactly;
- a Gaussian N(mu, s^2) per pixel: E[x0 | x_t] has a closed form, and samples must come
  out with mean mu and standard deviation s.
"""

from __future__ import annotations

import math

import pytest
import torch

from genframe.errors import UserError
from genframe.samplers.base import Sampler
from genframe.samplers.ddim import DDIMSampler
from genframe.samplers.ddpm import DDPMSampler
from genframe.samplers.schedules import make_schedule

KINDS = ("linear", "cosine")


@pytest.fixture(autouse=True)
def one_thread():
    # The samplers run hundreds of tiny ops; on two shared cores OpenMP spin-waiting
    # makes each one cost a scheduler tick. One thread keeps the file at a few seconds.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def point_oracle(schedule, x_star: torch.Tensor, prediction: str = "eps"):
    """The exact denoiser for data that is the single point x* (C, H, W)."""

    def denoise(x_t, t):
        a = schedule.gather(schedule.sqrt_alphas_cumprod, t, x_t)
        s = schedule.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
        x0 = x_star.expand_as(x_t)
        eps = (x_t - a * x0) / s
        return eps if prediction == "eps" else a * eps - s * x0

    return denoise


def gaussian_oracle(schedule, mu: float, std: float):
    """The exact eps predictor for data x0 ~ N(mu, std^2), independently per pixel.

    x_t = a x0 + s eps is Gaussian with mean a mu and variance a^2 std^2 + s^2, and
    E[eps | x_t] = s (x_t - a mu) / (a^2 std^2 + s^2).
    """

    def denoise(x_t, t):
        a = schedule.gather(schedule.sqrt_alphas_cumprod, t, x_t)
        s = schedule.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
        return s * (x_t - a * mu) / (a**2 * std**2 + s**2)

    return denoise


# -- schedules ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("steps", [10, 50, 1000])
def test_alphas_cumprod_monotone_decreasing(kind, steps):
    s = make_schedule(kind, steps)
    ab = s.alphas_cumprod
    assert ab.shape == (steps,)
    assert bool((ab[1:] < ab[:-1]).all()), "alpha_bar must strictly decrease"
    assert bool((s.betas > 0).all() and (s.betas < 1).all())
    assert 0 < float(ab[-1]) < 0.01, "the last step must be close to pure noise"


def test_linear_schedule_matches_ddpm():
    s = make_schedule("linear", 1000)
    assert float(s.betas[0]) == pytest.approx(1e-4)
    assert float(s.betas[-1]) == pytest.approx(0.02)
    # improved-DDPM's rescaling for fewer steps: both ends scale with 1000 / T.
    s100 = make_schedule("linear", 100)
    assert float(s100.betas[0]) == pytest.approx(1e-3)
    assert float(s100.betas[-1]) == pytest.approx(0.2)


def test_cosine_schedule_follows_its_formula():
    T = 1000
    s = make_schedule("cosine", T)

    def f(t):
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    for t in (0, 10, 500, 900):  # alpha_bar_t = f(t + 1) / f(0) where no beta is clipped
        assert float(s.alphas_cumprod[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert float(s.betas.max()) <= 0.999


def test_noising_at_t0_is_nearly_the_identity():
    """Convention: t = 0 is one step of noise, and for DDPM's schedule that step is tiny."""
    s = make_schedule("linear", 1000)
    assert float(s.sqrt_alphas_cumprod[0]) == pytest.approx(1.0, abs=1e-3)
    x0 = torch.rand(4, 1, 8, 8, generator=gen()) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen(1))
    x_t = s.q_sample(x0, torch.zeros(4, dtype=torch.long), noise)
    assert torch.allclose(x_t, x0, atol=0.05)  # sqrt(1 - ab_0) = 0.01, times |noise| < 5
    assert float(make_schedule("cosine", 1000).sqrt_alphas_cumprod[0]) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_prediction_conversions_invert_each_other(kind, prediction):
    s = make_schedule(kind, 1000)
    g = gen(3)
    x0 = torch.rand(6, 2, 5, 5, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    x_t = s.q_sample(x0, t, noise)
    out = s.target(x0, noise, t, prediction)  # what a perfect network outputs
    # x0 from eps divides by sqrt(ab), which is ~0 at the last cosine step (the reason
    # v-prediction exists): check it where it is well conditioned.
    ok = s.sqrt_alphas_cumprod[t] > 0.05 if prediction == "eps" else torch.ones(6, dtype=torch.bool)
    assert torch.allclose(s.predict_x0(x_t, t, out, prediction)[ok], x0[ok], atol=1e-3)
    assert torch.allclose(s.predict_eps(x_t, t, out, prediction), noise, atol=1e-3)
    # eps_from_x0 is the other direction of the same identity.
    x0_hat = s.predict_x0(x_t, t, out, prediction)
    assert torch.allclose(s.eps_from_x0(x_t, t, x0_hat)[ok], noise[ok], atol=1e-3)


def test_v_target_definition():
    s = make_schedule("cosine", 100)
    x0, noise, t = torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([50])
    expected = -float(s.sqrt_one_minus_alphas_cumprod[50])  # v = a*eps - s*x0
    assert float(s.v_target(x0, noise, t)) == pytest.approx(expected, rel=1e-6)


def test_schedule_rejects_bad_input():
    with pytest.raises(UserError, match="schedule must be one of"):
        make_schedule("cosin", 10)
    with pytest.raises(UserError, match="timesteps"):
        make_schedule("linear", 1)
    with pytest.raises(TypeError, match="integers"):
        make_schedule("linear", 10).gather(torch.ones(10), torch.tensor([0.5]), torch.ones(1))


# -- samplers ----------------------------------------------------------------------


def test_ddim_timesteps_are_trailing_and_even():
    s = make_schedule("linear", 1000)
    assert DDIMSampler(steps=50).timesteps(s) == list(range(999, -1, -20))
    assert DDIMSampler(steps=1000).timesteps(s) == DDPMSampler().timesteps(s)
    ts = DDIMSampler(steps=7).timesteps(make_schedule("cosine", 10))
    assert ts[0] == 9 and len(set(ts)) == 7 and ts == sorted(ts, reverse=True)
    assert DDIMSampler(steps=25).num_model_calls(s) == 25
    assert DDPMSampler().num_model_calls(s) == 1000


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("kind", KINDS)
def test_ddim_eta0_with_a_point_oracle_returns_the_point(prediction, kind):
    s = make_schedule(kind, 1000)
    x_star = torch.rand(1, 6, 5, generator=gen(7)) * 1.6 - 0.8  # (C, H, W)
    out = DDIMSampler(steps=20, eta=0.0).sample(
        point_oracle(s, x_star, prediction), s, (3, 1, 6, 5),
        prediction=prediction, generator=gen(), device="cpu", clip_x0=False,
    )
    assert torch.allclose(out, x_star.expand(3, -1, -1, -1), atol=1e-4)


def test_ddpm_with_a_point_oracle_returns_the_point():
    s = make_schedule("linear", 200)
    x_star = torch.linspace(-0.9, 0.9, 16).view(1, 4, 4)
    out = DDPMSampler().sample(point_oracle(s, x_star), s, (2, 1, 4, 4), prediction="eps",
                               generator=gen(), device="cpu")
    assert torch.allclose(out, x_star.expand(2, -1, -1, -1), atol=1e-4)


@pytest.mark.parametrize("sampler", [DDPMSampler(), DDIMSampler(steps=20)], ids=repr)
def test_without_clip_x0_data_beyond_one_is_returned_as_it_is(sampler):
    """A latent diffusion model's scaled latents reach |x| > 1: no clamp without clip_x0."""
    s = make_schedule("linear", 200)
    x_star = torch.linspace(-3.0, 3.0, 16).view(1, 4, 4)
    free = sampler.sample(point_oracle(s, x_star), s, (2, 1, 4, 4), prediction="eps",
                          generator=gen(), device="cpu", clip_x0=False)
    assert torch.allclose(free, x_star.expand(2, -1, -1, -1), atol=1e-3)
    clipped = sampler.sample(point_oracle(s, x_star), s, (2, 1, 4, 4), prediction="eps",
                             generator=gen(), device="cpu", clip_x0=True)
    assert float(clipped.abs().max()) <= 1.0


@pytest.mark.parametrize("sampler", [DDPMSampler(), DDIMSampler(steps=50, eta=0.0),
                                     DDIMSampler(steps=50, eta=1.0)], ids=repr)
def test_samplers_reproduce_a_gaussian_data_distribution(sampler):
    """With the exact denoiser of N(mu, std^2), samples have that mean and spread."""
    s = make_schedule("cosine", 500)
    mu, std = 0.2, 0.3
    x = sampler.sample(gaussian_oracle(s, mu, std), s, (4000, 1, 1, 1), prediction="eps",
                       generator=gen(), device="cpu", clip_x0=False)
    assert float(x.mean()) == pytest.approx(mu, abs=0.03)
    assert float(x.std()) == pytest.approx(std, abs=0.03)


def test_ddim_eta0_is_deterministic_given_the_seed():
    s = make_schedule("cosine", 100)
    denoise = gaussian_oracle(s, 0.0, 0.5)
    sampler = DDIMSampler(steps=10, eta=0.0)

    def run(seed):
        return sampler.sample(denoise, s, (4, 1, 3, 3), prediction="eps", generator=gen(seed),
                              device="cpu")

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # eta = 0 draws only x_T: the generator is left exactly one draw further on.
    g = gen(1)
    sampler.sample(denoise, s, (4, 1, 3, 3), prediction="eps", generator=g, device="cpu")
    g2 = gen(1)
    torch.randn((4, 1, 3, 3), generator=g2)
    assert torch.equal(g.get_state(), g2.get_state())


def test_ddim_with_every_step_and_eta1_is_ddpm():
    """DDIM (eta = 1, all T steps) is ancestral DDPM with the posterior variance, draw for draw."""
    s = make_schedule("linear", 100)
    denoise = gaussian_oracle(s, 0.1, 0.4)
    shape = (8, 1, 4, 4)
    ddpm = DDPMSampler().sample(denoise, s, shape, prediction="eps", generator=gen(5), device="cpu")
    ddim = DDIMSampler(steps=100, eta=1.0).sample(denoise, s, shape, prediction="eps",
                                                  generator=gen(5), device="cpu")
    assert torch.allclose(ddpm, ddim, atol=1e-4)


def test_samplers_return_the_data_range_and_call_the_model_as_declared():
    s = make_schedule("linear", 30)
    calls = []

    def wild(x_t, t):  # a bad denoiser: the result must still lie in [-1, 1]
        calls.append(int(t[0]))
        return torch.full_like(x_t, 50.0)

    for sampler in (DDPMSampler(), DDIMSampler(steps=7, eta=0.5)):
        calls.clear()
        x = sampler.sample(wild, s, (2, 1, 2, 2), prediction="eps", generator=gen(), device="cpu")
        assert x.shape == (2, 1, 2, 2) and float(x.abs().max()) <= 1.0
        assert calls == sampler.timesteps(s) and len(calls) == sampler.num_model_calls(s)


def test_sampler_describe_and_registry():
    from genframe.plugins import get_registry

    assert DDIMSampler(steps=10, eta=0.5).describe() == {"name": "ddim", "steps": 10, "eta": 0.5}
    assert DDPMSampler().describe() == {"name": "ddpm"}
    registry = get_registry()
    assert registry.sampler("ddim").load() is DDIMSampler
    assert registry.sampler("ddpm").load() is DDPMSampler
    assert issubclass(DDIMSampler, Sampler)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "sampler.steps"),
        ({"steps": 2.5}, "sampler.steps"),
        ({"eta": -0.1}, r"sampler.eta must be in \[0, 1\]"),
        ({"eta": 1.5}, r"sampler.eta must be in \[0, 1\]"),
    ],
)
def test_ddim_rejects_bad_arguments(kwargs, message):
    with pytest.raises(UserError, match=message):
        DDIMSampler(**kwargs)


def test_ddim_steps_above_the_training_steps_is_a_user_error():
    s = make_schedule("linear", 100)
    with pytest.raises(UserError, match="sampler.steps must be between 1 and 100"):
        DDIMSampler(steps=101).sample(lambda x, t: x, s, (1, 1, 2, 2), prediction="eps",
                                      generator=gen(), device="cpu")


def test_unknown_prediction_is_a_user_error():
    s = make_schedule("linear", 10)
    with pytest.raises(UserError, match="prediction"):
        DDIMSampler(steps=2).sample(lambda x, t: x, s, (1, 1, 2, 2), prediction="x0",
                                    generator=gen(), device="cpu")
