"""The GAN's objective: adversarial losses on logits, the R1 penalty, a diversity measure."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LOSSES = ("bce", "hinge")


def d_loss_fn(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator loss on logits of real and generated images."""
    real_logits, fake_logits = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    # BCE: -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z)))).
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss_fn(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator loss: non-saturating -log sigmoid(D(G(z))) for BCE, -D(G(z)) for hinge."""
    fake_logits = fake_logits.float()
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def r1_penalty(discriminate: Callable[[torch.Tensor], torch.Tensor],
               real: torch.Tensor) -> torch.Tensor:
    """E[||grad_x D(x)||^2] on real images x (Mescheder et al. 2018,
    https://arxiv.org/abs/1801.04406): penalising D's slope on the data keeps it from
    pushing the generator's samples around the real points (the loss adds gamma / 2 times
    this). `discriminate` maps images (B, C, H, W) to logits (B,)."""
    x = real.detach().requires_grad_(True)
    logits = discriminate(x)
    (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(dim=1).mean()


def mode_seeking_ratio(fake: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """How far apart two images of the same condition are for how far apart their noise
    is: mean |G(z1) - G(z2)| / mean |z1 - z2| over the pairs (first half, second half) of
    the batch (Mao et al. 2019, MSGAN, https://arxiv.org/abs/1903.05628). A generator
    that maps different noise to the same image (mode collapse within a class) has a
    ratio near 0; the generator's loss adds lambda / (ratio + 1e-5)."""
    half = fake.shape[0] // 2
    image_gap = (fake[:half] - fake[half:2 * half]).abs().flatten(1).float().mean(dim=1)  # (B/2,)
    noise_gap = (z[:half] - z[half:2 * half]).abs().float().mean(dim=1)  # (B/2,)
    return (image_gap / noise_gap).mean()


def mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance between distinct rows of x (N, ...) flattened."""
    flat = x.flatten(1).float()
    n = flat.shape[0]
    if n < 2:
        return torch.zeros((), device=x.device)
    d = torch.cdist(flat, flat)  # (N, N)
    return d.sum() / (n * (n - 1))
