"""A convolutional variational autoencoder.

Kingma & Welling 2014, https://arxiv.org/abs/1312.6114.

The encoder maps an image to a diagonal Gaussian q(z|x); the decoder maps a latent z to a
per-pixel likelihood p(x|z); training minimises the negative ELBO

    -ELBO(x) = E_q[-log p(x|z)] + KL(q(z|x) || N(0, I))

in nats per image. With `num_classes > 0` both networks also see a learned label embedding
and the model becomes a conditional VAE (Sohn et al. 2015).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from genframe.errors import UserError, argument_check, did_you_mean, valid_list
from genframe.exporters import ExportGraph, latent_decoder_graph
from genframe.layers import ConvDecoder, ConvEncoder
from genframe.module import GenerativeModule
from genframe.samples import Samples

LIKELIHOODS = ("discretized_gaussian", "gaussian", "bernoulli")

# Decoder log-scales are clamped to this range. The floor (as in PixelCNN++) keeps the
# bin masses from underflowing once the model becomes confident; the ceiling is far
# wider than the data range [-1, 1] so it never binds in practice.
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 3.0
# Encoder log-variances are clamped so exp() can neither overflow nor underflow early in
# training.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def quantize(x: torch.Tensor, num_levels: int) -> torch.Tensor:
    """Snap values in [-1, 1] to the nearest of `num_levels` evenly spaced levels."""
    step = num_levels - 1
    return torch.round((x.clamp(-1, 1) + 1) * (step / 2)) * (2 / step) - 1


# Below this point log Phi(x) uses its asymptotic series (see `_log_ndtr`).
_LOWER_TAIL = -20.0


def _log_ndtr(x: torch.Tensor) -> torch.Tensor:
    """log Phi(x), the log standard normal CDF, with a usable gradient everywhere.

    torch.special.log_ndtr has accurate values, but in float32 its gradient goes wrong
    below about -1000 (and can overflow to inf), which a badly placed mean early in
    training can reach. Below -20 we use the asymptotic series (Abramowitz & Stegun
    26.2.12) log Phi(x) = -x^2/2 - log(-x) - log(2 pi)/2 + log(1 - 1/x^2 + 3/x^4 - ...),
    whose truncation error there is below 1e-7 and whose gradient is exact arithmetic.
    """
    inner = torch.special.log_ndtr(x.clamp(min=_LOWER_TAIL))
    t = x.clamp(max=_LOWER_TAIL)  # both branches stay finite, so where() is safe
    t2 = t * t
    tail = (
        -0.5 * t2 - torch.log(-t) - 0.5 * math.log(2 * math.pi)
        + torch.log1p(-1.0 / t2 + 3.0 / (t2 * t2))
    )
    return torch.where(x < _LOWER_TAIL, tail, inner)


def _log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails.

    Subtracting two CDFs loses everything when both are near 1, so for intervals in the
    upper half we use the mirror identity Phi(b) - Phi(a) = Phi(-a) - Phi(-b). Then
    log(Phi(hi) - Phi(lo)) = log Phi(hi) + log(1 - exp(log Phi(lo) - log Phi(hi))),
    where log Phi stays accurate deep in the lower tail.
    """
    upper = (a + b) > 0
    hi = torch.where(upper, -a, b)
    lo = torch.where(upper, -b, a)
    log_hi = _log_ndtr(hi)
    log_lo = _log_ndtr(lo)
    # d = log Phi(lo) - log Phi(hi) < 0. Far out in a tail both logs are ~-1e9 and float32
    # rounding can make d >= 0; the clamp keeps expm1 finite there (the value is ~-1e9
    # anyway, and the gradient still flows through log_hi towards the data).
    d = (log_lo - log_hi).clamp(max=-1e-30)
    # -expm1(d) = 1 - exp(d) without cancellation when d is close to 0 (narrow bins).
    return log_hi + torch.log(-torch.expm1(d))


def discretized_gaussian_log_prob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, num_levels: int
) -> torch.Tensor:
    """Per-element log-probability of data on `num_levels` levels in [-1, 1].

    The probability of level x is the mass of N(mean, exp(log_scale)^2) over its bin
    [x - 1/(L-1), x + 1/(L-1)], with the first and last bins stretched to -inf and +inf
    so the masses of all L levels sum to 1. This is PixelCNN++'s discretized logistic
    (Salimans et al. 2017, https://arxiv.org/abs/1701.05517) with a Gaussian, and the sum
    over pixels is a true log-likelihood in nats of the discrete data. `x` is snapped to
    the grid first, so resampled (non-grid) data is scored as its quantised value.

    All arguments broadcast; the result has their broadcast shape.
    """
    x = quantize(x, num_levels)
    half_bin = 1.0 / (num_levels - 1)
    inv_scale = torch.exp(-log_scale)
    centered = x - mean
    # Standardised bin edges. The clamp only binds for a mean absurdly far from the data
    # (where the mass is ~0 anyway); it keeps x^2 in the tail series finite.
    a = ((centered - half_bin) * inv_scale).clamp(-1e5, 1e5)
    b = ((centered + half_bin) * inv_scale).clamp(-1e5, 1e5)
    # All three branches are finite everywhere, so torch.where passes finite gradients.
    log_first = _log_ndtr(b)  # x = -1 owns (-inf, upper)
    log_last = _log_ndtr(-a)  # x = +1 owns (lower, +inf)
    log_mid = _log_ndtr_diff(a, b)
    first = x < -1 + half_bin
    last = x > 1 - half_bin
    return torch.where(first, log_first, torch.where(last, log_last, log_mid))


class VAE(GenerativeModule):
    """Convolutional VAE, optionally class-conditional, for images in [-1, 1].

    Args:
        in_channels: image channels (``data.channels``).
        image_size: image side in pixels (``data.image_size``); any size, odd included.
        num_levels: grey levels of the data (``data.num_levels``); the discretized
            likelihood scores the data on this grid.
        latent_dim: size of the latent vector z.
        block_out_channels: widths of the conv levels, highest resolution first; each level after
            the first halves the spatial size.
        blocks_per_level: residual blocks per level in encoder and decoder.
        num_classes: 0 for an unconditional VAE; with > 0 the model is a conditional VAE
            that reads ``batch["label"]`` and generates with ``condition={"label": k}``.
        likelihood: ``"discretized_gaussian"`` (per-pixel mean and scale; exact nats of
            the discrete data), ``"gaussian"`` (per-pixel mean, one learned scale; a
            density, not nats of discrete data) or ``"bernoulli"`` (per-pixel
            probability of the intensity scaled to [0, 1]).
        kl_weight: weight of the KL term in the training loss (beta-VAE when != 1).
        kl_warmup_steps: anneal the KL weight linearly from 0 over this many optimizer
            steps (Bowman et al. 2016); 0 disables the warm-up.
        lr: AdamW learning rate (read when the optimizer is built, so fine-tuning can
            change ``hparams.lr``).
        weight_decay: AdamW weight decay.

    Logs ``train/loss``, ``train/recon``, ``train/kl`` and ``val/loss`` (the negative
    ELBO with KL weight 1, nats per image), ``val/recon``, ``val/kl``, ``val/bpd``
    (``val/loss`` / (ln 2 * C*H*W); bits per dimension of the discrete data for the
    discretized likelihood, only comparable between runs for the other two).

    Trained with genframe's default optimiser (AdamW from ``lr`` and ``weight_decay``).
    """

    # Runs saved before the rename called the width list `channels`.
    renamed_arguments = {"channels": "block_out_channels"}

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_levels: int = 256,
        latent_dim: int = 16,
        block_out_channels: list[int] = (32, 64),  # type: ignore[assignment]  # immutable default
        blocks_per_level: int = 1,
        num_classes: int = 0,
        likelihood: str = "discretized_gaussian",
        kl_weight: float = 1.0,
        kl_warmup_steps: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        block_out_channels = [int(c) for c in block_out_channels]  # a plain list in hparams, whatever came in
        _validate(locals())
        self.save_hyperparameters()

        self.in_channels = in_channels
        self.image_size = image_size
        self.num_levels = num_levels
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.likelihood = likelihood
        self.set_class_conditional(num_classes)

        self.encoder = ConvEncoder(
            in_channels, block_out_channels, image_size, blocks_per_level=blocks_per_level
        )
        feat_shape = self.encoder.out_shape  # (C_last, h, w)
        feat_dim = math.prod(feat_shape)

        # Label conditioning: one learned embedding, concatenated to the flattened encoder
        # features (so q(z|x, y) can leave label information out of z) and to z (so the
        # decoder gets y for free).
        embed_dim = block_out_channels[-1] if num_classes else 0
        self.label_embed = nn.Embedding(num_classes, embed_dim) if num_classes else None

        self.to_posterior = nn.Linear(feat_dim + embed_dim, 2 * latent_dim)
        self.from_latent = nn.Linear(latent_dim + embed_dim, feat_dim)
        self.feat_shape = feat_shape
        # discretized_gaussian: a mean and a log-scale per pixel; the others: one number.
        out_per_channel = 2 if likelihood == "discretized_gaussian" else 1
        self.decoder = ConvDecoder(
            out_per_channel * in_channels, block_out_channels, image_size, blocks_per_level=blocks_per_level
        )
        if likelihood == "gaussian":
            # One global log-scale, learned with everything else.
            self.log_scale = nn.Parameter(torch.zeros(()))

    # -- networks ---------------------------------------------------------------------

    def _embed(self, label: torch.Tensor | None, batch_size: int) -> list[torch.Tensor]:
        if self.label_embed is None:
            return []
        if label is None:
            raise UserError("this VAE is conditional (num_classes > 0) and needs batch['label']")
        return [self.label_embed(label.long().view(batch_size))]  # [(B, E)]

    def encode(
        self, x: torch.Tensor, label: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(z | x[, label]), each (B, latent_dim)."""
        B = x.shape[0]
        h = self.encoder(x).flatten(1)  # (B, C_last*h*w)
        h = torch.cat([h, *self._embed(label, B)], dim=1)  # (B, F + E)
        mu, logvar = self.to_posterior(h).chunk(2, dim=1)  # 2 x (B, D)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Raw decoder outputs for latents z (B, latent_dim): (B, k*C, H, W).

        k = 2 (mean, log-scale) for the discretized Gaussian, else 1 (mean or logits).
        """
        B = z.shape[0]
        h = torch.cat([z, *self._embed(label, B)], dim=1)  # (B, D + E)
        h = self.from_latent(h).view(B, *self.feat_shape)  # (B, C_last, h, w)
        return self.decoder(h)  # (B, k*C, H, W)

    # -- objective --------------------------------------------------------------------

    def recon_nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) per image, (B,), in nats, from decoder outputs `out`."""
        out = out.float()  # the likelihood needs float32 even under bf16 autocast
        if self.likelihood == "discretized_gaussian":
            mean, log_scale = out.chunk(2, dim=1)  # 2 x (B, C, H, W)
            log_scale = log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
            logp = discretized_gaussian_log_prob(x, mean, log_scale, self.num_levels)
            return -logp.flatten(1).sum(1)
        if self.likelihood == "gaussian":
            log_scale = self.log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
            nll = (
                0.5 * ((x - out) * torch.exp(-log_scale)) ** 2
                + log_scale
                + 0.5 * math.log(2 * math.pi)
            )
            return nll.flatten(1).sum(1)
        # bernoulli: the intensity in [0, 1] is the target probability (continuous
        # targets are fine for BCE, though then it is not a normalised likelihood).
        target = (x + 1) / 2
        bce = F.binary_cross_entropy_with_logits(out, target, reduction="none")
        return bce.flatten(1).sum(1)

    def forward(
        self, x: torch.Tensor, label: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """One pass of the ELBO with a reparameterised sample of z.

        Returns per-image terms (B,): ``recon`` (-log p(x|z)) and ``kl`` (KL(q || p)).
        """
        mu, logvar = self.encode(x, label)  # (B, D) each
        eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation trick
        recon = self.recon_nll(self.decode(z, label), x)  # (B,)
        mu, logvar = mu.float(), logvar.float()
        # KL(N(mu, sigma^2) || N(0, 1)) in closed form, summed over latent dims.
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)  # (B,)
        return {"recon": recon, "kl": kl}

    def kl_anneal(self) -> float:
        """The KL warm-up factor at the current optimizer step, in [0, 1]."""
        warmup = self.hparams.kl_warmup_steps
        if warmup <= 0:
            return 1.0
        return min(1.0, (self.global_step + 1) / warmup)

    def _batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return batch["image"], batch.get("label") if self.num_classes else None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, label = self._batch(batch)
        terms = self(x, label)
        recon, kl = terms["recon"].mean(), terms["kl"].mean()
        loss = recon + self.hparams.kl_weight * self.kl_anneal() * kl
        n = x.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/recon", recon, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/kl", kl, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, label = self._batch(batch)
        terms = self(x, label)
        recon, kl = terms["recon"].mean(), terms["kl"].mean()
        nelbo = recon + kl  # the true bound: no KL weight, no annealing
        n = x.shape[0]
        dims = x[0].numel()
        log = dict(on_epoch=True, batch_size=n, sync_dist=True)
        self.log("val/loss", nelbo, prog_bar=True, **log)
        self.log("val/recon", recon, **log)
        self.log("val/kl", kl, **log)
        self.log("val/bpd", nelbo / (math.log(2) * dims), **log)
        return nelbo

    # -- generation -------------------------------------------------------------------


    def sample(
        self,
        num_samples: int,
        *,
        condition: dict[str, Any],
        generator: torch.Generator,
        temperature: float = 1.0,
        mean: bool = True,
    ) -> Samples:
        """Decode `num_samples` latents drawn from the prior N(0, temperature^2 I).

        Args:
            num_samples: how many images.
            condition: ``{"label": k}`` (or a list of N labels) for a conditional model;
                without it a conditional model cycles through the classes.
            generator: the seeded generator every draw comes from.
            temperature: standard deviation of the prior draw (below 1 trades variety
                for cleaner images).
            mean: return the decoder's mean image (True) or a sample from p(x|z).
        """
        temperature = float(temperature)
        if not temperature >= 0:
            raise UserError(f"sampling.temperature must be >= 0, got {temperature}")
        labels, conditions = self.labels_for(num_samples, condition, self.num_classes)
        z = torch.randn(num_samples, self.latent_dim, generator=generator,
                        device=self.device) * temperature  # (N, D)
        out = self.decode(z, labels).float()  # (N, k*C, H, W)
        images = self._to_images(out, generator, mean=bool(mean))  # (N, C, H, W) in [0, 1]
        metadata = {"temperature": temperature, "mean": bool(mean)}
        return Samples(images=images, conditions=conditions, metadata=metadata)

    def _to_images(self, out: torch.Tensor, gen: torch.Generator, *, mean: bool) -> torch.Tensor:
        """Decoder outputs -> images in [0, 1]: the mean of p(x|z), or a draw from it."""
        if self.likelihood == "bernoulli":
            probs = torch.sigmoid(out)  # already on the [0, 1] intensity scale
            return probs if mean else torch.bernoulli(probs, generator=gen)
        if self.likelihood == "discretized_gaussian":
            loc, log_scale = out.chunk(2, dim=1)
            log_scale = log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
        else:
            loc, log_scale = out, self.log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
        x = loc
        if not mean:
            noise = torch.randn(loc.shape, generator=gen, device=loc.device)
            x = loc + torch.exp(log_scale) * noise
            if self.likelihood == "discretized_gaussian":
                # Rounding a Gaussian draw to the nearest level (edges absorbing the
                # tails) samples exactly the discretized distribution.
                x = quantize(x, self.num_levels)
        return ((x + 1) / 2).clamp(0, 1)

    def export_graphs(self) -> dict[str, ExportGraph]:
        """``decoder``: latents (B, latent_dim) [and labels (B,)] -> the mean image of
        p(x|z), (B, C, H, W) in [0, 1] (what ``generate(mean=true)`` returns)."""
        notes = {"latents": "draws from N(0, I), times the sampling temperature",
                 "images": "(B, C, H, W) in [0, 1], the mean of p(x|z)"}
        if self.num_classes:
            notes["labels"] = f"class ids 0..{self.num_classes - 1}"
        return {"decoder": latent_decoder_graph(_MeanDecoder(self), (self.latent_dim,),
                                                num_classes=self.num_classes, notes=notes)}

    def example_batch(self, batch_size: int = 4) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(0)
        shape = (batch_size, self.in_channels, self.image_size, self.image_size)
        levels = torch.randint(0, self.num_levels, shape, generator=gen)
        image = levels.float() * (2 / (self.num_levels - 1)) - 1  # on the data's grid
        return self._with_labels({"image": image.to(self.device)}, gen)


class _MeanDecoder(nn.Module):
    """A VAE's decoder for export: latents [, labels] -> the mean image in [0, 1]."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        out = self.vae.decode(latents, labels).float()
        return self.vae._to_images(out, None, mean=True)


def _validate(args: dict[str, Any]) -> None:
    """Refuse bad constructor values with a message naming the ``model.`` key."""

    need = argument_check(args)

    need(args["in_channels"] >= 1, "in_channels", "at least 1")
    need(args["image_size"] >= 1, "image_size", "at least 1")
    need(args["num_levels"] >= 2, "num_levels", "at least 2")
    need(args["latent_dim"] >= 1, "latent_dim", "at least 1")
    need(
        len(args["block_out_channels"]) >= 1 and all(c >= 1 for c in args["block_out_channels"]),
        "block_out_channels",
        "a non-empty list of positive widths",
    )
    need(args["blocks_per_level"] >= 0, "blocks_per_level", "0 or more")
    need(args["num_classes"] >= 0, "num_classes", "0 (unconditional) or more")
    need(args["kl_weight"] >= 0, "kl_weight", ">= 0")
    need(args["kl_warmup_steps"] >= 0, "kl_warmup_steps", ">= 0")
    need(args["lr"] > 0, "lr", "> 0")
    need(args["weight_decay"] >= 0, "weight_decay", ">= 0")
    if args["likelihood"] not in LIKELIHOODS:
        raise UserError(
            f"model.likelihood must be one of {valid_list(LIKELIHOODS)}, got "
            f"{args['likelihood']!r}.{did_you_mean(str(args['likelihood']), LIKELIHOODS)}"
        )

