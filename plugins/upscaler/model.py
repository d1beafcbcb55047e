"""A cascaded diffusion upscaler: a diffusion model of high-resolution images conditioned
on a low-resolution one, with noise augmentation of that input.

Cascaded diffusion (Ho et al. 2022, "Cascaded Diffusion Models for High Fidelity Image
Generation", https://arxiv.org/abs/2106.15282; Saharia et al. 2022, Imagen,
https://arxiv.org/abs/2205.11487): a base model makes small images, and a second
diffusion model, trained on the same data at two sizes, adds the detail. As in SR3
(Saharia et al. 2021, https://arxiv.org/abs/2104.07636) the low-resolution image is
upsampled (bilinear) to the output size and concatenated to x_t as extra input channels
of the U-Net, which predicts only the image's channels.

Noise augmentation (Ho et al. 2022, sec. 4.2, "Gaussian conditioning augmentation"): in
training, the low-resolution input is noised with the forward process at a random level
s (uniform over ``[0, noise_augmentation_max]`` of T, as Imagen's pseudo-code draws it;
0 leaves it clean),
and the network is told s through a second timestep embedding added to the first. The
upscaler then does not trust every pixel of its input, so it copes with the base model's
artefacts, which the real low-resolution images of training never had. At sampling time
a fixed level (``noise_augmentation``) is used.

Training, the noise schedule, the EMA and the samplers are the diffusion plugin's
(`Diffusion`, which this model extends); this module adds the low-resolution input.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from genframe.errors import UserError, argument_check
from genframe.layers import timestep_embedding
from genframe.samplers.base import Sampler
from genframe.samples import Samples
from genframe_plugins.diffusion.model import Diffusion
from genframe_plugins.diffusion.unet import UNet


class LowResUNet(UNet):
    """The diffusion `UNet` with a low-resolution image as extra input channels and the
    noise-augmentation level as a second timestep embedding.

    Args:
        channels: the image's channels C: the net reads 2C (x_t and the conditioning
            image) and predicts C.
        image_size, block_out_channels, **unet: as for `UNet`.

    ``forward(x_t, t, aug_t, *, low_res)``: x_t (B, C, H, W), t (B,) the diffusion
    timestep, aug_t (B,) the augmentation timestep of the conditioning (it travels in
    `UNet`'s label slot, which an unlabelled U-Net leaves free; -1 for a clean
    input), low_res (B, C, H, W) the
    noised low-resolution image already upsampled to H x W -> (B, C, H, W).
    """

    def __init__(self, channels: int, image_size: int, block_out_channels: list[int],
                 **unet: Any) -> None:
        super().__init__(2 * channels, image_size, block_out_channels, num_classes=0,
                         out_channels=channels, **unet)
        emb_dim = 4 * self.base_width
        # Its own MLP over the same sinusoids: "how noisy is the input" is a different
        # question from "how noisy is x_t" (Imagen adds the two embeddings).
        self.aug_mlp = nn.Sequential(
            nn.Linear(self.base_width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

    def embed(self, t: torch.Tensor, label: torch.Tensor | None,
              context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if label is None:
            raise ValueError("LowResUNet needs the augmentation timestep aug_t (B,)")
        emb = super().embed(t, None, context, mask)  # (B, E)
        return emb + self.aug_mlp(timestep_embedding(label, self.base_width))

    def forward(self, x: torch.Tensor, t: torch.Tensor, aug_t: torch.Tensor | None = None,
                context: torch.Tensor | None = None, mask: torch.Tensor | None = None, *,
                low_res: torch.Tensor) -> torch.Tensor:
        if low_res.shape != x.shape:
            raise ValueError(f"low_res must be upsampled to x_t's shape {tuple(x.shape)}, "
                             f"got {tuple(low_res.shape)}")
        return super().forward(torch.cat([x, low_res], dim=1), t, aug_t, context, mask)


class Upscaler(Diffusion):
    """Diffusion upscaler: high-resolution images in [-1, 1] from low-resolution ones.

    Args:
        in_channels: image channels (``data.channels``); the low-resolution image has
            as many.
        image_size: the output side in pixels (``data.image_size``): the data's images.
        low_res_size: the side of the low-resolution input, at most ``image_size - 1``;
            training makes it from each batch image by area averaging. None: half of
            `image_size`. In a cascade it must equal the base model's ``image_size``.
        block_out_channels, blocks_per_level, attention_resolutions, num_heads, dropout,
        timesteps, schedule, ema_decay, ema_start_step, lr, weight_decay, warmup_steps,
        default_sampler_steps: as for `Diffusion` (the U-Net runs at `image_size`).
        prediction: as for `Diffusion`, ``"v"`` by default, as Imagen's super-resolution
            models (it avoided their colour shifts).
        noise_augmentation: the augmentation level of the low-resolution input at
            sampling time, a fraction of T in [0, 1]: round(level * T) steps of the
            forward process (0: the clean input; 1: pure noise); `generate` can
            override it. Ho et al. found a moderate level best for sample quality.
        noise_augmentation_max: training draws each image's level uniformly from
            [0, noise_augmentation_max] (1, the default, as Imagen: the model then also
            learns the unconditional case, which `generate` without a low-resolution
            image uses). Must be at least `noise_augmentation`.
        residual: diffuse the residual x - up(x_low) between the image and its
            bilinearly upsampled low-resolution input, and add it back after sampling
            (SRDiff, Li et al. 2022, https://arxiv.org/abs/2104.14951), so the network
            only makes the missing detail; a short-trained model then errs towards the
            bilinear image, not towards noise. False: diffuse the image itself (SR3).

    The batch needs ``image`` only. ``generate(n, condition={"low_res": images},
    noise_augmentation=..., sampler=...)``: see `sample`.

    Logs ``train/loss`` and ``val/loss`` as `Diffusion` does (``val/loss`` at levels,
    noise and timesteps drawn from a fixed seed per batch).
    """

    needs = frozenset({"image"})
    condition_keys = frozenset({"low_res"})
    renamed_arguments: ClassVar[dict[str, str]] = {}  # none of Diffusion's old names
    # Upscalers saved before `residual` existed diffused the image itself.
    added_arguments: ClassVar[dict[str, Any]] = {"residual": False}

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 64,
        low_res_size: int | None = None,
        block_out_channels: list[int] = (64, 128),  # type: ignore[assignment]  # immutable default
        blocks_per_level: int = 2,
        attention_resolutions: list[int] | None = None,
        num_heads: int = 4,
        dropout: float = 0.0,
        timesteps: int = 1000,
        schedule: Literal["linear", "cosine"] = "cosine",
        prediction: Literal["eps", "v"] = "v",
        noise_augmentation: float = 0.1,
        noise_augmentation_max: float = 1.0,
        ema_decay: float = 0.999,
        ema_start_step: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        default_sampler_steps: int = 50,
        residual: bool = True,
    ) -> None:
        _validate(locals())
        super().__init__(
            in_channels=in_channels, image_size=image_size, num_classes=0,
            block_out_channels=block_out_channels, blocks_per_level=blocks_per_level,
            attention_resolutions=attention_resolutions, num_heads=num_heads,
            dropout=dropout, timesteps=timesteps, schedule=schedule, prediction=prediction,
            label_dropout=0.0, guidance=1.0, ema_decay=ema_decay,
            ema_start_step=ema_start_step, lr=lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, default_sampler_steps=default_sampler_steps,
        )
        # Diffusion saved its own arguments too (Lightning merges a subclass's): keep only
        # ours, the ones the spec rebuilds this model from.
        self.save_hyperparameters()
        own = inspect.signature(Upscaler.__init__).parameters
        for key in [k for k in self.hparams if k not in own]:
            self.hparams.pop(key)
        self.needs = type(self).needs
        self.condition_keys = type(self).condition_keys
        self.low_res_size = int(low_res_size) if low_res_size is not None else image_size // 2
        # The spec records the size used, so a cascade can check it without this code.
        self.resolved_arguments = {**self.resolved_arguments, "low_res_size": self.low_res_size}

    def build_unet(self, *, in_channels: int, num_classes: int, **unet: Any) -> UNet:
        """A U-Net that also reads the low-resolution image (`LowResUNet`)."""
        return LowResUNet(in_channels, **unet)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, aug_t: torch.Tensor,
                low_res: torch.Tensor) -> torch.Tensor:
        """The online network's raw prediction (eps or v) at (x_t, t) given the noised,
        upsampled low-resolution image `low_res` (B, C, H, W) at level `aug_t` (B,)."""
        return self.unet(x_t, t, aug_t, low_res=low_res)

    def unet_export_inputs(self, batch: int, gen: torch.Generator) -> dict[str, tuple[str, torch.Tensor]]:
        """``noise_level`` (B,) long: the augmentation timestep (-1: a clean input);
        ``low_res`` (B, C, H, W): the low-resolution image in [-1, 1], noised to that
        level and upsampled bilinearly to ``image_size`` (`conditioning`)."""
        levels = torch.randint(-1, self.schedule.num_steps, (batch,), generator=gen)
        low_res = torch.rand((batch, self.in_channels, self.image_size, self.image_size), generator=gen) * 2 - 1
        return {"noise_level": ("aug_t", levels), "low_res": ("low_res", low_res)}

    def unet_export_notes(self) -> dict[str, Any]:
        return {
            "noise_level": "augmentation timestep of low_res, -1 (clean) .. num_train_timesteps - 1; "
                           f"the model's default level {self.hparams.noise_augmentation} is timestep "
                           f"{self.aug_step(self.hparams.noise_augmentation)}",
            "low_res": f"the ({self.low_res_size}x{self.low_res_size}) image in [-1, 1], noised to "
                       "noise_level by the forward process, then upsampled bilinearly to "
                       f"{self.image_size}x{self.image_size}",
            "residual": (f"{bool(self.hparams.residual)}: the sampled x is the residual over the bilinearly "
                         "upsampled clean low_res image; add it back" if self.hparams.residual
                         else "False: the sampled x is the image"),
        }

    # -- the low-resolution input ------------------------------------------------------

    def downsample(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) at ``image_size`` -> (B, C, h, w) at ``low_res_size``, by area
        averaging (each low-resolution pixel the mean of the pixels it covers)."""
        return F.interpolate(images, size=(self.low_res_size, self.low_res_size), mode="area")

    def aug_step(self, level: float) -> int:
        """The augmentation timestep of level `level` in [0, 1]: round(level * T) steps of
        the forward process, i.e. timestep round(level * T) - 1 (-1: none, the clean
        input; T - 1: pure noise)."""
        return round(float(level) * self.schedule.num_steps) - 1

    def conditioning(self, low_res: torch.Tensor, aug_t: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The network's conditioning input: `low_res` (B, C, h, w) in [-1, 1] noised
        with the forward process q(z_s | x_low) at augmentation timesteps `aug_t` (B,)
        (-1: left clean), then upsampled bilinearly to (B, C, image_size, image_size)."""
        noise = torch.randn(low_res.shape, device=low_res.device, dtype=low_res.dtype,
                            generator=generator)
        noised = self.schedule.q_sample(low_res, aug_t.clamp(min=0), noise)  # (B, C, h, w)
        noised = torch.where((aug_t < 0).view(-1, 1, 1, 1), low_res, noised)
        size = (self.image_size, self.image_size)
        return F.interpolate(noised, size=size, mode="bilinear", align_corners=False)

    def _training_levels(self, n: int, device: torch.device,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmentation timesteps (n,) drawn uniformly from -1 (clean) .. aug_step(max)."""
        high = self.aug_step(self.hparams.noise_augmentation_max) + 1
        return torch.randint(-1, high, (n,), device=device, generator=generator)

    # -- objective --------------------------------------------------------------------

    def upsample(self, low_res: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, image_size, image_size), bilinearly."""
        size = (self.image_size, self.image_size)
        return F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)

    def _loss(self, net: UNet, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        aug_t = self._training_levels(x.shape[0], x.device, generator)  # (B,)
        clean = self.downsample(x)  # (B, C, h, w)
        low_res = self.conditioning(clean, aug_t, generator)  # (B, C, H, W)
        target = x - self.upsample(clean) if self.hparams.residual else x  # (B, C, H, W)
        return self.diffusion_loss(net, target, aug_t, generator=generator, low_res=low_res)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        loss = self._loss(self.unet, x, None)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x = batch["image"]
        gen = torch.Generator(device=x.device).manual_seed(10_000 + batch_idx)
        loss = self._loss(self.sampling_net, x, gen)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=x.shape[0], sync_dist=True)
        return loss

    # -- generation -------------------------------------------------------------------

    def sample(
        self,
        num_samples: int,
        *,
        condition: dict[str, Any],
        generator: torch.Generator,
        sampler: Sampler | None = None,
        noise_augmentation: float | None = None,
        clip_x0: bool = True,
    ) -> Samples:
        """Upscale ``condition["low_res"]`` to ``image_size``, or sample unconditionally.

        Args:
            num_samples: how many images.
            condition: ``{"low_res": images}``, images a float tensor in [0, 1] shaped
                (num_samples, C, low_res_size, low_res_size), or one image (C, h, w) /
                (1, C, h, w) for every sample. Without it the conditioning is pure noise
                at the top augmentation level: samples of the unconditional model that
                training with ``noise_augmentation_max=1`` also learns.
            generator: the seeded generator (the augmentation noise, then the sampler's).
            sampler: a `genframe.samplers.Sampler` (None: DDIM with
                ``default_sampler_steps``).
            noise_augmentation: the level of the low-resolution input in [0, 1] (None:
                the model's ``noise_augmentation``); it must be a level training drew,
                at most ``noise_augmentation_max``.
            clip_x0: clip the predicted clean image to [-1, 1] at every step.

        Returns:
            `Samples` with images (N, C, image_size, image_size) in [0, 1]; the metadata
            holds the level used (``noise_augmentation``) and whether a low-resolution
            image was given (``low_res``).

        Raises:
            UserError: a low-resolution image of another shape or outside [0, 1], a
                level outside [0, noise_augmentation_max], a sampler that does not fit,
                or no low-resolution image for a model trained with
                ``noise_augmentation_max < 1`` (it never learned the unconditional case).
        """
        sampler = self.check_sampler(sampler)
        level = self._level(noise_augmentation)
        given = condition.get("low_res")
        C, h = self.in_channels, self.low_res_size
        if given is None:
            if self.hparams.noise_augmentation_max < 1:
                raise UserError(
                    f"this upscaler was trained with noise_augmentation_max="
                    f"{self.hparams.noise_augmentation_max}, so it never learned to sample "
                    "without a low-resolution image: give condition={'low_res': images} "
                    f"(N, {C}, {h}, {h}) in [0, 1], or use it as the second stage of "
                    "`genframe generate run=BASE upscaler=THIS_RUN`")
            level = 1.0
            low = torch.zeros(num_samples, C, h, h, device=self.device)
        else:
            low = self._low_res(given, num_samples) * 2 - 1  # (N, C, h, w) in [-1, 1]
        aug_t = torch.full((num_samples,), self.aug_step(level), device=self.device, dtype=torch.long)
        cond = self.conditioning(low, aug_t, generator)  # (N, C, H, W)
        net = self.sampling_net

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return net(x, t, aug_t, low_res=cond)

        offset = self.upsample(low) if self.hparams.residual else None  # the bilinear image
        images, metadata = self.reverse_process(
            denoise, num_samples, generator=generator, sampler=sampler, clip_x0=clip_x0,
            offset=offset)
        return Samples(images=images, metadata={
            "noise_augmentation": level, "low_res": given is not None,
            "low_res_size": h, "residual": bool(self.hparams.residual), **metadata})

    def _level(self, level: float | None) -> float:
        top = float(self.hparams.noise_augmentation_max)
        if level is None:
            return float(self.hparams.noise_augmentation)
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 <= level <= top:
            raise UserError(
                f"noise_augmentation must be a number in [0, {top:g}] (a fraction of the "
                f"{self.schedule.num_steps} diffusion steps; this upscaler trained on levels "
                f"up to noise_augmentation_max={top:g}), got {level!r}")
        return float(level)

    def _low_res(self, image: Any, num_samples: int) -> torch.Tensor:
        """``condition["low_res"]`` checked and shaped (N, C, h, w), float32 on the model's
        device, values in [0, 1]."""
        return self.image_argument(image, num_samples, key="condition.low_res",
                                   channels=self.in_channels, size=self.low_res_size,
                                   sizes_from="in_channels and low_res_size")


def _validate(args: dict[str, Any]) -> None:
    """Refuse bad upscaler values with a message naming the ``model.`` key (the rest is
    `Diffusion`'s)."""
    need = argument_check(args)
    size, low = args["image_size"], args["low_res_size"]
    need(size >= 2, "image_size", "at least 2 (the upscaler's output side)")
    if low is not None and not 1 <= low < size:
        raise UserError(
            f"model.low_res_size={low} must be between 1 and model.image_size - 1 ({size - 1}): "
            f"the upscaler makes {size}x{size} images (data.image_size) from smaller ones; "
            f"e.g. model.low_res_size={max(1, size // 2)}, or a larger data.image_size")
    need(0 <= args["noise_augmentation"] <= 1, "noise_augmentation", "in [0, 1] (a fraction of T)")
    need(0 <= args["noise_augmentation_max"] <= 1, "noise_augmentation_max", "in [0, 1] (a fraction of T)")
    if args["noise_augmentation"] > args["noise_augmentation_max"]:
        raise UserError(
            f"model.noise_augmentation={args['noise_augmentation']} is above "
            f"model.noise_augmentation_max={args['noise_augmentation_max']}: sampling would use a "
            "level training never drew; lower the first or raise the second")
