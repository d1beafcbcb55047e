"""The GAN's networks: a DCGAN-style generator and a strided-conv (or timm-trunk)
discriminator with an optional projection head. Plain PyTorch, no Lightning."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from genframe.errors import UserError, did_you_mean
from genframe.files import load_state_dict_strict, read_state_dict
from genframe.layers import Upsample, downsampled_sizes, group_norm


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


class MinibatchStdDev(nn.Module):
    """Append one feature map: the standard deviation of each feature over a group of
    samples, averaged to one number per group (Karras et al. 2018, ProGAN,
    https://arxiv.org/abs/1710.10196, section 3). D then sees how varied a batch is, so a
    generator that draws near-identical images is easy to tell apart from real data.

    Args:
        group_size: samples per group; lowered to a divisor of the batch size.
    """

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C + 1, H, W)
        b, c, h, w = x.shape
        g = min(self.group_size, b)
        while b % g:
            g -= 1
        y = x.float().view(g, b // g, c, h, w)  # group members are strided, as in ProGAN
        # Written out rather than with Tensor.var, whose backward is ~6x slower here on CPU.
        y = y - y.mean(dim=0, keepdim=True)
        std = (y.square().mean(dim=0) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B/g,)
        # Sample i is in group i % (B/g): repeat the B/g values g times.
        std = std.repeat(g).view(b, 1, 1, 1).expand(b, 1, h, w)  # (B, 1, H, W)
        return torch.cat([x, std.to(x.dtype)], dim=1)


class Discriminator(nn.Module):
    """Strided-conv (or timm-trunk) discriminator with an optional projection head.

    Features phi(x): a 3x3 conv at full resolution then one stride-2 3x3 conv per further
    level (sizes rounded up, so any image size works), each followed by LeakyReLU(0.2),
    sum-pooled over space (as in SNGAN). `minibatch_std` appends a minibatch-standard-
    deviation map to the last level, followed by one more (1x1) conv (ProGAN). With
    `backbone` a timm model (``timm.create_model(name, pretrained=False, num_classes=0,
    in_chans=C)``) gives phi(x) instead; `backbone_weights` is a local file loaded
    strictly into it (see `timm_trunk`); `minibatch_std` then appends the statistic to
    the features the linear head sees. Logit: linear(phi) (+ <embed(y), phi> with
    labels, Miyato & Koyama 2018). Spectral norm (`spectral_norm`) covers the convs, the
    linear head and the embedding; it does not reach into a timm trunk.
    """

    def __init__(self, in_channels: int, image_size: int, channels: list[int], num_classes: int = 0,
                 spectral_norm: bool = True, minibatch_std: bool = False, backbone: str | None = None,
                 backbone_weights: str | None = None) -> None:
        super().__init__()
        self.vector_std: MinibatchStdDev | None = None
        if backbone:
            self.trunk = timm_trunk(backbone, in_channels, backbone_weights)
            feat_dim = int(self.trunk.num_features)
            self.pool = False
            if minibatch_std:  # the trunk's pooled features get the statistic instead
                self.vector_std = MinibatchStdDev()
        else:
            layers: list[nn.Module] = [
                _sn(nn.Conv2d(in_channels, channels[0], 3, padding=1), spectral_norm),
                nn.LeakyReLU(0.2),
            ]
            for c_in, c_out in zip(channels[:-1], channels[1:]):
                layers += [_sn(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), spectral_norm),
                           nn.LeakyReLU(0.2)]
            if minibatch_std:
                # ProGAN follows the statistic with a 3x3 conv; a 1x1 conv also lets every
                # feature use it, at a ninth of the cost (1.45x -> ~1.1x a plain D's step).
                layers += [MinibatchStdDev(),
                           _sn(nn.Conv2d(channels[-1] + 1, channels[-1], 1), spectral_norm),
                           nn.LeakyReLU(0.2)]
            self.trunk = nn.Sequential(*layers)
            feat_dim = channels[-1]
            self.pool = True
        self.head = _sn(nn.Linear(feat_dim + (self.vector_std is not None), 1), spectral_norm)
        self.embed = _sn(nn.Embedding(num_classes, feat_dim), spectral_norm) if num_classes else None

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, H, W), label: (B,) -> logits (B,)
        h = self.trunk(x)
        phi = h.sum(dim=(2, 3)) if self.pool else h  # (B, F)
        head_in = phi
        if self.vector_std is not None:
            head_in = self.vector_std(phi[:, :, None, None]).flatten(1)  # (B, F + 1)
        out = self.head(head_in).squeeze(1)  # (B,)
        if self.embed is not None:
            if label is None:
                raise UserError("this GAN is conditional (num_classes > 0) and needs batch['label']")
            out = out + (self.embed(label.long().view(-1)) * phi).sum(dim=1)
        return out


WEIGHTS_KEY = "model.d_backbone_weights"


def timm_trunk(name: str, in_channels: int, weights: str | Path | None) -> nn.Module:
    """A timm model without classifier (``num_classes=0``) taking `in_channels` images,
    never downloaded (``pretrained=False``); `weights` is a local file loaded strictly.

    The file is read by `genframe.files.read_state_dict` (safetensors, or a torch file
    without unpickling code) and loaded by `genframe.files.load_state_dict_strict`: its
    classifier head (timm's ``pretrained_cfg["classifier"]``) is dropped, every other key
    must fit, so a file for another architecture is refused with a `UserError`. A stem
    trained on another channel count (RGB weights, 1-channel digits) is adapted with
    ``timm.models.adapt_input_conv`` (summed for one channel, repeated and rescaled for
    more), as timm itself does for its pretrained weights.
    """
    import timm

    if not timm.is_model(name):
        raise UserError(
            f"model.d_backbone: '{name}' is not a timm model.{did_you_mean(name, timm.list_models())}"
        )
    trunk = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
    if weights:
        state = read_state_dict(weights, where=WEIGHTS_KEY)
        cfg = getattr(trunk, "pretrained_cfg", None) or {}
        state = _adapt_input_convs(trunk, state, cfg.get("first_conv"))
        classifier = cfg.get("classifier") or ()
        head = [f"{c}.{p}" for c in ((classifier,) if isinstance(classifier, str) else classifier)
                for p in ("weight", "bias")]
        load_state_dict_strict(
            trunk, state, where=WEIGHTS_KEY, ignore=head,
            what=f"timm model '{name}' (expected a state dict of that architecture in timm's layout)",
        )
    return trunk


def _adapt_input_convs(trunk: nn.Module, state: dict[str, torch.Tensor],
                       first_conv: str | tuple[str, ...] | list[str] | None
                       ) -> dict[str, torch.Tensor]:
    """`state` with its input conv weights adapted to the trunk's input channels."""
    from timm.models import adapt_input_conv

    names = (first_conv,) if isinstance(first_conv, str) else tuple(first_conv or ())
    state = dict(state)
    for conv_name in names:
        key = f"{conv_name}.weight"
        try:
            module = trunk.get_submodule(conv_name)
        except AttributeError:
            continue
        w = state.get(key)
        own = getattr(module, "weight", None)
        if w is None or own is None or w.ndim != 4 or own.ndim != 4:
            continue
        # Only the input-channel axis may differ; any other mismatch is another
        # architecture and is left to the strict loader to refuse.
        if w.shape[1] == own.shape[1] or w.shape[0] != own.shape[0] or w.shape[2:] != own.shape[2:]:
            continue
        try:
            state[key] = adapt_input_conv(int(own.shape[1]), w, base_chans=int(w.shape[1]))
        except (NotImplementedError, ValueError, AssertionError) as exc:
            raise UserError(
                f"{WEIGHTS_KEY}: cannot adapt {key} from {w.shape[1]} to {own.shape[1]} input "
                f"channels ({exc})"
            ) from exc
    return state
