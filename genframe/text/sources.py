"""Where text comes from: Python's own pydoc topics, text files, or JSONL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from genframe.errors import UserError, did_you_mean

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


def read_text(p: Path) -> str:
    """A UTF-8 text file's text; a `UserError` if it is not UTF-8."""
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 text: {e}") from None


def _load_files(p: Path) -> list[str]:
    if p.is_file():
        return [read_text(p)]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise UserError(f"data.path={p} holds no .txt or .md files; expected a text file "
                        "or a folder of .txt/.md files")
    return [read_text(f) for f in files]


def jsonl_records(p: Path) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for each non-empty line of a UTF-8 JSONL file, `where` being
    ``"<file>, line <n>"``; a line that is not JSON is a `UserError` saying where."""
    for lineno, line in enumerate(read_text(p).splitlines(), start=1):
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
