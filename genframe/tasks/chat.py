"""`genframe chat`: talk with a trained language model, turn by turn.

On a terminal it is an interactive loop (``you> ``, the reply streamed as it is
written); with stdin from a pipe or file each line is one user turn and only the replies
go to stdout (``echo "hi" | genframe chat run=DIR``). ``/reset`` clears the history (the
system prompt stays), ``/exit``, end of input or Ctrl-C ends the chat. The conversation
is saved as ``transcript.jsonl`` (chat JSONL, one conversation per line, a new one after
each ``/reset``) in the task's run directory, ready to fine-tune on with ``data=chat``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError
from genframe.files import atomic_write_bytes
from genframe.runs import start_run, update_run
from genframe.tasks.common import resolve_device, source_record
from genframe.tasks.build import to_plain
from genframe.terminal import enable_line_editing, reply_printer, user_lines
from genframe.text.chat import ChatTemplate, Message, chat_jsonl_line
from genframe.text.chat_session import ChatSession

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

    out_dir = Path(cfg.paths.output_dir)
    start_run(out_dir, cfg, "chat",
              source=source_record(run, weights),
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
        reply = session.send(text, stream=reply_printer(template.stop) if interactive else None,
                             on_too_long=say)
        if reply is not None:
            replies.append(reply)
            if not interactive:
                print(reply, flush=True)
            _write_transcript(transcript, session.conversations())

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
        for line in user_lines(interactive):
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


def _write_transcript(path: Path, conversations: list[list[Message]]) -> None:
    lines = "".join(chat_jsonl_line(c) + "\n" for c in conversations)
    atomic_write_bytes(path, lines.encode())
