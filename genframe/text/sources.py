"""Where text comes from: Python's own pydoc topics, text files, or JSONL."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from genframe.errors import UserError, did_you_mean

log = logging.getLogger("genframe")

SOURCES = ("pydoc", "files", "jsonl")
TEXT_SUFFIXES = (".txt", ".md")


def load_documents(source: str = "pydoc", *, path: str | None = None,
                   text_field: str = "text") -> list[str]:
    """The documents of a text source, one string each (uncleaned).

    - ``pydoc``: the English prose of ``pydoc_data.topics.topics`` (ships with Python).
    - ``files``: a text file (one document) or a folder searched recursively for
      ``.txt``/``.md`` files (one document per file).
    - ``jsonl``: a JSONL file, one object per line, the document in ``text_field``.
    """
    if source == "pydoc":
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)]
    elif source == "files":
        docs = _load_files(_need_path(path, "a text file or a folder of .txt/.md files"))
    elif source == "jsonl":
        docs = _load_jsonl(_need_path(path, "a JSONL file"), text_field)
    else:
        raise UserError(f"unknown data.source {source!r}; expected one of "
                        f"{', '.join(SOURCES)}.{did_you_mean(source, SOURCES)}")
    if not docs:
        raise UserError(f"the text source {source!r} at data.path={path} holds no documents")
    return docs


def _need_path(path: str | None, expected: str) -> Path:
    if not path:
        raise UserError(f"data.path is not set; expected {expected}")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"data.path={path} does not exist; expected {expected}")
    return p


BOM = "\ufeff"


class NotUTF8Error(UserError):
    """A file whose bytes are not UTF-8 text (the message names the file and offset)."""


def decode_text(data: bytes, where: str | Path) -> str:
    """`data` decoded as UTF-8, without a leading byte-order mark.

    Raises:
        NotUTF8Error: naming `where`, the byte offset and line of the first bad byte, and
            how to convert the file.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start:e.end]
        line = data.count(b"\n", 0, e.start) + 1
        hint = ("it starts with a UTF-16 byte-order mark: save it as UTF-8"
                if data[:2] in (b"\xff\xfe", b"\xfe\xff")
                else "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8)")
        raise NotUTF8Error(f"{where} is not UTF-8 text: byte 0x{bad[0]:02x} at offset {e.start} "
                           f"(line {line}) is not valid UTF-8; {hint}") from None
    return text[1:] if text.startswith(BOM) else text


def read_text(p: Path) -> str:
    """A UTF-8 text file's text, without a byte-order mark; a `NotUTF8Error` (a
    `UserError`) naming the file and the offset of the first byte that is not UTF-8."""
    return decode_text(Path(p).read_bytes(), p)


def text_lines(text: str) -> list[str]:
    """The lines of `text`, split at ``\n`` only (a trailing ``\r`` is dropped).

    Unlike ``str.splitlines``, characters such as U+2028 (line separator), U+2029,
    U+0085, ``\v`` and ``\f`` stay inside their line: JSONL and line-per-record files
    end records with newlines, and those characters are text.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def read_lines(p: Path) -> list[str]:
    """The lines of a UTF-8 text file (see `text_lines`; no byte-order mark)."""
    return text_lines(read_text(p))


def _load_files(p: Path) -> list[str]:
    if p.is_file():
        return [read_text(p)]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise UserError(f"data.path={p} holds no .txt or .md files; expected a text file "
                        "or a folder of .txt/.md files")
    # Bad data is skipped and counted: a file of a folder that is not UTF-8 is left out
    # with a warning; a folder of nothing else is an error.
    docs, skipped = [], []
    for f in files:
        try:
            docs.append(read_text(f))
        except NotUTF8Error as e:
            skipped.append(str(e))
    if skipped:
        if not docs:
            raise UserError(f"data.path={p}: none of its {len(files)} text files is UTF-8 "
                            f"text; first: {skipped[0]}")
        log.warning("data.path=%s: skipped %d of %d files that are not UTF-8 text: %s",
                    p, len(skipped), len(files),
                    "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    return docs


def jsonl_records(p: Path) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for each non-empty line of a UTF-8 JSONL file, `where` being
    ``"<file>, line <n>"``; a line that is not JSON is a `UserError` saying where.

    Records end at ``\n`` only (see `text_lines`); a byte-order mark is not text."""
    for lineno, line in enumerate(read_lines(p), start=1):
        if not line.strip():
            continue
        where = f"{p}, line {lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None


def _load_jsonl(p: Path, text_field: str) -> list[str]:
    if p.is_dir():
        raise UserError(f"data.path={p} is a folder; expected a JSONL file")
    docs = []
    for where, row in jsonl_records(p):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object, "
                            f"got {type(row).__name__}")
        if text_field not in row:
            raise UserError(f"{where}: no field {text_field!r} (data.text_field); "
                            f"fields are {sorted(row)}.{did_you_mean(text_field, row)}")
        value = row[text_field]
        if not isinstance(value, str):
            raise UserError(f"{where}: field {text_field!r} is "
                            f"{type(value).__name__}, expected a string")
        docs.append(value)
    return docs
