"""Cleaning: whitespace normalisation, empty/duplicate removal, optional pseudonymisation.

Pseudonymisation replaces, in this order (so that the more specific pattern wins):

==============  =======================================================  ===========
kind            what it matches                                          placeholder
==============  =======================================================  ===========
url_credentials ``scheme://user:password@host`` (the credentials only)   ``<CREDENTIALS>``
email           ``name@domain.tld``                                      ``<EMAIL>``
iban            an IBAN: 2 letters, 2 digits, 11-30 letters/digits        ``<IBAN>``
card            13-19 digits, plain or in groups of 4, passing Luhn      ``<CARD>``
ipv4            four dotted octets 0-255                                 ``<IP>``
ipv6            full or ``::``-compressed IPv6 addresses                 ``<IP>``
phone           grouped ``+CC ...`` or ``(555) 123-4567`` numbers (7+ digits) ``<PHONE>``
==============  =======================================================  ===========

It is a best-effort filter on patterns, not a guarantee of anonymity.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

log = logging.getLogger("genframe")

_URL_CREDENTIALS = re.compile(r"(?<=://)[^\s/:@]+:[^\s/@]+@")
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_CARD = re.compile(r"\b(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,3})?|\d{4}[ -]\d{6}[ -]\d{5})\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
                   r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
_H = r"[0-9A-Fa-f]{1,4}"
_IPV6 = re.compile(
    r"(?<![0-9A-Fa-f:])(?:"
    rf"(?:{_H}:){{7}}{_H}"                       # full form
    rf"|(?:{_H}:){{1,7}}:(?:{_H}(?::{_H}){{0,6}})?"  # compressed with a leading part
    rf"|::(?:{_H}(?::{_H}){{0,6}})"               # ::1, ::ffff:...
    r")(?![0-9A-Fa-f:])"
)
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4})(?!\w)"
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ipv6_ok(s: str) -> bool:
    # At least two colons and one hex group; rejects things like "a::" in prose and times.
    return s.count(":") >= 2 and s != "::" and any(c.isdigit() for c in s)


def pseudonymize_text(text: str, counts: dict[str, int] | None = None) -> str:
    """`text` with personal data replaced by placeholders; `counts` gains the numbers."""
    counts = counts if counts is not None else {}

    def sub(kind: str, pattern: re.Pattern, placeholder: str, text: str, check=None) -> str:
        def repl(m: re.Match) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return placeholder

        return pattern.sub(repl, text)

    text = sub("url_credentials", _URL_CREDENTIALS, "<CREDENTIALS>@", text)
    text = sub("email", _EMAIL, "<EMAIL>", text)
    text = sub("iban", _IBAN, "<IBAN>", text)
    text = sub("card", _CARD, "<CARD>", text,
               check=lambda s: _luhn(re.sub(r"\D", "", s)))
    text = sub("ipv4", _IPV4, "<IP>", text)
    text = sub("ipv6", _IPV6, "<IP>", text, check=_ipv6_ok)
    text = sub("phone", _PHONE, "<PHONE>", text,
               check=lambda s: len(re.sub(r"\D", "", s)) >= 7 and bool(re.search(r"[ ()-]", s)))
    return text


def normalize_text(text: str) -> str:
    """Line endings to \\n, tabs and runs of spaces to one space, trailing spaces and
    runs of 3+ newlines (2+ blank lines) trimmed; paragraphs and indentation-free lines kept."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v\u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def clean_documents(
    docs: Iterable[str],
    *,
    normalize_whitespace: bool = True,
    drop_empty: bool = True,
    dedupe: bool = True,
    pseudonymize: bool = False,
) -> tuple[list[str], dict[str, int]]:
    """Clean `docs`; returns the kept documents (in order) and counts of what was done:
    ``documents_in``, ``documents_out``, ``dropped_empty``, ``dropped_duplicates`` and,
    with `pseudonymize`, ``replaced_<kind>`` for each kind of personal data."""
    docs = list(docs)
    counts: dict[str, int] = {"documents_in": len(docs), "dropped_empty": 0,
                              "dropped_duplicates": 0}
    replaced: dict[str, int] = {}
    seen: set[str] = set()
    out: list[str] = []
    for doc in docs:
        if normalize_whitespace:
            doc = normalize_text(doc)
        if drop_empty and not doc.strip():
            counts["dropped_empty"] += 1
            continue
        if pseudonymize:
            doc = pseudonymize_text(doc, replaced)
        if dedupe:
            if doc in seen:
                counts["dropped_duplicates"] += 1
                continue
            seen.add(doc)
        out.append(doc)
    counts["documents_out"] = len(out)
    if pseudonymize:
        for kind in ("url_credentials", "email", "iban", "card", "ipv4", "ipv6", "phone"):
            counts[f"replaced_{kind}"] = replaced.get(kind, 0)
    log.info("text cleaning: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return out, counts
