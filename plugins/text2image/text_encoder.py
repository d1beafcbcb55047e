"""Text encoders for text-to-image: captions -> token features (B, T, D) and a mask.

Two kinds, one interface (``encoder(ids, mask) -> (B, T, D)``, ``feature_dim``):

- `TextEncoder`: a small bidirectional transformer over a genframe tokenizer, trained with
  the image model (as Imagen's ablations and Latent Diffusion's text-to-image models do
  with a transformer trained from scratch, Rombach et al. 2022, section 4.3).
- `LanguageModelEncoder`: a trained genframe language model (the ``transformer``
  plugin's public `text_features`), frozen or tuned: its last hidden states serve as the
  text features, as Imagen uses a frozen T5 encoder (Saharia et al. 2022).

`encode_texts` turns strings into right-padded ids and a mask, truncating to the encoder's
context the same way in training and generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from genframe.layers import TransformerBlock


class TextEncoder(nn.Module):
    """Token embedding + learned positions -> `depth` pre-norm transformer blocks with
    padding-masked self-attention -> LayerNorm.

    ``forward(ids, mask)``: ids (B, T) long, mask (B, T) bool (True = a real token) ->
    (B, T, width). Padded positions' outputs are not meaningful; readers mask them.

    Args:
        vocab_size: token ids the tokenizer can produce.
        max_length: the most tokens a text may have (longer ones are truncated by
            `encode_texts`).
        width: feature width D.
        depth: transformer blocks.
        num_heads: attention heads (must divide `width`).
        dropout: dropout inside the blocks.
    """

    def __init__(self, vocab_size: int, max_length: int, width: int, depth: int,
                 num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.max_length = max_length
        self.feature_dim = width
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_length, width)
        self.blocks = nn.ModuleList(
            TransformerBlock(width, num_heads, dropout=dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        # Unit-scale embeddings (PyTorch's default), not GPT's 0.02: the encoder learns only
        # from the image loss, which pulls two words apart only once the U-Net uses them.
        # At 0.02 the blocks' outputs drown a word's identity and words the U-Net reads
        # late ("left", "right") collapse to one feature; at unit scale they stay apart.
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.position_embedding.weight, std=1.0)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        positions = torch.arange(T, device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)[None]  # (B, T, D)
        for block in self.blocks:
            x = block(x, x_mask=mask)
        return self.norm(x)  # (B, T, D)


class LanguageModelEncoder(nn.Module):
    """A trained genframe language model used as a text encoder.

    Wraps any model with ``text_features(ids, mask) -> (B, T, D)`` and ``feature_dim``
    (the ``transformer`` plugin's `Transformer`). `trainable=False` freezes it and keeps
    it in eval mode (no dropout) however the parent module is switched.

    Args:
        language_model: the model, with its weights.
        trainable: tune it with the image model (True) or keep it frozen.
    """

    def __init__(self, language_model: nn.Module, trainable: bool) -> None:
        super().__init__()
        self.language_model = language_model
        self.trainable = trainable
        self.max_length = int(language_model.hparams.block_size)
        self.feature_dim = int(language_model.feature_dim)
        if not trainable:
            language_model.requires_grad_(False)
            language_model.eval()

    def train(self, mode: bool = True) -> LanguageModelEncoder:
        super().train(mode)
        if not self.trainable:
            self.language_model.eval()
        return self

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.language_model.text_features(ids, mask)  # (B, T, D)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded token ids and their mask for `texts`, each cut to `max_length` tokens.

    Returns (ids (B, T) long, mask (B, T) bool with True at real tokens, the indices of
    the texts that were truncated); T is the longest kept length (at least 1), padding is
    id 0 (never read: the mask hides it). An empty text has an all-False mask row: no
    text, the unconditional input of classifier-free guidance.
    """
    full = [tokenizer.encode(str(t)) if t else [] for t in texts]
    truncated = [i for i, tokens in enumerate(full) if len(tokens) > max_length]
    encoded = [tokens[:max_length] for tokens in full]
    T = max([len(e) for e in encoded] + [1])
    ids = torch.zeros(len(texts), T, dtype=torch.long)
    mask = torch.zeros(len(texts), T, dtype=torch.bool)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = True
    return ids.to(device), mask.to(device), truncated
