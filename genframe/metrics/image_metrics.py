"""Image metrics of generated images against real ones, in an extractor's feature space.

`feature_metrics` compares two feature sets (Fréchet distance, precision and recall);
`image_quality` does the same for two image sets; `class_accuracy` asks the data
classifier whether conditional samples show the class they were asked for; `ImageMetrics`
keeps the real set's features for repeated evaluations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from genframe.metrics.classifier import CachedClassifier, ClassifierFeatures, ImageClassifier
from genframe.metrics.features import extract_features, feature_batch_size
from genframe.metrics.frechet import (
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
)
from genframe.metrics.precision_recall import precision_recall

__all__ = ["ImageMetrics", "class_accuracy", "feature_metrics", "image_quality"]


def _subsample(features: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if features.shape[0] <= n:
        return features
    idx = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return features[idx]


def feature_metrics(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    *,
    k: int = 3,
    equal_sizes: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """FD, precision and recall between two feature sets (N_real, D), (N_fake, D).

    Args:
        k: neighbourhood size of precision/recall.
        equal_sizes: precision/recall on equally many real and generated samples (the
            larger set is subsampled with `seed`), as Kynkäänniemi et al. prescribe:
            k-NN radii shrink as a set grows. FD always uses every sample.
        seed: seed of that subsample.

    Returns:
        ``{"fd": ..., "precision": ..., "recall": ...}``
    """
    return {
        "fd": frechet_distance(real_features, fake_features),
        **_precision_recall(real_features, fake_features, k, equal_sizes, seed),
    }


def _precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int, equal_sizes: bool, seed: int
) -> dict[str, float]:
    if equal_sizes:
        n = min(real.shape[0], fake.shape[0])
        real, fake = _subsample(real, n, seed), _subsample(fake, n, seed + 1)
    return precision_recall(real, fake, k=k)


def image_quality(
    real: torch.Tensor,
    fake: torch.Tensor,
    extractor: torch.nn.Module,
    *,
    k: int = 3,
    batch_size: int | None = None,
    equal_sizes: bool = True,
) -> dict[str, float]:
    """Fréchet distance and improved precision/recall of `fake` images against `real`.

    Args:
        real, fake: float images (N, C, H, W) in [0, 1]; at least k + 1 of each. The
            numbers are estimates whose bias depends on the sample counts: compare runs
            at equal counts (hundreds at least; thousands for stable FD).
        extractor: a `FeatureExtractor` (see `build_extractor`), on the device to use.
        k: neighbourhood size of precision/recall.
        batch_size: images per extractor call (default: by the extractor's input size).
        equal_sizes: see `feature_metrics`.

    Returns:
        ``{"fd": float, "precision": float, "recall": float}``.
    """
    bs = batch_size or feature_batch_size(extractor)
    return feature_metrics(
        extract_features(extractor, real, batch_size=bs),
        extract_features(extractor, fake, batch_size=bs),
        k=k, equal_sizes=equal_sizes,
    )


def _predict(classifier: Any, images: torch.Tensor) -> torch.Tensor:
    if isinstance(classifier, CachedClassifier):
        classifier = classifier.extractor()
    elif isinstance(classifier, ImageClassifier):
        classifier = ClassifierFeatures(classifier)
    if not hasattr(classifier, "predict"):
        raise TypeError(f"class_accuracy needs a classifier with predict(), got {type(classifier).__name__}")
    return classifier.predict(images).cpu()


def class_accuracy(
    images: torch.Tensor,
    requested_labels: torch.Tensor | Sequence[int],
    classifier: ClassifierFeatures | CachedClassifier | ImageClassifier,
) -> dict[str, float]:
    """How often the data classifier sees the class a conditional model was asked for.

    Args:
        images: generated images (N, C, H, W) in [0, 1].
        requested_labels: the label each image was generated for (N,).
        classifier: the data's classifier (`ClassifierFeatures`, `CachedClassifier` or
            `ImageClassifier`); anything with ``predict(images) -> labels`` works.

    Returns:
        ``{"class_accuracy": overall, "class_accuracy/<c>": accuracy on images requested
        as class c}`` for every requested class c.

    Read it with the classifier's own validation accuracy in mind: it bounds what real
    images score.
    """
    labels = torch.as_tensor(requested_labels, dtype=torch.long).cpu().flatten()
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels.shape[0]} requested labels for {images.shape[0]} images")
    if labels.numel() == 0:
        raise ValueError("class_accuracy needs at least one image")
    correct = (_predict(classifier, images) == labels).float()
    out = {"class_accuracy": float(correct.mean())}
    for c in sorted(set(labels.tolist())):
        out[f"class_accuracy/{c}"] = float(correct[labels == c].mean())
    return out


class ImageMetrics:
    """Image metrics against a fixed set of real images, whose features are kept.

    Build it once per run (the real features are extracted here), then call it on each
    batch of generated images: during training every N epochs, or once per sampler in
    `genframe evaluate`.

    Args:
        real: real images (N, C, H, W) in [0, 1] (e.g. ``to_unit_range`` of the
            validation images).
        extractor: the feature extractor (`build_extractor`), on the device to use.
        classifier: the data classifier for class accuracy, or None to skip it.
        k: neighbourhood size of precision/recall.
        batch_size: images per extractor call.
        equal_sizes: see `feature_metrics`.
    """

    def __init__(
        self,
        real: torch.Tensor,
        extractor: torch.nn.Module,
        *,
        classifier: ClassifierFeatures | CachedClassifier | ImageClassifier | None = None,
        k: int = 3,
        batch_size: int | None = None,
        equal_sizes: bool = True,
    ) -> None:
        self.extractor = extractor
        self.classifier = classifier
        self.k = k
        self.equal_sizes = equal_sizes
        self.batch_size = batch_size or feature_batch_size(extractor)
        self.real_features = extract_features(extractor, real, batch_size=self.batch_size)  # (N, D)
        self.real_stats = gaussian_stats(self.real_features)

    @property
    def num_real(self) -> int:
        return int(self.real_features.shape[0])

    def __call__(
        self, fake: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None
    ) -> dict[str, float]:
        """Metrics of generated images `fake` (N, C, H, W) in [0, 1].

        Returns ``fd``, ``precision``, ``recall``, and with `labels` (the requested class
        of each image) and a classifier, the `class_accuracy` keys too.
        """
        fake_features = extract_features(self.extractor, fake, batch_size=self.batch_size)
        out = {
            "fd": frechet_distance_from_stats(*self.real_stats, *gaussian_stats(fake_features)),
            **_precision_recall(self.real_features, fake_features, self.k, self.equal_sizes, 0),
        }
        if labels is not None and self.classifier is not None:
            out.update(class_accuracy(fake, labels, self.classifier))
        return out

    def of_samples(self, samples: Any) -> dict[str, float]:
        """Metrics of a `Samples` value; class accuracy when every sample has a label."""
        if getattr(samples, "images", None) is None:
            raise ValueError("image metrics need image samples")
        labels = [c.get("label") for c in samples.conditions]
        return self(samples.images, labels if labels and None not in labels else None)
