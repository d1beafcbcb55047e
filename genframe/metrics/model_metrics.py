"""Image metrics of a model against its data: the glue `genframe evaluate` and the
training-time `SampleQuality` callback share. Plain arguments, no config objects."""

from __future__ import annotations

from typing import Any

import torch

from genframe.errors import UserError
from genframe.metrics.build import build_extractor, classifier_from_datasets, stack_dataset
from genframe.metrics.features import to_unit_range
from genframe.metrics.image_metrics import ImageMetrics
from genframe.samples import Samples


#: The real images the metrics can compare with (``metrics.real``).
REAL_CHOICES = ("all", "train", "val", "test")


def check_metric_options(
    *,
    num_samples: Any = 1000,
    batch_size: Any = 250,
    extractor: Any = "classifier",
    timm_model: Any = None,
    timm_weights: Any = None,
    timm_image_size: Any = None,
    k: Any = 3,
    real: Any = "all",
    alignment_prompts: Any = None,
    key: str = "metrics",
    real_choices: tuple[str, ...] = REAL_CHOICES,
) -> None:
    """Refuse (`UserError`) image-metric settings before any image is generated.

    Messages start with ``<key>.<name>=<value>``; `key` is the config node
    (``metrics``, ``callbacks.sample_metrics``).
    """
    from pathlib import Path

    from genframe.errors import did_you_mean
    from genframe.metrics.build import EXTRACTORS

    def integer(v: Any, low: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    if alignment_prompts is not None and not integer(alignment_prompts, 1):
        raise UserError(f"{key}.alignment_prompts={_shown(alignment_prompts)}: expected an "
                        "integer >= 1 (captions of the split to generate from), or null for all")

    checks = (("num_samples", num_samples, 2), ("batch_size", batch_size, 1), ("k", k, 1))
    for name, value, low in checks:
        if not integer(value, low):
            raise UserError(f"{key}.{name}={value!r}: expected an integer >= {low}")
    if k >= num_samples:
        raise UserError(f"{key}.k={k}: expected fewer neighbours than {key}.num_samples={num_samples}")
    if extractor not in EXTRACTORS:
        raise UserError(f"{key}.extractor={extractor!r}: expected one of {', '.join(EXTRACTORS)}."
                        f"{did_you_mean(str(extractor), EXTRACTORS)}")
    if real not in real_choices:
        raise UserError(f"{key}.real={real!r}: expected one of {', '.join(real_choices)}."
                        f"{did_you_mean(str(real), real_choices)}")
    if timm_image_size is not None and not integer(timm_image_size, 8):
        raise UserError(f"{key}.timm_image_size={_shown(timm_image_size)}: expected an integer >= 8, or null")
    if extractor == "timm":
        if not timm_model or not isinstance(timm_model, str):
            raise UserError(f"{key}.timm_model={_shown(timm_model)}: {key}.extractor=timm needs a timm "
                            "architecture name, e.g. resnet18")
        if not timm_weights:
            raise UserError(f"{key}.timm_weights={_shown(timm_weights)}: {key}.extractor=timm needs a "
                            "local weights file (nothing is downloaded)")
        if not Path(str(timm_weights)).expanduser().is_file():
            raise UserError(f"{key}.timm_weights={timm_weights}: no such file; expected a local "
                            "weights file (.safetensors, .pth, .pt, .bin)")


def data_image_metrics(
    data: Any,
    *,
    extractor: str = "classifier",
    timm_model: str | None = None,
    timm_weights: str | None = None,
    timm_image_size: int | None = None,
    k: int = 3,
    real: str = "all",
    max_real: int | None = None,
):
    """`ImageMetrics` against a data module's validation images.

    With ``extractor="classifier"`` the data's own classifier is trained on its labels
    (or loaded from the cache) and also scores class accuracy.

    Args:
        data: a set-up genframe data module with ``train_set`` and ``val_set``.
        extractor: ``"classifier"`` or ``"timm"`` (with `timm_model` and local `timm_weights`).
        k: neighbourhood size of precision/recall.
        real: the real images: ``"val"`` (the validation split), ``"train"``, ``"all"``
            (both) or ``"test"`` (the test split, for `genframe evaluate`; ``"all"`` leaves
            it out, so a training-time monitor never sees it). More real images make the
            Fréchet distance less biased; FD on the training images is the usual practice
            (as for CIFAR-10's FID).
        max_real: use at most this many real images.
    """
    data.setup("fit")
    classifier = None
    if extractor == "classifier":
        key = {"data": type(data).__name__,
               **{a: getattr(data, a, None) for a in ("image_size", "channels", "num_classes", "seed")}}
        classifier = classifier_from_datasets(key, data.train_set, data.val_set)
    feats = build_extractor(extractor, classifier=classifier, timm_model=timm_model,
                            timm_weights=timm_weights, image_size=timm_image_size)
    splits = {"val": [data.val_set], "train": [data.train_set], "all": [data.train_set, data.val_set]}
    if getattr(data, "test_set", None) is not None:
        splits["test"] = [data.test_set]
    if real not in splits:
        raise UserError(f"metrics.real={real}: expected one of {', '.join(splits)}")
    images = torch.cat([stack_dataset(s, ("image",))["image"] for s in splits[real]])[:max_real]
    return ImageMetrics(to_unit_range(images.float()), feats, classifier=classifier, k=k)


def sample_model(model, num_samples: int, *, batch_size: int, seed: int, **options: Any) -> Samples:
    """`num_samples` samples in batches (batch b uses seed + b), joined into one `Samples`."""
    if num_samples < 1:
        raise UserError(f"metrics.num_samples must be at least 1, got {num_samples}")
    parts = []
    for b, start in enumerate(range(0, num_samples, batch_size)):
        n = min(batch_size, num_samples - start)
        parts.append(model.generate(n, seed=seed + b, **options))
    if parts[0].images is None:
        raise UserError("image metrics need a model that generates images")
    return Samples(images=torch.cat([p.images.cpu() for p in parts]),
                   conditions=[c for p in parts for c in p.conditions],
                   metadata=dict(parts[0].metadata))


def model_image_metrics(model, metrics, num_samples: int, *, batch_size: int = 250,
                        seed: int = 0, **options: Any) -> dict[str, float]:
    """FD, precision/recall (and class accuracy for class-conditional models) of
    `num_samples` generated images; `options` go to `model.generate`."""
    was_training = model.training
    model.eval()
    try:
        samples = sample_model(model, num_samples, batch_size=batch_size, seed=seed, **options)
    finally:
        model.train(was_training)
    return metrics.of_samples(samples)


def model_alignment(model, prompts: list[str], *, batch_size: int = 250, seed: int = 0,
                    **options: Any) -> dict[str, float]:
    """`genframe.metrics.alignment.alignment_scores` of one image generated for each of
    `prompts` (shapes captions), in batches (batch b uses seed + b); `options` go to
    ``model.generate`` (guidance, sampler, ...).

    Raises:
        UserError: no prompt, or none that is a shapes caption.
    """
    from genframe.metrics.alignment import alignment_scores

    if not prompts:
        raise UserError("alignment: no prompts to generate images for")
    was_training = model.training
    model.eval()
    parts = []
    try:
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[start:start + batch_size]
            parts.append(model.generate(len(chunk), condition={"prompt": chunk}, seed=seed + b,
                                        **options).images.cpu())
    finally:
        model.train(was_training)
    return alignment_scores(torch.cat(parts), prompts)


def _shown(value) -> str:
    """A config value as the user writes it on the command line (``null``, not ``None``)."""
    return "null" if value is None else repr(value)
