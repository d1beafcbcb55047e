"""A KL-regularised convolutional autoencoder with a spatial latent: the first stage of
latent diffusion.

Rombach et al. 2022 ("High-Resolution Image Synthesis with Latent Diffusion Models",
https://arxiv.org/abs/2112.10752, section 3 and appendix G): an encoder maps an image
(C, H, W) to a diagonal Gaussian over a latent feature map (c, H/f, W/f), a decoder maps
a latent back to the image, and training minimises a reconstruction loss plus a very
weak KL term towards N(0, I) (weight ~1e-6), which keeps the latent's scale bounded
without blurring the reconstructions. A U-Net can denoise that latent as it denoises
images (`model=diffusion model.autoencoder=<this run>`), at a fraction of the pixels.

Latent Diffusion adds a perceptual (LPIPS) and a patch-adversarial loss; both need
pretrained networks this project cannot download, so the reconstruction loss here is L1
(with an optional L2 term), as in their ablations without LPIPS.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from genframe.errors import UserError, argument_check
from genframe.exporters import ExportGraph, latent_decoder_graph
from genframe.layers import ConvDecoder, ConvEncoder
from genframe.module import GenerativeModule
from genframe.samples import Samples

# Posterior log-variances are clamped as Latent Diffusion's DiagonalGaussianDistribution
# does, so exp() can neither overflow nor underflow.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class AutoencoderKL(GenerativeModule):
    """Convolutional autoencoder with a KL-regularised spatial latent, for images in [-1, 1].

    Args:
        in_channels: image channels (``data.channels``).
        image_size: image side in pixels (``data.image_size``).
        latent_channels: c, channels of the latent feature map (Stable Diffusion: 4).
        block_out_channels: widths of the conv levels, highest resolution first; each level
            after the first halves the spatial size, so the latent is
            (c, ceil(H / 2^(L-1)), ceil(W / 2^(L-1))) for L levels.
        blocks_per_level: residual blocks per level, in encoder and decoder.
        kl_weight: weight of KL(q(z|x) || N(0, I)) (summed over the latent) against the
            reconstruction loss (summed over the pixels); Latent Diffusion: 1e-6.
        l2_weight: weight of an added squared-error term (0: L1 alone).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.

    ``encode(x)`` (B, C, H, W) in [-1, 1] -> (mean, logvar), each (B, c, h, w);
    ``decode(z)`` (B, c, h, w) -> (B, C, H, W), roughly in [-1, 1].
    ``latent_shape``: (c, h, w).

    Logs ``train/loss`` (reconstruction + kl_weight * KL, per image), ``train/rec``,
    ``train/kl``; ``val/loss`` (the same, from the posterior mean), ``val/rec`` (mean
    absolute error per pixel, on [-1, 1]), ``val/kl`` and ``val/psnr`` (dB, images on
    [0, 1]).

    ``generate(n)`` decodes latents drawn from N(0, I): with a weak KL these are not
    images of the data (the latent diffusion model learns the real latent
    distribution); ``generate(n, condition={"image": x})`` returns reconstructions of x.
    """

    condition_keys = frozenset({"image"})

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        latent_channels: int = 4,
        block_out_channels: list[int] = (32, 64, 64),  # type: ignore[assignment]  # immutable default
        blocks_per_level: int = 1,
        kl_weight: float = 1e-6,
        l2_weight: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        block_out_channels = [int(c) for c in block_out_channels]
        _validate(locals())
        self.save_hyperparameters()
        self.in_channels = in_channels
        self.image_size = image_size
        self.latent_channels = latent_channels

        self.encoder = ConvEncoder(in_channels, block_out_channels, image_size,
                                   blocks_per_level=blocks_per_level)
        # mean and log-variance per latent element, from the encoder's last feature map
        self.to_moments = nn.Conv2d(block_out_channels[-1], 2 * latent_channels, 3, padding=1)
        self.from_latent = nn.Conv2d(latent_channels, block_out_channels[-1], 3, padding=1)
        self.decoder = ConvDecoder(in_channels, block_out_channels, image_size,
                                   blocks_per_level=blocks_per_level)
        self.latent_shape: tuple[int, int, int] = (latent_channels, *self.encoder.sizes[-1])

    # -- the two halves ---------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar) of q(z|x), each (B, c, h, w), for images x (B, C, H, W) in [-1, 1]."""
        mean, logvar = self.to_moments(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), about [-1, 1] (not clamped), for latents z (B, c, h, w)."""
        return self.decoder(self.from_latent(z))

    def encode_latents(self, x: torch.Tensor, *, sample: bool = False,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents (B, c, h, w) of images x (B, C, H, W) in [-1, 1]: the posterior mean, or
        a draw from q(z|x) with `sample` (what Latent Diffusion trains its U-Net on)."""
        mean, logvar = self.encode(x)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) clamped to [-1, 1], for latents z (B, c, h, w)."""
        return self.decode(z).clamp(-1, 1)

    # -- objective --------------------------------------------------------------------

    def _terms(self, x: torch.Tensor, *, sample: bool) -> dict[str, torch.Tensor]:
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        recon = self.decode(z)
        diff = (recon.float() - x.float()).flatten(1)
        rec = diff.abs().sum(1)  # (B,) L1 summed over pixels, as Latent Diffusion sums it
        if self.hparams.l2_weight > 0:
            rec = rec + self.hparams.l2_weight * diff.pow(2).sum(1)
        # KL(N(mean, var) || N(0, I)) summed over the latent: (B,)
        kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1)
        return {"rec": rec.mean(), "kl": kl.mean(), "recon": recon, "mae": diff.abs().mean()}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        terms = self._terms(x, sample=True)
        loss = terms["rec"] + self.hparams.kl_weight * terms["kl"]
        n = x.shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/rec", terms["rec"], on_epoch=True, batch_size=n)
        self.log("train/kl", terms["kl"], on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        terms = self._terms(x, sample=False)
        loss = terms["rec"] + self.hparams.kl_weight * terms["kl"]
        mse = ((terms["recon"].clamp(-1, 1).float() - x.float()) / 2).pow(2).flatten(1).mean(1)
        psnr = (-10 * torch.log10(mse.clamp_min(1e-10))).mean()  # images on [0, 1]
        log = dict(on_epoch=True, batch_size=x.shape[0], sync_dist=True)
        self.log("val/loss", loss, prog_bar=True, **log)
        self.log("val/rec", terms["mae"], **log)
        self.log("val/kl", terms["kl"], **log)
        self.log("val/psnr", psnr, prog_bar=True, **log)
        return loss

    # -- generation -------------------------------------------------------------------

    def sample(
        self,
        num_samples: int,
        *,
        condition: dict[str, Any],
        generator: torch.Generator,
        temperature: float = 1.0,
    ) -> Samples:
        """Reconstructions of ``condition["image"]`` ((N, C, H, W) or (C, H, W), in [0, 1]),
        or decodings of latents drawn from N(0, temperature^2 I) without one.

        Raises:
            UserError: a negative temperature, or an image of another shape or range.
        """
        temperature = float(temperature)
        if not temperature >= 0:
            raise UserError(f"sampling.temperature must be >= 0, got {temperature}")
        image = condition.get("image")
        if image is not None:
            x = self._check_image(image, num_samples) * 2 - 1
            z = self.encode_latents(x)
            metadata: dict[str, Any] = {"reconstruction": True}
        else:
            z = torch.randn((num_samples, *self.latent_shape), generator=generator,
                            device=self.device) * temperature
            metadata = {"reconstruction": False, "temperature": temperature}
        images = (self.decode_latents(z).float() + 1) / 2
        return Samples(images=images, conditions=[{} for _ in range(num_samples)], metadata=metadata)

    def export_graphs(self) -> dict[str, ExportGraph]:
        """``encoder``: images (B, C, H, W) in [0, 1] -> the posterior mean latents
        (B, c, h, w); ``decoder``: latents (B, c, h, w) -> images (B, C, H, W) in [0, 1]."""
        gen = torch.Generator().manual_seed(0)
        shape = (self.in_channels, self.image_size, self.image_size)
        images = [torch.rand((n, *shape), generator=gen).to(self.device) for n in (2, 3)]
        encoder = ExportGraph(
            _Encoder(self), {"images": images[0]}, ("latents",), {"images": {0: "batch"}},
            check_inputs=[{"images": images[1]}],
            notes={"images": "(B, C, H, W) in [0, 1]", "latents": "the mean of q(z|x)"})
        decoder = latent_decoder_graph(_Decoder(self), tuple(self.latent_shape),
                                       notes={"images": "(B, C, H, W) in [0, 1]"})
        return {"encoder": encoder, "decoder": decoder}

    def _check_image(self, image: Any, num_samples: int) -> torch.Tensor:
        return self.image_argument(image, num_samples, key="condition.image", channels=self.in_channels,
                                   size=self.image_size, sizes_from="in_channels and image_size")


class _Encoder(nn.Module):
    """For export: images in [0, 1] -> the posterior mean latents."""

    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode_latents(images * 2 - 1)


class _Decoder(nn.Module):
    """For export: latents -> images in [0, 1]."""

    def __init__(self, autoencoder: AutoencoderKL) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.autoencoder.decode_latents(latents).float() + 1) / 2


def _validate(args: dict[str, Any]) -> None:
    """Refuse bad constructor values with a message naming the ``model.`` key."""
    need = argument_check(args)
    need(args["in_channels"] >= 1, "in_channels", "at least 1")
    need(args["image_size"] >= 1, "image_size", "at least 1")
    need(args["latent_channels"] >= 1, "latent_channels", "at least 1")
    widths = args["block_out_channels"]
    need(len(widths) >= 1 and all(c >= 1 for c in widths), "block_out_channels",
         "a non-empty list of positive widths")
    need(args["blocks_per_level"] >= 0, "blocks_per_level", "0 or more")
    need(args["kl_weight"] >= 0, "kl_weight", ">= 0")
    need(args["l2_weight"] >= 0, "l2_weight", ">= 0")
    need(args["lr"] > 0, "lr", "> 0")
    need(args["weight_decay"] >= 0, "weight_decay", ">= 0")
    factor = 2 ** (len(widths) - 1)
    if args["image_size"] < factor:
        raise UserError(
            f"model.block_out_channels: {len(widths)} levels halve the image {len(widths) - 1} "
            f"times (factor {factor}), more than image_size={args['image_size']} allows; use at "
            f"most {int(math.log2(max(args['image_size'], 1))) + 1} levels")
