"""PPCA's likelihood, its fit, and its sampling options."""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from genframe import Samples, UserError
from genframe_ppca.model import PPCA


def _random_ppca(log_sigma: float, *, channels=3, size=4, k=5, seed=0) -> PPCA:
    torch.manual_seed(seed)
    m = PPCA(in_channels=channels, image_size=size, latent_dim=k)
    with torch.no_grad():
        m.mu.copy_(0.3 * torch.randn_like(m.mu))
        m.W.copy_(torch.randn_like(m.W))
        m.log_sigma.fill_(log_sigma)
    return m


def _reference_log_prob(m: PPCA, x: torch.Tensor) -> torch.Tensor:
    """log N(x; mu, W W^T + sigma^2 I) with the full D x D covariance, in float64."""
    W, mu = m.W.detach().double(), m.mu.detach().double()
    var = math.exp(2 * m.log_sigma.item())
    cov = W @ W.T + var * torch.eye(m.data_dim, dtype=torch.float64)
    return MultivariateNormal(mu, covariance_matrix=cov).log_prob(x.flatten(1).double())


@pytest.mark.parametrize("log_sigma", [0.5, -1.0, -4.0])
def test_log_prob_matches_multivariate_normal(log_sigma):
    m = _random_ppca(log_sigma)
    # Points on and off the model's subspace: the off-subspace ones test the residual term.
    x = torch.randn(16, 3, 4, 4)
    with torch.no_grad():
        ours = m.log_prob(x).double()
    ref = _reference_log_prob(m, x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-2)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # no Trainer here
def test_loss_is_the_mean_nll_in_nats():
    m = _random_ppca(-0.5, channels=1, size=8, k=3)
    batch = m.example_batch(8)
    loss = m.training_step(batch, 0)
    ref = -_reference_log_prob(m, batch["image"]).mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)


def _closed_form_nll(x: torch.Tensor, k: int) -> float:
    """The maximum-likelihood NLL (Tipping & Bishop 1999, eqs. 7-8), nats per row of x."""
    x = x.double()
    N, D = x.shape
    e = x - x.mean(0)
    lam = torch.linalg.eigvalsh(e.T @ e / N).flip(0)  # sample covariance spectrum, descending
    var = lam[k:].mean()  # sigma^2: the mean discarded variance
    # At the optimum C has eigenvalues lam[:k] and var (D - k times), and tr(C^-1 S) = D.
    logdet = torch.log(lam[:k]).sum() + (D - k) * torch.log(var)
    return float(0.5 * (D * math.log(2 * math.pi) + logdet + D))


def test_gradient_training_reaches_the_closed_form_optimum():
    torch.manual_seed(0)
    D, k, N = 16, 2, 2000
    W_true = torch.randn(D, k) * torch.tensor([2.0, 1.0])
    x = torch.randn(N, k) @ W_true.T + 0.3 + 0.2 * torch.randn(N, D)  # a true PPCA draw
    images = x.view(N, 1, 4, 4)

    m = PPCA(in_channels=1, image_size=4, latent_dim=k, lr=5e-2)
    opt = m.configure_optimizers()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 16 x 2 matrices: extra threads only add contention
    try:
        for _ in range(400):  # full-batch Adam
            opt.zero_grad()
            loss = -m.log_prob(images).mean()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    best = _closed_form_nll(x, k)
    assert loss.item() == pytest.approx(best, abs=5e-3), (loss.item(), best)
    # sigma^2 lands on the mean discarded eigenvalue (the true noise is 0.2^2).
    assert math.exp(2 * m.log_sigma.item()) == pytest.approx(0.04, rel=0.1)


def test_generate_shapes_range_and_noise_option():
    m = _random_ppca(-1.0, channels=3, size=4, k=5).eval()
    plain = m.generate(6, seed=1)
    noisy = m.generate(6, seed=1, noise=True)
    assert isinstance(plain, Samples) and plain.images.shape == (6, 3, 4, 4)
    for s in (plain, noisy):
        assert 0 <= float(s.images.min()) and float(s.images.max()) <= 1
    assert not torch.equal(plain.images, noisy.images)
    # genframe records the seed and the model's name (its class name when built by hand).
    assert plain.metadata == {"model": "PPCA", "seed": 1, "noise": False}
    assert noisy.metadata["noise"] is True


def test_generate_rejects_unknown_options_and_conditions():
    m = _random_ppca(-1.0)
    assert m.sampling_options() == ["noise"]
    with pytest.raises(UserError, match="sampling.temperature.*Valid options: noise"):
        m.generate(2, temperature=0.5)
    with pytest.raises(UserError, match="unconditional"):
        m.generate(2, condition={"label": 3})
    with pytest.raises(UserError, match="num_samples"):
        m.generate(0)


def test_bad_constructor_values_name_the_key():
    with pytest.raises(UserError, match="model.latent_dim"):
        PPCA(in_channels=1, image_size=8, latent_dim=0)
