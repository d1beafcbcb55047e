"""Differentiable augmentation of the discriminator's inputs (DiffAugment).

Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training",
https://arxiv.org/abs/2006.10738: the same random, differentiable transforms are applied
to real and generated images every time D sees them (in D's step and in G's step), so D
cannot memorise a small training set and G still receives gradients through the
transform. Written here after the authors' reference code (``DiffAugment_pytorch.py``;
it is not a pip package); the draws come from torch's global generator, which Lightning's
``seed_everything`` seeds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTS = ("color", "translation", "cutout")


def diff_augment(x: torch.Tensor, policy: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Apply each transform in `policy` (names from `AUGMENTS`) to images (B, C, H, W)
    in [-1, 1]."""
    for name in policy:
        x = _TRANSFORMS[name](x)
    return x


def _color(x: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    rand = lambda: torch.rand(b, 1, 1, 1, device=x.device, dtype=x.dtype)  # noqa: E731
    x = x + (rand() - 0.5)  # brightness
    if x.shape[1] > 1:  # saturation: colour images only
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (rand() * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (rand() + 0.5) + mean  # contrast


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    # Shift by up to ratio * size pixels (at least 1), zero-padded: (B, C, H, W) -> same.
    b, _, h, w = x.shape
    sh, sw = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device),
                            indexing="ij")
    gy = (gy[None] + dy + 1).clamp(0, h + 1)  # (B, H, W), indices into the padded image
    gx = (gx[None] + dx + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))  # (B, C, H + 2, W + 2); the border is the zero fill
    idx = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, gy, gx].permute(0, 3, 1, 2).contiguous()


def _cutout(x: torch.Tensor, ratio: float = 0.25) -> torch.Tensor:
    # Zero one square of side ratio * size (at least 1) at a random place per image.
    b, _, h, w = x.shape
    ch, cw = max(1, int(h * ratio + 0.5)), max(1, int(w * ratio + 0.5))
    top = torch.randint(0, h, (b, 1, 1), device=x.device) - ch // 2  # square centre uniform
    left = torch.randint(0, w, (b, 1, 1), device=x.device) - cw // 2
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device),
                            indexing="ij")
    inside = ((gy[None] >= top) & (gy[None] < top + ch)
              & (gx[None] >= left) & (gx[None] < left + cw))  # (B, H, W)
    return x * (~inside).unsqueeze(1).to(x.dtype)


_TRANSFORMS = {"color": _color, "translation": _translation, "cutout": _cutout}
