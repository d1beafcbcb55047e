"""Chat conversations for language models: one padded row of tokens per conversation,
with a loss mask that trains only on the assistant's turns."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from genframe.data.base import SPLIT_WORDS, SPLITS, DictDataset
from genframe.data.text import TokenizedDataModule
from genframe.errors import UserError

log = logging.getLogger("genframe")


class ChatDataModule(TokenizedDataModule):
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
        val_fraction: share of conversations held out for validation (at least one).
        test_fraction: share of conversations held out for testing (at least one); 0 turns
            the test split off (a few conversations to fine-tune on).
        seed: seed of the conversation split: a shuffled order's first ``test_fraction``
            are the test conversations, the next ``val_fraction`` the validation ones, the
            rest the training ones (see `genframe.data.base.split_indices` for why).
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
        test_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        from genframe.text.chat import ChatTemplate

        if not path:
            raise UserError("data.path is not set; expected a chat JSONL file, e.g. "
                            "data.path=chats.jsonl")
        super().__init__(tokenizer=tokenizer, vocab_size=vocab_size, block_size=block_size,
                         batch_size=batch_size, val_fraction=val_fraction,
                         test_fraction=test_fraction, seed=seed, num_workers=num_workers)
        self.path = path
        self.template = ChatTemplate.from_mapping(template, where="data.template")
        #: After setup: conversations read, and per split how many were truncated/dropped.
        self.stats: dict[str, int] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from genframe.text.chat import read_chat_jsonl

        conversations = read_chat_jsonl(self.path)
        split = self.split_items(conversations, "conversations", f"data.path={self.path}")
        self.stats = {"conversations": len(conversations)}
        unknown = self.fit_tokenizer({s: [self.template.render(c) for c in split[s]] for s in SPLITS},
                                     where=f"data.path={self.path}")
        self.stats.update({f"{s}_unknown_characters": n for s, n in unknown.items()})
        for s in SPLITS:
            if split[s]:  # data.test_fraction=0 leaves test_set None
                setattr(self, f"{s}_set", self._rows(split[s], s))
        self.summarize_splits("conversations", detail=f"seed {self.seed}")
        log.info("chat data: %s tokenizer, vocab %d", self.tokenizer.kind, self.vocab_size)

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
        name = SPLIT_WORDS[split]
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
