"""A conversation with a language model: history, trimming to the context window, replies,
and stop strings kept out of streamed text. No terminal I/O and no config here: the chat
task (`genframe.tasks.chat`) builds a `ChatSession` and connects it to the terminal."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from genframe.text.chat import ChatTemplate, Message, trim_history


class ChatSession:
    """The conversation with a model: history, trimming to the context window, replies.

    Args:
        generate: the model's ``generate`` method.
        count_tokens: the number of tokens the model reads for a prompt string.
        encode: messages -> the prompt's token ids, encoded piece by piece as the chat
            data encodes its training conversations; when given, prompts go to the
            model as ``prompt_ids`` (so a BPE model reads the same tokens it trained on)
            and are counted by it.
        template: the chat template.
        block_size: the model's context window in tokens.
        max_new_tokens: the longest reply; the prompt gets ``block_size - max_new_tokens``.
        system: a system prompt kept at the start of every prompt (never trimmed).
        seed: turn ``i`` samples with ``seed + i`` (None: fresh randomness).
        sampling: temperature, top_k, top_p (None values are left to the model).
    """

    def __init__(self, *, generate: Callable, count_tokens: Callable[[str], int],
                 template: ChatTemplate, block_size: int, max_new_tokens: int,
                 system: str | None = None, seed: int | None = None,
                 sampling: dict[str, Any] | None = None,
                 encode: Callable[[Sequence[Message]], list[int]] | None = None) -> None:
        self.generate = generate
        self.count_tokens = count_tokens
        self.encode = encode
        self.template = template
        self.budget = block_size - max_new_tokens
        self.max_new_tokens = max_new_tokens
        self.system = [{"role": "system", "content": system}] if system else []
        self.seed = seed
        self.sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
        self.history: list[Message] = []  # the current conversation, untrimmed
        self.finished: list[list[Message]] = []  # conversations before each /reset
        self.turns = 0
        params = inspect.signature(generate).parameters
        self._accepts = lambda key: key in params or any(
            p.kind == p.VAR_KEYWORD for p in params.values())

    def prompt_messages(self, user_text: str) -> list[Message] | None:
        """The messages of the next prompt (oldest exchanges dropped to fit), or None
        when the system prompt and `user_text` alone are too long."""
        messages = [*self.system, *self.history, {"role": "user", "content": user_text}]
        return trim_history(messages, self._prompt_tokens, self.budget)

    def _prompt_tokens(self, messages: Sequence[Message]) -> int:
        if self.encode is not None:
            return len(self.encode(messages))
        return self.count_tokens(self.template.render(messages, add_generation_prompt=True))

    def send(self, user_text: str, *, stream: Callable[[int, str], None] | None = None,
             on_too_long: Callable[[str], None] = print) -> str | None:
        """The assistant's reply to `user_text` (added to the history), or None after
        telling `on_too_long` that the message does not fit the context window."""
        messages = self.prompt_messages(user_text)
        if messages is None:
            alone = self._prompt_tokens([*self.system, {"role": "user", "content": user_text}])
            on_too_long(
                f"(message not sent: it makes a prompt of {alone} tokens"
                f"{' with the system prompt' if self.system else ''}, but only "
                f"{self.budget} fit in the context window with max_new_tokens="
                f"{self.max_new_tokens} left for the reply; write a shorter message)")
            return None
        options: dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                                   "stop": list(self.template.stop), **self.sampling}
        if stream is not None and self._accepts("stream"):
            options["stream"] = stream
        seed = None if self.seed is None else self.seed + self.turns
        if self.encode is not None:
            condition = {"prompt_ids": self.encode(messages)}
        else:
            condition = {"prompt": self.template.render(messages, add_generation_prompt=True)}
        samples = self.generate(1, condition=condition, seed=seed, **options)
        raw = cut_at_stop(samples.texts[0], self.template.stop)
        if stream is not None:
            stream(-1, raw)  # tells the printer the final text
        reply = raw.strip()
        self.turns += 1
        self.history += [{"role": "user", "content": user_text},
                         {"role": "assistant", "content": reply}]
        return reply

    def reset(self) -> None:
        """Start a new conversation (the system prompt stays)."""
        if self.history:
            self.finished.append(self.history)
        self.history = []

    def conversations(self) -> list[list[Message]]:
        """Every conversation so far, each with the system prompt first."""
        done = [*self.finished, *([self.history] if self.history else [])]
        return [[*self.system, *c] for c in done]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first stop string (all of it when none occurs)."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


class StopFilter:
    """Streamed text made safe to show: never a stop string, nor the start of one.

    `feed` returns the part of the text so far that cannot begin a stop string; text
    after a complete stop string is never shown. `finish(final)` returns what is left
    to show of the final reply.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.buffer = ""
        self.shown = 0
        self.done = False

    def feed(self, piece: str) -> str:
        if self.done:
            return ""
        self.buffer += piece
        cuts = [self.buffer.find(s) for s in self.stop if s in self.buffer]
        if cuts:
            self.done = True
            end = min(cuts)
        else:
            hold = max((k for s in self.stop for k in range(1, len(s))
                        if self.buffer.endswith(s[:k])), default=0)
            end = len(self.buffer) - hold
        out = self.buffer[self.shown:max(end, self.shown)]
        self.shown = max(end, self.shown)
        return out

    def finish(self, final: str) -> str:
        shown = self.buffer[:self.shown]
        return final[len(shown):] if final.startswith(shown) else ""
