"""`genframe chat`: talk with a trained language model, turn by turn.

On a terminal it is an interactive loop (``you> ``, the reply streamed as it is
written); with stdin from a pipe or file each line is one user turn and only the replies
go to stdout (``echo "hi" | genframe chat run=DIR``). ``/reset`` clears the history (the
system prompt stays), ``/exit``, end of input or Ctrl-C ends the chat. The conversation
is saved as ``transcript.jsonl`` (chat JSONL, one conversation per line, a new one after
each ``/reset``) in the task's run directory, ready to fine-tune on with ``data=chat``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError
from genframe.runs import atomic_write_bytes, start_run, update_run
from genframe.tasks.build import to_plain
from genframe.text.chat import ChatTemplate, Message, chat_jsonl_line, trim_history

TRANSCRIPT = "transcript.jsonl"
COMMANDS = {"/reset": "clear the history (the system prompt stays)",
            "/exit": "end the chat (so do Ctrl-D and Ctrl-C)",
            "/help": "show these commands"}


def chat(cfg: DictConfig) -> dict[str, Any]:
    """Chat with the language model of ``run`` (or ``ckpt``), reading user turns from stdin.

    Args:
        cfg: the composed `chat` config: ``run``/``ckpt``, ``device``, ``seed`` (turn ``i``
            samples with ``seed + i``), ``system`` (a system prompt), ``chat_template``
            (null: the run's ``data.template`` if it trained on chat data, else the
            default), ``max_new_tokens`` (null: half the context window, at most 200),
            ``temperature``, ``top_k``, ``top_p``, and ``template`` (a prompt template,
            rendered and sent as the first user message).

    Returns:
        dict with ``run_dir``, ``metrics`` (empty), ``replies`` (the assistant's replies
        in order) and ``transcript`` (the conversations as lists of messages).
    """
    from genframe.tasks.generate import _device
    from genframe.text.prompts import render_template_config
    from genframe.weights import load_model

    device = _device(cfg.device)
    first_message = render_template_config(to_plain(cfg.get("template")))
    model, run, weights = load_model(cfg.get("run"), cfg.get("ckpt"), cfg.get("adapter"))
    name = model.genframe_spec["name"]
    if getattr(model, "tokenizer", None) is None:
        raise UserError(f"model '{name}' is not a language model (it has no tokenizer); "
                        "chat needs a text model, e.g. one trained with model=transformer")
    block_size = model.hparams.get("block_size")
    if not block_size:
        raise UserError(f"model '{name}' has no block_size (context window); chat needs one")
    template, template_from = resolve_chat_template(to_plain(cfg.get("chat_template")), run)
    max_new = resolve_max_new_tokens(cfg.get("max_new_tokens"), block_size)
    model.to(device).eval()

    out_dir = Path(cfg.paths.output_dir)
    start_run(out_dir, cfg, "chat",
              source={"run": str(run.path) if run else None, "weights": str(weights)},
              chat_template=template.to_dict(), chat_template_from=template_from)
    session = ChatSession(
        generate=model.generate, count_tokens=lambda text: len(model.tokenizer.encode(text)),
        encode=(lambda messages: template.encode_prompt(messages, model.tokenizer))
        if "prompt_ids" in model.condition_keys else None,
        template=template, block_size=int(block_size), max_new_tokens=max_new,
        system=cfg.get("system"), seed=cfg.get("seed"),
        sampling={"temperature": cfg.temperature, "top_k": cfg.get("top_k"),
                  "top_p": cfg.get("top_p")},
    )
    interactive = sys.stdin.isatty()
    transcript = out_dir / TRANSCRIPT
    replies: list[str] = []

    def say(text: str) -> None:  # notices: in the conversation on a terminal, else stderr
        print(text, file=sys.stdout if interactive else sys.stderr, flush=True)

    def turn(text: str) -> None:
        reply = session.send(text, stream=_printer(template.stop) if interactive else None,
                             on_too_long=say)
        if reply is not None:
            replies.append(reply)
            if not interactive:
                print(reply, flush=True)
            _write_transcript(transcript, session.conversations())

    if interactive:
        _enable_line_editing()
        say(f"chatting with '{name}' ({run.path if run else weights}); context window "
            f"{block_size} tokens, replies up to {max_new}. /reset clears the history, "
            "/exit quits.")
    try:
        if first_message is not None:
            if interactive:
                print(f"you> {first_message}", flush=True)
            turn(first_message)
        for line in _user_lines(interactive):
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                command = text.split()[0].lower()
                if command == "/exit":
                    break
                if command == "/reset":
                    session.reset()
                    say("(history cleared)")
                else:
                    if command != "/help":
                        say(f"unknown command {command}")
                    say("\n".join(f"  {c:<7} {h}" for c, h in COMMANDS.items()))
                continue
            turn(text)
    except KeyboardInterrupt:
        print(flush=True)  # leave the terminal on a fresh line
    conversations = session.conversations()
    _write_transcript(transcript, conversations)
    update_run(out_dir, status="completed", turns=len(replies),
               conversations=len(conversations))
    say(f"run directory: {out_dir}\n  transcript: {transcript}")
    return {"run_dir": out_dir, "metrics": {}, "replies": replies, "transcript": conversations}


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


def _printer(stop: Sequence[str]) -> Callable[[int, str], None]:
    """A stream callback that prints the reply as it is written (index -1: the end)."""
    stop_filter: StopFilter | None = None

    def show(index: int, piece: str) -> None:
        nonlocal stop_filter
        if stop_filter is None:
            stop_filter = StopFilter(stop)
            sys.stdout.write("assistant> ")
        text = stop_filter.finish(piece) + "\n" if index < 0 else stop_filter.feed(piece)
        sys.stdout.write(text)
        sys.stdout.flush()

    return show


def resolve_chat_template(node: Any, run) -> tuple[ChatTemplate, str]:
    """The chat template to use and where it came from: ``chat_template`` when set, else
    the template of the run's chat data, else the default."""
    if node is not None:
        return ChatTemplate.from_mapping(node, where="chat_template"), "chat_template"
    data = run.data_config if run is not None else None
    if isinstance(data, dict) and data.get("name") == "chat":
        where = f"run={run.path}: data.template"
        return ChatTemplate.from_mapping(data.get("template"), where=where), "the run's data.template"
    return ChatTemplate(), "the default template"


def resolve_max_new_tokens(value: int | None, block_size: int) -> int:
    """``max_new_tokens``, defaulting to half the context window (at most 200)."""
    if value is None:
        return max(1, min(200, block_size // 2))
    if not isinstance(value, int) or value < 1:
        raise UserError(f"max_new_tokens must be a positive integer, got {value!r}")
    if value >= block_size:
        raise UserError(f"max_new_tokens={value} leaves no room for the prompt in the model's "
                        f"context window of {block_size} tokens; set max_new_tokens below "
                        f"{block_size} (null: {max(1, min(200, block_size // 2))})")
    return value


def _user_lines(interactive: bool):
    """User turns: `input()` on a terminal (until Ctrl-D), else stdin's lines."""
    if not interactive:
        yield from sys.stdin
        return
    while True:
        try:
            yield input("you> ")
        except EOFError:
            print(flush=True)
            return


def _enable_line_editing() -> None:
    try:
        import readline  # noqa: F401  (input() gains history and line editing)
    except ImportError:  # not on every platform
        pass


def _write_transcript(path: Path, conversations: list[list[Message]]) -> None:
    lines = "".join(chat_jsonl_line(c) + "\n" for c in conversations)
    atomic_write_bytes(path, lines.encode())
