"""Self-attention over image positions and sinusoidal timestep embeddings.

Both come from the DDPM / ADM U-Nets (Ho et al. 2020; Dhariwal & Nichol 2021,
https://arxiv.org/abs/2105.05233). Part of the core: never imports a plugin.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from genframe.layers.conv import group_norm


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim).

    The Transformer's position encoding (Vaswani et al. 2017) applied to the timestep, as
    in DDPM: half the features are cos(t * f_k), half sin(t * f_k), with frequencies
    f_k = max_period^(-k / half) from 1 down to ~1/max_period, so both neighbouring
    and distant timesteps are told apart. An odd `dim` gets one zero feature at the end.
    """
    if t.dim() != 1:
        t = t.reshape(-1)
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / max(half, 1)
    )  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual.

    GroupNorm -> 1x1 conv to q, k, v -> scaled dot-product attention per head -> 1x1
    projection, added to the input. The projection starts at zero so the block is the
    identity at initialisation (as in ADM), and a U-Net can gain attention layers without
    disturbing its early training.

    (B, C, H, W) -> (B, C, H, W). Cost is O((H*W)^2): use it at low resolutions.

    Args:
        channels: feature width C.
        num_heads: attention heads; must divide `channels`.
    """

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must be >= 1 and divide channels ({channels})")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        # -> 3 x (B, heads, H*W, C/heads): one sequence of H*W tokens per head
        qkv = qkv.reshape(B, 3, heads, C // heads, H * W).permute(1, 0, 2, 4, 3)
        q, k, v = qkv.unbind(0)
        # The fused kernel (flash / memory-efficient where available) scales by 1/sqrt(d).
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, H*W, C/heads)
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj(h)
