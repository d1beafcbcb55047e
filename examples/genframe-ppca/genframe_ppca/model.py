"""Probabilistic PCA (Tipping & Bishop 1999, https://doi.org/10.1111/1467-9868.00196).

An image, flattened to x in R^D (D = C*H*W), is modelled as

    x = W z + mu + eps,   z ~ N(0, I_k),   eps ~ N(0, sigma^2 I_D)

so its marginal is Gaussian, x ~ N(mu, C) with C = W W^T + sigma^2 I_D. Training minimises
the exact -log N(x; mu, C) averaged over images (nats per image). C is D x D, but every
quantity the likelihood needs comes from the k x k matrix M = W^T W + sigma^2 I_k:

    log|C|       = (D - k) log sigma^2 + log|M|                 (matrix determinant lemma)
    e^T C^-1 e   = |e - W a|^2 / sigma^2 + |a|^2,  a = M^-1 W^T e  (Woodbury, e = x - mu)

The second form is a sum of non-negative terms (a is the posterior mean of z given x), so
it has none of the cancellation of the textbook (|e|^2 - e^T W M^-1 W^T e) / sigma^2.
The cost per batch is O(B D k + k^3) instead of O(D^3).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from genframe import GenerativeModule, Samples
from genframe.errors import argument_check


class PPCA(GenerativeModule):
    """Probabilistic PCA of images in [-1, 1], trained by maximum likelihood.

    Args:
        in_channels: image channels (``data.channels``).
        image_size: image side in pixels (``data.image_size``).
        latent_dim: k, the number of columns of W (principal directions).
        lr: learning rate of genframe's default optimiser (AdamW, no weight decay), which
            this model uses as it is.

    Logs ``train/loss`` and ``val/loss`` (-log p(x), nats per image) and ``val/bpd``
    (the same in bits per dimension). Note that p is a density over the continuous
    [-1, 1] pixel scale, so these numbers are not comparable with the nats of a
    discrete-data likelihood (such as the VAE's discretized Gaussian) without a
    dequantisation correction.
    """

    needs = frozenset({"image"})

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        latent_dim: int = 8,
        lr: float = 1e-2,
    ) -> None:
        super().__init__()
        need = argument_check(locals())
        need(in_channels >= 1, "in_channels", "at least 1")
        need(image_size >= 1, "image_size", "at least 1")
        need(latent_dim >= 1, "latent_dim", "at least 1")
        need(lr > 0, "lr", "positive")
        self.save_hyperparameters()
        self.in_channels = in_channels
        self.image_size = image_size
        self.latent_dim = latent_dim
        self.data_dim = in_channels * image_size * image_size  # D

        self.mu = nn.Parameter(torch.zeros(self.data_dim))  # (D,)
        # W = 0 is a saddle point of the likelihood; small random columns break symmetry.
        self.W = nn.Parameter(0.1 * torch.randn(self.data_dim, latent_dim))  # (D, k)
        # sigma = exp(log_sigma) > 0 for any real value, so the optimiser needs no bounds.
        self.log_sigma = nn.Parameter(torch.zeros(()))

    # -- objective --------------------------------------------------------------------

    def log_prob(self, images: torch.Tensor) -> torch.Tensor:
        """log N(x; mu, W W^T + sigma^2 I) per image, (B,), in nats, for images (B, C, H, W)."""
        # Cholesky and the subtraction-free quadratic want float32 even under bf16 autocast.
        with torch.autocast(device_type=images.device.type, enabled=False):
            e = images.flatten(1).float() - self.mu  # (B, D)
            W = self.W.float()  # (D, k)
            D, k = W.shape
            var = torch.exp(2 * self.log_sigma.float())  # sigma^2
            M = W.T @ W + var * torch.eye(k, device=W.device, dtype=W.dtype)  # (k, k)
            L = torch.linalg.cholesky(M)  # M = L L^T; M is SPD since sigma^2 > 0
            a = torch.cholesky_solve((e @ W).T, L).T  # (B, k): M^-1 W^T e, the E[z|x]
            resid = e - a @ W.T  # (B, D)
            quad = resid.pow(2).sum(1) / var + a.pow(2).sum(1)  # (B,): e^T C^-1 e
            logdet = (D - k) * torch.log(var) + 2 * torch.log(torch.diagonal(L)).sum()
            return -0.5 * (D * math.log(2 * math.pi) + logdet + quad)

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        x = batch["image"]
        loss = -self.log_prob(x).mean()
        n = x.shape[0]
        if stage == "train":
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        else:
            log = dict(on_epoch=True, batch_size=n, sync_dist=True)
            self.log("val/loss", loss, prog_bar=True, **log)
            self.log("val/bpd", loss / (math.log(2) * self.data_dim), **log)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    # -- generation -------------------------------------------------------------------

    def sample(
        self,
        num_samples: int,
        *,
        condition: dict[str, Any],
        generator: torch.Generator,
        noise: bool = False,
    ) -> Samples:
        """Draw z ~ N(0, I) and return W z + mu as images in [0, 1].

        Args:
            num_samples: how many images.
            condition: always empty (PPCA is unconditional; genframe refuses any key).
            generator: the seeded generator every random number comes from.
            noise: (``sampling.noise=true``) add sigma * eps, i.e. return a draw from the
                full density rather than the noise-free mean of p(x | z).
        """
        z = torch.randn(num_samples, self.latent_dim, generator=generator, device=self.device)
        x = z @ self.W.T + self.mu  # (N, D)
        if noise:
            eps = torch.randn(x.shape, generator=generator, device=self.device)
            x = x + torch.exp(self.log_sigma) * eps
        shape = (num_samples, self.in_channels, self.image_size, self.image_size)
        images = ((x.view(shape) + 1) / 2).clamp(0, 1)  # [-1, 1] -> [0, 1]
        return Samples(images=images.float(), metadata={"noise": bool(noise)})
