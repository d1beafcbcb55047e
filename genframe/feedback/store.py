"""The feedback store: every generated sample with an id, and what people said about it.

One SQLite database (``$GENFRAME_FEEDBACK``, else ``<genframe cache>/feedback.sqlite``)
with two tables:

- ``samples``: one row per generated sample, written when it is made (by ``generate``,
  ``chat`` and ``serve``): its id, the source task, the model's registered name and
  version (``hub:NAME:VERSION`` or the run directory), the prompt or condition, seed,
  sampling settings, and the output (the text, or the image file).
- ``feedback``: ratings (+1 / -1 / 0), flags and corrected texts, each attached to one
  sample id; a sample may collect many.

Writers from many processes and threads share the file: WAL journal, each write one
``BEGIN IMMEDIATE`` transaction, and a long busy timeout, so concurrent writers wait
for each other instead of failing (SQLite allows one writer at a time, readers never
block). Nothing here knows about models or Hydra.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genframe.errors import UserError

FEEDBACK_ENV = "GENFRAME_FEEDBACK"
BUSY_TIMEOUT_S = 60.0
RATINGS = (-1, 0, 1)
MAX_TEXT = 100_000  # characters of a corrected text or comment kept

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    source TEXT NOT NULL,
    model TEXT,
    model_version TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('image', 'text')),
    prompt TEXT,
    condition TEXT,
    seed INTEGER,
    settings TEXT,
    output TEXT,
    file TEXT,
    run_dir TEXT
);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sample_id TEXT NOT NULL REFERENCES samples(id),
    created TEXT NOT NULL,
    rating INTEGER CHECK (rating IS NULL OR rating IN (-1, 0, 1)),
    flag TEXT,
    corrected_text TEXT,
    comment TEXT
);
CREATE INDEX IF NOT EXISTS feedback_sample ON feedback(sample_id);
CREATE INDEX IF NOT EXISTS samples_model ON samples(model_version);
"""


def default_path() -> Path:
    """``$GENFRAME_FEEDBACK``, else ``<genframe cache>/feedback.sqlite``."""
    env = os.environ.get(FEEDBACK_ENV)
    if env:
        return Path(env).expanduser()
    from genframe.cache import cache_dir

    return cache_dir() / "feedback.sqlite"


def new_id() -> str:
    """A new sample id: 32 hex digits (a random UUID)."""
    return uuid.uuid4().hex


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class SampleRecord:
    """One generated sample as the store keeps it (see the module docstring)."""

    id: str
    source: str
    kind: str
    model: str | None = None
    model_version: str | None = None
    prompt: str | None = None
    condition: Mapping[str, Any] | None = None
    seed: int | None = None
    settings: Mapping[str, Any] | None = None
    output: str | None = None
    file: str | None = None
    run_dir: str | None = None


def sample_records(samples: Any, ids: list[str], *, source: str, model: str | None,
                   model_version: str | None, settings: Mapping[str, Any] | None = None,
                   files: list[str | None] | None = None, run_dir: str | None = None) -> list[SampleRecord]:
    """One `SampleRecord` per sample of a `genframe.Samples` batch: its condition (and
    prompt), the batch's seed, `settings` with the batch's metadata, the text or the
    image's file."""
    seed = samples.metadata.get("seed")
    shared = json.loads(json.dumps({**(settings or {}), **samples.metadata}, default=str))
    records = []
    for i, sample_id in enumerate(ids):
        condition = samples.conditions[i] if i < len(samples.conditions) else {}
        prompt = condition.get("prompt") if isinstance(condition, Mapping) else None
        records.append(SampleRecord(
            id=sample_id, source=source, kind=samples.kind, model=model, model_version=model_version,
            prompt=prompt if isinstance(prompt, str) else None,
            condition=json.loads(json.dumps(condition, default=str)),
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
            settings=shared, output=samples.texts[i] if samples.texts is not None else None,
            file=files[i] if files else None, run_dir=run_dir))
    return records


class UnknownSample(UserError):
    """Feedback for a sample id the store does not hold."""


class FeedbackStore:
    """The SQLite feedback store at `path` (created with its tables on first use).

    Raises:
        UserError: the file cannot be created or opened, or is not a feedback store.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_path()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(f"feedback store {self.path}: cannot open it ({exc}); give "
                            f"feedback.db=<a writable file> (or set ${FEEDBACK_ENV})") from None

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: taken at once (IMMEDIATE), so two writers never both
        read and then both try to upgrade, which SQLite would refuse."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- samples -------------------------------------------------------------------------

    def add_samples(self, records: Iterable[SampleRecord]) -> list[str]:
        """Store `records` in one transaction; returns their ids."""
        rows = [(r.id, _now(), r.source, r.model, r.model_version, r.kind, r.prompt,
                 _json(r.condition), r.seed, _json(r.settings), r.output, r.file, r.run_dir)
                for r in records]
        with self._write() as db:
            db.executemany("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
        return [r[0] for r in rows]

    def sample(self, sample_id: str) -> dict[str, Any] | None:
        """The stored sample `sample_id` as a dict (None when unknown)."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM samples WHERE id = ?", (str(sample_id),)).fetchone()
        return _sample_dict(row) if row is not None else None

    # -- feedback ------------------------------------------------------------------------

    def add_feedback(self, sample_id: str, *, rating: int | None = None, flag: str | None = None,
                     corrected_text: str | None = None, comment: str | None = None) -> int:
        """Attach feedback to `sample_id`; returns the feedback row's id.

        Args:
            rating: +1 (good), -1 (bad) or 0 (neutral).
            flag: a short label (``"unsafe"``, ``"wrong"``, ...), at most 64 characters.
            corrected_text: what the text should have been (text samples).
            comment: free text.

        Raises:
            UnknownSample: no sample has that id.
            UserError: no rating, flag or corrected text; a rating outside -1, 0, 1; a
                text too long.
        """
        if rating is None and flag is None and corrected_text is None:
            raise UserError("feedback needs a rating (-1, 0 or 1), a flag or a corrected text")
        if rating is not None and (isinstance(rating, bool) or rating not in RATINGS):
            raise UserError(f"rating must be -1, 0 or 1, got {rating!r}")
        if flag is not None and (not isinstance(flag, str) or not 0 < len(flag) <= 64):
            raise UserError(f"flag must be a text of 1 to 64 characters, got {flag!r}")
        for key, text in (("corrected_text", corrected_text), ("comment", comment)):
            if text is not None and len(text) > MAX_TEXT:
                raise UserError(f"{key} is {len(text)} characters; at most {MAX_TEXT}")
        try:
            with self._write() as db:
                cursor = db.execute(
                    "INSERT INTO feedback (sample_id, created, rating, flag, corrected_text, comment) "
                    "VALUES (?,?,?,?,?,?)",
                    (str(sample_id), _now(), rating, flag, corrected_text, comment))
                return int(cursor.lastrowid)
        except sqlite3.IntegrityError:
            raise UnknownSample(f"no generated sample has id {sample_id!r} in the feedback "
                                f"store {self.path}") from None

    def feedback(self, sample_id: str | None = None) -> list[dict[str, Any]]:
        """Feedback rows (of one sample, or all), oldest first."""
        query = "SELECT * FROM feedback" + (" WHERE sample_id = ?" if sample_id else "") + " ORDER BY id"
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(query, (sample_id,) if sample_id else ())]

    def rated_samples(self, model_version: str | None = None) -> list[dict[str, Any]]:
        """Every sample with feedback, with its mean rating (``rating``, None without
        ratings), its number of ratings, its flags and its latest corrected text."""
        where = "WHERE s.model_version = ?" if model_version else ""
        query = f"""
            SELECT s.*, AVG(f.rating) AS rating, COUNT(f.rating) AS ratings,
                   GROUP_CONCAT(f.flag) AS flags,
                   (SELECT corrected_text FROM feedback c WHERE c.sample_id = s.id
                      AND c.corrected_text IS NOT NULL ORDER BY c.id DESC LIMIT 1) AS corrected_text
            FROM samples s JOIN feedback f ON f.sample_id = s.id {where}
            GROUP BY s.id ORDER BY MIN(f.id)"""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(query, (model_version,) if model_version else ()).fetchall()
        return [{**_sample_dict(r), "rating": r["rating"], "ratings": r["ratings"],
                 "flags": r["flags"].split(",") if r["flags"] else [],
                 "corrected_text": r["corrected_text"]} for r in rows]

    def counts(self) -> dict[str, int]:
        """Rows in each table."""
        with self._connect() as db:
            return {t: int(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])
                    for t in ("samples", "feedback")}


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _sample_dict(row: sqlite3.Row) -> dict[str, Any]:
    out = {k: row[k] for k in row.keys() if k in _SAMPLE_COLUMNS}
    for key in ("condition", "settings"):
        out[key] = json.loads(out[key]) if out.get(key) else None
    return out


_SAMPLE_COLUMNS = ("id", "created", "source", "model", "model_version", "kind", "prompt",
                   "condition", "seed", "settings", "output", "file", "run_dir")
