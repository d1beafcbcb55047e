"""Text input read the way people write it: records end at newlines only, a byte-order
mark is not text, bytes that are not UTF-8 are reported (or replaced on chat's stdin),
and characters a tokenizer never saw are counted, never silently mapped to <unk>."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from genframe.errors import UserError
from genframe.text import load_documents
from genframe.text.chat import chat_jsonl_line, read_chat_jsonl
from genframe.text.sources import jsonl_records, read_text
from genframe.text.tokenize import CharTokenizer

BOM = b"\xef\xbb\xbf"
# Characters str.splitlines() treats as line ends but JSONL does not, and that JSON
# writers leave raw in strings (the others it splits on, \v \f \x1c-\x1e, JSON escapes).
NOT_LINE_ENDS = ["\u2028", "\u2029", "\x85"]


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- records end at newlines only -----------------------------------------------------------

@pytest.mark.parametrize("char", NOT_LINE_ENDS)
def test_jsonl_records_split_on_newlines_only(tmp_path, char):
    text = f"one{char}two"
    raw = json.dumps({"text": text}, ensure_ascii=False) + "\r\n" + json.dumps({"text": "b"})
    path = write(tmp_path / "d.jsonl", raw.encode())
    assert [r["text"] for _, r in jsonl_records(path)] == [text, "b"]
    assert load_documents("jsonl", path=str(path))[0].startswith("one")


def test_chat_file_with_a_line_separator_in_a_message(tmp_path):
    content = "first line\u2028second line\u2029end"
    line = json.dumps({"messages": [{"role": "user", "content": content},
                                    {"role": "assistant", "content": "ok"}]}, ensure_ascii=False)
    path = write(tmp_path / "c.jsonl", BOM + (line + "\n").encode())
    (conversation,) = read_chat_jsonl(path)
    assert conversation[0]["content"] == content


def test_read_lines_splits_at_newlines_only():
    from genframe.text.sources import text_lines

    text = "a\u2028b\r\nc\x0cd\x0b\x1c\x1d\x1e\x85\u2029\n\ne\n"
    assert text_lines(text) == ["a\u2028b", "c\x0cd\x0b\x1c\x1d\x1e\x85\u2029", "", "e"]
    assert text_lines("x") == ["x"] and text_lines("") == []


def test_transcript_lines_survive_any_line_splitter():
    line = chat_jsonl_line([{"role": "user", "content": "a\u2028b\u2029c\udcff"}])
    assert len(line.splitlines()) == 1  # U+2028/U+2029 written as JSON escapes
    line.encode("utf-8")  # a lone surrogate (a byte that was not UTF-8) never breaks the file
    assert json.loads(line)["messages"][0]["content"] == "a\u2028b\u2029c\ufffd"


# -- a byte-order mark is not text -------------------------------------------------------------

def test_byte_order_mark_is_not_text(tmp_path):
    from genframe.text.sources import read_lines

    single = write(tmp_path / "one.txt", BOM + "Hello world".encode())
    assert load_documents("files", path=str(single)) == ["Hello world"]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(2):
        write(folder / f"{i}.md", BOM + f"doc {i}".encode())
    assert load_documents("files", path=str(folder)) == ["doc 0", "doc 1"]
    jsonl = write(tmp_path / "d.jsonl", BOM + b'{"text": "x"}\n')
    assert load_documents("jsonl", path=str(jsonl)) == ["x"]
    prompts = write(tmp_path / "p.txt", BOM + b"Once upon\r\n")
    assert read_text(prompts) == "Once upon\r\n" and read_lines(prompts) == ["Once upon"]
    from genframe.text import load_tokenizer

    saved = tmp_path / "tok"
    saved.mkdir()
    write(saved / "tokenizer.json", BOM + CharTokenizer(["a", "b"]).to_json().encode())
    assert load_tokenizer(saved).encode("ab") == [1, 2]


def test_prompt_files_with_bom_and_line_separators(tmp_path):
    from genframe.tasks.generate import read_prompt_file

    jsonl = write(tmp_path / "p.jsonl",
                  BOM + '{"prompt": "The list\u2028type"}\n'.encode())
    assert read_prompt_file(str(jsonl)) == ["The list\u2028type"]
    txt = write(tmp_path / "p.txt", BOM + "Hello\u2028there\nThe end\n".encode())
    assert read_prompt_file(str(txt)) == ["Hello\u2028there", "The end"]


# -- bytes that are not UTF-8 ---------------------------------------------------------------------

def test_a_text_file_that_is_not_utf8_names_the_file_and_offset(tmp_path):
    bad = write(tmp_path / "latin1.txt", b"good\ncaf\xe9\n")
    with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text: byte 0xe9 at offset 8 "
                                        r"\(line 2\).*save it as UTF-8"):
        load_documents("files", path=str(bad))
    utf16 = write(tmp_path / "u16.jsonl", '{"text": "x"}\n'.encode("utf-16"))
    with pytest.raises(UserError, match="u16.jsonl is not UTF-8 text.*UTF-16"):
        load_documents("jsonl", path=str(utf16))
    chats = write(tmp_path / "c.jsonl", b'{"messages": []}\n{"messages": [\xff]}\n')
    with pytest.raises(UserError, match=r"c.jsonl is not UTF-8 text: byte 0xff at offset 31 "
                                        r"\(line 2\)"):
        read_chat_jsonl(chats)


def test_a_folder_skips_and_counts_files_that_are_not_utf8(tmp_path, caplog):
    write(tmp_path / "a.txt", b"fine text")
    write(tmp_path / "b.txt", b"caf\xe9")
    with caplog.at_level(logging.WARNING, logger="genframe"):
        assert load_documents("files", path=str(tmp_path)) == ["fine text"]
    assert "skipped 1 of 2 files that are not UTF-8 text" in caplog.text
    assert "b.txt" in caplog.text and "offset 3" in caplog.text
    (tmp_path / "a.txt").unlink()
    with pytest.raises(UserError, match="none of its 1 text files is UTF-8"):
        load_documents("files", path=str(tmp_path))


def piped_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_piped_chat_input_replaces_bytes_that_are_not_utf8(monkeypatch):
    from genframe.terminal import user_lines

    piped_stdin(monkeypatch, BOM + b"hello\nhi\xff\xfe there\xe2\x80\xa8x\nbye\n")
    notices: list[str] = []
    lines = [line.rstrip("\n") for line in user_lines(False, notice=notices.append)]
    assert lines == ["hello", "hi\ufffd\ufffd there\u2028x", "bye"]
    assert notices == ["(line 2 of the input: 2 bytes that are not UTF-8 replaced by \ufffd)"]
    # A text stream (a program embedding genframe) with escaped bytes is cleaned too.
    monkeypatch.setattr("sys.stdin", io.StringIO("a\udcff\n"))
    assert list(user_lines(False)) == ["a\ufffd\n"]
    # So is a system prompt with a byte of the command line that was not UTF-8.
    from genframe.terminal import clean_input

    assert clean_input("be \udcff nice", "system", notices.append) == "be \ufffd nice"
    assert notices[-1] == "(system: 1 byte that is not UTF-8 replaced by \ufffd)"


# -- characters the tokenizer never saw --------------------------------------------------------

def test_unknown_characters_are_counted_with_examples():
    from genframe.text.tokenize import report_unknown, unknown_characters

    tok = CharTokenizer.train(["abc "])
    assert unknown_characters(tok, ["ab☃é é"]) == {"é": 2, "☃": 1}
    assert report_unknown(tok, ["ab☃é é"], "the prompt") == (
        "the prompt: 3 characters the tokenizer never saw ('é' x2, '☃') read as <unk>")
    assert report_unknown(tok, ["abc"], "the prompt") is None
    many = report_unknown(tok, ["defghij"], "x")
    assert many.startswith("x: 7 characters") and "... 7 distinct" in many


def test_text_data_reports_characters_the_model_tokenizer_never_saw(tmp_path, caplog):
    from genframe.data.text import TextDataModule

    write(tmp_path / "t.txt", ("the café serves crème brûlée " * 40).encode())
    dm = TextDataModule(source="files", path=str(tmp_path / "t.txt"), block_size=8,
                        val_fraction=0.2, test_fraction=0)
    dm.use_tokenizer(CharTokenizer.train(["the cafe serves creme brulee"]))
    with caplog.at_level(logging.WARNING, logger="genframe"):
        dm.setup()
    assert dm.unknown_characters["train"] > 0 and sum(dm.unknown_characters.values()) == 4 * 40
    assert "characters the tokenizer never saw" in caplog.text
    assert "read as <unk> by the model's tokenizer" in caplog.text


def test_chat_data_reports_characters_the_model_tokenizer_never_saw(tmp_path, caplog):
    from genframe.data.chat import ChatDataModule

    rows = [{"messages": [{"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": "ok ☃"}]} for i in range(10)]
    path = write(tmp_path / "c.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    dm = ChatDataModule(path=str(path), block_size=64, batch_size=2)
    tok = CharTokenizer.train(["<system> <user> <assistant> <end>\n hi 0123456789 ok"])
    dm.use_tokenizer(tok)
    with caplog.at_level(logging.WARNING, logger="genframe"):
        dm.setup()
    assert sum(dm.stats[f"{s}_unknown_characters"] for s in ("train", "val", "test")) == 10
    assert "'☃'" in caplog.text and "<unk>" in caplog.text


# -- chat's errors name chat's own keys ------------------------------------------------------------

@pytest.mark.parametrize("override, expected", [
    ("seed=abc", "seed: expected an integer"),
    ("temperature=-1", "temperature: expected a number >= 0"),
    ("top_k=0", "top_k: expected an integer >= 1"),
    ("top_p=2", "top_p: expected a number in (0, 1]"),
    ("max_new_tokens=0", "max_new_tokens: expected a positive integer"),
    ("system=[1]", "system: expected a string"),
])
def test_chat_options_are_checked_under_chat_keys(compose_task, override, expected):
    from genframe.tasks.chat import check_chat_options

    cfg = compose_task("chat", "run=x", override)
    with pytest.raises(UserError) as info:
        check_chat_options(cfg)
    assert str(info.value).startswith(expected) and "sampling" not in str(info.value)


def test_a_model_sampling_error_is_named_by_chat_key():
    from genframe.tasks.chat import chat_keys

    with pytest.raises(UserError, match=r"^top_p must be in \(0, 1\]"), chat_keys():
        raise UserError("sampling.top_p must be in (0, 1] or null, got 2")
    with pytest.raises(UserError, match=r"^chat_template.stop must be"), chat_keys():
        raise UserError("sampling.stop must be a non-empty string")
    with pytest.raises(UserError, match="^run=x: other"), chat_keys():
        raise UserError("run=x: other")


# -- from the command line ----------------------------------------------------------------------------

CONVERSATIONS = [{"messages": [{"role": "user", "content": f"Hello {i}\u2028there"},
                               {"role": "assistant", "content": f"Hi {i}, how are you?"}]}
                 for i in range(8)]


def test_chat_cli_reads_bad_stdin_bytes_without_losing_the_transcript(
        tmp_path, monkeypatch, capsys):
    """Train a tiny model on a chat file with a BOM and U+2028s, then chat with it from a
    pipe carrying bytes that are not UTF-8 and a character it never saw."""
    from genframe.cli import main

    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "chats.jsonl", BOM + "".join(
        json.dumps(c, ensure_ascii=False) + "\n" for c in CONVERSATIONS).encode())
    run = tmp_path / "run"
    assert main(["train", "data=chat", f"data.path={path}", "data.block_size=48",
                 "data.batch_size=4", "model=transformer", "model.n_layer=1", "model.n_embd=16",
                 "model.n_head=2", "trainer.max_steps=1", "trainer.limit_val_batches=1",
                 "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                 "logger=none", "num_samples=1", "++sampling.max_new_tokens=4",
                 f"hydra.run.dir={run}"]) == 0
    vocab = json.loads((run / "tokenizer.json").read_text())["vocab"]
    assert "\u2028" in vocab and "\ufeff" not in vocab
    capsys.readouterr()
    piped_stdin(monkeypatch, b"Hello\nHi \xff there \xe2\x98\x83\nBye\n")
    out = tmp_path / "chat"
    assert main(["chat", f"run={run}", "device=cpu", "max_new_tokens=4",
                 f"hydra.run.dir={out}"]) == 0
    err = capsys.readouterr().err
    assert "line 2 of the input: 1 byte that is not UTF-8 replaced" in err
    assert "your message: 2 characters the tokenizer never saw" in err
    (conversation,) = read_chat_jsonl(out / "transcript.jsonl")
    assert [m["content"] for m in conversation if m["role"] == "user"] == [
        "Hello", "Hi \ufffd there \u2603", "Bye"]
    # generate names the prompt's characters the tokenizer never saw too
    assert main(["generate", f"run={run}", "device=cpu", "prompt=\"Hi \u2603\u2603\"", "num_samples=1",
                 "++sampling.max_new_tokens=2", f"hydra.run.dir={tmp_path / 'gen'}"]) == 0
    assert "the prompt: 2 characters the tokenizer never saw" in capsys.readouterr().err
