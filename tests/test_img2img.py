"""Image-to-image (SDEdit, Meng et al. 2021): samplers that start from x_t at one of their
steps, and ``Diffusion.generate(init_image=..., strength=...)`` on the tiny preset."""

from __future__ import annotations

import pytest
import torch

from genframe.errors import UserError
from genframe.samplers.ddim import DDIMSampler
from genframe.samplers.ddpm import DDPMSampler
from genframe.samplers.schedules import make_schedule
from genframe.testing import build_tiny

STRENGTHS = (0.2, 0.5, 0.8, 1.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_tiny("diffusion")  # 1x8x8, 10 classes, T = 50


def digit_images(n: int) -> torch.Tensor:
    """The first n of scikit-learn's bundled 8x8 digits, (n, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().images[:n], dtype=torch.float32).unsqueeze(1) / 16.0


@pytest.fixture
def calls(model):
    """A list that grows by one per call of the sampling network (one per sampler step)."""
    seen: list[int] = []
    handle = model.sampling_net.register_forward_hook(lambda mod, args, out: seen.append(1))
    yield seen
    handle.remove()


# -- the sampler interface ----------------------------------------------------------


@pytest.mark.parametrize("sampler", [DDIMSampler(steps=10), DDPMSampler()], ids=["ddim", "ddpm"])
def test_start_for_strength_runs_round_strength_times_steps(sampler):
    s = make_schedule("cosine", 50)
    steps = len(sampler.timesteps(s))
    for strength in (0.2, 0.5, 0.8, 1.0, 0.35):
        start = sampler.start_for_strength(s, strength)
        assert steps - start == int(strength * steps + 0.5)
        assert sampler.num_model_calls(s, start) == steps - start
    assert sampler.start_for_strength(s, 1e-6) == steps - 1  # at least one step runs
    for bad in (0, -0.1, 1.01, True, "0.5"):
        with pytest.raises(UserError, match="strength"):
            sampler.start_for_strength(s, bad)


@pytest.mark.parametrize("sampler", [DDIMSampler(steps=10), DDPMSampler()], ids=["ddim", "ddpm"])
def test_sampling_from_x_start_visits_the_remaining_steps(sampler):
    s = make_schedule("linear", 50)
    ts = sampler.timesteps(s)
    x0 = torch.full((2, 1, 2, 2), 0.5)
    start = sampler.start_for_strength(s, 0.4)
    x_t = sampler.noise_to_start(x0, s, start, generator=torch.Generator().manual_seed(0))
    seen: list[int] = []

    def oracle(x, t):  # the exact denoiser for data that is the point x0
        seen.append(int(t[0]))
        return s.eps_from_x0(x, t, x0)

    out = sampler.sample(oracle, s, tuple(x0.shape), prediction="eps",
                         generator=torch.Generator().manual_seed(1), device="cpu",
                         start=start, x_start=x_t)
    assert seen == ts[start:]
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="x_start"):  # a later start needs its x_t
        sampler.sample(oracle, s, tuple(x0.shape), prediction="eps",
                       generator=torch.Generator(), device="cpu", start=start)


def test_noise_to_start_at_the_first_step_is_the_plain_starting_noise():
    s = make_schedule("cosine", 50)
    sampler = DDIMSampler(steps=10)
    x0 = torch.rand(3, 1, 4, 4)
    plain = sampler.initial_noise((3, 1, 4, 4), torch.Generator().manual_seed(7), "cpu")
    same = sampler.noise_to_start(x0, s, 0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(same, plain)
    # later: q(x_t | x0) at t = timesteps[start], with that same draw as its noise
    start = 6
    t = torch.full((3,), sampler.timesteps(s)[start])
    later = sampler.noise_to_start(x0, s, start, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(later, s.q_sample(x0, t, plain))


# -- Diffusion.generate(init_image=..., strength=...) ---------------------------------


@pytest.mark.parametrize("sampler", [DDIMSampler(steps=5), DDPMSampler()], ids=["ddim", "ddpm"])
def test_strength_one_is_plain_sampling(model, sampler):
    init = digit_images(4)
    plain = model.generate(4, seed=3, sampler=sampler)
    img2img = model.generate(4, seed=3, sampler=sampler, init_image=init, strength=1.0)
    assert torch.equal(img2img.images, plain.images)
    other = model.generate(4, seed=3, sampler=sampler, init_image=init, strength=0.6)
    assert not torch.allclose(other.images, plain.images)


@pytest.mark.parametrize("sampler", [DDIMSampler(steps=10), DDPMSampler()], ids=["ddim", "ddpm"])
def test_steps_run_are_round_strength_times_steps(model, sampler, calls):
    steps = len(sampler.timesteps(model.schedule))
    init = digit_images(1)[0]  # one (C, H, W) image for every sample
    for strength in STRENGTHS:
        calls.clear()
        samples = model.generate(2, seed=0, sampler=sampler, init_image=init, strength=strength)
        assert len(calls) == round(strength * steps)
        assert samples.metadata["strength"] == strength
        assert samples.metadata["start_timestep"] == sampler.timesteps(model.schedule)[steps - len(calls)]


@pytest.mark.parametrize("sampler", [DDIMSampler(steps=10), DDPMSampler()], ids=["ddim", "ddpm"])
def test_distance_to_the_init_image_grows_with_strength(model, sampler):
    init = digit_images(16)
    dist = []
    for strength in STRENGTHS:
        out = model.generate(16, seed=0, sampler=sampler, init_image=init, strength=strength)
        dist.append(float((out.images - init).abs().mean()))
    assert all(a < b for a, b in zip(dist, dist[1:])), dist
    # a small strength stays close: well under what pure noise gives
    assert dist[0] < 0.5 * dist[-1], dist


def test_bad_strength_and_init_image_are_user_errors(model):
    init = digit_images(2)
    for bad in (0, 0.0, -0.5, 1.5):
        with pytest.raises(UserError, match="strength"):
            model.generate(2, seed=0, init_image=init, strength=bad)
    with pytest.raises(UserError, match="strength"):
        model.generate(2, seed=0, init_image=init, strength="half")
    with pytest.raises(UserError, match="strength=0.5 needs init_image"):
        model.generate(2, seed=0, strength=0.5)
    expected = r"init_image: expected shape \(2, 1, 8, 8\) or one image \(1, 8, 8\)"
    for shape in ((2, 3, 8, 8), (2, 1, 16, 16), (3, 1, 8, 8), (8, 8)):
        with pytest.raises(UserError, match=expected):
            model.generate(2, seed=0, init_image=torch.rand(shape), strength=0.5)
    with pytest.raises(UserError, match=r"init_image: expected values in \[0, 1\]"):
        model.generate(2, seed=0, init_image=init * 2 - 1, strength=0.5)
    with pytest.raises(UserError, match="init_image"):
        model.generate(2, seed=0, init_image=[[0.5]], strength=0.5)
