"""One subject from a few images, for subject tuning (``genframe finetune finetune=subject``).

DreamBooth (Ruiz et al. 2023, "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation", https://arxiv.org/abs/2208.12242) teaches a text-to-image
model a subject from three to five images, bound to a rare token ("a sks dog"), while
images of the subject's class that the model made itself before tuning ("a dog") keep
the class from drifting towards the subject or being forgotten (prior preservation).

This module holds the parts that need no model: `SubjectDataModule` (the subject's
images, captioned with the instance prompt, mixed batch by batch with the class images
the task hands it), `check_token` (is the token a word the model does not know yet, that
it can still read?) and `class_prompts_from` (the class prompts taken from the base run's
captions). Generating the class images is the fine-tuning task's job.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from genframe.data.base import CaptionTokenizer, GenerativeDataModule
from genframe.data.image_folder import _expand, _list_images, _reason, decode_image
from genframe.errors import UserError, closest, plural, valid_list

log = logging.getLogger("genframe")

#: The default caption of every subject image.
INSTANCE_PROMPT = "a {token} {class_word}"
#: More subject images than this and subject tuning is probably not what is wanted.
MANY_IMAGES = 20
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def words_of(text: str) -> list[str]:
    """The lower-cased words of `text` (letters and digits; inner ' and - kept)."""
    return _WORD.findall(text.lower())


# -- the token ---------------------------------------------------------------------------


def check_token(token: Any, class_word: Any, tokenizer: Any, captions: Sequence[str] | None,
                instance_prompt: str = INSTANCE_PROMPT) -> dict[str, Any]:
    """Refuse a token the model already knows, or cannot read, and a class word it never saw.

    What "knows" means here, for genframe's own text encoders (trained with the model
    on the base run's captions): a word the model read in training. So

    - the token must not be a word of the base run's training `captions` (as a whole
      word, any case), nor the class word;
    - with a BPE tokenizer, the token must not be one whole-word entry of the vocabulary
      (``Ġsks``: BPE merges only what its training text repeats, so such an entry is a
      word of that text even when the captions are not at hand);
    - the tokenizer must read every piece of the token as a piece of its own: a
      character a char tokenizer never saw is ``<unk>``, one id shared by every unknown
      character, so the model could not tell the token from other unknown words.
      (Byte-level BPE reads any text.) A piece the captions never contain is readable
      but its embedding never trained: the token starts without meaning, the weak prior
      DreamBooth looks for in a rare token. ``method=full`` tunes those embeddings;
      ``method=lora`` binds the subject to them as they are. ``untrained_pieces`` in the
      result names them.

    The class word must be a word of the captions: prior preservation generates images
    of it, which for an unknown word would be noise. Without captions (fine-tuning from
    a bare checkpoint) only the pieces can be checked, and a warning says so.

    Args:
        token: the rare word, e.g. ``"sks"``: non-empty, no spaces.
        class_word: the subject's class, e.g. ``"circle"`` (may be several words).
        tokenizer: the model's tokenizer (`genframe.text.tokenize`: char or BPE).
        captions: the base run's training captions, or None when unknown.
        instance_prompt: the caption template, for reading the token in context.

    Returns:
        what the check found, for run.json: ``token_pieces`` (how the tokenizer reads the
        token in the instance prompt) and ``class_word_captions`` (how many captions name
        the class).

    Raises:
        UserError: an empty token or one with spaces, a token the model knows, a token of
            pieces it never read, a class word it never saw.
    """
    if not isinstance(token, str) or not token.strip():
        raise UserError(f"token={token!r}: finetune=subject needs a rare word to bind the subject "
                        "to, e.g. token=sks")
    if any(c.isspace() for c in token) or any(c in "{}" for c in token):
        raise UserError(f"token={token!r}: expected one word without spaces or braces (the "
                        "subject is bound to it), e.g. token=sks")
    if not isinstance(class_word, str) or not class_word.strip():
        raise UserError(f"class_word={class_word!r}: finetune=subject needs the subject's class, a "
                        "word the model knows, e.g. class_word=circle")
    if token.lower() in words_of(class_word):
        raise UserError(f"token={token} is the class word ({class_word}); the token must be a new "
                        "word, e.g. token=sks")
    prompt = instance_caption(instance_prompt, token, class_word)
    pieces = _pieces(tokenizer, prompt, token)
    found: dict[str, Any] = {"token_pieces": pieces}
    trained = _trained_pieces(tokenizer, captions) if captions else None
    words = Counter(w for c in captions or () for w in set(words_of(c)))
    suggest = _suggestions(tokenizer, trained, words)
    if token.lower() in words:
        example = next(c for c in captions if token.lower() in words_of(c))
        raise UserError(
            f"token={token}: a word the model already knows (in {plural(words[token.lower()], 'caption')} "
            f"of its training data, e.g. '{example}'); the subject would overwrite it. Choose a "
            f"word no caption has{suggest}")
    if getattr(tokenizer, "kind", None) == "bpe":
        vocab = tokenizer._tok.get_vocab()
        whole = _bpe_word(prompt, token)
        if whole in vocab:
            raise UserError(
                f"token={token}: one whole-word entry of the model's BPE vocabulary ({whole!r}), so "
                f"a word of its training text; choose a word it never read{suggest}")
    unread = _unread(tokenizer, pieces)
    if unread:
        raise UserError(
            f"token={token}: the model cannot read it: its {tokenizer.kind} tokenizer reads "
            f"{', '.join(repr(p) for p in unread)} as <unk>, one id shared by every character it "
            f"never saw, so the token could not be told apart from other unknown words. Choose "
            f"a token of characters its captions contain{suggest}")
    found["untrained_pieces"] = [p for p in dict.fromkeys(pieces) if trained is not None and p not in trained]
    unknown = [w for w in words_of(class_word) if w not in words]
    if captions and unknown:
        near = closest(unknown[0], words, n=3)
        raise UserError(
            f"class_word={class_word}: the model never saw {', '.join(repr(w) for w in unknown)} in "
            f"its training captions, so it has no prior of that class to keep."
            f"{' Did you mean ' + ' or '.join(near) + '?' if near else ''} Words it knows: "
            f"{valid_list(sorted(words), 30)}")
    if not captions:
        log.warning("finetune=subject: the base run's captions are not at hand, so whether the "
                    "model already knows token=%s and class_word=%s cannot be checked (only that "
                    "its tokenizer reads them)", token, class_word)
        missing = _unread(tokenizer, _pieces(tokenizer, class_word, class_word))
        if missing:
            raise UserError(f"class_word={class_word}: the model's tokenizer cannot read "
                            f"{', '.join(repr(p) for p in missing)} (<unk>)")
    found["class_word_captions"] = sum(1 for c in captions or () if _names(c, class_word))
    return found


def _pieces(tokenizer: Any, prompt: str, word: str) -> list[str]:
    """The tokens of `word` as the tokenizer reads it inside `prompt`."""
    if getattr(tokenizer, "kind", None) == "bpe":
        encoding = tokenizer._tok.encode(prompt)
        start = prompt.index(word)
        end = start + len(word)
        return [tok for tok, (a, b) in zip(encoding.tokens, encoding.offsets) if a < end and b > start]
    return list(word)


def _bpe_word(prompt: str, word: str) -> str:
    """The byte-level BPE spelling of `word` as one whole word of `prompt` (``Ġsks``)."""
    start = prompt.index(word)
    return ("Ġ" if start > 0 and prompt[start - 1] == " " else "") + word


def _trained_pieces(tokenizer: Any, captions: Sequence[str]) -> set[str]:
    """Every token the tokenizer makes of `captions`: the ones whose embeddings trained."""
    if getattr(tokenizer, "kind", None) == "bpe":
        return {t for e in tokenizer._tok.encode_batch(list(dict.fromkeys(captions))) for t in e.tokens}
    return {c for caption in captions for c in caption}


def _unread(tokenizer: Any, pieces: list[str]) -> list[str]:
    """The `pieces` the tokenizer reads as ``<unk>`` (a char tokenizer's unseen characters;
    byte-level BPE has none)."""
    stoi = getattr(tokenizer, "stoi", None)
    if stoi is not None:
        return [p for p in dict.fromkeys(pieces) if p not in stoi]
    vocab = tokenizer._tok.get_vocab() if hasattr(tokenizer, "_tok") else None
    return [p for p in dict.fromkeys(pieces) if vocab is not None and p not in vocab]


def _suggestions(tokenizer: Any, trained: set[str] | None, words: Counter) -> str:
    """", e.g. token=sls or token=srs": rare tokens of the captions' letters, which the
    model can read but does not know as words."""
    if not trained:
        return ", e.g. token=sks"
    letters = sorted(c for c in set("".join(words)) if c in string.ascii_lowercase)
    consonants = [c for c in letters if c not in "aeiou"]
    found = []
    for a in consonants:
        for b in consonants:
            candidate = a + b + a
            if a == b or candidate in words:
                continue
            prompt = f"a {candidate} thing"
            if getattr(tokenizer, "kind", None) == "bpe" and \
                    _bpe_word(prompt, candidate) in tokenizer._tok.get_vocab():
                continue
            if not _unread(tokenizer, _pieces(tokenizer, prompt, candidate)):
                found.append(candidate)
            if len(found) == 3:
                return ", e.g. token=" + " or token=".join(found)
    return ", e.g. token=" + " or token=".join(found) if found else ""


def _names(caption: str, class_word: str) -> bool:
    """Whether `caption` names `class_word` (its words, in order, as whole words)."""
    want, have = words_of(class_word), words_of(caption)
    return any(have[i:i + len(want)] == want for i in range(len(have) - len(want) + 1))


def instance_caption(template: str, token: str, class_word: str) -> str:
    """The caption of the subject's images: `template` with ``{token}`` and ``{class_word}``
    filled in ("a {token} {class_word}" -> "a sks circle").

    Raises:
        UserError: a template without ``{token}``, or with another ``{field}``.
    """
    if not isinstance(template, str) or "{token}" not in template:
        raise UserError(f"data.instance_prompt={template!r}: expected a caption holding "
                        "{token} (and usually {class_word}), e.g. 'a {token} {class_word}'")
    try:
        return template.format(token=token, class_word=class_word)
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"data.instance_prompt={template!r}: only {{token}} and {{class_word}} "
                        f"can be filled in ({type(exc).__name__}: {exc})") from exc


def class_prompts_from(captions: Sequence[str] | None, class_word: str, count: int,
                       seed: int = 0) -> list[str]:
    """`count` class prompts for prior preservation: the base run's training `captions`
    that name `class_word`, each distinct caption in turn (in a seeded order), or
    ``"a <class_word>"`` when no caption names it (or there are none)."""
    named = sorted({c for c in captions or () if _names(c, class_word)})
    if not named:
        return [f"a {class_word}"] * count
    order = torch.randperm(len(named), generator=torch.Generator().manual_seed(seed)).tolist()
    return [named[order[i % len(named)]] for i in range(count)]


# -- the data ----------------------------------------------------------------------------


class _Examples(Dataset):
    """Images (N, C, H, W) in [-1, 1] and their captions, as ``{"image", "caption"}``."""

    def __init__(self, images: torch.Tensor, captions: list[str]) -> None:
        self.images = images
        self.captions = captions

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "caption": self.captions[i]}


class MixedBatches(Sampler[list[int]]):
    """Batches of `per_batch[0]` subject examples (indices ``0..num_instance-1``) and
    `per_batch[1]` class examples (the indices after them), each drawn from its own
    shuffled cycle, for ``ceil(num_instance * repeats / per_batch[0])`` batches an epoch.

    Each epoch draws a new order from `seed` and the epoch's number, so runs repeat
    (Lightning sets the epoch, `set_epoch`; without it each pass counts one). Its position
    in the epoch is its state (``state_dict``), which torchdata's ``StatefulDataLoader``
    saves in every checkpoint, so a continued run gets the batches it would have.
    """

    def __init__(self, num_instance: int, num_class: int, per_batch: tuple[int, int],
                 repeats: int, seed: int) -> None:
        self.num_instance, self.num_class = num_instance, num_class
        self.per_batch = per_batch
        self.batches = math.ceil(num_instance * repeats / per_batch[0])
        self.seed = seed
        self.epoch = 0
        self.yielded = 0  # batches of this epoch handed out so far
        self._resume_at = 0

    def __len__(self) -> int:
        return self.batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        start, self._resume_at = self._resume_at, 0
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        inst = _cycle(self.num_instance, gen)
        cls = _cycle(self.num_class, gen) if self.num_class and self.per_batch[1] else None
        self.yielded = 0
        for _ in range(self.batches):
            batch = [next(inst) for _ in range(self.per_batch[0])]
            if cls is not None:
                batch += [self.num_instance + next(cls) for _ in range(self.per_batch[1])]
            self.yielded += 1
            if self.yielded > start:
                yield batch

    def state_dict(self) -> dict[str, int]:
        # The epoch being drawn (`__iter__` already counted the next one).
        return {"epoch": self.epoch - 1 if self.yielded else self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._resume_at = int(state["epoch"]), int(state["yielded"])


def _cycle(n: int, gen: torch.Generator) -> Iterator[int]:
    """0..n-1 in shuffled passes, reshuffled every pass."""
    while True:
        yield from torch.randperm(n, generator=gen).tolist()


class SubjectDataModule(CaptionTokenizer, GenerativeDataModule):
    """A few images of one subject, captioned with an instance prompt, mixed batch by
    batch with class images (DreamBooth's prior preservation).

    Every image under `root` (recursively) is decoded with Pillow, centre-cropped and
    resized to `image_size` as ``data=image_folder`` does; files Pillow cannot read are
    skipped, counted (``skipped``) and named in a warning. Each is captioned
    `instance_prompt` with `token` and `class_word` filled in ("a sks circle").

    Prior preservation: the task that tunes the model hands it class images the model
    made before tuning (`set_class_images`, before ``setup``). A training batch then
    holds ``round(batch_size / (1 + prior_loss_weight))`` subject examples and the rest
    class examples, so the batch's mean loss is, up to a constant factor, DreamBooth's
    ``L_subject + lambda * L_class`` with ``lambda = prior_loss_weight`` (lambda = 1:
    equal halves, the paper's setting). The weight is a mix ratio rather than a factor
    on the loss, so the model's own objective is used unchanged. Without class images
    every example is a subject image.

    There is nothing to hold out from five images: the validation split is every
    subject image plus ``round(prior_loss_weight * len(subject images))`` class images
    (the objective on them, with the model's fixed validation noise); there is no test
    split.

    Args:
        root: the folder of subject images (``~`` is expanded).
        token: the rare word the subject is bound to (checked by `check_token`).
        class_word: the subject's class.
        instance_prompt: the caption of every subject image, with ``{token}`` and
            ``{class_word}``.
        image_size: side length in pixels (fine-tuning fills in the model's).
        channels: 3 (RGB) or 1 (grey) (fine-tuning fills in the model's).
        prior_loss_weight: lambda, class examples per subject example in a batch (> 0).
        batch_size: examples per training batch, subject and class together (>= 2
            with class images).
        repeats: how often each subject image is seen per epoch.
        seed: seed of the batch order.
        num_workers: DataLoader worker processes.
        tokenizer: ``char`` or ``bpe``, only used when no model gives its tokenizer.

    Raises:
        UserError: a missing folder, no image files, no readable image (at ``setup``),
            bad values.
    """

    provides = frozenset({"image", "caption"})

    def __init__(
        self,
        root: str,
        token: str,
        class_word: str,
        instance_prompt: str = INSTANCE_PROMPT,
        image_size: int | None = None,
        channels: int | None = None,
        prior_loss_weight: float = 1.0,
        batch_size: int = 8,
        repeats: int = 10,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str = "char",
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.check_tokenizer_kind(tokenizer)
        for key, value, low in (("image_size", image_size, 4), ("repeats", repeats, 1),
                                ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                filled = " (finetune fills in the model's; give one for other tasks)" \
                    if key == "image_size" and value is None else ""
                raise UserError(f"data.{key} must be an integer >= {low}, got {value!r}{filled}")
        if channels not in (1, 3):
            raise UserError(f"data.channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        if isinstance(prior_loss_weight, bool) or not isinstance(prior_loss_weight, (int, float)) \
                or not 0 < prior_loss_weight <= 10:
            raise UserError(f"data.prior_loss_weight must be a number in (0, 10] (class examples "
                            f"per subject example in a batch), got {prior_loss_weight!r}")
        self.root = _expand(root)
        self.token, self.class_word = str(token), str(class_word)
        self.instance_prompt = instance_caption(instance_prompt, self.token, self.class_word)
        self.image_size, self.channels = image_size, channels
        self.prior_loss_weight = float(prior_loss_weight)
        self.repeats, self.seed = repeats, seed
        self.num_classes = 0
        self.files = _list_images(self.root)
        #: (file, why) of each file Pillow could not read (after ``setup``).
        self.skipped: list[tuple[Path, str]] = []
        self._subject: torch.Tensor | None = None  # (N, C, H, W) in [-1, 1]
        self.class_images: torch.Tensor | None = None  # (N, C, H, W) in [-1, 1]
        self.class_captions: list[str] = []
        self.per_batch = (batch_size, 0)

    def set_class_images(self, images: torch.Tensor, prompts: list[str]) -> None:
        """The class images for prior preservation, made by the model before tuning.

        Args:
            images: (N, C, H, W) floats in [0, 1], as `Samples.images`.
            prompts: the N prompts they were made from (their captions in training).
        """
        if self.train_set is not None:
            raise RuntimeError("set_class_images() must come before setup()")
        if images.ndim != 4 or images.shape[0] != len(prompts) or images.shape[0] == 0:
            raise ValueError(f"expected (N, C, H, W) images and N prompts, got {tuple(images.shape)} "
                             f"and {len(prompts)}")
        if tuple(images.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise UserError(f"class images of shape {tuple(images.shape[1:])} do not match the "
                            f"subject's images ({self.channels}, {self.image_size}, {self.image_size})")
        if self.batch_size < 2:
            raise UserError(f"data.batch_size={self.batch_size}: prior preservation needs at least "
                            "2 (a subject and a class example per batch)")
        self.class_images = images.float() * 2 - 1
        self.class_captions = [str(p) for p in prompts]

    def load_subject(self) -> torch.Tensor:
        """The subject's images (N, C, H, W) in [-1, 1], read once (``setup`` calls it; a
        task may call it first to refuse a bad folder before any other work).

        Raises:
            UserError: no file under ``root`` Pillow can read.
        """
        if self._subject is not None:
            return self._subject
        mode = "L" if self.channels == 1 else "RGB"
        arrays = []
        for path in self.files:
            try:
                arrays.append(decode_image(path, self.image_size, mode))
            except Exception as exc:  # noqa: BLE001 - Pillow's zoo of errors: bad data
                self.skipped.append((path, _reason(exc, path)))
        if self.skipped:
            names = ", ".join(p.relative_to(self.root).as_posix() for p, _ in self.skipped[:5])
            log.warning("subject: skipped %s under %s that Pillow cannot read: %s%s",
                        plural(len(self.skipped), "file"), self.root, names,
                        ", ..." if len(self.skipped) > 5 else "")
        if not arrays:
            path, why = self.skipped[0]
            raise UserError(f"data.root: none of the {plural(len(self.files), 'image file')} under "
                            f"{self.root} could be read (e.g. {path.name}: {why}); expected 5-10 "
                            "images of the subject that Pillow can decode")
        if len(arrays) > MANY_IMAGES:
            log.warning("subject: %d images under %s; subject tuning is meant for a few (5-10). "
                        "For many captioned images fine-tune on data=captioned_folder",
                        len(arrays), self.root)
        import numpy as np

        self._subject = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return self._subject

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        subject = self.load_subject()
        n = len(subject)
        captions = [self.instance_prompt] * n
        if self.class_images is not None:
            per_subject = max(1, round(self.batch_size / (1 + self.prior_loss_weight)))
            per_subject = min(per_subject, self.batch_size - 1)
            self.per_batch = (per_subject, self.batch_size - per_subject)
            images = torch.cat([subject, self.class_images])
            self.train_set = _Examples(images, captions + self.class_captions)
            n_val = min(len(self.class_images), max(1, round(self.prior_loss_weight * n)))
            self.val_set = _Examples(torch.cat([subject, self.class_images[:n_val]]),
                                     captions + self.class_captions[:n_val])
        else:
            self.per_batch = (self.batch_size, 0)
            self.train_set = _Examples(subject, captions)
            self.val_set = _Examples(subject, list(captions))
        self.fit_caption_tokenizer(captions + self.class_captions)
        self.summarize_splits(
            "examples", detail=f"{plural(n, 'subject image')} '{self.instance_prompt}', "
            f"{plural(len(self.class_captions), 'class image')}; {self.per_batch[0]} subject + "
            f"{self.per_batch[1]} class per batch")

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        n = len(dataset) - len(self.class_captions)
        sampler = MixedBatches(n, len(self.class_captions), self.per_batch, self.repeats, self.seed)
        return StatefulDataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                  persistent_workers=self.num_workers > 0,
                                  generator=torch.Generator().manual_seed(self.seed))

    def summary(self) -> dict[str, Any]:
        """What run.json records about the subject data (after ``setup``)."""
        return {"root": str(self.root), "instance_prompt": self.instance_prompt,
                "subject_images": len(self.files) - len(self.skipped),
                "skipped_files": [p.relative_to(self.root).as_posix() for p, _ in self.skipped],
                "class_images": len(self.class_captions),
                "subject_per_batch": self.per_batch[0], "class_per_batch": self.per_batch[1],
                "prior_loss_weight": self.prior_loss_weight}
