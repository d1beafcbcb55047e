"""Chat conversations for language models: one padded row of tokens per conversation,
with a loss mask that trains only on the assistant's turns."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from typing import Any

import torch

from genframe.data.base import DictDataset, GenerativeDataModule
from genframe.errors import UserError

log = logging.getLogger("genframe")


class ChatDataModule(GenerativeDataModule):
    """Conversations from a chat JSONL file as ``{"tokens", "loss_mask"}`` rows.

    Each conversation is rendered with the chat template and becomes one row of
    ``block_size + 1`` token ids, padded with id 0 (mask 0). ``loss_mask`` is 1 on the
    tokens of the assistant's content and end marker, so a model learns to answer, not
    to write the user's turns. A conversation longer than a row is truncated (counted
    and logged); one with no assistant token left to learn is dropped (counted).

    Args:
        path: the chat JSONL file: ``{"messages": [{"role", "content"}, ...]}`` a line.
        template: the chat template as a mapping (`genframe.text.chat.ChatTemplate`
            keys); None is the default template.
        tokenizer: "char" or "bpe", trained on the training conversations; used only when
            no tokenizer is handed in with `use_tokenizer` (fine-tuning keeps the model's).
        vocab_size: BPE vocabulary size (ignored by "char").
        block_size: context length T; each row holds T + 1 tokens.
        batch_size: conversations per batch.
        val_fraction: share of conversations held out (at least one).
        seed: seed of the conversation split.
        num_workers: DataLoader worker processes.
    """

    provides = frozenset({"tokens", "loss_mask"})

    def __init__(
        self,
        path: str | None = None,
        template: Mapping[str, Any] | None = None,
        tokenizer: str = "char",
        vocab_size: int = 512,
        block_size: int = 256,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        from genframe.data.text import check_text_args
        from genframe.text.chat import ChatTemplate

        if not path:
            raise UserError("data.path is not set; expected a chat JSONL file, e.g. "
                            "data.path=chats.jsonl")
        check_text_args(tokenizer, block_size, batch_size, val_fraction)
        self.path = path
        self.template = ChatTemplate.from_mapping(template, where="data.template")
        self.tokenizer_kind = tokenizer
        self.bpe_vocab_size = vocab_size
        self.block_size = block_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.tokenizer = None
        self.vocab_size: int | None = None
        #: After setup: conversations read, and per split how many were truncated/dropped.
        self.stats: dict[str, int] = {}

    def use_tokenizer(self, tokenizer) -> None:
        """Tokenise with `tokenizer` (the model's, when fine-tuning) instead of training
        one; characters it does not know become id 0."""
        if self.train_set is not None:
            raise RuntimeError("use_tokenizer() must come before setup()")
        self.tokenizer = tokenizer
        self.tokenizer_kind = tokenizer.kind

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from genframe.text.chat import read_chat_jsonl
        from genframe.text.tokenize import build_tokenizer

        conversations = read_chat_jsonl(self.path)
        if len(conversations) < 2:
            raise UserError(f"data.path={self.path} holds {len(conversations)} conversation; "
                            "need at least 2 (one for training, one for validation)")
        order = list(range(len(conversations)))
        random.Random(self.seed).shuffle(order)
        n_val = min(len(order) - 1, max(1, round(len(order) * self.val_fraction)))
        val = [conversations[i] for i in sorted(order[:n_val])]
        train = [conversations[i] for i in sorted(order[n_val:])]
        if self.tokenizer is None:
            texts = [self.template.render(c) for c in train]
            self.tokenizer = build_tokenizer(self.tokenizer_kind, texts,
                                             vocab_size=self.bpe_vocab_size)
        self.vocab_size = self.tokenizer.vocab_size
        self.stats = {"conversations": len(conversations)}
        self.train_set = self._rows(train, "train")
        self.val_set = self._rows(val, "val")
        log.info("chat data: %s tokenizer, vocab %d, %d train / %d val conversations",
                 self.tokenizer.kind, self.vocab_size, len(self.train_set), len(self.val_set))

    def _rows(self, conversations: list, split: str) -> DictDataset:
        """Encode, truncate and pad `conversations` into a dataset of rows."""
        span = self.block_size + 1
        tokens, masks = [], []
        truncated = dropped = 0
        for messages in conversations:
            ids, mask = self.template.encode(messages, self.tokenizer)
            if len(ids) > span:
                truncated += 1
                ids, mask = ids[:span], mask[:span]
            # Position 0 is never a target (the model predicts tokens 1..T).
            if not any(mask[1:]):
                dropped += 1
                continue
            pad = span - len(ids)
            tokens.append(ids + [0] * pad)
            masks.append(mask + [0] * pad)
        self.stats[f"{split}_truncated"] = truncated
        self.stats[f"{split}_dropped"] = dropped
        name = "training" if split == "train" else "validation"
        if truncated or dropped:
            log.warning("chat data: %d of %d %s conversations truncated to data.block_size + 1 = "
                        "%d tokens; %d dropped (no assistant token left to learn)",
                        truncated, len(conversations), name, span, dropped)
        if not tokens:
            raise UserError(
                f"data.path={self.path}: none of the {len(conversations)} {name} conversations "
                f"has an assistant token within data.block_size + 1 = {span} tokens "
                f"({dropped} dropped); add assistant messages, shorten the conversations or "
                "raise data.block_size")
        return DictDataset({
            "tokens": torch.tensor(tokens, dtype=torch.long),
            "loss_mask": torch.tensor(masks, dtype=torch.float32),
        })

    def save_tokenizer(self, directory) -> None:
        """Save the tokenizer (``tokenizer.json``) into a run directory."""
        if self.tokenizer is None:
            self.setup("fit")
        self.tokenizer.save(directory)
