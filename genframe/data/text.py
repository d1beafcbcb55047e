"""Text for language models: load, clean, split, tokenise (cached), serve token windows."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from genframe.data.base import (
    SPLIT_WORDS,
    SPLITS,
    GenerativeDataModule,
    check_fractions,
    split_counts,
)
from genframe.errors import UserError

log = logging.getLogger("genframe")


class TokenWindows(Dataset):
    """Windows of ``block_size + 1`` tokens from one token stream, as ``{"tokens": ...}``.

    ``random_offsets=True`` (training): each item starts at a fresh random offset drawn
    from torch's generator (seeded by Lightning's ``seed_everything``); the length is the
    number of non-overlapping windows, so one epoch sees about every token once.
    ``random_offsets=False`` (validation): consecutive non-overlapping windows.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, random_offsets: bool) -> None:
        self.tokens = tokens
        self.block_size = block_size
        self.random_offsets = random_offsets
        self.span = block_size + 1
        if len(tokens) < self.span:
            raise ValueError("token stream shorter than one window")
        self.length = max(1, (len(tokens) - 1) // block_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.random_offsets:
            start = int(torch.randint(0, len(self.tokens) - self.span + 1, ()).item())
        else:
            if not 0 <= i < self.length:
                raise IndexError(i)
            start = min(i * self.block_size, len(self.tokens) - self.span)
        window = np.asarray(self.tokens[start:start + self.span], dtype=np.int64)
        return {"tokens": torch.from_numpy(window)}


def check_text_args(tokenizer: str, block_size: int, batch_size: int, val_fraction: float,
                    test_fraction: float) -> None:
    """Refuse (`UserError`) the text data settings no run could use."""
    from genframe.text.tokenize import TOKENIZERS, build_tokenizer

    if tokenizer not in TOKENIZERS:
        build_tokenizer(tokenizer, [])  # raises the UserError with a hint
    if block_size < 1:
        raise UserError(f"data.block_size must be at least 1, got {block_size}")
    if batch_size < 1:
        raise UserError(f"data.batch_size must be at least 1, got {batch_size}")
    check_fractions(val_fraction, test_fraction)


def _more_for(split: str) -> str:
    """How a user gives `split` more text."""
    if split == "train":
        return "smaller data.val_fraction and data.test_fraction"
    return f"a larger data.{split}_fraction"


def report_unknown_per_split(tokenizer, splits: dict[str, list[str]], *, given: bool,
                             where: str) -> dict[str, int]:
    """Warn about the characters of each split that `tokenizer` encodes as ``<unk>``
    (a count and a few examples; never silent); returns the count per split.

    `given`: the tokenizer came with the model (fine-tuning, evaluating) rather than
    being trained on this data's training split.
    """
    from genframe.text.tokenize import describe_unknown, unknown_characters

    found = {}
    for split, texts in splits.items():
        counts = unknown_characters(tokenizer, texts)
        found[split] = sum(counts.values())
        if counts:
            origin = ("the model's tokenizer" if given
                      else "the tokenizer trained on the training split")
            log.warning("%s: the %s split holds %s, read as <unk> by %s", where,
                        SPLIT_WORDS[split], describe_unknown(counts), origin)
    return found


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats per token) on `val_tokens` of the training split's token
    frequencies (add-one smoothed): the loss of a model that ignores context, for scale."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(val_tokens, dtype=np.int64)].mean())


class TokenizedDataModule(GenerativeDataModule):
    """What the text data modules share: the tokenizer settings and checks, the seeded
    split of their items (documents, conversations, preference pairs), and a tokenizer
    that is either handed in (`use_tokenizer`: the model's, when fine-tuning) or trained
    on the training split.

    Args: as `TextDataModule`'s of the same names.
    """

    def __init__(self, *, tokenizer: str, vocab_size: int, block_size: int, batch_size: int,
                 val_fraction: float, test_fraction: float, seed: int, num_workers: int) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        check_text_args(tokenizer, block_size, batch_size, val_fraction, test_fraction)
        self.tokenizer_kind = tokenizer
        self.bpe_vocab_size = vocab_size
        self.block_size = block_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.tokenizer = None
        self.vocab_size: int | None = None

    def split_items(self, items: list, what: str, where: str) -> dict[str, list]:
        """The items of each split: a shuffled order's (seeded by ``seed``) first
        ``test_fraction`` are the test items, the next ``val_fraction`` the validation
        ones, the rest the training ones, each split in the items' own order (see
        `genframe.data.base.split_indices` for why test comes first).

        Raises:
            UserError: a split would be empty (names `where` and `what`).
        """
        _, n_val, n_test = split_counts(len(items), self.val_fraction, self.test_fraction,
                                        what=what, where=where)
        order = list(range(len(items)))
        random.Random(self.seed).shuffle(order)
        picked = {"train": order[n_test + n_val:], "val": order[n_test:n_test + n_val],
                  "test": order[:n_test]}
        return {split: [items[i] for i in sorted(idx)] for split, idx in picked.items()}

    def fit_tokenizer(self, texts: dict[str, list[str]], where: str) -> dict[str, int]:
        """Train the tokenizer on ``texts["train"]`` unless one was handed in, set
        ``vocab_size``, and warn about the characters of each split it reads as
        ``<unk>``; returns their count per split."""
        from genframe.text.tokenize import build_tokenizer

        given = self.tokenizer is not None
        if not given:
            self.tokenizer = build_tokenizer(self.tokenizer_kind, texts["train"],
                                             vocab_size=self.bpe_vocab_size)
        self.vocab_size = self.tokenizer.vocab_size
        return report_unknown_per_split(self.tokenizer, texts, given=given, where=where)

    def use_tokenizer(self, tokenizer) -> None:
        """Tokenise with `tokenizer` (e.g. the model's, when fine-tuning) instead of
        training one; characters it does not know become ``<unk>`` (counted and logged)."""
        if self.train_set is not None:
            raise RuntimeError("use_tokenizer() must come before setup()")
        self.tokenizer = tokenizer
        self.tokenizer_kind = tokenizer.kind

    def save_tokenizer(self, directory) -> None:
        """Save the tokenizer (``tokenizer.json``) into a run directory."""
        if self.tokenizer is None:
            self.setup("fit")
        self.tokenizer.save(directory)


class TextDataModule(TokenizedDataModule):
    """Token windows of a text corpus for autoregressive language models.

    Args:
        source: "pydoc" (Python's own documentation prose, offline), "files" (a text file
            or a folder of .txt/.md files) or "jsonl" (one JSON object per line).
        path: the file or folder for "files" and "jsonl".
        text_field: the JSONL field holding the text.
        tokenizer: "char" (one id per character) or "bpe" (byte-level BPE).
        vocab_size: BPE vocabulary size (ignored by "char", whose size is the text's).
        block_size: context length T; batches hold T + 1 tokens (the model shifts them).
        batch_size: windows per batch.
        val_fraction: share of the documents held out for validation (of the text when
            there are fewer than 3 documents).
        test_fraction: share of the documents held out for testing (``genframe
            evaluate``), likewise; 0 turns the test split off.
        seed: seed of the document split.
        random_offsets: training windows start at a fresh random offset each time (more
            distinct windows); false: the consecutive non-overlapping windows, in the
            shuffled order alone, so the data a step sees depends only on the seed (a run
            under DDP then sees exactly the batches one process would).

    Splits: with 3 documents or more, whole documents are split at random (seeded): a
    shuffled order's first ``test_fraction`` are the test documents, the next
    ``val_fraction`` the validation documents, the rest the training documents, so a
    document never straddles two splits. With fewer, the text is cut by position: the
    last ``test_fraction`` of its characters are the test text, the ``val_fraction``
    before them the validation text. The tokenizer is trained on the training split only.
        pseudonymize: replace e-mail addresses, phone numbers, IPs, ... by placeholders.
        num_workers: DataLoader worker processes.
    """

    provides = frozenset({"tokens"})

    def __init__(
        self,
        source: str = "pydoc",
        path: str | None = None,
        text_field: str = "text",
        tokenizer: str = "char",
        vocab_size: int = 512,
        block_size: int = 64,
        batch_size: int = 12,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        pseudonymize: bool = False,
        num_workers: int = 0,
        random_offsets: bool = True,
    ) -> None:
        super().__init__(tokenizer=tokenizer, vocab_size=vocab_size, block_size=block_size,
                         batch_size=batch_size, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, num_workers=num_workers)
        if not isinstance(random_offsets, bool):
            raise UserError(f"data.random_offsets must be true or false, got {random_offsets!r}")
        self.random_offsets = random_offsets
        self.source = source
        self.path = path
        self.text_field = text_field
        self.pseudonymize = pseudonymize
        self.cache_hits: dict[str, bool] = {}
        self.unigram_loss: float | None = None  # after setup: a context-free baseline
        self.token_counts: dict[str, int] = {}  # after setup: tokens per split
        self.unknown_characters: dict[str, int] = {}  # after setup: <unk> characters per split

    def _separator(self) -> int | None:
        """The id put between documents: <|endoftext|> for BPE, a newline for char."""
        if self.tokenizer.kind == "bpe":
            return 0
        return self.tokenizer.stoi.get("\n")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from genframe.text import clean_documents, load_documents, token_cache

        docs = load_documents(self.source, path=self.path, text_field=self.text_field)
        docs, _ = clean_documents(docs, pseudonymize=self.pseudonymize)
        if not docs:
            raise UserError(f"data.path={self.path}: the {self.source} source has no text "
                            "left after cleaning (all documents empty)")
        span = self.block_size + 1
        splits = self._split(docs)
        self.unknown_characters = self.fit_tokenizer(
            splits, where=f"data.path={self.path}" if self.path else f"data.source={self.source}")
        sep = self._separator()
        tokens = {}
        for split in [s for s in SPLITS if splits[s]]:  # data.test_fraction=0: no test split
            tokens[split], self.cache_hits[split] = token_cache(splits[split], self.tokenizer,
                                                                separator=sep)
            if len(tokens[split]) < span:
                raise UserError(
                    f"the {SPLIT_WORDS[split]} split of data.path={self.path} ({self.source}) "
                    f"has {len(tokens[split])} tokens, fewer than data.block_size + 1 = {span}; "
                    f"use more text, a smaller block_size or {_more_for(split)}")
        # Training windows start at random offsets (or are the consecutive ones, shuffled);
        # validation and test windows are the same consecutive ones every time.
        self.train_set = TokenWindows(tokens["train"], self.block_size,
                                      random_offsets=self.random_offsets)
        self.val_set = TokenWindows(tokens["val"], self.block_size, random_offsets=False)
        if "test" in tokens:
            self.test_set = TokenWindows(tokens["test"], self.block_size, random_offsets=False)
        self.unigram_loss = unigram_loss(tokens["train"], tokens["val"], self.vocab_size)
        self.token_counts = {split: len(t) for split, t in tokens.items()}
        unit = "documents" if len(docs) >= 3 else "pieces of one text"
        self.summarize_splits(unit, {split: len(splits[split]) for split in tokens},
                              detail=" / ".join(f"{n} {s}" for s, n in self.token_counts.items())
                              + f" tokens, seed {self.seed}")
        log.info("text data: %s tokenizer, vocab %d; unigram baseline %.4f nats per "
                 "validation token", self.tokenizer.kind, self.vocab_size, self.unigram_loss)

    def _split(self, docs: list[str]) -> dict[str, list[str]]:
        """The documents of each split (see the class docstring)."""
        if len(docs) >= 3:
            return self.split_items(docs, "documents", f"data.path={self.path} ({self.source})")
        # One or two documents: cut the text by position, the test text last (as the
        # validation text was before test splits).
        text = "\n\n".join(docs)
        test_cut = int(len(text) * (1 - self.test_fraction))
        val_cut = int(len(text) * (1 - self.test_fraction - self.val_fraction))
        return {"train": [text[:val_cut]], "val": [text[val_cut:test_cut]],
                "test": [text[test_cut:]] if self.test_fraction else []}

