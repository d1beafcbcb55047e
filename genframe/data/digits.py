"""scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes), shipped offline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genframe.data.base import (
    DictDataset,
    GenerativeDataModule,
    check_fractions,
    split_indices,
)
from genframe.errors import UserError


class DigitsDataModule(GenerativeDataModule):
    """The `load_digits` images scaled to [-1, 1], with their labels.

    Args:
        batch_size: images per batch.
        val_fraction: share of the images held out for validation (choosing checkpoints).
        test_fraction: share of the images held out for testing (``genframe evaluate``);
            0 turns the test split off.
            With the defaults: 1,437 training, 180 validation and 180 test images; see
            `split_indices` for how the split is drawn.
        seed: seed of the train/validation/test split.
        image_size: side length; the native 8 keeps the 17 grey levels exact, other
            sizes resample bilinearly.
        channels: 1 (grey) or 3 (the grey value repeated).
        num_classes: always 10 (kept in the config so models can read it).
        num_levels: grey levels of the data (17 for the native digits).
        num_workers: DataLoader worker processes.
    """

    provides = frozenset({"image", "label"})

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        image_size: int = 8,
        channels: int = 1,
        num_classes: int = 10,
        num_levels: int = 17,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if channels not in (1, 3):
            raise UserError(f"data.channels must be 1 or 3 for digits, got {channels}")
        if num_classes != 10:
            raise UserError(f"data.num_classes is 10 for digits, got {num_classes}")
        if image_size < 4:
            raise UserError(f"data.image_size must be at least 4, got {image_size}")
        if not 2 <= num_levels <= 256:
            raise UserError(f"data.num_levels must be between 2 and 256 (digits have 17 grey "
                            f"levels), got {num_levels}")
        check_fractions(val_fraction, test_fraction)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.num_levels = num_levels

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
        images = images / 16.0 * 2.0 - 1.0  # 0..16 grey levels -> [-1, 1]
        if self.image_size != images.shape[-1]:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False,
            ).clamp(-1, 1)
        if self.channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        labels = torch.tensor(digits.target, dtype=torch.long)
        splits = split_indices(len(images), self.val_fraction, self.test_fraction, self.seed,
                               what="images", where="the digits data")
        # data.test_fraction=0 (no test split) leaves test_set None.
        self.train_set, self.val_set, self.test_set = (
            DictDataset({"image": images[idx], "label": labels[idx]}) if len(idx) else None
            for idx in splits)
        self.summarize_splits("images", detail=f"seed {self.seed}")
