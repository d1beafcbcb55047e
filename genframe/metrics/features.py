"""Feature extractors: the space in which image metrics compare real and generated images.

The reference FID uses Inception-v3 weights that cannot be downloaded here, so every
metric in `genframe.metrics` takes its feature extractor as an argument. Two kinds ship:

- `genframe.metrics.classifier.ClassifierFeatures`: a small CNN genframe trains on the
  data's labels and caches (works offline, e.g. on digits);
- `TimmFeatures`: any timm model, with weights from a local file the user names.

Convention: an extractor takes float images shaped (N, C, H, W) with values in [0, 1] --
the range of `Samples.images`, not the [-1, 1] of training batches (see `to_unit_range`)
-- and returns float features shaped (N, D). It has a `name` and an integer
`num_features` (= D), which is also what torchmetrics asks of a custom feature module, so
an extractor can be passed as ``feature=`` to torchmetrics'
``FrechetInceptionDistance(feature=extractor, normalize=True)`` or
``KernelInceptionDistance``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genframe.errors import UserError, did_you_mean, plural
from genframe.files import load_state_dict_strict, read_state_dict


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map training-batch images from [-1, 1] to the extractors' [0, 1]."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


class FeatureExtractor(nn.Module):
    """Base of feature extractors: images (N, C, H, W) in [0, 1] -> features (N, D).

    Subclasses set ``name`` (shown in reports and cache keys) and ``num_features`` (D) and
    implement ``forward``. An extractor is frozen: its parameters need no gradient and it
    stays in eval mode even when a parent module (a Lightning module, a torchmetrics
    metric) calls ``.train()``, so BatchNorm statistics and dropout never change the
    features between calls.
    """

    name: str = "features"
    num_features: int = 0

    def freeze(self) -> FeatureExtractor:
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Same trick as torchmetrics' NoTrainInceptionV3: ignore requests to train.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def check_images(self, images: torch.Tensor) -> None:
        """Refuse inputs that break the convention (wrong rank or dtype)."""
        if images.ndim != 4:
            raise ValueError(f"{self.name}: expected images shaped (N, C, H, W), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(
                f"{self.name}: expected float images in [0, 1], got dtype {images.dtype} "
                "(divide uint8 images by 255)"
            )


def batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, images.shape[0], batch_size):
        yield images[start:start + batch_size]


@torch.no_grad()
def extract_features(
    extractor: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Run `extractor` over `images` in batches, without gradients.

    Args:
        extractor: a `FeatureExtractor` (or any module mapping (B, C, H, W) to (B, D)).
        images: float tensor (N, C, H, W) in [0, 1], on any device.
        batch_size: images per forward pass.
        device: where to run; default the extractor's device.

    Returns:
        float32 features (N, D) on the CPU.
    """
    if device is None:
        device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    out = [extractor(chunk.to(device, torch.float32)).float().cpu() for chunk in batches(images, batch_size)]
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)  # (N, D)


def match_channels(images: torch.Tensor, channels: int, *, who: str) -> torch.Tensor:
    """Grey -> RGB by repeating the channel; anything else that differs is an error."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1)
    raise UserError(
        f"{who} expects images with {plural(channels, 'channel')}, got {c}; "
        "compare images with the channel count the feature extractor was built for"
    )


class TimmFeatures(FeatureExtractor):
    """Pooled features of a timm model whose weights come from a local file.

    ``timm.create_model(model_name, pretrained=False, num_classes=0)`` builds the network
    without its classifier (so the output is the pooled, pre-logits feature vector) and
    the weights are read from `weights`: ``.safetensors`` with safetensors, ``.pth`` /
    ``.pt`` / ``.bin`` with ``torch.load(weights_only=True)`` (never unpickling code).
    Nothing is ever downloaded.

    Images are prepared as the model was trained: grey images repeated to 3 channels,
    resized (bilinear or bicubic as the model's data config says, with antialiasing) to
    the model's input size (or `image_size`), then normalised with the model's mean/std.

    Args:
        model_name: a timm architecture name, e.g. ``"resnet50"`` or ``"vit_small_patch16_224"``.
        weights: path of a local weights file in timm's key layout (as written by
            ``model.state_dict()`` / timm's Hugging Face repos). A classifier head in the
            file is dropped; wrappers ``{"state_dict": ...}``, ``{"model": ...}``,
            ``{"state_dict_ema": ...}`` and a ``module.`` prefix are understood.
        image_size: side length fed to the model; default the model's own input size.
            Smaller sizes make the features cheaper (CNNs accept any size).
        weights_key, model_key, image_size_key: the config keys these values came from, for messages.
    """

    def __init__(
        self,
        model_name: str,
        weights: str | Path,
        image_size: int | None = None,
        *,
        weights_key: str = "metrics.timm_weights",
        model_key: str = "metrics.timm_model",
        image_size_key: str = "metrics.timm_image_size",
    ) -> None:
        super().__init__()
        import timm
        from timm.data import resolve_data_config

        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"{weights_key}={weights}: no such file")
        if not timm.is_model(model_name):
            raise UserError(
                f"{model_key}={model_name}: not a timm model.{did_you_mean(model_name, timm.list_models())}"
            )
        model = timm.create_model(model_name, pretrained=False, num_classes=0)
        load_timm_weights(model, path, where=f"{weights_key}={weights}")
        self.model = model

        data_cfg = resolve_data_config({}, model=model)
        in_chans, height, width = data_cfg["input_size"]
        if image_size is not None:
            if image_size < 8:
                raise UserError(f"{image_size_key} must be at least 8, got {image_size}")
            height = width = int(image_size)
        self.in_chans = int(in_chans)
        self.input_size = (int(height), int(width))
        # timm names PIL filters; torch's interpolate knows bilinear and bicubic.
        self.interpolation = "bicubic" if data_cfg.get("interpolation") == "bicubic" else "bilinear"
        self.register_buffer("mean", torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.name = f"timm:{model_name}"
        self.model_name = model_name
        self.weights = str(path.resolve())
        self.freeze()
        # The pooled width differs from `model.num_features` for models with a pre-logits
        # layer; one forward pass at the chosen size is the only sure way to know it.
        probe = torch.full((1, self.in_chans, *self.input_size), 0.5)
        try:
            with torch.no_grad():
                self.num_features = int(self.forward(probe).shape[-1])
        except (RuntimeError, AssertionError, ValueError) as exc:
            # e.g. a ViT built for 224x224 patches refuses other sizes.
            first = (str(exc).splitlines() or [""])[0][:200]
            raise UserError(
                f"{image_size_key}={image_size}: timm model '{model_name}' does not run at "
                f"{self.input_size[0]}x{self.input_size[1]} ({first}); leave it unset to use "
                f"the model's own input size {tuple(data_cfg['input_size'][1:])}"
            ) from exc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, C, H, W) in [0, 1] -> (B, D)
        self.check_images(images)
        x = match_channels(images.float(), self.in_chans, who=self.name)
        if tuple(x.shape[-2:]) != self.input_size:
            # Antialiasing matters when shrinking large images (aliasing shifts features,
            # Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
            # Evaluation", https://arxiv.org/abs/2104.11222).
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation,
                              align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        feats = self.model(x)  # (B, D): num_classes=0 leaves the pooled pre-logits output
        return feats.flatten(1)


def load_timm_weights(model: nn.Module, path: Path, *, where: str) -> None:
    """Load a local weights file into a timm model built with ``num_classes=0``.

    We load the state dict ourselves instead of timm's ``pretrained_cfg_overlay=dict(file=)``
    route: that route loads with ``strict=False`` once the classifier is removed, so a
    file for another architecture would load silently with random layers left. Here the
    file is read by `genframe.files.read_state_dict` (never unpickling code; wrappers and
    a ``module.`` prefix understood) and loaded by `genframe.files.load_state_dict_strict`:
    every key must fit, and a mismatch is a `UserError` naming `where` and the first keys.
    """
    state = read_state_dict(path, where=where)
    # The file may carry the classifier the model was trained with; the extractor has none.
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    head = [f"{name}.{p}" for name in ((classifier,) if isinstance(classifier, str) else classifier)
            for p in ("weight", "bias")]
    arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    load_state_dict_strict(
        model, state, where=where, ignore=head,
        what=f"timm model '{arch}' (expected a state dict of that architecture in timm's layout)",
    )


def feature_batch_size(extractor: nn.Module, default: int = 256) -> int:
    """A batch size that keeps large timm inputs within memory (about 2**25 input values)."""
    size = getattr(extractor, "input_size", None)
    if size is None:
        return default
    per_image = 3 * size[0] * size[1]
    return max(1, min(default, 2 ** math.floor(math.log2(max(1, 2 ** 25 // per_image)))))
