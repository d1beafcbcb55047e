"""A generative adversarial network: DCGAN-style networks, BCE or hinge loss, cGAN.

Goodfellow et al. 2014 (https://arxiv.org/abs/1406.2661) with the DCGAN recipe of Radford
et al. 2016 (https://arxiv.org/abs/1511.06434): a generator G maps noise z ~ N(0, I) to an
image through upsampling convolutions with BatchNorm and a tanh output; a discriminator D
maps an image to a logit through strided convolutions with LeakyReLU; both are trained
with Adam(betas=(0.5, 0.999)) in alternating steps (Lightning manual optimisation):

- D step: real images vs generated ones (detached from G), the generator frozen;
- G step: fool D (non-saturating loss for ``bce``, -D(G(z)) for ``hinge``), D frozen.

Losses (``loss``): ``bce`` is the original objective with the non-saturating generator
loss, ``hinge`` the one of Lim & Ye 2017 / Miyato et al. 2018 (SNGAN). ``spectral_norm``
wraps every layer of the convolutional discriminator in spectral normalisation (Miyato et
al. 2018, https://arxiv.org/abs/1802.05957).

With ``num_classes > 0`` the model is a conditional GAN: the generator sees a learned label
embedding concatenated to z, and the discriminator is a projection discriminator (Miyato
& Koyama 2018, https://arxiv.org/abs/1802.05637): D(x, y) = psi(phi(x)) + <embed(y), phi(x)>.

The networks (`Generator`, `Discriminator`), the objective (`d_loss_fn`/`g_loss_fn`) and
the two optimisation steps (`d_step`, `g_step`) are separate pieces.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from numbers import Integral
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from genframe.errors import UserError, argument_check, did_you_mean, valid_list
from genframe.layers import Upsample, downsampled_sizes, group_norm
from genframe.module import GenerativeModule
from genframe.samples import Samples

log = logging.getLogger(__name__)

LOSSES = ("bce", "hinge")
G_NORMS = ("batch", "group")
SAMPLING_OPTIONS = ("truncation",)
MONITOR_SAMPLES = 64  # fixed-noise batch of the sample grid and the collapse check
MONITOR_SEED = 0
MAX_TRUNCATION_ROUNDS = 1000


# -- networks ---------------------------------------------------------------------------


class Generator(nn.Module):
    """DCGAN-style generator: z (+ label embedding) -> linear -> low-res map -> upsampling
    convs -> tanh image of any size.

    Args:
        out_channels: image channels.
        image_size: output side; any size (the levels follow `downsampled_sizes`, and each
            upsampling lands on the exact size of the level above, as in `ConvDecoder`).
        latent_dim: size of z.
        channels: widths per level, highest resolution first (each level after the first
            halves the spatial size, so the linear layer feeds the last, smallest level).
        num_classes: > 0 adds a label embedding (latent_dim wide) concatenated to z.
        norm: ``"batch"`` (DCGAN) or ``"group"`` (batch-size independent).
    """

    def __init__(self, out_channels: int, image_size: int, latent_dim: int, channels: list[int],
                 num_classes: int = 0, norm: str = "batch") -> None:
        super().__init__()
        self.sizes = downsampled_sizes(image_size, len(channels) - 1)
        self.in_shape = (channels[-1], *self.sizes[-1])
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        in_dim = latent_dim * (2 if num_classes else 1)
        make_norm = (lambda c: nn.BatchNorm2d(c)) if norm == "batch" else group_norm
        self.fc = nn.Linear(in_dim, math.prod(self.in_shape))
        self.norm_in = make_norm(channels[-1])
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        # Lowest level first: a conv block, then for each level above: upsample + conv block.
        self.blocks.append(nn.Sequential(
            nn.Conv2d(channels[-1], channels[-1], 3, padding=1), make_norm(channels[-1]), nn.ReLU(),
        ))
        for c_in, c_out in zip(channels[::-1][:-1], channels[::-1][1:]):
            self.ups.append(Upsample(c_in, c_out))
            self.blocks.append(nn.Sequential(
                make_norm(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1), make_norm(c_out), nn.ReLU(),
            ))
        self.head = nn.Conv2d(channels[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        # z: (B, D), label: (B,) -> (B, C, H, W) in [-1, 1]
        if self.embed is not None:
            if label is None:
                raise UserError("this GAN is conditional (num_classes > 0) and needs labels")
            z = torch.cat([z, self.embed(label.long().view(-1))], dim=1)  # (B, 2D)
        h = self.fc(z).view(z.shape[0], *self.in_shape)  # (B, C_last, h, w)
        h = F.relu(self.norm_in(h))
        h = self.blocks[0](h)
        for i, (up, block) in enumerate(zip(self.ups, self.blocks[1:])):
            h = block(up(h, self.sizes[len(self.sizes) - 2 - i]))
        return torch.tanh(self.head(h))


def _sn(module: nn.Module, enabled: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(module) if enabled else module


class Discriminator(nn.Module):
    """Strided-conv (or timm-trunk) discriminator with an optional projection head.

    Features phi(x): a 3x3 conv at full resolution then one stride-2 3x3 conv per further
    level (sizes rounded up, so any image size works), each followed by LeakyReLU(0.2),
    sum-pooled over space (as in SNGAN). With `backbone` a timm model
    (``timm.create_model(name, pretrained=False, num_classes=0, in_chans=C)``) gives
    phi(x) instead; `backbone_weights` is a local file (safetensors or a torch state dict)
    loaded into it. Logit: linear(phi) (+ <embed(y), phi> with labels, Miyato & Koyama 2018).
    Spectral norm (`spectral_norm`) covers the convs, the linear head and the embedding;
    it does not reach into a timm trunk.
    """

    def __init__(self, in_channels: int, image_size: int, channels: list[int], num_classes: int = 0,
                 spectral_norm: bool = True, backbone: str | None = None,
                 backbone_weights: str | None = None) -> None:
        super().__init__()
        if backbone:
            self.trunk = _timm_trunk(backbone, in_channels, backbone_weights)
            feat_dim = int(self.trunk.num_features)
            self.pool = False
        else:
            layers: list[nn.Module] = [
                _sn(nn.Conv2d(in_channels, channels[0], 3, padding=1), spectral_norm),
                nn.LeakyReLU(0.2),
            ]
            for c_in, c_out in zip(channels[:-1], channels[1:]):
                layers += [_sn(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), spectral_norm),
                           nn.LeakyReLU(0.2)]
            self.trunk = nn.Sequential(*layers)
            feat_dim = channels[-1]
            self.pool = True
        self.head = _sn(nn.Linear(feat_dim, 1), spectral_norm)
        self.embed = _sn(nn.Embedding(num_classes, feat_dim), spectral_norm) if num_classes else None

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, H, W), label: (B,) -> logits (B,)
        h = self.trunk(x)
        phi = h.sum(dim=(2, 3)) if self.pool else h  # (B, F)
        out = self.head(phi).squeeze(1)  # (B,)
        if self.embed is not None:
            if label is None:
                raise UserError("this GAN is conditional (num_classes > 0) and needs batch['label']")
            out = out + (self.embed(label.long().view(-1)) * phi).sum(dim=1)
        return out


def _timm_trunk(name: str, in_channels: int, weights: str | None) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise UserError(
            f"model.d_backbone: '{name}' is not a timm model.{did_you_mean(name, timm.list_models())}"
        )
    trunk = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"model.d_backbone_weights: no such file: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        own = trunk.state_dict()
        # Drop a classifier head and anything that does not fit (e.g. a 3-channel stem).
        state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not state:
            raise UserError(
                f"model.d_backbone_weights: {path} holds no weights that fit the timm model '{name}'"
            )
        trunk.load_state_dict(state, strict=False)
    return trunk


# -- objective --------------------------------------------------------------------------


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


def mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance between distinct rows of x (N, ...) flattened."""
    flat = x.flatten(1).float()
    n = flat.shape[0]
    if n < 2:
        return torch.zeros((), device=x.device)
    d = torch.cdist(flat, flat)  # (N, N)
    return d.sum() / (n * (n - 1))


# -- the model --------------------------------------------------------------------------


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
        d_backbone: a timm model name to use as the discriminator's feature trunk instead
            of the strided convs (created with ``pretrained=False``); None = convs.
        d_backbone_weights: a local weights file for `d_backbone` (never downloaded).
        lr_g: Adam learning rate of the generator (betas (0.5, 0.999)).
        lr_d: Adam learning rate of the discriminator (betas (0.5, 0.999)).
        d_steps_per_g_step: discriminator steps (one per batch) per generator step.
        sample_every_n_epochs: save ``samples/epoch_XXX.png`` (a grid from a fixed noise
            batch) in the run directory every N validation epochs; 0 = never.
        collapse_threshold: warn of mode collapse when the mean pairwise distance of
            fixed-noise samples falls below this fraction of that of real images.

    Logs ``train/loss`` (= ``train/g_loss``), ``train/d_loss``, ``train/d_acc_real``,
    ``train/d_acc_fake``; ``val/loss`` (the generator loss against the current
    discriminator on fixed noise: a *relative* number, since D changes, not a measure of
    quality to compare across runs), ``val/d_loss``, ``val/d_acc_real``, ``val/d_acc_fake``
    and ``val/diversity`` (sample / real mean pairwise distance).
    """

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
        d_backbone: str | None = None,
        d_backbone_weights: str | None = None,
        lr_g: float = 2e-4,
        lr_d: float = 2e-4,
        d_steps_per_g_step: int = 1,
        sample_every_n_epochs: int = 5,
        collapse_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        g_channels = [int(c) for c in g_channels]
        d_channels = [int(c) for c in d_channels]
        _validate(locals())
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.loss_kind = loss
        self.set_class_conditional(num_classes)

        self.generator = Generator(in_channels, image_size, latent_dim, g_channels,
                                   num_classes=num_classes, norm=g_norm)
        self.discriminator = Discriminator(
            in_channels, image_size, d_channels, num_classes=num_classes,
            spectral_norm=spectral_norm, backbone=d_backbone, backbone_weights=d_backbone_weights,
        )
        self._standalone_opts: list[torch.optim.Optimizer] | None = None
        self._val_real: torch.Tensor | None = None

    # -- networks -----------------------------------------------------------------------

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Generator output for noise z (B, latent_dim): (B, C, H, W) in [-1, 1]."""
        return self.generator(z, label)

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
        betas = (0.5, 0.999)  # DCGAN
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr_g, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr_d, betas=betas)
        return [opt_g, opt_d]

    def _opts(self) -> tuple[Any, Any]:
        """(opt_g, opt_d): the Trainer's, or our own when stepping outside a Trainer."""
        if self._trainer is not None:
            opt_g, opt_d = self.optimizers()
            return opt_g, opt_d
        if self._standalone_opts is None:
            self._standalone_opts = self.configure_optimizers()
        return tuple(self._standalone_opts)  # type: ignore[return-value]

    @contextmanager
    def _training_only(self, opt: Any, net: nn.Module):
        """Gradients flow only into `net` (the parameters of `opt`) inside the block."""
        if self._trainer is not None:
            self.toggle_optimizer(opt)
            try:
                yield
            finally:
                self.untoggle_optimizer(opt)
            return
        own = {id(p) for p in net.parameters()}
        saved = {p: p.requires_grad for p in self.parameters()}
        for p in self.parameters():
            if id(p) not in own:
                p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in saved.items():
                p.requires_grad_(flag)

    def _backward(self, loss: torch.Tensor) -> None:
        if self._trainer is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    def d_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One discriminator update on real images vs generated ones (G frozen)."""
        _, opt_d = self._opts()
        x, label = self._batch(batch)
        with self._training_only(opt_d, self.discriminator):
            with torch.no_grad():
                fake = self.generator(self._noise(x.shape[0]), label)
            real_logits = self.discriminator(x, label)
            fake_logits = self.discriminator(fake.detach(), label)
            d_loss = d_loss_fn(self.loss_kind, real_logits, fake_logits)
            opt_d.zero_grad(set_to_none=True)
            self._backward(d_loss)
            opt_d.step()
        return {
            "d_loss": d_loss.detach(),
            "d_acc_real": (real_logits.detach() > 0).float().mean(),
            "d_acc_fake": (fake_logits.detach() < 0).float().mean(),
        }

    def g_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """One generator update to fool the discriminator (D frozen); returns the G loss."""
        opt_g, _ = self._opts()
        x, label = self._batch(batch)
        with self._training_only(opt_g, self.generator):
            fake = self.generator(self._noise(x.shape[0]), label)
            g_loss = g_loss_fn(self.loss_kind, self.discriminator(fake, label))
            opt_g.zero_grad(set_to_none=True)
            self._backward(g_loss)
            opt_g.step()
        return g_loss.detach()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """A D step on every batch and a G step every `d_steps_per_g_step` batches.

        Returns the generator loss (the discriminator loss on batches without a G step) so
        genframe's FiniteLossGuard stops a diverged run; outside a Trainer (plain calls, as
        in the contract check) it returns None: both steps have already been taken.
        """
        n = batch["image"].shape[0]
        d = self.d_step(batch)
        kw = dict(on_step=True, on_epoch=True, batch_size=n)
        self.log("train/d_loss", d["d_loss"], prog_bar=True, **kw)
        self.log("train/d_acc_real", d["d_acc_real"], **kw)
        self.log("train/d_acc_fake", d["d_acc_fake"], **kw)
        out = d["d_loss"]
        if (batch_idx + 1) % self.hparams.d_steps_per_g_step == 0:
            g_loss = self.g_step(batch)
            self.log("train/g_loss", g_loss, **kw)
            self.log("train/loss", g_loss, prog_bar=True, **kw)
            out = g_loss
        return out if self._trainer is not None else None

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
        if self._trainer is None or self.trainer.sanity_checking:
            return
        samples = self.generate(MONITOR_SAMPLES, seed=MONITOR_SEED)
        images = samples.images.to(self.device)  # (N, C, H, W) in [0, 1]
        if self._val_real is not None and len(self._val_real) >= 2:
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
        every = self.hparams.sample_every_n_epochs
        if every and (self.current_epoch + 1) % every == 0 and self.trainer.is_global_zero:
            path = self.save_sample_grid(samples, Path(self.trainer.default_root_dir))
            log.info("epoch %d: fixed-noise sample grid saved to %s", self.current_epoch, path)

    def save_sample_grid(self, samples: Samples, root: Path) -> Path:
        """Write `samples` as ``root/samples/epoch_XXX.png``; returns the path."""
        from PIL import Image
        from torchvision.utils import make_grid

        folder = root / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        x = samples.images.detach().float().clamp(0, 1).cpu()
        grid = make_grid(x, nrow=max(1, math.ceil(math.sqrt(len(x)))), padding=1, pad_value=1.0)
        arr = (grid * 255).round().byte()
        img = Image.fromarray(arr[0].numpy(), mode="L") if self.in_channels == 1 else (
            Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB"))
        scale = max(1, 256 // max(img.size))
        if scale > 1:
            img = img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST)
        path = folder / f"epoch_{self.current_epoch:03d}.png"
        tmp = path.with_suffix(".png.tmp")
        img.save(tmp, format="PNG")
        tmp.replace(path)
        return path

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

    def generate(
        self,
        num_samples: int,
        *,
        condition: dict[str, Any] | None = None,
        seed: int | None = None,
        truncation: float | None = None,
        **sampling: Any,
    ) -> Samples:
        """Generate `num_samples` images with the generator (in eval mode).

        Args:
            num_samples: how many images.
            condition: ``{"label": k}`` (or a list of N labels) for a conditional model;
                without it a conditional model cycles through the classes.
            seed: the same seed gives the same images.
            truncation: redraw noise entries with |z| > truncation (> 0): less varied,
                more typical samples. None: plain N(0, I).
        """
        self.check_sampling(sampling, SAMPLING_OPTIONS)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise UserError(f"num_samples must be a positive integer, got {num_samples!r}")
        if truncation is not None and (
            isinstance(truncation, bool) or not isinstance(truncation, (int, float))
            or not math.isfinite(truncation) or truncation <= 0
        ):
            raise UserError(f"truncation must be a number > 0 (or null for none), got {truncation!r}")
        condition = self.check_condition(condition)
        labels, conditions = self.labels_for(num_samples, condition, self.num_classes)
        gen, seed = self.make_generator(seed)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                z = self.sample_noise(num_samples, gen, None if truncation is None else float(truncation))
                x = self.generator(z, labels)  # (N, C, H, W) in [-1, 1]
        finally:
            self.train(was_training)
        images = ((x.float() + 1) / 2).clamp(0, 1)
        metadata = {"model": "gan", "seed": seed,
                    "truncation": None if truncation is None else float(truncation)}
        return Samples(images=images.cpu(), conditions=conditions, metadata=metadata)


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
    need(args["d_backbone"] is None or (isinstance(args["d_backbone"], str) and args["d_backbone"]),
         "d_backbone", "a timm model name or null")
    if args["d_backbone_weights"] is not None and not args["d_backbone"]:
        raise UserError("model.d_backbone_weights is set but model.d_backbone is null; "
                        "name the timm model the weights belong to")
    for key in ("lr_g", "lr_d"):
        need(is_num(args[key]) and args[key] > 0, key, "a number > 0")
    need(is_int(args["d_steps_per_g_step"]) and args["d_steps_per_g_step"] >= 1,
         "d_steps_per_g_step", "an integer >= 1")
    need(is_int(args["sample_every_n_epochs"]) and args["sample_every_n_epochs"] >= 0,
         "sample_every_n_epochs", "an integer >= 0 (0 = never)")
    need(is_num(args["collapse_threshold"]) and 0 <= args["collapse_threshold"] < 1,
         "collapse_threshold", "in [0, 1) (0 = never warn)")
