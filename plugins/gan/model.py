"""A generative adversarial network: DCGAN-style networks, BCE or hinge loss, cGAN.

Goodfellow et al. 2014 (https://arxiv.org/abs/1406.2661) with the DCGAN recipe of Radford
et al. 2016 (https://arxiv.org/abs/1511.06434): a generator G maps noise z ~ N(0, I) to an
image through upsampling convolutions with BatchNorm and a tanh output; a discriminator D
maps an image to a logit through strided convolutions with LeakyReLU; both are trained
with Adam in alternating steps (Lightning manual optimisation, two optimisers):

- D step: real images vs generated ones (detached from G), only D's parameters toggled;
- G step: fool D (non-saturating loss for ``bce``, -D(G(z)) for ``hinge``), only G's.

Losses (``loss``): ``bce`` is the original objective with the non-saturating generator
loss, ``hinge`` the one of Lim & Ye 2017 / Miyato et al. 2018 (SNGAN). ``spectral_norm``
wraps every layer of the convolutional discriminator in spectral normalisation (Miyato et
al. 2018, https://arxiv.org/abs/1802.05957).

With ``num_classes > 0`` the model is a conditional GAN: the generator sees a learned label
embedding concatenated to z, and the discriminator is a projection discriminator (Miyato
& Koyama 2018, https://arxiv.org/abs/1802.05637): D(x, y) = psi(phi(x)) + <embed(y), phi(x)>.

Against mode collapse (a generator that covers only part of the data):
``mode_seeking`` (MSGAN's term, Mao et al. 2019: two noise vectors for the same label
must give different images), ``d_minibatch_std`` (a minibatch standard-deviation map in
D, Karras et al. 2018), ``r1_gamma`` (the R1 gradient penalty on real images, Mescheder
et al. 2018), ``augment`` (DiffAugment, Zhao et al. 2020) and ``ema_decay`` (images drawn
from an exponential moving average of G's weights, Yazıcı et al. 2019). The first two and
the EMA are on by default: on digits (``experiment=digits_gan``) they take recall from
0.00 to about 0.6 at a class accuracy of about 0.96, for ~5% more training time; R1 and
DiffAugment are off (on digits they cost class accuracy or time, for no more recall).

The pieces live apart: the networks in `network.py`, the objective in `losses.py`, the
augmentation in `augment.py`; this file holds the LightningModule (the two optimisation
steps, validation, generation). Fixed-noise sample grids are written during training by
the generic `genframe.callbacks.SampleGrid`, which the model adds itself
(`configure_callbacks`) when ``sample_every_n_epochs > 0``.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from numbers import Integral
from typing import Any, Literal

import torch
import torch.nn as nn

from genframe.errors import UserError, argument_check, did_you_mean, valid_list
from genframe.exporters import ExportGraph, latent_decoder_graph
from genframe.module import GenerativeModule
from genframe.optim import implementation
from genframe.samples import Samples
from genframe_plugins.gan.augment import AUGMENTS, diff_augment
from genframe_plugins.gan.losses import (
    LOSSES,
    d_loss_fn,
    g_loss_fn,
    mean_pairwise_distance,
    mode_seeking_ratio,
    r1_penalty,
)
from genframe_plugins.gan.network import Discriminator, Generator

__all__ = ["GAN", "Generator", "Discriminator", "d_loss_fn", "g_loss_fn"]

log = logging.getLogger(__name__)

G_NORMS = ("batch", "group")
MONITOR_SAMPLES = 64  # fixed-noise batch of the sample grid and the collapse check
MONITOR_SEED = 0
MAX_TRUNCATION_ROUNDS = 1000


class GAN(GenerativeModule):
    """DCGAN-style GAN on images in [-1, 1], optionally class-conditional.

    Args:
        in_channels: image channels (``data.channels``).
        image_size: image side in pixels (``data.image_size``); any size, odd included.
        num_classes: 0 for an unconditional GAN; K > 0: a conditional GAN (label
            embedding in G, projection discriminator) that reads ``batch["label"]`` and
            generates with ``condition={"label": k}``.
        latent_dim: size of the noise vector z.
        g_channels: generator widths per level, highest resolution first; each level after
            the first halves the spatial size (the linear layer feeds the smallest level).
        d_channels: discriminator widths per level, highest resolution first.
        g_norm: ``"batch"`` (BatchNorm, DCGAN) or ``"group"`` (GroupNorm) in the generator.
        loss: ``"bce"`` (non-saturating) or ``"hinge"``.
        spectral_norm: spectral normalisation on the discriminator's layers.
        d_minibatch_std: a minibatch standard-deviation map before D's last conv (with
            `d_backbone`: one more feature for D's linear head).
        r1_gamma: weight of the R1 penalty gamma / 2 * E||grad D(x_real)||^2 in D's
            loss; 0 = none.
        augment: DiffAugment transforms applied to every image D sees, any of
            ``color``, ``translation``, ``cutout``; empty = none.
        ema_decay: generate with an exponential moving average of G's weights with this
            decay (warmed up as min(decay, (1 + t) / (10 + t)) over G steps t); 0 = the
            trained G itself.
        mode_seeking: weight lambda of the mode-seeking term lambda / (ratio + 1e-5) in
            G's loss, ratio = image distance / noise distance of pairs drawn for the same
            label (MSGAN); 0 = none.
        d_backbone: a timm model name to use as the discriminator's feature trunk instead
            of the strided convs (created with ``pretrained=False``); None = convs.
        d_backbone_weights: a local weights file for `d_backbone` (never downloaded),
            loaded strictly; an RGB stem is adapted to the data's channels.
        lr_g: Adam learning rate of the generator.
        lr_d: Adam learning rate of the discriminator.
        betas: Adam's (beta1, beta2) for both networks; DCGAN uses (0.5, 0.999).
        d_steps_per_g_step: discriminator steps (one per batch) per generator step.
        sample_every_n_epochs: write a fixed-noise sample grid (PNGs, ``grid.png``,
            ``manifest.jsonl``) to ``samples/epoch_XXX/`` of the run directory every N
            training epochs (`genframe.callbacks.SampleGrid`); 0 = never.
        collapse_threshold: warn of mode collapse when the mean pairwise distance of
            fixed-noise samples falls below this fraction of that of real images.

    Logs ``train/loss`` (= ``train/g_loss``), ``train/d_loss``, ``train/d_acc_real``,
    ``train/d_acc_fake`` (and ``train/r1``, ``train/mode_seeking`` when those are on);
    ``val/loss`` (the generator loss against the current discriminator on fixed noise: a
    *relative* number, since D changes, not a measure of quality to compare across runs),
    ``val/d_loss``, ``val/d_acc_real``, ``val/d_acc_fake`` and ``val/diversity`` (sample /
    real mean pairwise distance).
    """

    learning_rate_keys = ("lr_g", "lr_d")  # what finetune.lr sets
    ddp_find_unused_parameters = True  # a D step leaves the generator out of its loss
    # Runs saved before these options existed trained without them.
    added_arguments = {"d_minibatch_std": False, "r1_gamma": 0.0, "augment": [],
                       "ema_decay": 0.0, "mode_seeking": 0.0}

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 0,
        latent_dim: int = 32,
        g_channels: list[int] = (64, 128),  # type: ignore[assignment]  # immutable default
        d_channels: list[int] = (64, 128),  # type: ignore[assignment]
        g_norm: Literal["batch", "group"] = "batch",
        loss: Literal["bce", "hinge"] = "bce",
        spectral_norm: bool = True,
        d_minibatch_std: bool = True,
        r1_gamma: float = 0.0,
        augment: list[str] = (),  # type: ignore[assignment]
        ema_decay: float = 0.999,
        mode_seeking: float = 0.01,
        d_backbone: str | None = None,
        d_backbone_weights: str | None = None,
        lr_g: float = 2e-4,
        lr_d: float = 2e-4,
        betas: list[float] = (0.5, 0.999),  # type: ignore[assignment]
        d_steps_per_g_step: int = 1,
        sample_every_n_epochs: int = 5,
        collapse_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        g_channels = [int(c) for c in g_channels]
        d_channels = [int(c) for c in d_channels]
        augment = augment if isinstance(augment, str) else list(augment)
        betas = betas if isinstance(betas, str) else list(betas)
        _validate(locals())
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.loss_kind = loss
        self.augment = augment
        self.set_class_conditional(num_classes)

        self.generator = Generator(in_channels, image_size, latent_dim, g_channels,
                                   num_classes=num_classes, norm=g_norm)
        self.discriminator = Discriminator(
            in_channels, image_size, d_channels, num_classes=num_classes,
            spectral_norm=spectral_norm, minibatch_std=d_minibatch_std,
            backbone=d_backbone, backbone_weights=d_backbone_weights,
        )
        # The averaged generator is a buffer-like copy: in the state dict (so checkpoints
        # and weights files keep it), never optimised.
        self.generator_ema: Generator | None = None
        if ema_decay > 0:
            self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        self._g_steps = 0
        self._val_real: torch.Tensor | None = None

    # -- networks -----------------------------------------------------------------------

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Generator output for noise z (B, latent_dim): (B, C, H, W) in [-1, 1]."""
        return self.generator(z, label)

    @property
    def sampling_generator(self) -> nn.Module:
        """The generator `generate()` draws from: the EMA copy when there is one."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    def discriminate(self, x: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        """D's logits (B,) for images x (B, C, H, W), after the DiffAugment transforms in
        training (the same policy for real and generated images, as the paper requires)."""
        if self.augment and self.training:
            x = diff_augment(x, self.augment)
        return self.discriminator(x, label)

    def _batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = batch["image"]
        if not self.num_classes:
            return x, None
        if batch.get("label") is None:
            raise UserError("this GAN is conditional (num_classes > 0) and needs batch['label']")
        return x, batch["label"].long().view(-1)

    def _noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=self.device, generator=generator)

    # -- optimisation -------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        betas = tuple(self.hparams.betas)
        g, d = list(self.generator.parameters()), list(self.discriminator.parameters())
        opt_g = torch.optim.Adam(g, lr=self.hparams.lr_g, betas=betas, **implementation(g))
        opt_d = torch.optim.Adam(d, lr=self.hparams.lr_d, betas=betas, **implementation(d))
        return [opt_g, opt_d]

    def configure_callbacks(self) -> list[Any]:
        """The fixed-noise sample grid, every `sample_every_n_epochs` training epochs,
        unless the trainer already has a `SampleGrid` (one from the callbacks config wins;
        and a `validate` after `fit` finds the one attached for the fit)."""
        every = self.hparams.sample_every_n_epochs
        if not every:
            return []
        from genframe.callbacks import SampleGrid

        trainer = self._trainer
        if trainer is not None and any(isinstance(c, SampleGrid) for c in trainer.callbacks):
            return []
        return [SampleGrid(every, num_samples=MONITOR_SAMPLES, seed=MONITOR_SEED)]

    def d_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One discriminator update on real images vs generated ones; only D's parameters
        are toggled for gradients (Lightning's `toggled_optimizer`)."""
        _, opt_d = self.optimizers()
        x, label = self._batch(batch)
        with self.toggled_optimizer(opt_d):
            with torch.no_grad():
                fake = self.generator(self._noise(x.shape[0]), label)
            real_logits = self.discriminate(x, label)
            fake_logits = self.discriminate(fake, label)
            d_loss = d_loss_fn(self.loss_kind, real_logits, fake_logits)
            loss = d_loss
            out = {"d_loss": d_loss.detach()}
            if self.hparams.r1_gamma > 0:
                r1 = r1_penalty(lambda t: self.discriminate(t, label), x)
                loss = loss + self.hparams.r1_gamma / 2 * r1
                out["r1"] = r1.detach()
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt_d.step()
        out["d_acc_real"] = (real_logits.detach() > 0).float().mean()
        out["d_acc_fake"] = (fake_logits.detach() < 0).float().mean()
        return out

    def g_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One generator update to fool the discriminator (only G's parameters toggled);
        returns the G loss (and the mode-seeking ratio)."""
        opt_g, _ = self.optimizers()
        x, label = self._batch(batch)
        n = x.shape[0]
        out = {}
        with self.toggled_optimizer(opt_g):
            if self.hparams.mode_seeking > 0 and n >= 2:
                # Pairs share their condition: the batch's first half of labels, twice.
                half = n // 2
                label = None if label is None else label[:half].repeat(2)
                n = 2 * half
            z = self._noise(n)
            fake = self.generator(z, label)
            g_loss = g_loss_fn(self.loss_kind, self.discriminate(fake, label))
            loss = g_loss
            if self.hparams.mode_seeking > 0 and n >= 2:
                ratio = mode_seeking_ratio(fake, z)
                loss = loss + self.hparams.mode_seeking / (ratio + 1e-5)
                out["mode_seeking"] = ratio.detach()
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            opt_g.step()
        self._g_steps += 1
        self._update_ema()
        out["g_loss"] = g_loss.detach()
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.generator_ema is None:
            return
        # Warm-up as in TensorFlow's ExponentialMovingAverage(num_updates): early averages
        # do not drag the random initial weights along for thousands of steps.
        t = self._g_steps
        decay = min(self.hparams.ema_decay, (1 + t) / (10 + t))
        for ema, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            ema.lerp_(p.detach(), 1 - decay)
        for ema, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            ema.copy_(b)  # BatchNorm statistics follow the trained generator

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gan_g_steps"] = self._g_steps  # the EMA warm-up goes on after a resume

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._g_steps = int(checkpoint.get("gan_g_steps", 0))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """A D step on every batch and a G step every `d_steps_per_g_step` batches.

        Returns the generator loss (the discriminator loss on batches without a G step) so
        genframe's FiniteLossGuard stops a diverged run.
        """
        n = batch["image"].shape[0]
        d = self.d_step(batch)
        kw = dict(on_step=True, on_epoch=True, batch_size=n)
        self.log("train/d_loss", d["d_loss"], prog_bar=True, **kw)
        self.log("train/d_acc_real", d["d_acc_real"], **kw)
        self.log("train/d_acc_fake", d["d_acc_fake"], **kw)
        if "r1" in d:
            self.log("train/r1", d["r1"], **kw)
        out = d["d_loss"]
        if (batch_idx + 1) % self.hparams.d_steps_per_g_step == 0:
            g = self.g_step(batch)
            self.log("train/g_loss", g["g_loss"], **kw)
            self.log("train/loss", g["g_loss"], prog_bar=True, **kw)
            if "mode_seeking" in g:
                self.log("train/mode_seeking", g["mode_seeking"], **kw)
            out = g["g_loss"]
        return out

    # -- validation and training health -------------------------------------------------

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, label = self._batch(batch)
        n = x.shape[0]
        # Fixed noise per batch: val/loss then moves with the weights, not the draw. It is
        # the G loss against the *current* D, so it is only a relative number.
        gen = torch.Generator(device=self.device).manual_seed(10_000 + batch_idx)
        fake = self.generator(self._noise(n, gen), label)
        real_logits = self.discriminator(x, label)
        fake_logits = self.discriminator(fake, label)
        g_loss = g_loss_fn(self.loss_kind, fake_logits)
        kw = dict(on_epoch=True, batch_size=n, sync_dist=True)
        self.log("val/loss", g_loss, prog_bar=True, **kw)
        self.log("val/d_loss", d_loss_fn(self.loss_kind, real_logits, fake_logits), **kw)
        self.log("val/d_acc_real", (real_logits > 0).float().mean(), **kw)
        self.log("val/d_acc_fake", (fake_logits < 0).float().mean(), **kw)
        if batch_idx == 0:
            self._val_real = x[:MONITOR_SAMPLES].detach()
        return g_loss

    def on_validation_epoch_end(self) -> None:
        """Log ``val/diversity`` of the fixed-noise batch (the one the sample grid shows)
        and warn of mode collapse when it falls below `collapse_threshold`."""
        if self._trainer is None or self.trainer.sanity_checking:
            return
        if self._val_real is None or len(self._val_real) < 2:
            return
        images = self.generate(MONITOR_SAMPLES, seed=MONITOR_SEED).images.to(self.device)  # [0, 1]
        real = (self._val_real.float() + 1) / 2
        ratio = float(mean_pairwise_distance(images) / mean_pairwise_distance(real).clamp_min(1e-8))
        self.log("val/diversity", ratio, sync_dist=True)
        if ratio < self.hparams.collapse_threshold:
            msg = (
                f"possible mode collapse: at epoch {self.current_epoch} samples from different "
                f"noise are near-identical (mean pairwise distance {ratio:.3f} of the real "
                f"images', below model.collapse_threshold={self.hparams.collapse_threshold})"
            )
            warnings.warn(msg, stacklevel=1)
            log.warning(msg)

    # -- generation ---------------------------------------------------------------------

    def sample_noise(self, n: int, generator: torch.Generator, truncation: float | None = None
                     ) -> torch.Tensor:
        """z ~ N(0, I), (n, latent_dim); with `truncation` t every entry with |z| > t is
        redrawn until it falls inside (the truncation trick, Brock et al. 2019)."""
        z = self._noise(n, generator)
        if truncation is None:
            return z
        for _ in range(MAX_TRUNCATION_ROUNDS):
            out = z.abs() > truncation
            if not out.any():
                break
            z = torch.where(out, self._noise(n, generator), z)
        return z.clamp(-truncation, truncation)  # only binds for absurdly small t

    def export_graphs(self) -> dict[str, ExportGraph]:
        """``generator``: latents (B, latent_dim) [and labels (B,)] -> images (B, C, H, W)
        in [0, 1], from the EMA generator when there is one (what ``generate`` draws)."""
        notes = {"latents": "draws from N(0, I) (truncated for the truncation trick)",
                 "images": "(B, C, H, W) in [0, 1]"}
        if self.num_classes:
            notes["labels"] = f"class ids 0..{self.num_classes - 1}"
        return {"generator": latent_decoder_graph(_UnitRange(self.sampling_generator), (self.latent_dim,),
                                                  num_classes=self.num_classes, notes=notes)}

    def sample(
        self,
        num_samples: int,
        *,
        condition: dict[str, Any],
        generator: torch.Generator,
        truncation: float | None = None,
    ) -> Samples:
        """Make `num_samples` images with the generator (the EMA generator when
        `ema_decay` > 0).

        Args:
            num_samples: how many images.
            condition: ``{"label": k}`` (or a list of N labels) for a conditional model;
                without it a conditional model cycles through the classes.
            generator: the seeded generator the noise is drawn from.
            truncation: redraw noise entries with |z| > truncation (> 0): less varied,
                more typical samples. None: plain N(0, I).
        """
        if truncation is not None and (not math.isfinite(truncation) or truncation <= 0):
            raise UserError(f"truncation must be a number > 0 (or null for none), got {truncation!r}")
        labels, conditions = self.labels_for(num_samples, condition, self.num_classes)
        z = self.sample_noise(num_samples, generator, None if truncation is None else float(truncation))
        x = self.sampling_generator(z, labels)  # (N, C, H, W) in [-1, 1]
        images = ((x.float() + 1) / 2).clamp(0, 1)
        metadata = {"truncation": None if truncation is None else float(truncation)}
        return Samples(images=images, conditions=conditions, metadata=metadata)


class _UnitRange(nn.Module):
    """The generator for export, its tanh output mapped from [-1, 1] to [0, 1]."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, latents: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return ((self.generator(latents, labels).float() + 1) / 2).clamp(0, 1)


def _validate(args: dict[str, Any]) -> None:
    """Refuse bad constructor values with a message naming the ``model.`` key."""

    need = argument_check(args)

    def is_int(v: Any) -> bool:
        return isinstance(v, Integral) and not isinstance(v, bool)

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    need(is_int(args["in_channels"]) and args["in_channels"] >= 1, "in_channels", "an integer >= 1")
    need(is_int(args["image_size"]) and args["image_size"] >= 1, "image_size", "an integer >= 1")
    need(is_int(args["num_classes"]) and args["num_classes"] >= 0, "num_classes",
         "0 (unconditional) or more")
    need(is_int(args["latent_dim"]) and args["latent_dim"] >= 1, "latent_dim", "an integer >= 1")
    for key in ("g_channels", "d_channels"):
        need(len(args[key]) >= 1 and all(c >= 1 for c in args[key]), key,
             "a non-empty list of positive widths")
    for key, allowed in (("loss", LOSSES), ("g_norm", G_NORMS)):
        if args[key] not in allowed:
            raise UserError(
                f"model.{key} must be one of {valid_list(allowed)}, got {args[key]!r}."
                f"{did_you_mean(str(args[key]), allowed)}"
            )
    need(isinstance(args["spectral_norm"], bool), "spectral_norm", "true or false")
    need(isinstance(args["d_minibatch_std"], bool), "d_minibatch_std", "true or false")
    need(is_num(args["r1_gamma"]) and args["r1_gamma"] >= 0, "r1_gamma", "a number >= 0 (0 = none)")
    need(isinstance(args["augment"], list), "augment",
         f"a list of transforms (any of {valid_list(AUGMENTS)}), e.g. [translation]; [] = none")
    for name in args["augment"]:
        if name not in AUGMENTS:
            raise UserError(
                f"model.augment: unknown transform {name!r}; expected a list of "
                f"{valid_list(AUGMENTS)}.{did_you_mean(str(name), AUGMENTS)}"
            )
    need(len(set(args["augment"])) == len(args["augment"]), "augment", "a list without repeats")
    need(is_num(args["ema_decay"]) and 0 <= args["ema_decay"] < 1, "ema_decay",
         "in [0, 1) (0 = no averaging)")
    need(is_num(args["mode_seeking"]) and args["mode_seeking"] >= 0, "mode_seeking",
         "a number >= 0 (0 = none)")
    need(args["d_backbone"] is None or (isinstance(args["d_backbone"], str) and args["d_backbone"]),
         "d_backbone", "a timm model name or null")
    if args["d_backbone_weights"] is not None and not args["d_backbone"]:
        raise UserError("model.d_backbone_weights is set but model.d_backbone is null; "
                        "name the timm model the weights belong to")
    for key in ("lr_g", "lr_d"):
        need(is_num(args[key]) and args[key] > 0, key, "a number > 0")
    betas = args["betas"]
    need(isinstance(betas, list) and len(betas) == 2 and all(is_num(b) and 0 <= b < 1 for b in betas),
         "betas", "two numbers in [0, 1), e.g. [0.5, 0.999]")
    need(is_int(args["d_steps_per_g_step"]) and args["d_steps_per_g_step"] >= 1,
         "d_steps_per_g_step", "an integer >= 1")
    need(is_int(args["sample_every_n_epochs"]) and args["sample_every_n_epochs"] >= 0,
         "sample_every_n_epochs", "an integer >= 0 (0 = never)")
    need(is_num(args["collapse_threshold"]) and 0 <= args["collapse_threshold"] < 1,
         "collapse_threshold", "in [0, 1) (0 = never warn)")
