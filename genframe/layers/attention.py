"""Attention blocks for image models, and sinusoidal timestep embeddings.

`SelfAttention2d` and `timestep_embedding` come from the DDPM / ADM U-Nets (Ho et al. 2020;
Dhariwal & Nichol 2021, https://arxiv.org/abs/2105.05233). `CrossAttention`,
`TransformerBlock` and `SpatialTransformer` condition a feature map on a sequence of
(text) token features, as Stable Diffusion's U-Net does (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models",
https://arxiv.org/abs/2112.10752). All of them share one multi-head kernel,
`multihead_attention`. Part of the core: never imports a plugin.
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


def sincos_positions_2d(height: int, width: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings of an H x W grid: (H*W, dim), row-major.

    Half the features encode the row, half the column, each with the 1-D sinusoids of
    `timestep_embedding` (as MAE and DiT embed image patches: He et al. 2022; Peebles &
    Xie 2023). No parameters, so any grid size works.
    """
    rows = torch.arange(height, device=device).repeat_interleave(width)  # (H*W,)
    cols = torch.arange(width, device=device).repeat(height)  # (H*W,)
    half = dim // 2
    return torch.cat([timestep_embedding(rows, half, 100.0),
                      timestep_embedding(cols, dim - half, 100.0)], dim=1)  # (H*W, dim)


def multihead_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    key_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention with `num_heads` heads over packed features.

    q (B, N, h*d), k and v (B, T, h*d) -> (B, N, h*d): the last dimension is split into
    `num_heads` heads of width d, each head attends on its own, and the heads are packed
    back in the same order. `key_mask` (B, T) bool, True = a real key: queries never attend
    to the False keys (padding). Every row of `key_mask` needs at least one True key; a row
    with none would give NaN (the callers below handle that case).
    """
    B, N, E = q.shape
    T = k.shape[1]
    d = E // num_heads
    q = q.reshape(B, N, num_heads, d).transpose(1, 2)  # (B, h, N, d)
    k = k.reshape(B, T, num_heads, d).transpose(1, 2)  # (B, h, T, d)
    v = v.reshape(B, T, num_heads, d).transpose(1, 2)  # (B, h, T, d)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T)
    # The fused kernel (flash / memory-efficient where available) scales by 1/sqrt(d).
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return y.transpose(1, 2).reshape(B, N, E)  # (B, N, h*d)


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
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        # one sequence of H*W tokens: 3 x (B, H*W, C). Made contiguous first: q, k, v
        # whose features are strided by H*W send SDPA to its slow math path.
        q, k, v = qkv.flatten(2).transpose(1, 2).contiguous().chunk(3, dim=-1)
        h = multihead_attention(q, k, v, self.num_heads)  # (B, H*W, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj(h)


def _check_dims(**dims: int | None) -> None:
    for name, value in dims.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _head_dim(width: int, num_heads: int, head_dim: int | None, width_name: str) -> int:
    """The per-head width: `head_dim`, or `width / num_heads` when it is not given."""
    _check_dims(**{width_name: width, "num_heads": num_heads, "head_dim": head_dim})
    if head_dim is not None:
        return head_dim
    if width % num_heads:
        raise ValueError(
            f"num_heads ({num_heads}) must divide {width_name} ({width}), or give head_dim"
        )
    return width // num_heads


class CrossAttention(nn.Module):
    """Multi-head attention of queries over a context sequence (self-attention without one).

    Queries come from `x` (B, N, query_dim), keys and values from `context`
    (B, T, context_dim), e.g. the token features of a caption; the result has the shape of
    `x`. With `context_dim=None` the module attends over `x` itself, which is how
    `TransformerBlock` uses it for its self-attention. As in Stable Diffusion's U-Net
    (Rombach et al. 2022): q, k, v are bias-free linear maps to `num_heads * head_dim`
    features, and a linear map (then dropout) brings the heads back to `query_dim`.

    `mask` (B, T) bool, True = a real token, keeps queries off padded caption tokens, so
    what a padding slot holds never changes the output. A sample whose mask has no True at
    all (an empty caption) gets a zero output, the same as having no context.

    Args:
        query_dim: feature width of `x`.
        context_dim: feature width of `context`; None for self-attention.
        num_heads: attention heads.
        head_dim: width of each head; default `query_dim // num_heads` (which must divide).
        dropout: dropout on the output.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        num_heads: int = 1,
        head_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_dims(context_dim=context_dim)
        head_dim = _head_dim(query_dim, num_heads, head_dim, "query_dim")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.query_dim = query_dim
        self.context_dim = context_dim
        self.num_heads = num_heads
        inner = num_heads * head_dim
        kv_dim = query_dim if context_dim is None else context_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, query_dim), context (B, T, context_dim), mask (B, T) -> (B, N, query_dim)."""
        if x.dim() != 3 or x.shape[-1] != self.query_dim:
            raise ValueError(f"x must be (B, N, {self.query_dim}), got {tuple(x.shape)}")
        if context is None:
            if self.context_dim is not None:
                raise ValueError(f"context (B, T, {self.context_dim}) is required by this cross-attention")
            context = x  # self-attention
        elif self.context_dim is None:
            raise ValueError("context given to a self-attention (context_dim=None)")
        elif context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context must be (B={x.shape[0]}, T, {self.context_dim}), got {tuple(context.shape)}"
            )
        empty = None
        if mask is not None:
            if mask.shape != context.shape[:2]:
                raise ValueError(
                    f"mask must be (B, T) = {tuple(context.shape[:2])} like the context, got {tuple(mask.shape)}"
                )
            mask = mask.to(device=x.device, dtype=torch.bool)
            empty = ~mask.any(dim=1)  # (B,) samples with no real token at all
            # let those attend to everything (no NaN); their output is zeroed below
            mask = mask | empty[:, None]
        dropout_p = self.to_out[1].p if self.training else 0.0
        q = self.to_q(x)  # (B, N, inner)
        k, v = self.to_k(context), self.to_v(context)  # (B, T, inner) each
        y = multihead_attention(q, k, v, self.num_heads, mask, dropout_p)  # (B, N, inner)
        y = self.to_out(y)  # (B, N, query_dim)
        if empty is not None:
            y = y.masked_fill(empty[:, None, None], 0.0)
        return y


class FeedForward(nn.Module):
    """Transformer feed-forward: Linear -> GEGLU (or GELU) -> dropout -> Linear.

    GEGLU (Shazeer 2020, "GLU Variants Improve Transformer", https://arxiv.org/abs/2002.05202)
    gates half of the hidden features with the GELU of the other half, as Stable
    Diffusion's transformer blocks do. (B, N, dim) -> (B, N, dim).

    Args:
        dim: feature width.
        mult: hidden width = `mult * dim`.
        glu: GEGLU when True, a plain GELU MLP when False.
        dropout: dropout on the hidden features.
    """

    def __init__(self, dim: int, mult: int = 4, glu: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        _check_dims(dim=dim, ff_mult=mult)
        hidden = mult * dim
        self.glu = glu
        self.proj_in = nn.Linear(dim, 2 * hidden if glu else hidden)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)  # (B, N, 2*hidden) with GEGLU, else (B, N, hidden)
        if self.glu:
            h, gate = h.chunk(2, dim=-1)  # 2 x (B, N, hidden)
            h = h * F.gelu(gate)
        else:
            h = F.gelu(h)
        return self.proj_out(self.dropout(h))  # (B, N, dim)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block over tokens with optional cross-attention to a context.

    x + attn(ln(x)); x + cross_attn(ln(x), context); x + ff(ln(x)) — Stable Diffusion's
    `BasicTransformerBlock` (Rombach et al. 2022). The cross-attention step is skipped
    when `context` is None (or when the block has no `context_dim`).
    (B, N, dim), context (B, T, context_dim), mask (B, T) -> (B, N, dim). `x_mask` (B, N)
    bool, True = a real token, keeps the self-attention off padded positions of `x` (a
    text encoder over padded captions).

    Args:
        dim: token width.
        num_heads, head_dim: attention heads and their width (default `dim // num_heads`).
        context_dim: width of the context tokens; None for a block without cross-attention.
        dropout: dropout in the attention outputs and the feed-forward.
        ff_mult, gated_ff: feed-forward hidden width `ff_mult * dim`, GEGLU or GELU.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        head_dim: int | None = None,
        context_dim: int | None = None,
        dropout: float = 0.0,
        ff_mult: int = 4,
        gated_ff: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, num_heads, head_dim, dropout)  # self-attention
        self.norm2 = self.attn2 = None
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = CrossAttention(dim, context_dim, num_heads, head_dim, dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult, gated_ff, dropout)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), mask=x_mask)  # (B, N, dim)
        if context is not None:
            if self.attn2 is None:
                raise ValueError("context given to a TransformerBlock built without context_dim")
            x = x + self.attn2(self.norm2(x), context, mask)  # (B, N, dim)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned on a context.

    Stable Diffusion's spatial transformer (Rombach et al. 2022): GroupNorm -> 1x1 conv to
    `num_heads * head_dim` features -> `depth` `TransformerBlock`s over the H*W tokens
    (self-attention, cross-attention to `context`, feed-forward) -> 1x1 conv back to
    `channels`, added to the input. The output conv starts at zero, so a new block is the
    identity and a U-Net can gain it without disturbing its early training.

    x (B, C, H, W), context (B, T, context_dim), mask (B, T) bool (True = real token)
    -> (B, C, H, W). With `context=None` the cross-attention steps are skipped (an
    unconditional pass, e.g. the dropped caption of classifier-free guidance, if the
    model chooses to represent it that way). Cost is O((H*W)^2 + H*W*T): use it at low
    resolutions.

    Args:
        channels: feature width C of the map.
        context_dim: width D of the context tokens; None builds self-attention only.
        num_heads: attention heads.
        head_dim: width of each head; default `channels // num_heads` (which must divide).
        depth: number of transformer blocks.
        dropout: dropout inside the blocks.
        ff_mult, gated_ff: feed-forward hidden width multiplier, GEGLU (True) or GELU.
        positions: add fixed 2-D sine-cosine position embeddings (`sincos_positions_2d`)
            to the tokens, so attention knows where each one is: what a caption's "top
            left" must be matched against. Convolutions alone see position only through
            the padding at the borders (Liu et al. 2018, "An intriguing failing of
            convolutional neural networks and the CoordConv solution").
    """

    def __init__(
        self,
        channels: int,
        context_dim: int | None = None,
        num_heads: int = 1,
        head_dim: int | None = None,
        depth: int = 1,
        dropout: float = 0.0,
        ff_mult: int = 4,
        gated_ff: bool = True,
        positions: bool = False,
    ) -> None:
        super().__init__()
        _check_dims(depth=depth, context_dim=context_dim)
        head_dim = _head_dim(channels, num_heads, head_dim, "channels")
        inner = num_heads * head_dim
        self.channels = channels
        self.positions = positions
        self.norm = group_norm(channels)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.blocks = nn.ModuleList(
            TransformerBlock(inner, num_heads, head_dim, context_dim, dropout, ff_mult, gated_ff)
            for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (B, {self.channels}, H, W), got {tuple(x.shape)}")
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))  # (B, inner, H, W)
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, inner): one token per position
        if self.positions:
            h = h + sincos_positions_2d(H, W, h.shape[-1], h.device).to(h.dtype)
        for block in self.blocks:
            h = block(h, context, mask)  # (B, H*W, inner)
        h = h.transpose(1, 2).reshape(B, -1, H, W)  # (B, inner, H, W)
        return x + self.proj_out(h)
