"""Base class of genframe data modules, the shared train/validation/test split, and a
small in-memory dataset."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from genframe.errors import UserError, valid_list

log = logging.getLogger("genframe")

#: The splits every genframe data module serves, in the order they are reported.
SPLITS = ("train", "val", "test")
SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


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


class CaptionTokenizer:
    """For image + caption data modules: the tokenizer a text-to-image model reads the
    captions with.

    `fit_caption_tokenizer` (called in ``setup``) trains one of kind ``tokenizer_kind``
    (``"char"`` or ``"bpe"``, as for text data) on the training split's captions, unless
    the model brought its own (`use_tokenizer`, when fine-tuning or evaluating); either
    way ``vocab_size`` is its size afterwards.
    """

    tokenizer: Any = None
    tokenizer_kind: str = "char"
    vocab_size: int | None = None
    #: Token budget of a BPE tokenizer trained on the captions.
    bpe_vocab_size: int = 512

    def check_tokenizer_kind(self, kind: str) -> None:
        from genframe.text.tokenize import TOKENIZERS

        if kind not in TOKENIZERS:
            raise UserError(f"data.tokenizer={kind!r}: expected one of {valid_list(TOKENIZERS)} "
                            "(the captions' tokenizer for text-to-image models)")
        self.tokenizer_kind = kind

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Read captions with `tokenizer` (the model's) instead of training one."""
        if getattr(self, "train_set", None) is not None:
            raise RuntimeError("use_tokenizer() must come before setup()")
        self.tokenizer = tokenizer
        self.tokenizer_kind = tokenizer.kind

    def fit_caption_tokenizer(self, captions: list[str]) -> None:
        """Train the tokenizer on the training captions (unless one was given)."""
        from genframe.text.tokenize import build_tokenizer

        if self.tokenizer is None:
            self.tokenizer = build_tokenizer(self.tokenizer_kind, captions, self.bpe_vocab_size)
        self.vocab_size = self.tokenizer.vocab_size


class GenerativeDataModule(pl.LightningDataModule):
    """A LightningDataModule whose batches are dicts with genframe's agreed keys.

    Subclasses set ``provides`` (the batch keys they deliver) and fill ``self.train_set``,
    ``self.val_set`` and ``self.test_set`` in ``setup`` (`split_indices` cuts one
    collection into the three, reproducibly), then call `summarize_splits` once. Images
    are float tensors shaped (N, C, H, W) scaled to [-1, 1]; labels are long tensors.

    The validation split picks the best checkpoint during training; the test split is
    touched only by ``genframe evaluate`` (its default ``split=test``), so the figures it
    reports were never used to choose anything.
    """

    provides: ClassVar[frozenset[str]] = frozenset()
    #: Text data modules: the tokenizer in use (after ``setup``).
    tokenizer: Any = None

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Use `tokenizer` instead of training one (fine-tuning keeps the model's).

        Only text data modules take one; they must accept it before ``setup``.
        """
        provides = ", ".join(sorted(getattr(self, "provides", ()))) or "no text"
        raise UserError(f"data module {type(self).__name__} provides {provides}, not text: a "
                        "language model's run needs text data (data=text or data=chat)")

    def __init__(self, batch_size: int = 64, num_workers: int = 0) -> None:
        super().__init__()
        # Checked here, before any data is read: torch would refuse them only when the
        # first DataLoader is made, after the model summary.
        for key, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"data.{key} must be an integer >= {low}, got {value!r}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        #: After setup: how many items (images, documents, conversations) each split holds.
        self.split_sizes: dict[str, int] = {}

    def dataset(self, split: str) -> Dataset:
        """The dataset of `split` (``"train"``, ``"val"`` or ``"test"``), set up if needed."""
        if split not in SPLITS:
            raise UserError(f"split={split}: expected one of {', '.join(SPLITS)}")
        if getattr(self, f"{split}_set", None) is None:
            self.setup("fit")
        dataset = getattr(self, f"{split}_set", None)
        if dataset is None:
            if split == "test" and getattr(self, "test_fraction", None) == 0:
                raise UserError(
                    f"data.test_fraction=0: data module {type(self).__name__} has no test "
                    "split; expected data.test_fraction > 0 (e.g. 0.1, then train again, as "
                    "the split changes the training data), or evaluate split=val")
            raise UserError(
                f"data module {type(self).__name__} has no {SPLIT_WORDS[split]} split (its "
                f"setup leaves {split}_set empty); expected a data module with a {split} split, "
                "or evaluate another split (split=val)")
        return dataset

    def dataloader(self, split: str) -> DataLoader:
        """A DataLoader over `split`; only the training split is shuffled.

        The training split's loader is torchdata's ``StatefulDataLoader`` over an
        `EpochShuffle` sampler: each epoch's order is a function of the seed and the epoch
        alone, and Lightning saves the loader's position in every checkpoint, so a run
        continued from any checkpoint (mid-epoch or at an epoch's end) sees the batches
        the uninterrupted run would.
        """
        options = dict(batch_size=self.batch_size, num_workers=self.num_workers,
                       persistent_workers=self.num_workers > 0, drop_last=False)
        dataset = self.dataset(split)
        if split != "train":
            return DataLoader(dataset, shuffle=False, **options)
        # The loader's own generator for its workers' base seed: drawn from torch's global
        # one at every epoch's start, it would shift the training's random stream by
        # where a run was continued from.
        sampler = EpochShuffle(len(dataset))
        return StatefulDataLoader(dataset, sampler=sampler, **options,
                                  generator=torch.Generator().manual_seed(sampler.seed))

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def summarize_splits(self, unit: str, counts: Mapping[str, int] | None = None,
                         detail: str = "") -> None:
        """Log once how many `unit` (images, documents, ...) each split holds.

        Args:
            unit: what is counted, plural ("images").
            counts: split name -> count; default the lengths of the three datasets.
            detail: appended to the line in parentheses (e.g. the split seed).
        """
        if self.split_sizes:
            return
        if counts is None:
            counts = {s: len(getattr(self, f"{s}_set")) for s in SPLITS
                      if getattr(self, f"{s}_set", None) is not None}
        self.split_sizes = {s: int(counts[s]) for s in SPLITS if s in counts}
        sizes = " / ".join(f"{n} {s}" for s, n in self.split_sizes.items())
        log.info("%s splits: %s %s%s", type(self).__name__, sizes, unit,
                 f" ({detail})" if detail else "")


def check_fractions(val_fraction: float | None, test_fraction: float | None) -> None:
    """Refuse (`UserError`) split shares no data could use.

    `val_fraction` must lie strictly between 0 and 1 (the validation split picks the best
    checkpoint); `test_fraction` too, or be exactly 0, which turns the test split off (for
    data too small to spare one; ``genframe evaluate`` then refuses ``split=test``).
    Together they must stay below 1, so that training keeps some data. None means the
    split does not come from a fraction (``image_folder``'s ``val_root`` / ``test_root``)
    and is not checked.
    """
    shares = {"data.val_fraction": val_fraction, "data.test_fraction": test_fraction}
    for key, value in shares.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}={value!r}: expected a number between 0 and 1, e.g. 0.1")
        if key == "data.test_fraction" and value == 0:
            continue
        if not 0.0 < value < 1.0:
            also = " (or 0 for no test split)" if key == "data.test_fraction" else ""
            raise UserError(f"{key}={value}: expected a share strictly between 0 and 1, "
                            f"e.g. 0.1{also}")
    if None not in (val_fraction, test_fraction) and val_fraction + test_fraction >= 1.0:
        raise UserError(
            f"data.val_fraction + data.test_fraction = {val_fraction} + {test_fraction} = "
            f"{val_fraction + test_fraction:g}: expected less than 1, so that some data is "
            "left for training (e.g. 0.1 and 0.1)")


def split_counts(n: int, val_fraction: float | None, test_fraction: float | None, *,
                 what: str = "items", where: str = "the data") -> tuple[int, int, int]:
    """How many of `n` items go to (train, val, test).

    A held-out split gets ``round(n * fraction)`` items, at least 1; a fraction of None
    (the split comes from elsewhere) or a `test_fraction` of 0 (no test split) gives 0.
    Refuses (`UserError`) a split that would be empty, naming `where` (e.g. the folder)
    and what would be valid.
    """
    check_fractions(val_fraction, test_fraction)
    n_val = 0 if not val_fraction else max(1, round(n * val_fraction))
    n_test = 0 if not test_fraction else max(1, round(n * test_fraction))
    n_train = n - n_val - n_test
    if n_train < 1:
        held = [f"data.{k}_fraction={f} holds out {c}" for k, f, c in
                (("val", val_fraction, n_val), ("test", test_fraction, n_test)) if c]
        need = 1 + (n_val > 0) + (n_test > 0)
        no_test = ", or data.test_fraction=0 for no test split" if n_test else ""
        raise UserError(
            f"{where}: too few {what} ({n}) for the splits: {' and '.join(held)}, leaving "
            f"{max(n_train, 0)} for training; expected smaller fractions or more {what} (at "
            f"least {need}){no_test}")
    return n_train, n_val, n_test


def split_indices(n: int, val_fraction: float | None, test_fraction: float | None, seed: int,
                  *, what: str = "items", where: str = "the data",
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A reproducible random (train, val, test) split of range(n).

    One permutation of range(n) drawn from `seed` is cut into three: its first
    ``n_test`` items are the test split, the next ``n_val`` the validation split, the
    rest the training split (`split_counts` says how many). The same `n`, fractions and
    seed always give the same split on any machine.

    Why the test split comes first: before genframe had test splits, the validation split
    was the first ``n_val`` items of this same permutation. With ``test_fraction ==
    val_fraction`` the test split is exactly that old validation split, so a run trained
    before test splits existed is evaluated on images it never trained on, and a test
    figure of a new run compares directly with the old validation figures. The new
    validation split comes out of the old training split instead (the training split
    shrinks by ``test_fraction``): splitting the old validation split in two would have
    kept the training data, but left two splits of half the size for choosing checkpoints
    and for reporting (90 digits each), their figures noisier by a factor of about 1.4.
    """
    n_train, n_val, n_test = split_counts(n, val_fraction, test_fraction, what=what, where=where)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test + n_val:], perm[n_test:n_test + n_val], perm[:n_test]


def caption_condition(model: Any, data: Any, num_samples: int, split: str = "val") -> dict[str, Any] | None:
    """``{"prompt": [...]}`` of `num_samples` captions of `split` (cycled) for a model that
    makes images from prompts and data with captions -- what a text-to-image model's
    sample grids show during and after training -- or None for other models and data."""
    if ("prompt" not in getattr(model, "condition_keys", ()) or "image" not in getattr(model, "needs", ())
            or "caption" not in getattr(data, "provides", ())):
        return None
    captions = split_captions(data, split, num_samples)
    return {"prompt": [captions[i % len(captions)] for i in range(num_samples)]} if captions else None


def split_captions(data: Any, split: str, limit: int | None = None) -> list[str]:
    """The captions of a captioned data module's `split` (the first `limit`), in order."""
    dataset = data.dataset(split)
    count = len(dataset) if limit is None else min(int(limit), len(dataset))
    return [str(dataset[i]["caption"]) for i in range(count)]



class EpochShuffle(DistributedSampler):
    """Indices ``0 .. size - 1`` in a random order that depends only on `seed` and the
    epoch, with its position as state (``state_dict``), which torchdata's
    ``StatefulDataLoader`` puts in every checkpoint Lightning writes. A run continued
    from a checkpoint shuffles every epoch as the uninterrupted run did and goes on after
    the items an interrupted epoch had already used. Lightning calls `set_epoch` at the
    start of every training epoch (as for PyTorch's ``DistributedSampler``).

    Under several processes (DDP) each rank takes every ``num_replicas``-th index of the
    same epoch order, starting at its rank, as PyTorch's ``DistributedSampler`` does (the
    order is padded with its first indices to a multiple of ``num_replicas``, so every rank
    yields ``ceil(size / num_replicas)`` items). The ranks' batches of a step together are
    then exactly the items one process with a ``num_replicas`` times larger batch would
    take at that step. Being a ``DistributedSampler``, Lightning leaves it in place.

    Args:
        size: the number of items.
        seed: the base seed; default ``torch.initial_seed()`` (the run's ``seed``, which
            Lightning's ``seed_everything`` set).
        num_replicas, rank: the processes sharing the data and this one's index; default
            ``torch.distributed``'s world size and rank when it is initialised, else 1 and 0.
    """

    def __init__(self, size: int, seed: int | None = None, *, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas or (dist.get_world_size() if ready else 1)
        rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        seed = torch.initial_seed() if seed is None else int(seed)
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=seed, drop_last=False)
        self.size = size
        self.yielded = 0  # items of this epoch's share handed out so far
        self._resume_at = 0

    def __iter__(self):
        start, self._resume_at = self._resume_at, 0
        generator = torch.Generator().manual_seed((self.seed + 1_000_003 * self.epoch) % 2**63)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.num_replicas > 1:
            padding = self.total_size - self.size
            order += (order * (padding // max(self.size, 1) + 1))[:padding]
            order = order[self.rank::self.num_replicas]
        self.yielded = start
        for index in order[start:]:
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self._resume_at = int(state["yielded"])
