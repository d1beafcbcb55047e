"""Terminal input and output of the interactive tasks (`chat`, streamed `generate`):
text printed as a model writes it, and user lines read with line editing."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from genframe.text.chat_session import StopFilter


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


def user_lines(interactive: bool):
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
