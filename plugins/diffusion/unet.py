"""The noise-prediction U-Net of DDPM / ADM, for any image size.

Ho et al. 2020 (https://arxiv.org/abs/2006.11239, appendix B) with the ADM refinements of
Dhariwal & Nichol 2021 (https://arxiv.org/abs/2105.05233): residual blocks that take a
timestep (and class) embedding, self-attention at chosen resolutions and in the middle,
skip connections from every block of the way down to the way up, and zero-initialised
output layers so the network starts as a near-identity on each residual path.

Level ``i`` runs at width ``block_out_channels[i]`` and spatial size ``sizes[i]``; each level after
the first halves the size, rounding up (`genframe.layers.downsampled_sizes`), and the way
up returns to the exact sizes recorded on the way down, so 8x8 digits and odd or
non-square sizes all work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from genframe.layers import (
    Downsample,
    ResBlock,
    SelfAttention2d,
    SpatialTransformer,
    Upsample,
    downsampled_sizes,
    group_norm,
    timestep_embedding,
)


def level_sides(image_size: int | Sequence[int], num_levels: int) -> list[int]:
    """The side each level is known by in ``attention_resolutions``: max(H, W) of its size."""
    return [max(s) for s in downsampled_sizes(image_size, num_levels - 1)]


class UNet(nn.Module):
    """Predicts the noise (or v) in x_t, given x_t, the timestep and optionally a label.

    Args:
        in_channels: input channels (the image's, plus any concatenated conditioning).
        out_channels: output channels; None (the default) means as many as `in_channels`.
            A net that also reads conditioning channels (an upscaler's low-resolution
            image, SR3) predicts only the image's: ``in_channels=2 * C, out_channels=C``.
        image_size: image side (int) or (H, W).
        block_out_channels: width of each level, highest resolution first, e.g. ``[64, 128]``.
        blocks_per_level: ResBlocks per level on the way down (the way up has one more,
            to also consume the skip from the level's downsampling, as in ADM).
        attention_resolutions: spatial sides (max(H, W)) of the levels that get
            self-attention after each ResBlock, e.g. ``[4]`` for the 4x4 level of 8x8
            images. The middle block always has attention.
        num_heads: attention heads (must divide the width of every attention level).
        dropout: dropout inside the ResBlocks.
        num_classes: 0 for an unconditional net; K > 0 adds a label embedding with K + 1
            entries, index K being the "null" label used for classifier-free guidance.
        context_dim: None for a net without text; D > 0 makes every attention layer a
            `genframe.layers.SpatialTransformer` (self-attention, then cross-attention to a
            context of D-wide token features, then a feed-forward), as in Stable
            Diffusion's U-Net (Rombach et al. 2022), and (unless `pooled_context` is
            False) adds a projection of the tokens' mean to the timestep embedding, as
            Imagen does with its pooled text embedding (Saharia et al. 2022), so every
            residual block sees the text. The spatial
            transformers' tokens carry 2-D position embeddings, so words about places
            ("top left") can be matched to positions.
        transformer_depth: transformer blocks in each of those layers.
        pooled_context: with `context_dim`, add the pooled text embedding to the timestep
            embedding (True) or let the text in through cross-attention only (False).

    ``forward(x, t, label=None, context=None, mask=None)``: x (B, C, H, W), t (B,) integer
    or float timesteps, label (B,) long in 0..K (K = null), context (B, T, D) token
    features and mask (B, T) bool (True = a real token; a row without one is "no text",
    the unconditional pass) -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        block_out_channels: Sequence[int],
        *,
        blocks_per_level: int = 2,
        attention_resolutions: Sequence[int] = (),
        num_heads: int = 4,
        dropout: float = 0.0,
        num_classes: int = 0,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        pooled_context: bool = True,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        widths = [int(c) for c in block_out_channels]
        if not widths or any(c < 1 for c in widths):
            raise ValueError(f"block_out_channels must be a non-empty list of positive widths, got {block_out_channels}")
        self.sizes = downsampled_sizes(image_size, len(widths) - 1)
        sides = [max(s) for s in self.sizes]
        unknown = sorted(set(attention_resolutions) - set(sides))
        if unknown:
            raise ValueError(
                f"attention_resolutions {unknown} match no level; the levels have sides {sides}"
            )
        attn_levels = {i for i, side in enumerate(sides) if side in set(attention_resolutions)}
        self.num_classes = num_classes
        self.null_label = num_classes  # the extra embedding row for "no label"

        # Timestep embedding: sinusoids of width block_out_channels[0] -> MLP to 4x that (DDPM).
        self.base_width = widths[0]
        emb_dim = 4 * widths[0]
        self.time_mlp = nn.Sequential(
            nn.Linear(widths[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        # Class embedding added to the time embedding (ADM's class-conditional models).
        self.label_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        # Pooled text embedding added to the time embedding (Imagen).
        self.context_embed = (nn.Linear(context_dim, emb_dim)
                              if context_dim and pooled_context else None)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim=emb_dim, dropout=dropout)

        self.context_dim = context_dim

        def attn(width: int) -> nn.Module:
            if context_dim is None:
                return SelfAttention2d(width, num_heads)
            return SpatialTransformer(width, context_dim, num_heads, depth=transformer_depth,
                                      dropout=dropout, positions=True)

        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)

        # Way down. Every block's output is kept as a skip; skip_widths mirrors the stack.
        self.down = nn.ModuleList()
        skip_widths = [widths[0]]
        width = widths[0]
        for i, w in enumerate(widths):
            for _ in range(blocks_per_level):
                layers = [res(width, w)] + ([attn(w)] if i in attn_levels else [])
                self.down.append(nn.ModuleList(layers))
                width = w
                skip_widths.append(width)
            if i + 1 < len(widths):
                self.down.append(nn.ModuleList([Downsample(width)]))  # keeps the width (ADM)
                skip_widths.append(width)

        self.middle = nn.ModuleList([res(width, width), attn(width), res(width, width)])

        # Way up: blocks_per_level + 1 blocks per level, each eating one skip.
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):
            w = widths[i]
            for b in range(blocks_per_level + 1):
                layers: list[nn.Module] = [res(width + skip_widths.pop(), w)]
                width = w
                if i in attn_levels:
                    layers.append(attn(w))
                if i > 0 and b == blocks_per_level:
                    layers.append(Upsample(w))
                self.up.append(nn.ModuleList(layers))
        assert not skip_widths

        self.norm_out = group_norm(width)
        self.head = nn.Conv2d(width, in_channels if out_channels is None else out_channels, 3, padding=1)
        # Zero-init the output: the untrained net predicts 0 (ADM).
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed(
        self,
        t: torch.Tensor,
        label: torch.Tensor | None,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The conditioning vector of each sample: (B, 4 * block_out_channels[0])."""
        emb = self.time_mlp(timestep_embedding(t, self.base_width))  # (B, E)
        if self.label_embed is not None:
            if label is None:  # an unlabelled call of a conditional net: unconditional
                label = torch.full_like(t, self.null_label, dtype=torch.long)
            emb = emb + self.label_embed(label.long().reshape(-1))
        if self.context_embed is not None and context is not None:
            # The mean of the real tokens' features; zero for "no text" (an all-False mask).
            keep = (torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
                    if mask is None else mask.to(torch.bool))[..., None]  # (B, T, 1)
            pooled = (context * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, D)
            emb = emb + self.context_embed(pooled)
        return emb

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        label: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (context is None) != (self.context_dim is None):
            raise ValueError("context (B, T, context_dim) is needed exactly when the U-Net was "
                             f"built with context_dim (here {self.context_dim})")

        def attend(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
            return layer(h, context, mask) if isinstance(layer, SpatialTransformer) else layer(h)

        emb = self.embed(t, label, context, mask)  # (B, E)
        h = self.stem(x)  # (B, block_out_channels[0], H, W)
        skips = [h]
        level = 0
        for block in self.down:
            for layer in block:
                if isinstance(layer, ResBlock):
                    h = layer(h, emb)
                elif isinstance(layer, Downsample):
                    h = layer(h)
                    level += 1
                else:
                    h = attend(layer, h)
            skips.append(h)

        for layer in self.middle:  # (B, block_out_channels[-1], h, w)
            h = layer(h, emb) if isinstance(layer, ResBlock) else attend(layer, h)

        for block in self.up:
            for layer in block:
                if isinstance(layer, ResBlock):
                    h = layer(torch.cat([h, skips.pop()], dim=1), emb)
                elif isinstance(layer, Upsample):
                    level -= 1
                    h = layer(h, self.sizes[level])  # exact size of the level above
                else:
                    h = attend(layer, h)
        return self.head(F.silu(self.norm_out(h)))  # (B, out_channels, H, W)
