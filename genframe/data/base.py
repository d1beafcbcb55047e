"""Base class of genframe data modules and a small in-memory dataset."""

from __future__ import annotations

from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


class DictDataset(Dataset):
    """Rows of equally long tensors (or lists), served as dicts: ``{"image": ..., ...}``."""

    def __init__(self, columns: dict[str, Any]) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns have different lengths: {lengths}")
        self.columns = columns
        self.length = lengths.pop()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self.columns.items()}


class GenerativeDataModule(pl.LightningDataModule):
    """A LightningDataModule whose batches are dicts with genframe's agreed keys.

    Subclasses set ``provides`` (the batch keys they deliver) and fill
    ``self.train_set`` / ``self.val_set`` in ``setup``. Images are float tensors shaped
    (N, C, H, W) scaled to [-1, 1]; labels are long tensors.
    """

    provides: ClassVar[frozenset[str]] = frozenset()
    #: Text data modules: the tokenizer in use (after ``setup``).
    tokenizer: Any = None

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Use `tokenizer` instead of training one (fine-tuning keeps the model's).

        Only text data modules take one; they must accept it before ``setup``.
        """
        from genframe.errors import UserError

        raise UserError(f"data module {type(self).__name__} does not take a tokenizer")

    def __init__(self, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            self.setup("fit")
            dataset = self.train_set if shuffle else self.val_set
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A reproducible random train/validation split of range(n)."""
    if not 0.0 < val_fraction < 1.0:
        from genframe.errors import UserError

        raise UserError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:], perm[:n_val]
