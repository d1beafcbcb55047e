"""Terminal input and output of the interactive tasks (`chat`, streamed `generate`):
text printed as a model writes it, and user lines read with line editing."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator, Sequence

from genframe.text.chat_session import StopFilter

_SURROGATES = re.compile("[\ud800-\udfff]")


def reply_printer(stop: Sequence[str]) -> Callable[[int, str], None]:
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


def user_lines(interactive: bool, notice: Callable[[str], None] | None = None) -> Iterator[str]:
    """User turns: `input()` on a terminal (until Ctrl-D), else stdin's lines.

    Piped input is split at ``\n`` only (a U+2028 in a message is text, not a line end);
    a byte-order mark at its start is dropped; bytes that are not UTF-8 are replaced by
    U+FFFD, and `notice` is told how many on which line, so a stray byte never ends the
    chat or its transcript.
    """
    if not interactive:
        for n, line in enumerate(_piped_lines(sys.stdin), start=1):
            yield clean_input(line.removeprefix("\ufeff") if n == 1 else line,
                         f"line {n} of the input", notice)
        return
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(flush=True)
            return
        yield clean_input(line, "your message", notice)


def _piped_lines(stream) -> Iterator[str]:
    """`stream`'s lines, read as bytes where it has them (bytes that are not UTF-8 become
    lone surrogates, which `clean_input` counts and replaces)."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # a text stream (tests, a program embedding genframe)
        yield from stream
        return
    for raw in buffer:  # binary lines end at b"\n" only
        yield raw.decode("utf-8", "surrogateescape")


def clean_input(text: str, where: str, notice: Callable[[str], None] | None) -> str:
    """`text` with bytes that were not UTF-8 replaced by U+FFFD (`replace_undecodable`);
    `notice` is told how many there were in `where`."""
    text, bad = replace_undecodable(text)
    if bad and notice is not None:
        notice(f"({where}: {bad} byte{'s' if bad != 1 else ''} that {'are' if bad != 1 else 'is'}"
               " not UTF-8 replaced by \ufffd)")
    return text


def replace_undecodable(text: str) -> tuple[str, int]:
    """`text` with lone surrogates (what Python makes of bytes that are not UTF-8, e.g.
    in ``sys.argv`` or a terminal's input) replaced by U+FFFD, and how many there were."""
    return _SURROGATES.subn("\ufffd", text)


def enable_line_editing() -> None:
    """Give `input()` history and line editing where the platform has readline."""
    try:
        import readline  # noqa: F401  (importing it is what enables line editing)
    except ImportError:  # not on every platform
        pass


class SampleStreamPrinter:
    """Prints a batch's texts: the first as it is made (the model's `stream` callback),
    the others when the batch is done. Nothing is printed before the first piece, so a
    refused prompt leaves no half-written output."""

    def __init__(self, start: int, prompt: str) -> None:
        self.start = start
        self.prompt = prompt
        self.started = False

    def __call__(self, row: int, piece: str) -> None:
        if row == 0:
            self._header()
            sys.stdout.write(piece)
            sys.stdout.flush()

    def _header(self) -> None:
        if not self.started:
            sys.stdout.write(f"--- sample {self.start} ---\n{self.prompt}")
            self.started = True

    def finish(self, samples) -> None:
        self._header()
        lines = [""]
        for j in range(1, len(samples)):
            prompt = samples.conditions[j].get("prompt") or ""
            lines += [f"--- sample {self.start + j} ---", prompt + samples.texts[j]]
        print("\n".join(lines), flush=True)
