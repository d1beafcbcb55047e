"""Image-quality metrics shared by every image model.

Everything here takes plain arguments (tensors, paths, numbers; never a DictConfig), and
images as float (N, C, H, W) in [0, 1] -- the range of `Samples.images`. Map training
batches, which are in [-1, 1], with `to_unit_range`.

The feature space is pluggable (the reference Inception weights cannot be downloaded)::

    clf = classifier_from_datasets({"name": "digits", ...}, dm.train_set, dm.val_set)
    extractor = build_extractor("classifier", classifier=clf)
    # or: build_extractor("timm", timm_model="resnet50", timm_weights="~/w/r50.safetensors")
    image_quality(real, fake, extractor)
    # -> {"fd": 1.93, "precision": 0.81, "recall": 0.77}
    class_accuracy(fake, requested_labels, clf)
    # -> {"class_accuracy": 0.94, "class_accuracy/0": 0.97, ...}

`ImageMetrics` keeps the real set's features so that repeated evaluations (every N
epochs during training, or several samplers in `genframe evaluate`) extract them once.
Metric keys are bare (``fd``); the caller adds its stage prefix (``val/fd``).

Where things live: `features` (the extractor convention, `TimmFeatures`), `classifier`
(genframe's own data classifier and its cache), `frechet` and `precision_recall` (the
arithmetic on features), `image_metrics` (the scores of image sets, `ImageMetrics`),
`build` (extractor by name, the classifier of a data module's sets), `model_metrics`
(sampling a model and scoring it: the glue `genframe evaluate` and `SampleQuality` share).
This file only re-exports the public names.
"""

from genframe.cache import cache_dir
from genframe.metrics.build import (
    EXTRACTORS,
    build_extractor,
    classifier_from_datasets,
    stack_dataset,
)
from genframe.metrics.classifier import (
    CachedClassifier,
    ClassifierFeatures,
    ImageClassifier,
    load_or_train_classifier,
    train_classifier,
)
from genframe.metrics.features import (
    FeatureExtractor,
    TimmFeatures,
    extract_features,
    feature_batch_size,
    to_unit_range,
)
from genframe.metrics.frechet import (
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_stats,
)
from genframe.metrics.image_metrics import (
    ImageMetrics,
    class_accuracy,
    feature_metrics,
    image_quality,
)
from genframe.metrics.precision_recall import precision_recall

__all__ = [
    "EXTRACTORS",
    "CachedClassifier",
    "ClassifierFeatures",
    "FeatureExtractor",
    "ImageClassifier",
    "ImageMetrics",
    "TimmFeatures",
    "build_extractor",
    "cache_dir",
    "class_accuracy",
    "classifier_from_datasets",
    "extract_features",
    "feature_batch_size",
    "feature_metrics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_stats",
    "image_quality",
    "load_or_train_classifier",
    "precision_recall",
    "stack_dataset",
    "to_unit_range",
    "train_classifier",
]
