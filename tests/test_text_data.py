"""The text data layer: sources, cleaning, pseudonymisation, tokenizers, cache, data module."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from genframe.data.text import TextDataModule
from genframe.errors import UserError
from genframe.text import (
    BPETokenizer,
    CharTokenizer,
    build_tokenizer,
    clean_documents,
    load_documents,
    load_tokenizer,
    pseudonymize_text,
    token_cache,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.\nIt was the best of times.",
    "Python's for statement iterates over the items of any sequence, in order.",
    "Ünïcödé, émoji 🙂 and tabs\tstay round-trippable.",
]


def test_char_tokenizer_round_trip_unknown_and_save(tmp_path):
    tok = build_tokenizer("char", CORPUS)
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == len(set("".join(CORPUS))) + 1
    for s in CORPUS:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("fox§")[-1] == 0  # unseen char -> <unk>
    tok.save(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert data["kind"] == "char"
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.encode(CORPUS[2]) == tok.encode(CORPUS[2])


def test_bpe_round_trip_and_save(tmp_path):
    docs = load_documents("pydoc")[:10]
    tok = build_tokenizer("bpe", docs, vocab_size=300)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size <= 300
    samples = [*CORPUS, docs[0][:500], "  leading spaces\n\nand\r\nCRLF"]
    for s in samples:
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s
    # Merges were learned: common English compresses below one token per byte.
    assert len(tok.encode(docs[1])) < len(docs[1].encode())
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["kind"] == "bpe"
    again = BPETokenizer.load(tmp_path)
    assert again.encode(samples[3]) == tok.encode(samples[3])
    with pytest.raises(UserError, match="vocab_size"):
        build_tokenizer("bpe", docs, vocab_size=100)


def test_unknown_tokenizer_kind_suggests():
    with pytest.raises(UserError, match="Did you mean 'char'"):
        build_tokenizer("chr", CORPUS)
    with pytest.raises(UserError, match="data.tokenizer"):
        TextDataModule(tokenizer="wordpiece")


@pytest.mark.parametrize("text,kind,placeholder", [
    ("write to jane.doe+tag@example.co.uk today", "email", "<EMAIL>"),
    ("call +44 20 7946 0958 after nine", "phone", "<PHONE>"),
    ("or (555) 123-4567 at home", "phone", "<PHONE>"),
    ("the server 192.168.1.20 answered", "ipv4", "<IP>"),
    ("ping 2001:db8:85a3::8a2e:370:7334 now", "ipv6", "<IP>"),
    ("and ::1 is localhost", "ipv6", "<IP>"),
    ("fetch https://alice:s3cret@example.com/x", "url_credentials", "<CREDENTIALS>@"),
    ("pay to DE89 3704 0044 0532 0130 00 please", "iban", "<IBAN>"),
    ("card 4111 1111 1111 1111 expired", "card", "<CARD>"),
])
def test_pseudonymisation_catches_each_kind(text, kind, placeholder):
    counts: dict[str, int] = {}
    out = pseudonymize_text(text, counts)
    assert placeholder in out and counts == {kind: 1}, (out, counts)


def test_pseudonymisation_leaves_prose_and_code_alone():
    prose = [
        "In 2023 the list had 12 items; x[1:3] is a slice and 3.14 is a float.",
        "Use a::b or dict.get(key) and the @decorator syntax; see PEP 8 and 1.2.3.",
        "The year 1999, version 3.12.1, a ratio of 10:30 and the value 0x1F.",
        "Compare f(a, b) == 42 with re.sub(r'\\d+', '', s).",
    ]
    counts: dict[str, int] = {}
    for p in prose:
        assert pseudonymize_text(p, counts) == p
    assert counts == {}
    # The pydoc corpus itself is almost untouched.
    _, c = clean_documents(load_documents("pydoc"), pseudonymize=True)
    assert sum(v for k, v in c.items() if k.startswith("replaced_")) == 0


def test_cleaning_counts_and_logs(caplog):
    docs = ["  Hello\t\tworld  \r\n", "", "   \n\n ", "Hello world", "Other\n\n\n\ntext",
            "mail me: a@b.org"]
    with caplog.at_level(logging.INFO, logger="genframe"):
        out, counts = clean_documents(docs, pseudonymize=True)
    assert out == ["Hello world", "Other\n\ntext", "mail me: <EMAIL>"]
    assert counts["dropped_empty"] == 2 and counts["dropped_duplicates"] == 1
    assert counts["documents_in"] == 6 and counts["documents_out"] == 3
    assert counts["replaced_email"] == 1 and counts["replaced_phone"] == 0
    assert "dropped_duplicates=1" in caplog.text
    kept, c = clean_documents(docs, normalize_whitespace=False, drop_empty=False, dedupe=False)
    assert kept == docs and c["dropped_empty"] == c["dropped_duplicates"] == 0


def test_pydoc_and_files_sources(tmp_path):
    docs = load_documents("pydoc")
    assert len(docs) > 50 and sum(map(len, docs)) > 100_000
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "b.md").write_text("second")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert load_documents("files", path=str(tmp_path)) == ["first", "second"]
    assert load_documents("files", path=str(tmp_path / "a.txt")) == ["first"]
    with pytest.raises(UserError, match="Did you mean 'files'"):
        load_documents("file", path=str(tmp_path))


def test_jsonl_source_and_bad_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "one", "id": 1}\n\n{"body": "two"}\n')
    assert load_documents("jsonl", path=str(f), text_field="body") == ["one", "two"]
    with pytest.raises(UserError, match=r"line 1: no field 'text' \(data.text_field\); fields are \['body', 'id'\]"):
        load_documents("jsonl", path=str(f), text_field="text")
    f.write_text('{"text": "ok"}\n{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(UserError, match=r"d\.jsonl, line 3: not valid JSON"):
        load_documents("jsonl", path=str(f))


def test_missing_or_empty_paths_name_data_path(tmp_path):
    with pytest.raises(UserError, match="data.path is not set"):
        load_documents("files")
    with pytest.raises(UserError, match="data.path=.*does not exist"):
        load_documents("jsonl", path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match="data.path=.*no .txt or .md files"):
        load_documents("files", path=str(tmp_path))
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    dm = TextDataModule(source="files", path=str(tmp_path))
    with pytest.raises(UserError, match="data.path=.*no text"):
        dm.setup("fit")


def test_token_cache_hits_on_second_call(tmp_path):
    tok = CharTokenizer.train(CORPUS)
    toks, hit = token_cache(CORPUS, tok, tmp_path, separator=tok.stoi["\n"])
    assert not hit and isinstance(toks, np.memmap) and toks.dtype == np.uint16
    expected = tok.encode("\n".join(CORPUS))
    assert toks.tolist() == expected  # the cache holds what plain encoding gives
    again, hit = token_cache(CORPUS, tok, tmp_path, separator=tok.stoi["\n"])
    assert hit and again.tolist() == expected
    # Other text or another vocabulary is another entry.
    _, hit = token_cache(CORPUS[:2], tok, tmp_path, separator=tok.stoi["\n"])
    assert not hit
    _, hit = token_cache(CORPUS, CharTokenizer.train(CORPUS[:2]), tmp_path)
    assert not hit


def test_text_datamodule_on_pydoc_char():
    dm = TextDataModule(block_size=32, batch_size=4)
    assert dm.provides == frozenset({"tokens"})
    dm.setup("fit")
    assert dm.tokenizer.kind == "char" and dm.vocab_size == dm.tokenizer.vocab_size
    assert 60 < dm.vocab_size < 300
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"tokens"}
    x = batch["tokens"]
    assert x.shape == (4, 33) and x.dtype == torch.long
    assert int(x.min()) >= 0 and int(x.max()) < dm.vocab_size
    val = next(iter(dm.val_dataloader()))["tokens"]
    assert val.shape == (4, 33) and int(val.max()) < dm.vocab_size
    # An epoch is about one pass over the training tokens.
    n_train = len(dm.train_set.tokens)
    assert len(dm.train_set) == (n_train - 1) // 32
    # Validation windows are consecutive; the second run opens the token cache.
    assert dm.val_set[1]["tokens"][0] == dm.val_set[0]["tokens"][-1]
    again = TextDataModule(block_size=32, batch_size=4)
    again.setup("fit")
    assert again.cache_hits == {"train": True, "val": True, "test": True}
    assert np.array_equal(np.asarray(again.train_set.tokens), np.asarray(dm.train_set.tokens))


def test_text_datamodule_bpe_on_small_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"text": f"Document number {i} says hello to the reader, again and again."}
            for i in range(20)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = TextDataModule(source="jsonl", path=str(f), tokenizer="bpe", vocab_size=280,
                        block_size=8, batch_size=2, val_fraction=0.2)
    dm.setup("fit")
    assert dm.vocab_size <= 280
    x = next(iter(dm.train_dataloader()))["tokens"]
    assert x.shape == (2, 9) and int(x.max()) < dm.vocab_size
    dm.save_tokenizer(tmp_path / "run")
    assert load_tokenizer(tmp_path / "run").encode("hello") == dm.tokenizer.encode("hello")
    with pytest.raises(UserError, match="block_size"):
        TextDataModule(source="jsonl", path=str(f), block_size=10_000).setup("fit")


def test_unigram_baseline_matches_a_hand_count():
    import math

    import numpy as np

    from genframe.data.text import unigram_loss

    train = np.array([0, 0, 0, 1])  # counts + 1: [4, 2, 1] of 7 for vocab 3
    val = np.array([0, 1, 2])
    expected = -(math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 3
    assert unigram_loss(train, val, 3) == pytest.approx(expected)
