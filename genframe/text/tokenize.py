"""Tokenizers: character-level and byte-level BPE (the `tokenizers` library).

Both save to one JSON file, ``tokenizer.json`` in a directory, with a ``kind`` field, so
generation and fine-tuning reload exactly the tokenizer a run was trained with.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from genframe.errors import UserError, did_you_mean

FILENAME = "tokenizer.json"
UNK = "<unk>"


class _SavedTokenizer:
    """What both tokenizers share: a fingerprint and one ``tokenizer.json`` on disk."""

    kind: str  # subclasses also define to_json()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def save(self, directory: str | Path) -> Path:
        from genframe.files import atomic_write_bytes

        path = Path(directory) / FILENAME
        atomic_write_bytes(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, directory: str | Path):
        tok = load_tokenizer(directory)
        if not isinstance(tok, cls):
            raise UserError(f"{Path(directory) / FILENAME} holds a {tok.kind} tokenizer, not {cls.kind}")
        return tok


class CharTokenizer(_SavedTokenizer):
    """One id per character seen in the training text; id 0 is ``<unk>`` for the rest."""

    kind = "char"

    def __init__(self, chars: Sequence[str]) -> None:
        self.itos = [UNK, *chars]
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        return cls(sorted(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        get = self.stoi.get
        return [get(c, 0) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        itos = self.itos
        return "".join(itos[i] if 0 < i < len(itos) else "" for i in map(int, ids))

    #: What `unit_lengths` counts: bits per character for this tokenizer.
    unit = "char"

    def unit_lengths(self) -> list[int]:
        """Characters each id stands for (1 each; ``<unk>`` stood for one character)."""
        return [1] * len(self.itos)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "vocab": self.itos}, ensure_ascii=False)

    @classmethod
    def from_json(cls, data: dict) -> CharTokenizer:
        vocab = data["vocab"]
        if not vocab or vocab[0] != UNK:
            raise UserError("char tokenizer file has no <unk> entry first")
        return cls(vocab[1:])



class BPETokenizer(_SavedTokenizer):
    """Byte-level BPE (GPT-2 style) trained with the `tokenizers` library.

    Every string round-trips (bytes are the base alphabet); ``<unk>`` is never needed
    but ``<|endoftext|>`` is reserved as id 0 to separate documents.
    """

    kind = "bpe"
    EOT = "<|endoftext|>"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257 + 1:
            raise UserError(f"data.vocab_size must be at least 258 for byte-level BPE "
                            f"(256 bytes + specials), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[cls.EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(list(texts), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    #: What `unit_lengths` counts: bits per byte for this tokenizer.
    unit = "byte"

    def unit_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for (0 for ``<|endoftext|>``).

        Byte-level BPE spells every byte as one character of its alphabet, so a token's
        length in that alphabet is its length in bytes.
        """
        lengths = [0] * self.vocab_size
        special = set(self._tok.get_added_tokens_decoder())
        for token, i in self._tok.get_vocab().items():
            lengths[i] = 0 if i in special else len(token)
        return lengths

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": json.loads(self._tok.to_str())},
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, data: dict) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(json.dumps(data["tokenizer"])))



def unknown_characters(tokenizer, texts: Iterable[str]) -> Counter:
    """How often each character of `texts` that `tokenizer` never saw occurs (those
    characters are encoded as ``<unk>``). Empty for byte-level BPE, which reads any text."""
    stoi = getattr(tokenizer, "stoi", None)
    counts: Counter = Counter()
    if stoi is None:
        return counts
    for text in texts:
        for c in set(text).difference(stoi):  # the set first: fast on long documents
            counts[c] += text.count(c)
    return counts


def describe_unknown(counts: Counter, *, examples: int = 5) -> str:
    """``"3 characters the tokenizer never saw ('é' x2, '☃')"``, for
    messages about `unknown_characters`; "" when there are none."""
    if not counts:
        return ""
    total = sum(counts.values())
    shown = ", ".join(f"{c!r}" + (f" x{n}" if n > 1 else "")
                      for c, n in counts.most_common(examples))
    more = f", ... {len(counts)} distinct" if len(counts) > examples else ""
    return (f"{total} character{'s' if total != 1 else ''} the tokenizer never saw "
            f"({shown}{more})")


def report_unknown(tokenizer, texts: Iterable[str], what: str) -> str | None:
    """A one-line notice that `what` holds characters `tokenizer` encodes as ``<unk>``
    (a count and a few examples), or None when it knows them all."""
    described = describe_unknown(unknown_characters(tokenizer, texts))
    return f"{what}: {described} read as {UNK}" if described else None


TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer}


def start_id(tokenizer) -> int:
    """The token a language model's text starts from when there is no prompt: the
    newline of a character tokenizer (documents are separated by one), ``<|endoftext|>``
    (id 0) of the byte-level BPE tokenizer, and id 0 without a tokenizer."""
    if tokenizer is not None and getattr(tokenizer, "kind", None) == "char":
        return tokenizer.stoi.get("\n", 0)
    return 0


def build_tokenizer(kind: str, texts: Iterable[str], vocab_size: int = 512):
    """Train a tokenizer of `kind` ("char" or "bpe") on `texts` (the training split)."""
    if kind not in TOKENIZERS:
        raise UserError(f"unknown data.tokenizer {kind!r}; expected one of "
                        f"{', '.join(TOKENIZERS)}.{did_you_mean(kind, TOKENIZERS)}")
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size=vocab_size)
    return CharTokenizer.train(texts)


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in `directory` (a run directory or any folder)."""
    path = Path(directory) / FILENAME
    if not path.is_file():
        raise UserError(f"no tokenizer at {path}")
    from genframe.text.sources import read_text

    try:
        data = json.loads(read_text(path))  # a byte-order mark is not part of the JSON
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not a valid tokenizer file: {e}") from None
    return tokenizer_from_json(data, where=str(path))


def tokenizer_from_json(data: dict, *, where: str = "tokenizer") -> CharTokenizer | BPETokenizer:
    """A tokenizer from its JSON form (``json.loads(tok.to_json())``)."""
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind not in TOKENIZERS:
        raise UserError(f"{where} has an unknown tokenizer kind {kind!r}")
    return TOKENIZERS[kind].from_json(data)
