"""Convolutional building blocks shared by genframe's image models.

The pieces follow the residual U-Net/VAE blocks of DDPM (Ho et al. 2020) and the Stable
Diffusion autoencoder: GroupNorm -> SiLU -> conv, with a 1x1 skip when the width changes.
`ConvEncoder` and `ConvDecoder` stack them into trunks from a list of channel widths and
work for any image size: every stride-2 step rounds the size up (ceil), and the decoder
upsamples to the exact size recorded on the way down, so 8x8 digits, odd sizes and
non-square images all come back at the size they went in.

This module is part of the core: it never imports a plugin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

Size2d = tuple[int, int]


def as_size2d(size: int | Sequence[int]) -> Size2d:
    """`8` -> `(8, 8)`; `(h, w)` stays `(h, w)`."""
    if isinstance(size, int):
        h = w = size
    else:
        h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {(h, w)}")
    return h, w


def downsampled_sizes(size: int | Sequence[int], num_downsamples: int) -> list[Size2d]:
    """Spatial sizes seen by a trunk that halves the size `num_downsamples` times.

    Each stride-2 step (3x3 kernel, padding 1) maps a side n to ceil(n / 2), so odd sides
    are never dropped: ``downsampled_sizes(7, 2) == [(7, 7), (4, 4), (2, 2)]``.
    """
    h, w = as_size2d(size)
    sizes = [(h, w)]
    for _ in range(num_downsamples):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes.append((h, w))
    return sizes


def norm_groups(channels: int, max_groups: int = 32, min_group_channels: int = 4) -> int:
    """A GroupNorm group count that divides `channels`.

    32 groups as in Wu & He (2018) for wide layers; narrow layers (the tiny presets) get
    fewer groups so each group still normalises over a few channels, not over one.
    """
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0 and channels // groups >= min(min_group_channels, channels):
            return groups
    return 1


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm -> SiLU -> conv3x3) twice, plus a skip.

    Args:
        in_channels: width of the input.
        out_channels: width of the output (default: unchanged); a 1x1 conv maps the skip
            path when it differs.
        emb_dim: if set, ``forward(x, emb)`` adds a projection of the embedding ``emb``
            (B, emb_dim) between the two convs, as DDPM does with the timestep embedding.
        dropout: dropout before the second conv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        emb_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels) if emb_dim else None
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Zero-init the last conv so each block starts as the identity (ADM, Dhariwal &
        # Nichol 2021): deep stacks then train as stably as shallow ones.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C_in, H, W), emb: (B, E) or None
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.emb_proj is not None:
            if emb is None:
                raise ValueError("this ResBlock was built with emb_dim and needs emb")
            h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h  # (B, C_out, H, W)


class Downsample(nn.Module):
    """Halve the spatial size with a stride-2 3x3 conv.

    (B, C_in, H, W) -> (B, C_out, ceil(H/2), ceil(W/2)).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        # A learned strided conv rather than pooling: it can also change the width, and
        # padding 1 makes odd sides round up instead of losing a row.
        self.conv = nn.Conv2d(in_channels, out_channels or in_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling followed by a 3x3 conv.

    Nearest + conv avoids the checkerboard artefacts of transposed convolutions
    (Odena et al. 2016, https://distill.pub/2016/deconv-checkerboard/). Pass `size` to
    ``forward`` to land on an exact size (e.g. 7 rather than 8 after 4 -> x2); without
    it the size doubles.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels or in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Size2d | None = None) -> torch.Tensor:
        # x: (B, C_in, h, w) -> (B, C_out, H, W) with (H, W) = size or (2h, 2w)
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


def _check_widths(block_out_channels: Sequence[int]) -> list[int]:
    widths = [int(c) for c in block_out_channels]
    if not widths or any(c < 1 for c in widths):
        raise ValueError(f"block_out_channels must be a non-empty list of positive widths, got {block_out_channels}")
    return widths


class ConvEncoder(nn.Module):
    """A convolutional trunk from images to a low-resolution feature map.

    Level ``i`` runs `blocks_per_level` ResBlocks at width ``block_out_channels[i]``; between levels
    a stride-2 conv halves the size (rounding up) and moves to the next width. The output
    is normalised and activated, ready for a linear or conv head.

    Args:
        in_channels: image channels.
        block_out_channels: width of each level, highest resolution first, e.g. ``[32, 64]``.
        image_size: input side (int) or ``(H, W)``.
        blocks_per_level: ResBlocks per level (0 gives a plain strided conv net).
        emb_dim: embedding width passed to every ResBlock (see `ResBlock`), or None.
        dropout: dropout inside the ResBlocks.

    Attributes:
        sizes: the spatial size at each level, ``sizes[-1]`` being the output's.
        out_channels: ``block_out_channels[-1]``.
        out_shape: ``(block_out_channels[-1], H_out, W_out)``.
    """

    def __init__(
        self,
        in_channels: int,
        block_out_channels: Sequence[int],
        image_size: int | Sequence[int],
        *,
        blocks_per_level: int = 1,
        emb_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = _check_widths(block_out_channels)
        self.sizes = downsampled_sizes(image_size, len(widths) - 1)
        self.out_channels = widths[-1]
        self.out_shape = (widths[-1], *self.sizes[-1])

        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i, width in enumerate(widths):
            level = nn.ModuleList(
                ResBlock(width, emb_dim=emb_dim, dropout=dropout) for _ in range(blocks_per_level)
            )
            if i + 1 < len(widths):
                level.append(Downsample(width, widths[i + 1]))
            self.levels.append(level)
        self.norm_out = group_norm(widths[-1])

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C_img, H, W) -> (B, block_out_channels[-1], H_out, W_out)
        h = self.stem(x)  # (B, block_out_channels[0], H, W)
        for level in self.levels:
            for layer in level:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return F.silu(self.norm_out(h))


class ConvDecoder(nn.Module):
    """The mirror of `ConvEncoder`: a low-resolution feature map back to full-size outputs.

    Takes ``(B, block_out_channels[-1], *sizes[-1])`` and walks the levels from the lowest
    resolution up, upsampling to the exact size recorded on the way down, so the output is
    always ``(B, out_channels, H, W)`` for the `image_size` given, odd sizes included.

    Args:
        out_channels: output channels per pixel (e.g. 2*C for a mean and a log-scale).
        block_out_channels: the same list of widths as the matching encoder, highest resolution
            first.
        image_size: output side (int) or ``(H, W)``.
        blocks_per_level: ResBlocks per level.
        emb_dim: embedding width passed to every ResBlock, or None.
        dropout: dropout inside the ResBlocks.

    Attributes:
        sizes: the spatial size at each level (``sizes[0]`` is the image size).
        in_shape: the feature-map shape the decoder expects, ``(block_out_channels[-1], h, w)``.
    """

    def __init__(
        self,
        out_channels: int,
        block_out_channels: Sequence[int],
        image_size: int | Sequence[int],
        *,
        blocks_per_level: int = 1,
        emb_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        widths = _check_widths(block_out_channels)
        self.sizes = downsampled_sizes(image_size, len(widths) - 1)
        self.in_shape = (widths[-1], *self.sizes[-1])

        # Built lowest resolution first, in the order forward() visits them.
        self.levels = nn.ModuleList()
        for i in reversed(range(len(widths))):
            level = nn.ModuleList(
                ResBlock(widths[i], emb_dim=emb_dim, dropout=dropout)
                for _ in range(blocks_per_level)
            )
            if i > 0:
                level.append(Upsample(widths[i], widths[i - 1]))
            self.levels.append(level)
        self.norm_out = group_norm(widths[0])
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        # h: (B, block_out_channels[-1], h, w) -> (B, out_channels, H, W)
        level_index = len(self.sizes) - 1
        for level in self.levels:
            for layer in level:
                if isinstance(layer, Upsample):
                    level_index -= 1
                    h = layer(h, self.sizes[level_index])  # exact size of the level above
                else:
                    h = layer(h, emb)
        return self.head(F.silu(self.norm_out(h)))
