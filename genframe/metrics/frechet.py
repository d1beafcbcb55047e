"""Fréchet distance between two sets of features.

Fit a Gaussian to each set (mean, covariance) and take the Fréchet (2-Wasserstein)
distance between the two Gaussians (Heusel et al. 2017, "GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium", https://arxiv.org/abs/1706.08500):

    FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})

With Inception-v3 features this is FID; genframe computes it in whatever feature space the
chosen extractor gives, so numbers are comparable only within one extractor (its `name`
goes into every report).

Why not torchmetrics' ``FrechetInceptionDistance`` here: it runs the feature extractor
itself inside ``update(images)``, so the same features could not also feed precision and
recall (the extractor would run twice), and it cannot take features that were computed
once and kept (the real set's, reused every evaluation during training). Our extractors do
satisfy its custom-feature contract (float [0, 1] input, integer ``num_features``), and
the tests check that both give the same number. The arithmetic is float64 throughout, as
in torchmetrics.
"""

from __future__ import annotations

import torch


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64.

    Keep these for a reference set to compare many generated sets against it.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be shaped (N, D), got {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"the Fréchet distance needs at least 2 samples per set, got {features.shape[0]}")
    x = features.detach().to("cpu", torch.float64)
    mu = x.mean(dim=0)
    # Two-pass covariance (centre, then multiply) rather than E[xx^T] - mu mu^T: no
    # cancellation when the features' mean is large against their spread.
    xc = x - mu
    sigma = xc.T @ xc / (x.shape[0] - 1)
    return mu, sigma


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    # Round-off makes tiny eigenvalues of a singular covariance slightly negative.
    return (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.T


def frechet_distance_from_stats(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    The trace term Tr((S1 S2)^{1/2}) is the sum of the square roots of the eigenvalues of
    S1 S2, which equal those of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}. Going through
    the symmetric form keeps every eigen-decomposition real and stable (eigh), where
    scipy.linalg.sqrtm of the non-symmetric product can return complex parts and
    NaN for singular covariances -- common here, where the number of samples is often
    close to the feature width.
    """
    mu1, sigma1, mu2, sigma2 = (t.to("cpu", torch.float64) for t in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"feature widths differ: {tuple(mu1.shape)} vs {tuple(mu2.shape)}; "
            "both sets must come from the same extractor"
        )
    sqrt1 = _sqrt_psd(sigma1)
    middle = sqrt1 @ sigma2 @ sqrt1
    middle = (middle + middle.T) / 2  # symmetric up to round-off; make it exactly so
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    fd = diff @ diff + torch.trace(sigma1) + torch.trace(sigma2) - 2.0 * trace_sqrt
    # Mathematically >= 0; round-off can leave -1e-12 for identical sets.
    return max(float(fd), 0.0)


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N1, D), (N2, D).

    Both sets must come from the same extractor. The estimate is biased upwards for small
    sets (Chong & Forsyth 2020, https://arxiv.org/abs/1911.07023), so compare numbers
    computed with the same number of samples.
    """
    return frechet_distance_from_stats(*gaussian_stats(real_features), *gaussian_stats(fake_features))
