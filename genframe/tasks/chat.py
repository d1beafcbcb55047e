"""`genframe chat`: talk with a trained language model, turn by turn.

On a terminal it is an interactive loop (``you> ``, the reply streamed as it is
written); with stdin from a pipe or file each line is one user turn and only the replies
go to stdout (``echo "hi" | genframe chat run=DIR``). ``/reset`` clears the history (the
system prompt stays), ``/exit``, end of input or Ctrl-C ends the chat. The conversation
is saved as ``transcript.jsonl`` (chat JSONL, one conversation per line, a new one after
each ``/reset``) in the task's run directory, ready to fine-tune on with ``data=chat``.
"""

from __future__ import annotations

import math
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError
from genframe.files import atomic_write_bytes
from genframe.runs import start_run, update_run
from genframe.feedback import new_id, sample_records
from genframe.tasks.common import feedback_store, model_version, resolve_device, source_record
from genframe.tasks.build import to_plain
from genframe.terminal import (
    clean_input,
    enable_line_editing,
    reply_printer,
    user_lines,
)
from genframe.text.chat import ChatTemplate, Message, chat_jsonl_line
from genframe.text.chat_session import ChatSession
from genframe.text.tokenize import report_unknown

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
    from genframe.text.prompts import render_template_config
    from genframe.weights import load_model

    check_chat_options(cfg)
    device = resolve_device(cfg.device)
    first_message = render_template_config(to_plain(cfg.get("template")))
    model, run, weights = load_model(cfg.get("run"), cfg.get("ckpt"), cfg.get("adapter"))
    name = model.registered_name
    if getattr(model, "tokenizer", None) is None:
        raise UserError(f"model '{name}' is not a language model (it has no tokenizer); "
                        "chat needs a text model, e.g. one trained with model=transformer")
    block_size = model.hparams.get("block_size")
    if not block_size:
        raise UserError(f"model '{name}' has no block_size (context window); chat needs one")
    template, template_from = resolve_chat_template(to_plain(cfg.get("chat_template")), run)
    max_new = resolve_max_new_tokens(cfg.get("max_new_tokens"), block_size)
    model.to(device).eval()
    # A byte of the command line that is not UTF-8 reaches us as a lone surrogate.
    system = clean_input(cfg.get("system") or "", "system",
                         notice=lambda text: print(text, file=sys.stderr))

    out_dir = Path(cfg.paths.output_dir)
    start_run(out_dir, cfg, "chat",
              source=source_record(run, weights, cfg.get("hub")),
              chat_template=template.to_dict(), chat_template_from=template_from)
    store = feedback_store(cfg)
    version = model_version(cfg, run, weights)
    sample_ids: list[str] = []

    def generate(n: int, **kwargs: Any):
        """`model.generate`, each reply recorded in the feedback store."""
        samples = model.generate(n, **kwargs)
        ids = [new_id() for _ in range(n)]
        if store is not None:
            store.add_samples(sample_records(samples, ids, source="chat", model=name, model_version=version,
                                             run_dir=str(out_dir)))
        sample_ids.extend(ids)
        return samples

    session = ChatSession(
        generate=generate, count_tokens=lambda text: len(model.tokenizer.encode(text)),
        encode=(lambda messages: template.encode_prompt(messages, model.tokenizer))
        if "prompt_ids" in model.condition_keys else None,
        template=template, block_size=int(block_size), max_new_tokens=max_new,
        system=system, seed=cfg.get("seed"),
        sampling={"temperature": cfg.temperature, "top_k": cfg.get("top_k"),
                  "top_p": cfg.get("top_p")},
    )
    interactive = sys.stdin.isatty()
    transcript = out_dir / TRANSCRIPT
    replies: list[str] = []

    def say(text: str) -> None:  # notices: in the conversation on a terminal, else stderr
        print(text, file=sys.stdout if interactive else sys.stderr, flush=True)

    def note_unknown(texts: list[str], what: str) -> None:  # never silently <unk>
        note = report_unknown(model.tokenizer, texts, what)
        if note:
            say(f"({note})")

    def turn(text: str) -> None:
        note_unknown([text], "your message")
        with chat_keys():
            reply = session.send(text, on_too_long=say,
                                 stream=reply_printer(template.stop) if interactive else None)
        if reply is not None:
            replies.append(reply)
            if not interactive:
                print(reply, flush=True)
            _write_transcript(transcript, session.conversations())

    note_unknown([template.render([{"role": r, "content": ""} for r in ("user", "assistant")])
                  + template.generation_prompt], "the chat template")
    if system:
        note_unknown([system], "system")
    if interactive:
        enable_line_editing()
        say(f"chatting with '{name}' ({run.path if run else weights}); context window "
            f"{block_size} tokens, replies up to {max_new}. /reset clears the history, "
            "/exit quits.")
    try:
        if first_message is not None:
            if interactive:
                print(f"you> {first_message}", flush=True)
            turn(first_message)
        for line in user_lines(interactive, notice=say):
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
               conversations=len(conversations), sample_ids=sample_ids)
    say(f"run directory: {out_dir}\n  transcript: {transcript}")
    return {"run_dir": out_dir, "metrics": {}, "replies": replies, "transcript": conversations}


def check_chat_options(cfg: DictConfig) -> None:
    """Refuse (`UserError`, naming chat's own keys) the values no chat could use, before
    the model is loaded."""
    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v: Any) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v))

    seed, temperature = cfg.get("seed"), cfg.get("temperature")
    top_k, top_p, system = cfg.get("top_k"), cfg.get("top_p"), cfg.get("system")
    max_new = cfg.get("max_new_tokens")
    if seed is not None and not integer(seed):
        raise UserError(f"seed: expected an integer (turn i samples with seed + i) or null "
                        f"(fresh randomness), got {seed!r}")
    if not number(temperature) or temperature < 0:
        raise UserError(f"temperature: expected a number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not integer(top_k) or top_k < 1):
        raise UserError(f"top_k: expected an integer >= 1 or null, got {top_k!r}")
    if top_p is not None and (not number(top_p) or not 0 < top_p <= 1):
        raise UserError(f"top_p: expected a number in (0, 1] or null, got {top_p!r}")
    if max_new is not None and (not integer(max_new) or max_new < 1):
        raise UserError(f"max_new_tokens: expected a positive integer or null (half the "
                        f"model's context window), got {max_new!r}")
    if system is not None and not isinstance(system, str):
        raise UserError(f"system: expected a string (a system prompt) or null, got {system!r}")


#: The model's generate() options chat sets, by the chat key that sets each.
_CHAT_KEY_OF = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                "max_new_tokens": "max_new_tokens", "stop": "chat_template.stop"}


@contextmanager
def chat_keys():
    """Re-raise a model's ``sampling.<option>`` `UserError` with the chat key that set
    the option (``sampling.top_p`` -> ``top_p``): chat has no ``sampling`` group."""
    try:
        yield
    except UserError as exc:
        text = str(exc)
        match = re.match(r"sampling\.(\w+)", text)
        if match is None:
            raise
        key = _CHAT_KEY_OF.get(match.group(1), match.group(1))
        raise UserError(key + text[match.end():]) from None


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
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"max_new_tokens: expected a positive integer or null, got {value!r}")
    if value >= block_size:
        raise UserError(f"max_new_tokens={value} leaves no room for the prompt in the model's "
                        f"context window of {block_size} tokens; set max_new_tokens below "
                        f"{block_size} (null: {max(1, min(200, block_size // 2))})")
    return value


def _write_transcript(path: Path, conversations: list[list[Message]]) -> None:
    lines = "".join(chat_jsonl_line(c) + "\n" for c in conversations)
    atomic_write_bytes(path, lines.encode())
