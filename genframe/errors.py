"""Errors genframe raises on purpose.

`UserError` is for mistakes a user can fix (a bad override, a missing file, a model that
does not fit the data). The CLI prints its message without a traceback and exits with
status 2. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class GenframeError(Exception):
    """Base class of errors whose message is meant for the user."""

    exit_code = 1


class UserError(GenframeError):
    """A mistake in the user's config, command line or files (exit status 2)."""

    exit_code = 2


class TrainingDiverged(GenframeError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""

    exit_code = 1


class Interrupted(GenframeError):
    """The user stopped the run (Ctrl-C); its last checkpoint is kept."""

    exit_code = 130


class GenframeDeprecationWarning(DeprecationWarning):
    """A plugin uses an interface genframe will drop (the CLI shows it once per place)."""


def closest(word: str, choices: Iterable[str], n: int = 3, cutoff: float = 0.5) -> list[str]:
    """The choices that look most like `word` (for 'did you mean' hints); `cutoff` is
    difflib's similarity ratio a choice must reach (0.7 keeps only near-misspellings)."""
    choices = [str(c) for c in choices]
    return difflib.get_close_matches(word, choices, n=n, cutoff=cutoff)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' Did you mean X?' suffix, or '' when nothing is close."""
    found = closest(word, choices)
    if not found:
        return ""
    return " Did you mean " + " or ".join(repr(f) for f in found) + "?"


def valid_list(choices: Iterable[str], limit: int = 20) -> str:
    choices = sorted(str(c) for c in choices)
    text = ", ".join(choices[:limit])
    if len(choices) > limit:
        text += f", ... ({len(choices) - limit} more)"
    return text or "none"


def plural(count: int, word: str, many: str | None = None) -> str:
    """``"1 key"``, ``"3 keys"``, ``"0 keys"``; `many` for irregular plurals
    (``plural(2, "class", "classes")``)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def argument_check(args: Any, prefix: str = "model"):
    """``need(ok, key, expected)`` for checking constructor values (``args`` is usually
    ``locals()``): raises a `UserError` naming ``<prefix>.<key>``, what was expected and
    the value given, e.g. "model.latent_dim must be at least 1, got 0"."""

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise UserError(f"{prefix}.{key} must be {expected}, got {args[key]!r}")

    return need
