"""Chat data: conversations read from JSONL, and the template that turns them into tokens.

A chat JSONL file holds one conversation per line::

    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is a tuple?"},
                  {"role": "assistant", "content": "An immutable sequence."}]}

A `ChatTemplate` writes each message as text around its content. The default one, which
a small character-level model trained on English prose can learn, renders that line as::

    <system> Be brief.
    <user> What is a tuple?
    <assistant> An immutable sequence.<end>

and at generation time ends the prompt with ``"<assistant> "``; the reply is cut at the
stop string ``"<end>"``. For training (`ChatTemplate.encode`) only the assistant's
content and the template text after it (``"<end>\\n"``) are targets of the loss.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genframe.errors import UserError, did_you_mean, valid_list

ROLES = ("system", "user", "assistant")

#: The default chat template (also written out in conf/data/chat.yaml).
DEFAULT_TEMPLATE: dict[str, Any] = {
    "system": "<system> {content}\n",
    "user": "<user> {content}\n",
    "assistant": "<assistant> {content}<end>\n",
    "generation_prompt": "<assistant> ",
    "stop": ["<end>"],
}

Message = dict[str, str]  # {"role": ..., "content": ...}


# -- reading and writing chat JSONL -----------------------------------------------------

def read_chat_jsonl(path: str | Path, *, key: str = "data.path") -> list[list[Message]]:
    """The conversations of a chat JSONL file, one list of messages per non-blank line.

    Raises:
        UserError: naming the file and line for a line that is not JSON, not an object,
            has no ``messages`` list, a message with an unknown role or non-string
            content; or a file that is missing or holds no conversation.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise UserError(f"{key}={path} {what}; expected a chat JSONL file")
    from genframe.text.sources import jsonl_records

    conversations = [parse_conversation(row, where=where) for where, row in jsonl_records(p)]
    if not conversations:
        raise UserError(f"{p} holds no conversations (the file is empty); expected one JSON "
                        'object per line: {"messages": [{"role": "user", "content": "..."}, ...]}')
    return conversations


def parse_conversation(row: Any, *, where: str = "conversation") -> list[Message]:
    """Check one decoded JSONL record and return its messages as plain dicts."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object with a \"messages\" list, "
                        f"got {type(row).__name__}")
    if "messages" not in row:
        raise UserError(f"{where}: no \"messages\" field; fields are {sorted(row)}."
                        f"{did_you_mean('messages', row)}")
    messages = row["messages"]
    if not isinstance(messages, list):
        raise UserError(f"{where}: \"messages\" is {type(messages).__name__}, expected a list "
                        "of {\"role\", \"content\"} objects")
    out = []
    for i, msg in enumerate(messages):
        at = f"{where}, message {i}"
        if not isinstance(msg, dict):
            raise UserError(f"{at}: expected an object with role and content, "
                            f"got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            hint = did_you_mean(role, ROLES) if isinstance(role, str) else ""
            raise UserError(f"{at}: unknown role {role!r}; valid roles are "
                            f"{', '.join(ROLES)}.{hint}")
        content = msg.get("content")
        if not isinstance(content, str):
            got = "missing" if "content" not in msg else f"{type(content).__name__}"
            raise UserError(f"{at} ({role}): content is {got}, expected a string")
        out.append({"role": role, "content": content})
    return out


def chat_jsonl_line(messages: Sequence[Message]) -> str:
    """One conversation as a line of chat JSONL (without the newline).

    U+2028 and U+2029 are written as ``\\u2028``/``\\u2029`` escapes (the same JSON) so
    that a reader splitting lines with ``str.splitlines`` still sees one line; a lone
    surrogate (a byte that was not UTF-8) is written as U+FFFD, so the line is always
    valid UTF-8.
    """
    line = json.dumps({"messages": [{"role": m["role"], "content": m["content"]}
                                    for m in messages]}, ensure_ascii=False)
    line = line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return _LONE_SURROGATE.sub("\ufffd", line)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# -- the template ------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatTemplate:
    """How messages become text (and token ids) for a chat model.

    Args:
        system, user, assistant: format strings with exactly one ``{content}`` field
            (``{{``/``}}`` for literal braces), e.g. ``"<user> {content}\\n"``.
        generation_prompt: literal text that starts the assistant's turn when generating
            (usually the assistant format's text before ``{content}``).
        stop: strings that end an assistant turn when generating (usually the end marker
            of the assistant format).
    """

    system: str = DEFAULT_TEMPLATE["system"]
    user: str = DEFAULT_TEMPLATE["user"]
    assistant: str = DEFAULT_TEMPLATE["assistant"]
    generation_prompt: str = DEFAULT_TEMPLATE["generation_prompt"]
    stop: tuple[str, ...] = tuple(DEFAULT_TEMPLATE["stop"])

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        for role in ROLES:
            _split_format(getattr(self, role), where=f"chat template {role!r}")
        if not isinstance(self.generation_prompt, str):
            raise UserError("chat template 'generation_prompt': expected a string, got "
                            f"{type(self.generation_prompt).__name__}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise UserError(f"chat template 'stop': expected a list of non-empty strings, "
                            f"got {list(self.stop)!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, *,
                     where: str = "chat template") -> ChatTemplate:
        """A template from a config mapping; keys left out keep the default's value."""
        if mapping is None:
            return cls()
        if isinstance(mapping, ChatTemplate):
            return mapping
        if not isinstance(mapping, Mapping):
            raise UserError(f"{where}: expected a mapping with keys {', '.join(DEFAULT_TEMPLATE)}, "
                            f"got {mapping!r}")
        kwargs = {}
        for key, value in mapping.items():
            if key not in DEFAULT_TEMPLATE:
                raise UserError(f"{where}.{key}: unknown key.{did_you_mean(str(key), DEFAULT_TEMPLATE)}"
                                f" Valid keys: {valid_list(DEFAULT_TEMPLATE)}")
            if key == "stop":
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, (list, tuple)):
                    raise UserError(f"{where}.stop: expected a list of strings, got {value!r}")
                value = tuple(value)
            elif not isinstance(value, str):
                raise UserError(f"{where}.{key}: expected a string, got {value!r}")
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except UserError as exc:
            raise UserError(str(exc).replace("chat template ", f"{where}: ", 1)) from None

    def to_dict(self) -> dict[str, Any]:
        """The plain mapping `from_mapping` reads back."""
        return {"system": self.system, "user": self.user, "assistant": self.assistant,
                "generation_prompt": self.generation_prompt, "stop": list(self.stop)}

    def parts(self, role: str) -> tuple[str, str]:
        """The literal text before and after ``{content}`` in the format of `role`."""
        return _split_format(getattr(self, role), where=f"chat template {role!r}")

    def render(self, messages: Iterable[Message], *, add_generation_prompt: bool = False) -> str:
        """The conversation as text; with `add_generation_prompt`, ready for the model to
        write the assistant's next turn."""
        pieces = []
        for msg in messages:
            before, after = self.parts(msg["role"])
            pieces += [before, msg["content"], after]
        if add_generation_prompt:
            pieces.append(self.generation_prompt)
        return "".join(pieces)

    def encode(self, messages: Iterable[Message], tokenizer) -> tuple[list[int], list[int]]:
        """Token ids of the conversation and a loss mask of the same length.

        The mask is 1 exactly on the tokens of each assistant message's content and of
        the template text after it (its end marker), 0 elsewhere. Each template piece and
        each content is encoded on its own and the ids concatenated, so the mask's
        boundaries are exact for any tokenizer (a BPE merge never straddles them).
        """
        ids: list[int] = []
        mask: list[int] = []
        for msg in messages:
            before, after = self.parts(msg["role"])
            target = 1 if msg["role"] == "assistant" else 0
            for text, m in ((before, 0), (msg["content"], target), (after, target)):
                if text:
                    piece = tokenizer.encode(text)
                    ids += piece
                    mask += [m] * len(piece)
        return ids, mask

    def encode_prompt(self, messages: Iterable[Message], tokenizer) -> list[int]:
        """Token ids of the conversation followed by the generation prompt."""
        ids, _ = self.encode(messages, tokenizer)
        if self.generation_prompt:
            ids += tokenizer.encode(self.generation_prompt)
        return ids


def _split_format(fmt: Any, *, where: str) -> tuple[str, str]:
    """(text before, text after) the single ``{content}`` field of a format string."""
    if not isinstance(fmt, str):
        raise UserError(f"{where}: expected a string with one {{content}} field, got {fmt!r}")
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as exc:
        raise UserError(f"{where}: {exc} in {fmt!r}; write {{{{ and }}}} for literal braces") from None
    fields = [(f, spec, conv) for _, f, spec, conv in parsed if f is not None]
    if len(fields) != 1 or fields[0] != ("content", "", None):
        shown = ", ".join("{" + f + "}" for f, _, _ in fields) or "none"
        raise UserError(f"{where}: {fmt!r} must hold exactly one {{content}} field "
                        f"(found: {shown}); write {{{{ and }}}} for literal braces")
    before, after, seen = [], [], False
    for literal, field, _, _ in parsed:
        (after if seen else before).append(literal)
        if field is not None:
            seen = True
    return "".join(before), "".join(after)


# -- history trimming (the chat task) ----------------------------------------------------

def trim_history(messages: Sequence[Message], count_tokens: Callable[[Sequence[Message]], int],
                 budget: int) -> list[Message] | None:
    """The longest recent part of a conversation whose prompt fits in `budget` tokens.

    `messages` is a conversation ending with the newest user message; a leading system
    message is always kept. The oldest exchanges (a user message and the replies up to
    the next user message) are dropped one at a time until ``count_tokens(kept)`` (the
    length of the rendered prompt, generation prompt included) is at most `budget`.

    Returns:
        The kept messages, or None when even the system message (if any) and the newest
        user message alone do not fit.
    """
    head = [m for m in messages[:1] if m["role"] == "system"]
    rest = list(messages[len(head):])
    while True:
        kept = head + rest
        if count_tokens(kept) <= budget:
            return kept
        # Drop the oldest exchange: its first message and everything up to the next user
        # message. Stop when the newest user message is all that is left.
        nxt = next((i for i in range(1, len(rest)) if rest[i]["role"] == "user"), None)
        if nxt is None:
            return None
        rest = rest[nxt:]
