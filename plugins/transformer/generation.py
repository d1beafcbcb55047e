"""Autoregressive decoding for the transformer: token choice, the loop, stop and stream.

Kept apart from the network (which only maps ids to logits) and from the Lightning
module (which validates options and turns texts into `Samples`).

The loop runs a batch of rows of different lengths together. Rows are left-padded, so
the last column is every row's newest token; an attention mask hides the padding and
each row's position ids count only its real tokens, so a row generates exactly what it
would alone.

Context window. A forward pass sees at most ``block_size`` tokens of a row.

* Without a cache (the reference path), every step feeds the last ``block_size``
  tokens of each row, as nanoGPT does.
* With a cache, the prompt is run once (prefill) and each step feeds one new token.
  When a row's context would grow past ``block_size``, the row is cut to its last
  ``block_size // 2`` tokens and the batch is prefilled again from the cut contexts;
  steps then continue from the new cache. Cached keys carry the positions (and, past
  the first layer, the context) they were computed with, so a window cannot simply
  slide one token at a time without a full recompute; halving (as llama.cpp's context
  shift does) pays one prefill per ``block_size / 2`` tokens instead of one per token.

Both paths give the same tokens while every row fits in the window (up to and
including the token chosen from a full ``block_size`` context); after that the cached
path sees a shorter (half to full) window than the reference path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .network import GPT, KVCache

#: (row index, token id) -> True when the row has finished (a stop string).
OnToken = Callable[[int, int], bool]


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set to -inf the logits (B, V) outside the top-k and outside the nucleus.

    Nucleus (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751): keep the smallest
    set of most likely tokens whose probabilities sum to at least `top_p`; the most
    likely token always stays.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = before >= top_p  # the first token has before == 0: always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The next token of each row (B,) from its logits (B, V).

    Temperature 0 is greedy (argmax; top-k and top-p change nothing then). Otherwise
    the logits are divided by the temperature, filtered, and one token is drawn with
    `generator`.
    """
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _left_padded(contexts: Sequence[Sequence[int]], device: torch.device):
    """Inputs of one forward over whole contexts: ids (B, W), the real-token mask (B, W),
    position ids (B, W) and the attention mask (B, 1, W, W)."""
    width = max(len(c) for c in contexts)
    ids = torch.tensor([[0] * (width - len(c)) + list(c) for c in contexts], device=device)
    real = torch.tensor(
        [[False] * (width - len(c)) + [True] * len(c) for c in contexts], device=device
    )  # (B, W)
    positions = (real.cumsum(dim=1) - 1).clamp(min=0)  # (B, W): 0 at each row's first token
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # A padding query sees only itself: a row with nothing to attend to would turn into
    # NaN, and NaN values poison real queries even at zero attention weight.
    eye = torch.eye(width, dtype=torch.bool, device=device)
    attn = (causal & real[:, None, :]) | eye  # (B, W, W)
    return ids, real, positions, attn[:, None]


def decode(
    net: GPT,
    contexts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
    on_token: OnToken | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Continue each context (a non-empty list of ids) by up to `max_new_tokens` tokens.

    Args:
        net: the network, in eval mode, under ``torch.no_grad()``.
        contexts: one list of token ids per row, each at most ``net.block_size`` long.
        max_new_tokens: the most tokens a row gets.
        choose: logits (B, V) of the rows still running -> their next tokens (B,).
        on_token: called with (row, token) after each token; returning True ends the row
            (it leaves the batch).
        use_cache: prefill once and reuse keys/values (True), or run the whole window
            every step (False, the reference path).

    Returns:
        the generated ids of each row (the contexts not included).
    """
    block = net.block_size
    device = net.lm_head.weight.device
    ctx = [list(c) for c in contexts]
    out: list[list[int]] = [[] for _ in ctx]
    rows = list(range(len(ctx)))  # the rows still running, in batch order
    cache: KVCache | None = None
    real = torch.empty(0)  # (B, L) real-token mask of the cache's columns
    padded = False  # whether the cache holds padding columns (rows of different lengths)
    last = torch.empty(0)  # (B, 1) the newest token of each running row

    def prefill(remaining: int) -> torch.Tensor:
        nonlocal cache, real, padded
        padded = len({len(ctx[r]) for r in rows}) > 1
        ids, real, positions, attn = _left_padded([ctx[r] for r in rows], device)
        # Room for the tokens still to feed, never more than one window.
        cache = net.new_cache(min(block, ids.shape[1] + remaining - 1))
        return net(ids, positions=positions, attn_mask=attn, cache=cache, last_only=True)

    for step in range(max_new_tokens):
        remaining = max_new_tokens - step  # tokens still to choose, this one included
        if not use_cache:
            # nanoGPT: crop every row to its last block_size tokens.
            ids, _, positions, attn = _left_padded([ctx[r][-block:] for r in rows], device)
            logits = net(ids, positions=positions, attn_mask=attn, last_only=True)
        elif cache is None:
            logits = prefill(remaining)
        elif any(len(ctx[r]) > block for r in rows):
            for r in rows:  # the sliding window: keep the last half of a full context
                if len(ctx[r]) > block:
                    ctx[r] = ctx[r][-max(1, block // 2):]
            logits = prefill(remaining)
        elif cache.length >= cache.capacity:
            # Only padding columns of rows that left the batch fill the cache: re-pad.
            logits = prefill(remaining)
        elif padded:
            real = torch.cat([real, real.new_ones(len(rows), 1)], dim=1)  # (B, L)
            positions = real.sum(dim=1, keepdim=True) - 1  # (B, 1): the row's own count
            logits = net(last, positions=positions, attn_mask=real[:, None, None, :],
                         cache=cache, last_only=True)
        else:
            # No padding: positions follow the cache, and one query needs no mask.
            logits = net(last, cache=cache, last_only=True)
        chosen = choose(logits[:, -1])  # (B,)
        tokens = chosen.tolist()  # -> host: stop strings need text
        keep = []
        for j, (r, t) in enumerate(zip(rows, tokens)):
            out[r].append(t)
            ctx[r].append(t)
            if not use_cache:
                ctx[r] = ctx[r][-block:]  # only the window is ever read again
            if on_token is None or not on_token(r, t):
                keep.append(j)
        last = chosen[:, None]  # (B, 1)
        if len(keep) < len(rows):
            rows = [rows[j] for j in keep]
            if not rows:
                break
            if cache is not None:
                index = torch.tensor(keep, device=device)
                cache.select(index)
                last = last[index]
                if padded:
                    real = real[index]
    return out


class RowText:
    """The text of one generated row: finds stop strings and streams safe pieces.

    Args:
        decode: ids -> text.
        stop: strings that end the row; its text is cut before the first one.
        emit: called with each new piece of text; the pieces join to `text`.

    A piece never includes a tail that may still change or vanish: trailing U+FFFD
    (byte-level BPE decodes an incomplete UTF-8 character to it; the next token may
    complete it) and a tail that could be the start of a stop string.

    Each token decodes only the last few ids (incremental detokenisation as in Hugging
    Face's text-generation-inference): the ids since the last clean text boundary, with
    one id before them for context (a tokenizer may join tokens with a separator), so a
    long row costs O(length), not O(length^2).
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: Sequence[str] = (),
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.decode = decode
        self.stop = list(stop)
        self.emit = emit
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._emitted = 0
        # self.text[:_settled] is the final text of ids[:_read] (ended on a whole
        # character); ids[_prefix:_read] is decoded again as context for the new ids.
        self._settled = 0
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> bool:
        """Append a token; True when the text now holds a stop string (the row ends)."""
        self.ids.append(token)
        settled = self._settled
        text = self._decoded()
        for s in self.stop:  # an earlier stop string would have ended the row already
            at = text.find(s, max(0, settled - len(s) + 1))
            if at >= 0 and (not self.stopped or at < len(self.text)):
                self.text, self.stopped = text[:at], True
        if self.stopped:
            self.finish()
            return True
        self.text = text
        end = len(text)
        while end > self._emitted and text[end - 1] == "\ufffd":
            end -= 1
        self._send(end - self._stop_prefix(text, end))
        return False

    def finish(self) -> None:
        """Send what is left (at the end of generation)."""
        self._send(len(self.text))

    def _decoded(self) -> str:
        """The text of all ids so far, decoding only those after the settled text."""
        head = self.decode(self.ids[self._prefix:self._read])
        tail = self.decode(self.ids[self._prefix:])
        if not tail.startswith(head):  # a tokenizer that rewrites earlier text: decode all
            text = self.decode(self.ids)
        else:
            text = self.text[: self._settled] + tail[len(head):]
        if not text.endswith("\ufffd"):
            self._settled = len(text)
            self._prefix, self._read = max(0, len(self.ids) - 1), len(self.ids)
        return text

    def _stop_prefix(self, text: str, end: int) -> int:
        """Length of the longest tail of `text[:end]` that begins some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, end), longest, -1):
                if text.endswith(s[:k], 0, end):
                    longest = k
                    break
        return longest

    def _send(self, end: int) -> None:
        if end > self._emitted:
            if self.emit is not None:
                self.emit(self.text[self._emitted:end])
            self._emitted = end
