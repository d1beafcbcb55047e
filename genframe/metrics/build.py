"""The metrics' parts built from plain settings and a data module's sets.

`build_extractor` turns the extractor's name (``metrics.extractor`` in configs) into a
`FeatureExtractor`; `classifier_from_datasets` trains (or loads from the cache) the data
classifier of a data module's labelled images; `stack_dataset` gathers a data set's rows
into tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from genframe.errors import UserError, did_you_mean
from genframe.metrics.classifier import (
    CachedClassifier,
    ClassifierFeatures,
    ImageClassifier,
    load_or_train_classifier,
)
from genframe.metrics.features import FeatureExtractor, TimmFeatures, to_unit_range

__all__ = ["EXTRACTORS", "build_extractor", "classifier_from_datasets", "stack_dataset"]

EXTRACTORS = ("classifier", "timm")


def build_extractor(
    kind: str,
    *,
    classifier: CachedClassifier | ImageClassifier | None = None,
    timm_model: str | None = None,
    timm_weights: str | Path | None = None,
    image_size: int | None = None,
    key: str = "metrics",
) -> FeatureExtractor:
    """The feature extractor named by `kind`.

    Args:
        kind: ``"classifier"`` (genframe's own data classifier) or ``"timm"``.
        classifier: for ``"classifier"``: the result of `load_or_train_classifier` /
            `classifier_from_datasets`, or an `ImageClassifier`.
        timm_model: for ``"timm"``: the architecture name.
        timm_weights: for ``"timm"``: a local weights file (.safetensors, .pth, .pt, .bin).
        image_size: for ``"timm"``: the side fed to the network (default: the model's).
        key: the config node these values came from, for error messages
            (``metrics.extractor``, ``metrics.timm_weights``, ...).
    """
    if kind == "classifier":
        if classifier is None:
            raise ValueError("build_extractor('classifier') needs classifier=")
        if isinstance(classifier, CachedClassifier):
            return classifier.extractor()
        return ClassifierFeatures(classifier)
    if kind == "timm":
        if not timm_model:
            raise UserError(f"{key}.extractor=timm needs {key}.timm_model (a timm architecture name)")
        if not timm_weights:
            raise UserError(
                f"{key}.extractor=timm needs {key}.timm_weights (a local weights file; "
                "nothing is downloaded)"
            )
        return TimmFeatures(
            timm_model, timm_weights, image_size,
            weights_key=f"{key}.timm_weights", model_key=f"{key}.timm_model",
            image_size_key=f"{key}.timm_image_size",
        )
    raise UserError(
        f"{key}.extractor={kind}: unknown feature extractor; expected one of "
        f"{', '.join(EXTRACTORS)}.{did_you_mean(kind, EXTRACTORS)}"
    )


def stack_dataset(
    dataset: Dataset, keys: Sequence[str] = ("image", "label"), *, limit: int | None = None,
    batch_size: int = 512,
) -> dict[str, torch.Tensor]:
    """Stack the rows of a genframe dataset (dict rows) into tensors, e.g. all images.

    Args:
        dataset: a dataset whose items are dicts (``data_module.val_set``).
        keys: the columns to keep; a missing key is an error naming the available ones.
        limit: keep at most this many rows (the first ones; of a streamed
            ``IterableDataset``, such as shards, the first ones it yields).
    """
    from torch.utils.data import DataLoader, IterableDataset, Subset

    streamed = isinstance(dataset, IterableDataset)
    if not streamed and limit is not None and limit < len(dataset):  # type: ignore[arg-type]
        dataset = Subset(dataset, range(limit))
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    rows = 0
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False if not streamed else None):
        for k in keys:
            if k not in batch:
                raise KeyError(f"the data has no '{k}' column (it has {sorted(batch)})")
            columns[k].append(torch.as_tensor(batch[k]))
        rows += len(columns[keys[0]][-1])
        if limit is not None and rows >= limit:
            break
    if not any(columns.values()):
        raise ValueError("the dataset is empty")
    stacked = {k: torch.cat(v) for k, v in columns.items()}
    return {k: v[:limit] for k, v in stacked.items()} if limit is not None else stacked


def classifier_from_datasets(
    data_key: Mapping[str, Any],
    train_set: Dataset,
    val_set: Dataset,
    *,
    cache_dir: Path | str | None = None,
    **settings: Any,
) -> CachedClassifier:
    """The cached data classifier for a data module's train and validation sets.

    Reads ``image`` (in [-1, 1], as batches carry them) and ``label`` from both sets,
    then calls `load_or_train_classifier` (see there for `data_key` and `settings`).
    A data set without labels cannot have a classifier: `UserError`.
    """
    try:
        train = stack_dataset(train_set)
        val = stack_dataset(val_set)
    except KeyError as exc:
        raise UserError(
            f"metrics.extractor=classifier needs labelled images; {exc.args[0]}. "
            "Use metrics.extractor=timm with local weights for unlabelled data"
        ) from exc
    return load_or_train_classifier(
        data_key,
        to_unit_range(train["image"].float()), train["label"].long(),
        to_unit_range(val["image"].float()), val["label"].long(),
        cache_dir=cache_dir, **settings,
    )
