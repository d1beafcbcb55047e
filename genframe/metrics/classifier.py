"""A small image classifier genframe trains on the data's labels, and caches.

It serves two metrics when no pretrained network is at hand (the offline case):

- its penultimate layer is a feature space for the Fréchet distance and precision/recall
  (`ClassifierFeatures`), in the spirit of the LeNet-feature FID that papers report on
  MNIST-like data;
- its predictions measure whether a class-conditional model draws the class it was asked
  for (`genframe.metrics.class_accuracy`), as the classification accuracy score of
  Ravuri & Vinyals 2019 (https://arxiv.org/abs/1905.10887) in reverse.

Training is a plain torch loop (no Lightning, no Hydra): a few seconds on the digits on a
CPU. The weights are cached as safetensors in ``classifiers/`` of genframe's cache folder
(`genframe.cache`), keyed by a hash of the data description, the data's content, the
architecture and the training settings, so an evaluation during every validation epoch, a
sweep, or `genframe evaluate` train it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from genframe.cache import CLASSIFIERS, cache_dir
from genframe.errors import UserError
from genframe.files import atomic_write_bytes
from genframe.layers.conv import ConvEncoder, as_size2d
from genframe.metrics.features import FeatureExtractor, match_channels

log = logging.getLogger(__name__)

# Bump when the architecture or the training loop changes meaning: old cache entries are
# then ignored instead of loaded into a different network.
FORMAT = "genframe-classifier/1"
META_KEY = "genframe_classifier"

_default_cache_dir = cache_dir  # `load_or_train_classifier` has an argument of that name


def default_channels(image_size: int | Sequence[int]) -> tuple[int, ...]:
    """Level widths by image size: one stride-2 level per doubling, up to four levels."""
    side = min(as_size2d(image_size))
    widths = [32, 64]
    while side > 16 and len(widths) < 4:  # 8 -> 2 levels, 32 -> 3, 64 and up -> 4
        widths.append(128)
        side //= 2
    return tuple(widths)


class ImageClassifier(nn.Module):
    """A small residual CNN: images in [0, 1] -> class logits, with a feature layer.

    ``ConvEncoder`` trunk (genframe.layers) -> adaptive average pool to at most 4x4 ->
    linear -> SiLU (the features) -> dropout -> linear (the logits). Pooling to a small
    grid rather than to 1x1 keeps where the strokes are, which matters for 8x8 digits,
    and keeps the head small for large images.

    Args:
        in_channels: image channels.
        image_size: side (int) or (H, W) of the images it is trained on.
        num_classes: number of labels.
        channels: width of each trunk level (default: `default_channels(image_size)`).
        blocks_per_level: ResBlocks per trunk level.
        feature_dim: width of the feature layer that `ClassifierFeatures` returns.
        dropout: dropout before the last linear layer.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int | Sequence[int],
        num_classes: int,
        *,
        channels: Sequence[int] | None = None,
        blocks_per_level: int = 1,
        feature_dim: int = 128,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        channels = tuple(channels or default_channels(image_size))
        self.config = {
            "in_channels": int(in_channels),
            "image_size": list(as_size2d(image_size)),
            "num_classes": int(num_classes),
            "channels": list(channels),
            "blocks_per_level": int(blocks_per_level),
            "feature_dim": int(feature_dim),
            "dropout": float(dropout),
        }
        self.in_channels = int(in_channels)
        self.image_size = as_size2d(image_size)
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.trunk = ConvEncoder(in_channels, channels, image_size, blocks_per_level=blocks_per_level)
        c, h, w = self.trunk.out_shape
        grid = (min(h, 4), min(w, 4))
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.to_features = nn.Linear(c * grid[0] * grid[1], feature_dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, C, H, W) in [0, 1] -> (B, feature_dim)
        x = images * 2.0 - 1.0  # the [-1, 1] range genframe's networks are built for
        h = self.pool(self.trunk(x))  # (B, c, <=4, <=4)
        return F.silu(self.to_features(h.flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))  # (B, num_classes) logits


def _shift(images: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (edge padding), a mild augmentation.

    Generated samples are rarely centred exactly like the data; a classifier that has
    seen small shifts judges them on their shape rather than their position.
    """
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n)[:, None, None, None]
    chan = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, chan, rows, cols]  # (N, C, H, W)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Share of `images` (in [0, 1]) that `model` labels correctly."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, images.shape[0])


def _check_data(images: torch.Tensor, labels: torch.Tensor, num_classes: int, what: str) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(
            f"{what} images must be a float tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError(f"no {what} images")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{what}: {tuple(labels.shape)} labels for {images.shape[0]} images")
    if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
        raise ValueError(
            f"{what} images must be in [0, 1] (got [{float(images.min()):.2f}, "
            f"{float(images.max()):.2f}]); map training batches with to_unit_range()"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{what} labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )


def train_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    epochs: int = 10,
    seed: int = 0,
    num_classes: int | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    max_shift: int | None = None,
    num_threads: int | None = None,
    **arch: Any,
) -> tuple[ImageClassifier, float]:
    """Train an `ImageClassifier` and measure it on the validation images.

    Args:
        train_images, val_images: float (N, C, H, W) in [0, 1].
        train_labels, val_labels: long (N,) in [0, num_classes).
        epochs: passes over the training images.
        seed: seeds the initial weights, the batch order and the augmentation; the same
            seed on the same data gives the same weights (the global RNG is left alone).
        num_classes: default ``max(label) + 1``.
        batch_size, lr, weight_decay: AdamW with a one-cycle schedule (15% warm-up to
            `lr`, then cosine decay).
        max_shift: random translation in pixels for augmentation; default 1 pixel per 8
            of the image side.
        num_threads: torch threads while training (restored afterwards); default 1 for
            images up to 32x32, else unchanged. Convolutions this small gain nothing from
            intra-op threads, and on a busy CPU OpenMP threads that wait for each other
            made the digits classifier 40 times slower (2 threads, one core taken).
        **arch: further `ImageClassifier` arguments (channels, feature_dim, ...).

    Returns:
        (the model in eval mode on the CPU, validation accuracy in [0, 1]).
    """
    train_labels = train_labels.long().cpu()
    val_labels = val_labels.long().cpu()
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if train_labels.numel() == 0 or val_labels.numel() == 0:
        raise ValueError("the classifier needs training and validation images")
    if num_classes is None:
        num_classes = int(max(int(train_labels.max()), int(val_labels.max()))) + 1
    train_images, val_images = train_images.float().cpu(), val_images.float().cpu()
    _check_data(train_images, train_labels, num_classes, "training")
    _check_data(val_images, val_labels, num_classes, "validation")
    if train_images.shape[1:] != val_images.shape[1:]:
        raise ValueError(f"training and validation images differ in shape: "
                         f"{tuple(train_images.shape[1:])} vs {tuple(val_images.shape[1:])}")
    h, w = train_images.shape[-2:]
    if max_shift is None:
        max_shift = max(1, min(h, w) // 8)

    if num_threads is None:
        num_threads = 1 if h * w <= 32 * 32 else torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _train(train_images, train_labels, val_images, val_labels, num_classes=num_classes,
                      epochs=epochs, seed=seed, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, max_shift=max_shift, arch=arch)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    num_classes: int,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_shift: int,
    arch: dict[str, Any],
) -> tuple[ImageClassifier, float]:
    _, c, h, w = train_images.shape
    generator = torch.Generator().manual_seed(seed)
    # fork_rng: seeding for the weights' init must not reset the caller's global RNG
    # (a training run that evaluates mid-way would otherwise replay its random stream).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageClassifier(c, (h, w), num_classes, **arch)
        n = train_images.shape[0]
        steps = epochs * -(-n // batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, steps),
                                                       pct_start=0.15)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                x = _shift(train_images[idx], generator, max_shift)  # (B, C, H, W)
                loss = F.cross_entropy(model(x), train_labels[idx])
                if not torch.isfinite(loss):
                    raise RuntimeError("the metrics classifier diverged (non-finite loss)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    model.eval()
    return model, accuracy(model, val_images, val_labels)


@dataclass
class CachedClassifier:
    """What `load_or_train_classifier` returns.

    Attributes:
        model: the classifier (eval mode, CPU).
        val_accuracy: its accuracy on the validation images when it was trained.
        path: the cache file.
        from_cache: True when the weights were loaded, False when trained just now.
        train_seconds: how long the training took (also recorded in the cache file).
        meta: everything the cache file records (data key, settings, accuracy, ...).
    """

    model: ImageClassifier
    val_accuracy: float
    path: Path
    from_cache: bool
    train_seconds: float
    meta: dict[str, Any]

    def extractor(self) -> ClassifierFeatures:
        return ClassifierFeatures(self.model, name=f"classifier:{self.path.stem}")


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """A hash of the tensors' values, so a changed data set never meets a stale cache."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text)[:40] or "data"


def load_or_train_classifier(
    data_key: Mapping[str, Any],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val_images: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    cache_dir: Path | str | None = None,
    epochs: int = 10,
    seed: int = 0,
    **settings: Any,
) -> CachedClassifier:
    """Load the classifier of this data from the cache, or train and cache it.

    Args:
        data_key: a JSON-able description of the data, e.g. ``{"name": "digits",
            "image_size": 8, "channels": 1, "num_classes": 10, "seed": 0,
            "val_fraction": 0.1}``. It names the cache entry (with a hash of the images
            and labels themselves, so an edited image folder is never matched to old
            weights) and is recorded in the file. ``num_classes`` is used if present.
        train_images, val_images: float (N, C, H, W) in [0, 1].
        train_labels, val_labels: long (N,).
        cache_dir: default `genframe.cache.cache_dir()`; entries go to
            ``<cache_dir>/classifiers/``.
        epochs, seed, **settings: passed to `train_classifier` and part of the key.

    Returns:
        a `CachedClassifier`; ``from_cache`` says whether it was loaded.

    The entry is locked while it is checked, trained and written (atomically), so
    concurrent runs (a sweep, DDP ranks) train it once: the others wait and load it.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file, save

    try:
        description = json.loads(json.dumps(dict(data_key), sort_keys=True))
    except TypeError as exc:
        raise ValueError(f"data_key must be JSON-serialisable: {exc}") from exc
    settings = {"epochs": int(epochs), "seed": int(seed), **settings}
    if "num_classes" not in settings and description.get("num_classes") is not None:
        settings["num_classes"] = int(description["num_classes"])
    # Threads change the speed, not the weights: not part of the key.
    key_settings = {k: v for k, v in settings.items() if k != "num_threads"}
    key = {
        "format": FORMAT,
        "data": description,
        "content": data_fingerprint(
            train_images.float(), train_labels.long(), val_images.float(), val_labels.long()
        ),
        "settings": key_settings,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    path = root / CLASSIFIERS / f"{_slug(str(description.get('name', 'data')))}-{digest}.safetensors"

    from genframe.cache import entry_lock

    # One process trains; others wanting the same entry (DDP ranks) wait, then load it.
    with entry_lock(path):
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = json.loads((f.metadata() or {})[META_KEY])
                if meta.get("key") != key:
                    raise ValueError("the cache entry was written for other data or settings")
                model = ImageClassifier(**_arch_args(meta["architecture"]))
                model.load_state_dict(load_file(str(path)), strict=True)
                model.eval()
                return CachedClassifier(model, float(meta["val_accuracy"]), path, True,
                                        float(meta.get("train_seconds", 0.0)), meta)
            except (SafetensorError, OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
                # A damaged or foreign entry costs a retraining, never a wrong classifier.
                log.warning("ignoring the classifier cache entry %s (%s); training again", path, exc)

        start = time.perf_counter()
        model, val_acc = train_classifier(train_images, train_labels, val_images, val_labels, **settings)
        seconds = time.perf_counter() - start
        meta = {
            "key": key,
            "architecture": model.config,
            "val_accuracy": val_acc,
            "num_classes": model.num_classes,
            "num_train": int(train_images.shape[0]),
            "num_val": int(val_images.shape[0]),
            "train_seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(path, save(state, metadata={META_KEY: json.dumps(meta, sort_keys=True)}))
        log.info("trained the metrics classifier in %.1f s (val accuracy %.4f); cached at %s",
                 seconds, val_acc, path)
        return CachedClassifier(model, val_acc, path, False, seconds, meta)


def _arch_args(config: Mapping[str, Any]) -> dict[str, Any]:
    args = dict(config)
    return {
        "in_channels": args.pop("in_channels"),
        "image_size": tuple(args.pop("image_size")),
        "num_classes": args.pop("num_classes"),
        **args,
    }


class ClassifierFeatures(FeatureExtractor):
    """An `ImageClassifier` seen as a feature extractor (its penultimate layer).

    Args:
        classifier: a trained `ImageClassifier` (from `load_or_train_classifier`).
        name: shown in reports; the cache file's stem by default.

    Images must have the size the classifier was trained on (a model and its data
    classifier must agree); grey images are repeated for a 3-channel classifier.
    """

    def __init__(self, classifier: ImageClassifier, *, name: str = "classifier") -> None:
        super().__init__()
        self.classifier = classifier
        self.name = name
        self.num_features = classifier.feature_dim
        self.num_classes = classifier.num_classes
        self.freeze()

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        x = match_channels(images.float(), self.classifier.in_channels, who=self.name)
        if tuple(x.shape[-2:]) != self.classifier.image_size:
            raise UserError(
                f"{self.name} was trained on {self.classifier.image_size[0]}x"
                f"{self.classifier.image_size[1]} images, got {x.shape[-2]}x{x.shape[-1]}; "
                "evaluate a model with the data (and image_size) it was trained on"
            )
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, C, H, W) in [0, 1] -> (B, feature_dim)
        return self.classifier.features(self._prepare(images))

    @torch.no_grad()
    def logits(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Class logits (N, num_classes) of images in [0, 1], on the CPU."""
        if images.shape[0] == 0:
            return torch.empty(0, self.num_classes)
        out = [
            self.classifier(self._prepare(chunk.to(self.device))).float().cpu()
            for chunk in images.split(batch_size)
        ]
        return torch.cat(out)  # (N, num_classes)

    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """The predicted label (N,) of each image in [0, 1]."""
        return self.logits(images, batch_size).argmax(dim=1)
