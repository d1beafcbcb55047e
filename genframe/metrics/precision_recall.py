"""Improved precision and recall of generated images (k-nearest-neighbour manifolds).

Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
Models", https://arxiv.org/abs/1904.06991. Each set of features approximates its manifold
by a union of balls: around every sample, a ball reaching its k-th nearest neighbour in
the same set. Then

- precision = share of generated samples that fall inside the real manifold
  (are the samples realistic?),
- recall    = share of real samples that fall inside the generated manifold
  (does the model cover the data's variety?).

FD mixes both failures into one number; these two separate them (a model that draws only
half of the digits keeps a high precision and loses recall).

torchmetrics has no implementation of this metric, so it is written here: a few lines of
``torch.cdist`` in row chunks, which keeps memory at chunk x N distances instead of N x N.
Distances, radii and the "<=" test follow the authors' reference code (the sample itself
is its own 0-th neighbour and is skipped; a point on a ball's boundary is inside).
"""

from __future__ import annotations

import torch


def _chunk_rows(n_cols: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, n_cols))


def knn_radii(features: torch.Tensor, k: int = 3, *, max_elements: int = 2 ** 24) -> torch.Tensor:
    """Distance from each sample (N, D) to its k-th nearest other sample: (N,)."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be between 1 and the set size - 1 ({n - 1}), got {k}")
    radii = []
    step = _chunk_rows(n, max_elements)
    for start in range(0, n, step):
        d = torch.cdist(features[start:start + step], features)  # (chunk, N)
        # k + 1: the smallest distance is the sample to itself (0).
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_manifold(
    queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, max_elements: int
) -> torch.Tensor:
    """For each query (Q, D): is it within radii[j] of some support sample j? -> (Q,) bool."""
    inside = []
    step = _chunk_rows(support.shape[0], max_elements)
    for start in range(0, queries.shape[0], step):
        d = torch.cdist(queries[start:start + step], support)  # (chunk, S)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


@torch.no_grad()
def precision_recall(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    k: int = 3,
    *,
    max_elements: int = 2 ** 24,
) -> dict[str, float]:
    """Improved precision and recall of `fake_features` against `real_features`.

    Args:
        real_features: (N_real, D) features of real images.
        fake_features: (N_fake, D) features of generated images, same extractor.
        k: neighbourhood size of the k-NN balls; the paper uses 3. Larger k inflates the
            manifolds (both numbers go up); keep it fixed when comparing models.
        max_elements: distances held in memory at once (chunking; 2**24 floats = 64 MiB).

    Returns:
        ``{"precision": float, "recall": float}``, each in [0, 1].

    Use the same number of real and generated samples (the paper uses 50k each): the
    radii shrink as a set grows, so unequal sets bias the two numbers against each other.
    """
    if real_features.ndim != 2 or fake_features.ndim != 2:
        raise ValueError("features must be shaped (N, D)")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(
            f"feature widths differ: {real_features.shape[1]} vs {fake_features.shape[1]}; "
            "both sets must come from the same extractor"
        )
    # float32 is enough: a radius is a k-th neighbour distance, far above round-off.
    real = real_features.detach().float()
    fake = fake_features.detach().to(real.device, torch.float32)
    real_radii = knn_radii(real, k, max_elements=max_elements)
    fake_radii = knn_radii(fake, k, max_elements=max_elements)
    precision = _inside_manifold(fake, real, real_radii, max_elements).float().mean()
    recall = _inside_manifold(real, fake, fake_radii, max_elements).float().mean()
    return {"precision": float(precision), "recall": float(recall)}
