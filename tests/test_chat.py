"""Chat: JSONL conversations, the chat template and its loss mask, data=chat, prompt
templates, history trimming, and `genframe chat` end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from genframe.data.chat import ChatDataModule
from genframe.errors import UserError
from genframe.samples import Samples
from genframe.text.chat import (
    DEFAULT_TEMPLATE,
    ChatTemplate,
    parse_conversation,
    read_chat_jsonl,
    trim_history,
)
from genframe.text.prompts import render_prompt, render_template_config, template_fields
from genframe.text.tokenize import BPETokenizer, CharTokenizer, build_tokenizer


def conv(*pairs: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


CONVERSATIONS = [
    conv(("user", "What is a tuple?"), ("assistant", "An immutable sequence.")),
    conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"),
         ("user", "And a list?"), ("assistant", "A mutable sequence.")),
    conv(("user", "Name a loop."), ("assistant", "for")),
    conv(("user", "What does len do?"), ("assistant", "It counts items.")),
    conv(("user", "Is None false?"), ("assistant", "Yes, None is falsy.")),
    conv(("user", "What is a dict?"), ("assistant", "A mapping of keys to values.")),
]


def write_jsonl(path: Path, rows) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def chats(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chats.jsonl", CONVERSATIONS)


# -- reading chat JSONL --------------------------------------------------------------------

def test_read_chat_jsonl_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [CONVERSATIONS[0], "", "   ", CONVERSATIONS[1]])
    convs = read_chat_jsonl(path)
    assert len(convs) == 2 and convs[1][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("bad,expected", [
    ("{not json", r"line 3: not valid JSON"),
    ('["a", "list"]', r"line 3: expected a JSON object .* got list"),
    ('{"turns": []}', r"line 3: no \"messages\" field; fields are \['turns'\]"),
    ('{"mesages": []}', r"line 3: no \"messages\" field.*Did you mean 'mesages'"),
    ('{"messages": "hi"}', r"line 3: \"messages\" is str, expected a list"),
    ('{"messages": ["hi"]}', r"line 3, message 0: expected an object"),
    ('{"messages": [{"role": "bot", "content": "x"}]}',
     r"line 3, message 0: unknown role 'bot'; valid roles are system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "asistant", "content": "y"}]}',
     r"line 3, message 1: unknown role 'asistant'.*Did you mean 'assistant'"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"line 3, message 0 \(user\): content is int"),
    ('{"messages": [{"role": "user"}]}', r"line 3, message 0 \(user\): content is missing"),
])
def test_bad_chat_jsonl_names_file_and_line(tmp_path, bad, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [CONVERSATIONS[0], "", bad])
    with pytest.raises(UserError, match=expected) as info:
        read_chat_jsonl(path)
    assert str(path) in str(info.value)


def test_empty_or_missing_chat_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(UserError, match="empty.jsonl holds no conversations"):
        read_chat_jsonl(empty)
    with pytest.raises(UserError, match="data.path=.*nope.jsonl does not exist"):
        read_chat_jsonl(tmp_path / "nope.jsonl")


# -- the template and its loss mask ----------------------------------------------------------

def masked_text(tok, ids, mask, value=1) -> str:
    return "".join(tok.decode([i]) if m == value else "|" for i, m in zip(ids, mask))


def test_default_template_renders_and_masks_exactly_assistant_content_and_end_marker():
    tpl = ChatTemplate()
    messages = parse_conversation(CONVERSATIONS[1])
    text = tpl.render(messages)
    assert text == ("<system> Be brief.\n<user> Hi\n<assistant> Hello!<end>\n"
                    "<user> And a list?\n<assistant> A mutable sequence.<end>\n")
    assert tpl.render(messages[:4], add_generation_prompt=True).endswith(
        "<user> And a list?\n<assistant> ")
    tok = CharTokenizer.train([text])
    ids, mask = tpl.encode(messages, tok)
    assert len(ids) == len(mask) == len(text) and tok.decode(ids) == text
    learned = [s for s in masked_text(tok, ids, mask).split("|") if s]
    assert learned == ["Hello!<end>\n", "A mutable sequence.<end>\n"]
    assert "Hi" in masked_text(tok, ids, mask, value=0)
    prompt = tpl.encode_prompt(messages[:4], tok)
    assert tok.decode(prompt) == tpl.render(messages[:4], add_generation_prompt=True)


def test_mask_boundaries_are_exact_with_bpe():
    tpl = ChatTemplate.from_mapping({"user": "### User: {content}\n",
                                     "assistant": "### Bot: {content} [done]\n\n",
                                     "generation_prompt": "### Bot: ", "stop": "[done]"})
    assert tpl.stop == ("[done]",)
    messages = parse_conversation(CONVERSATIONS[1])
    docs = [tpl.render(parse_conversation(c)) for c in CONVERSATIONS] * 5
    tok = BPETokenizer.train(docs, vocab_size=300)
    ids, mask = tpl.encode(messages, tok)
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    assert [tok.decode(s) for s in spans if s] == ["Hello! [done]\n\n", "A mutable sequence. [done]\n\n"]


@pytest.mark.parametrize("mapping,expected", [
    ({"assistent": "{content}"}, r"chat_template.assistent: unknown key.*Did you mean 'assistant'"),
    ({"user": "<user> no field\n"}, r"'user'.*exactly one \{content\} field \(found: none\)"),
    ({"user": "{name}: {content}"}, r"exactly one \{content\} field \(found: \{name\}, \{content\}\)"),
    ({"user": "{content"}, r"literal braces"),
    ({"stop": [""]}, r"stop.*non-empty strings"),
    ({"assistant": 3}, r"chat_template.assistant: expected a string"),
])
def test_bad_chat_template(mapping, expected):
    with pytest.raises(UserError, match=expected):
        ChatTemplate.from_mapping(mapping, where="chat_template")


def test_literal_braces_and_round_trip():
    tpl = ChatTemplate.from_mapping({"user": "{{user}} {content}\n"})
    assert tpl.render([{"role": "user", "content": "hi"}]) == "{user} hi\n"
    assert ChatTemplate.from_mapping(tpl.to_dict()) == tpl
    assert ChatTemplate().to_dict() == DEFAULT_TEMPLATE


def test_the_yaml_default_template_is_the_code_default():
    from omegaconf import OmegaConf

    from genframe.config import conf_dir

    node = OmegaConf.to_container(OmegaConf.load(conf_dir() / "data" / "chat.yaml"))
    assert node["template"] == DEFAULT_TEMPLATE


# -- data=chat -----------------------------------------------------------------------------

def test_chat_data_module_rows_masks_and_split(chats):
    data = ChatDataModule(path=str(chats), block_size=48, batch_size=4, val_fraction=0.2)
    data.setup("fit")
    assert data.provides == {"tokens", "loss_mask"}
    assert data.vocab_size == data.tokenizer.vocab_size and data.block_size == 48
    assert len(data.train_set) + len(data.val_set) + len(data.test_set) == len(CONVERSATIONS)
    assert len(data.val_set) >= 1
    batch = next(iter(data.train_dataloader()))
    assert batch["tokens"].shape == batch["loss_mask"].shape == (4, 49)
    assert batch["tokens"].dtype == torch.long
    # Each row is a conversation rendered by hand with the default template, one token a
    # character, cut to 49 tokens; its mask is 1 exactly on each reply and its "<end>\n".
    formats = {"system": "<system> {}\n", "user": "<user> {}\n", "assistant": "<assistant> {}<end>\n"}
    expected = {}
    for c in CONVERSATIONS:
        text, target = "", []
        for m in c["messages"]:
            before, after = formats[m["role"]].split("{}")
            reply = int(m["role"] == "assistant")
            text += before + m["content"] + after
            target += [0] * len(before) + [reply] * len(m["content"] + after)
        expected[text[:49]] = target[:49]
    for row, mask in zip(batch["tokens"], batch["loss_mask"]):
        n = int((row != 0).sum())  # padding is id 0 with mask 0
        assert (row[n:] == 0).all() and (mask[n:] == 0).all()
        text = data.tokenizer.decode(row[:n].tolist())
        assert text in expected, text
        assert mask[:n].tolist() == expected[text], text
    # Validation never shares a conversation with training.
    train_rows = {tuple(r.tolist()) for r in data.train_set.columns["tokens"]}
    assert not train_rows & {tuple(r.tolist()) for r in data.val_set.columns["tokens"]}
    # The same seed splits the same way.
    again = ChatDataModule(path=str(chats), block_size=48, val_fraction=0.2)
    again.setup()
    assert torch.equal(again.val_set.columns["tokens"], data.val_set.columns["tokens"])


def test_chat_data_truncates_and_drops_with_counts(tmp_path, caplog):
    long_user = "word " * 40
    rows = [
        conv(("user", "Hi"), ("assistant", "Hello there, how are you?")),   # truncated
        conv(("user", long_user), ("assistant", "ok")),                      # dropped
        conv(("user", "Hey"), ("assistant", "Yo")),                          # fits
        conv(("user", "only a question")),                                   # dropped
    ] * 2
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    data = ChatDataModule(path=str(path), block_size=40, val_fraction=0.25, test_fraction=0)
    with caplog.at_level(logging.WARNING, logger="genframe"):
        data.setup()
    s = data.stats
    assert s["conversations"] == 8
    assert s["train_truncated"] + s["val_truncated"] == 4  # the two long ones, twice
    assert s["train_dropped"] + s["val_dropped"] == 4
    assert len(data.train_set) + len(data.val_set) == 8 - 4
    assert "truncated" in caplog.text and "dropped" in caplog.text
    row = data.train_set[0]
    assert row["tokens"].shape == (41,) and row["loss_mask"][1:].sum() > 0


def test_chat_data_with_a_given_tokenizer_maps_unknown_characters_to_zero(chats):
    tok = build_tokenizer("char", ["<system> <user> <assistant> <end>\n abcdefghijklmnopqrstuvwxyz?.!"])
    data = ChatDataModule(path=str(chats), block_size=64, val_fraction=0.2)
    data.use_tokenizer(tok)
    data.setup()
    assert data.tokenizer is tok and data.vocab_size == tok.vocab_size
    ids, _ = data.template.encode([{"role": "user", "content": "Hi"}], tok)
    assert ids[len("<user> ")] == 0  # 'H' is unknown to this tokenizer
    with pytest.raises(RuntimeError, match="before setup"):
        data.use_tokenizer(tok)


def test_chat_data_with_bpe(chats):
    data = ChatDataModule(path=str(chats), tokenizer="bpe", vocab_size=300, block_size=32,
                          val_fraction=0.2)
    data.setup()
    assert data.tokenizer.kind == "bpe" and data.train_set[0]["tokens"].shape == (33,)


def test_chat_data_errors(tmp_path, chats):
    with pytest.raises(UserError, match="data.path is not set"):
        ChatDataModule(path=None)
    with pytest.raises(UserError, match="Did you mean 'char'"):
        ChatDataModule(path=str(chats), tokenizer="chr")
    with pytest.raises(UserError, match="data.template.usr: unknown key"):
        ChatDataModule(path=str(chats), template={"usr": "{content}"})
    one = write_jsonl(tmp_path / "one.jsonl", CONVERSATIONS[:1])
    with pytest.raises(UserError, match=r"too few conversations \(1\) for the splits"):
        ChatDataModule(path=str(one)).setup()
    bad = write_jsonl(tmp_path / "bad.jsonl", [CONVERSATIONS[0], '{"messages": [{"role": "me"}]}'])
    with pytest.raises(UserError, match="bad.jsonl, line 2, message 0: unknown role 'me'"):
        ChatDataModule(path=str(bad)).setup()
    no_answers = write_jsonl(tmp_path / "q.jsonl", [conv(("user", "a")), conv(("user", "b"))])
    with pytest.raises(UserError, match="none of the 1 training conversations has an assistant token"):
        ChatDataModule(path=str(no_answers), val_fraction=0.5, test_fraction=0).setup()


def test_data_chat_config_builds_through_the_registry(chats):
    from genframe.config import compose
    from genframe.tasks.build import build_data

    cfg = compose("train", ["data=chat", f"data.path={chats}", "data.block_size=40"])
    data = build_data(cfg.data)
    assert isinstance(data, ChatDataModule) and data.template == ChatTemplate()
    data.setup()
    assert data.train_set[0]["tokens"].shape == (41,)


# -- prompt templates --------------------------------------------------------------------------

def test_render_prompt():
    assert render_prompt("Question: {question}\nAnswer:", {"question": "Why?"}) == \
        "Question: Why?\nAnswer:"
    assert render_prompt("{{literal}} {x} and {x}", {"x": 1}) == "{literal} 1 and 1"
    assert render_prompt("no fields", {}) == "no fields"
    assert template_fields("{a} {b} {a}") == ["a", "b"]


@pytest.mark.parametrize("template,variables,expected", [
    ("Q: {question}", {}, r"no value for template.vars.question .*given: none"),
    ("Q: {question} {context}", {"question": "q"},
     r"no value for template.vars.context .*uses context, question; given: question"),
    ("Q: {question}", {"question": None}, r"no value for template.vars.question"),
    ("Q: {question}", {"question": "q", "questoin": "x"},
     r"template.vars.questoin: the template does not use this variable. Did you mean 'question'"),
    ("Q: {}", {}, r"positional field"),
    ("Q: {0}", {}, r"positional field"),
    ("Q: {q.attr}", {"q": 1}, r"field \{q.attr\}"),
    ("Q: {question", {"question": "q"}, r"literal braces"),
])
def test_render_prompt_errors(template, variables, expected):
    with pytest.raises(UserError, match=expected):
        render_prompt(template, variables)


@pytest.mark.parametrize("name", ["qa", "summarize"])
def test_shipped_prompt_templates_render(name):
    from omegaconf import OmegaConf

    from genframe.config import compose

    node = OmegaConf.to_container(compose("chat", [f"template={name}"]).template)
    fields = template_fields(node["text"])
    assert sorted(node["vars"]) == sorted(fields)
    with pytest.raises(UserError, match="no value for"):
        render_template_config(node)
    node["vars"] = {f: "VALUE" for f in fields}
    assert "VALUE" in render_template_config(node)


def test_template_config_errors():
    assert render_template_config(None) is None
    with pytest.raises(UserError, match="template.txt: unknown key.*Did you mean 'text'"):
        render_template_config({"txt": "x"})
    with pytest.raises(UserError, match="template: no text"):
        render_template_config({"vars": {"a": 1}})


# -- history trimming and the chat session --------------------------------------------------

def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def test_trim_history_drops_oldest_exchanges_never_the_system_prompt():
    history = [msg("system", "S" * 10),
               msg("user", "a" * 10), msg("assistant", "b" * 10),
               msg("user", "c" * 10), msg("assistant", "d" * 10),
               msg("user", "e" * 10)]

    def count(ms):
        return sum(len(m["content"]) for m in ms)

    assert trim_history(history, count, 60) == history
    assert trim_history(history, count, 59) == [history[0], *history[3:]]
    assert trim_history(history, count, 40) == [history[0], *history[3:]]
    assert trim_history(history, count, 39) == [history[0], history[5]]
    assert trim_history(history, count, 20) == [history[0], history[5]]
    assert trim_history(history, count, 19) is None  # the system prompt is never dropped
    assert trim_history(history[1:], count, 10) == [history[5]]
    assert trim_history(history[1:], count, 9) is None
    # An exchange with several assistant messages goes as a whole.
    multi = [msg("user", "a"), msg("assistant", "b"), msg("assistant", "c"), msg("user", "d")]
    assert trim_history(multi, count, 1) == [multi[3]]


class FakeModel:
    """Stands in for a language model: replies with a fixed text and records prompts."""

    def __init__(self, reply: str = "Sure thing.<end>\n<user> more") -> None:
        self.reply = reply
        self.calls: list[dict] = []

    def generate(self, num_samples, *, condition=None, seed=None, max_new_tokens=200,
                 temperature=1.0, top_k=None, top_p=None, stop=(), stream=None):
        self.calls.append({"prompt": condition["prompt"], "seed": seed, "stop": stop,
                           "max_new_tokens": max_new_tokens, "temperature": temperature})
        if stream is not None:
            for i in range(0, len(self.reply), 3):
                stream(0, self.reply[i:i + 3])
        return Samples(texts=[self.reply])


def make_session(model, **kw):
    from genframe.text.chat_session import ChatSession

    args = {"generate": model.generate, "count_tokens": len, "template": ChatTemplate(),
            "block_size": 120, "max_new_tokens": 20, "seed": 5, **kw}
    return ChatSession(**args)


def test_chat_session_trims_history_resets_and_records():
    model = FakeModel()
    session = make_session(model, system="Be kind.", sampling={"temperature": 0.5, "top_k": None})
    assert session.send("hello") == "Sure thing."
    first = model.calls[0]
    assert first["prompt"] == "<system> Be kind.\n<user> hello\n<assistant> "
    assert first["seed"] == 5 and first["stop"] == ["<end>"] and first["temperature"] == 0.5
    session.send("second question")
    session.send("third")
    # 100 characters of prompt allowed: the oldest exchange had to go, the system prompt stayed.
    last = model.calls[-1]["prompt"]
    assert last.startswith("<system> Be kind.\n") and "hello" not in last and "third" in last
    assert len(last) <= 100 and [c["seed"] for c in model.calls] == [5, 6, 7]
    told = []
    assert session.send("x" * 200, on_too_long=told.append) is None
    assert "message not sent" in told[0] and "100 fit" in told[0]
    session.reset()
    session.send("after reset")
    assert model.calls[-1]["prompt"] == "<system> Be kind.\n<user> after reset\n<assistant> "
    convs = session.conversations()
    assert len(convs) == 2 and convs[0][0] == msg("system", "Be kind.")
    assert [m["content"] for m in convs[0][1:]] == ["hello", "Sure thing.", "second question",
                                                    "Sure thing.", "third", "Sure thing."]


def test_stop_filter_never_shows_a_stop_string():
    from genframe.text.chat_session import StopFilter, cut_at_stop

    f = StopFilter(["<end>"])
    shown = "".join(f.feed(p) for p in ["Hel", "lo <", "en", "d>\n<user> more"])
    assert shown == "Hello "
    assert f.finish("Hello ") == ""
    f = StopFilter(["<end>"])
    assert f.feed("a <e") == "a " and f.finish("a <e") == "<e"  # a prefix held back, then shown
    assert cut_at_stop("abc<end>def<end>", ["<end>"]) == "abc"
    assert cut_at_stop("abc", ["<end>"]) == "abc"


def test_streamed_reply_is_printed_without_the_stop_string(capsys):
    from genframe.terminal import reply_printer as _printer

    model = FakeModel("Hi there<end>\n<user> ignore")
    session = make_session(model)
    assert session.send("hello", stream=_printer(["<end>"])) == "Hi there"
    assert capsys.readouterr().out == "assistant> Hi there\n"


def test_max_new_tokens_and_template_resolution():
    from types import SimpleNamespace

    from genframe.tasks.chat import resolve_chat_template, resolve_max_new_tokens

    assert resolve_max_new_tokens(None, 64) == 32 and resolve_max_new_tokens(None, 1024) == 200
    assert resolve_max_new_tokens(10, 64) == 10
    with pytest.raises(UserError, match="max_new_tokens=64 leaves no room"):
        resolve_max_new_tokens(64, 64)
    custom = {"user": "U: {content}\n", "assistant": "A: {content}\n\n",
              "generation_prompt": "A: ", "stop": ["\n\n"]}
    chat_run = SimpleNamespace(path="r", data_config={"name": "chat", "template": custom})
    text_run = SimpleNamespace(path="r", data_config={"name": "text"})
    assert resolve_chat_template(None, chat_run)[0].user == "U: {content}\n"
    assert resolve_chat_template(None, text_run)[0] == ChatTemplate()
    assert resolve_chat_template(None, None)[0] == ChatTemplate()
    assert resolve_chat_template(custom, text_run)[1] == "chat_template"


# -- genframe chat -----------------------------------------------------------------------------

def chat_cli(*args: str, cwd: Path, stdin: str, timeout: int = 300):
    """`genframe ARGS` with `stdin` piped in (runs land under `cwd`/outputs)."""
    import os
    import subprocess

    from tests.conftest import GENFRAME

    env = {**os.environ, "GENFRAME_OUTPUT_ROOT": str(cwd / "outputs")}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([*GENFRAME, *args], check=False, cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_chat_refuses_a_missing_run(tmp_path):
    result = chat_cli("chat", f"run={tmp_path / 'nope'}", cwd=tmp_path, stdin="hi\n")
    assert result.returncode == 2
    assert "run=" in result.stderr and "no such directory" in result.stderr
    assert "Traceback" not in result.stderr
    result = chat_cli("chat", "run=x", "template=qa", cwd=tmp_path, stdin="hi\n")
    assert result.returncode == 2 and "template.vars.question" in result.stderr
    result = chat_cli("chat", "run=x", "template=qa", "template.vars.questoin=hi", cwd=tmp_path,
                      stdin="hi\n")
    assert result.returncode == 2 and "Did you mean 'question'" in result.stderr


TINY_TRANSFORMER = ["model=transformer", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
                    "trainer.max_steps=5", "trainer.max_epochs=5", "trainer.limit_val_batches=1",
                    "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                    "logger=none", "num_samples=1", "++sampling.max_new_tokens=8"]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    """A tiny transformer trained for 5 steps on a tiny chat JSONL with `genframe train`."""
    root = tmp_path_factory.mktemp("chat_run")
    path = write_jsonl(root / "chats.jsonl", CONVERSATIONS)
    result = chat_cli("train", "data=chat", f"data.path={path}", "data.block_size=64",
                      "data.batch_size=4", *TINY_TRANSFORMER, cwd=root, stdin="")
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (root / "outputs" / "train").iterdir()
    assert json.loads((run / "run.json").read_text())["data"]["name"] == "chat"
    return run


def test_bad_chat_jsonl_exits_2(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [CONVERSATIONS[0], "[1, 2]"])
    result = chat_cli("train", "data=chat", f"data.path={bad}", *TINY_TRANSFORMER,
                      cwd=tmp_path, stdin="")
    assert result.returncode == 2, result.stderr
    assert "bad.jsonl, line 2: expected a JSON object" in result.stderr
    assert "Traceback" not in result.stderr


def read_transcript(chat_dir: Path) -> list[list[dict]]:
    return read_chat_jsonl(chat_dir / "transcript.jsonl")


def test_chat_from_a_pipe(chat_run, tmp_path):
    lines = ["Hello", "What is it?", "/reset", "/help", "x" * 80, "Again", "/exit", "never"]
    result = chat_cli("chat", f"run={chat_run}", "max_new_tokens=8", "system=Be brief.",
                      cwd=tmp_path, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(history cleared)" in result.stderr and "/exit" in result.stderr
    assert "message not sent" in result.stderr  # the 80-character line cannot fit
    (chat_dir,) = (tmp_path / "outputs" / "chat").iterdir()
    convs = read_transcript(chat_dir)
    assert [[m["role"] for m in c] for c in convs] == [
        ["system", "user", "assistant", "user", "assistant"], ["system", "user", "assistant"]]
    assert [m["content"] for c in convs for m in c if m["role"] == "user"] == \
        ["Hello", "What is it?", "Again"]
    for c in convs:
        for m in c:
            if m["role"] == "assistant":
                assert m["content"] in result.stdout  # every reply was printed
    info = json.loads((chat_dir / "run.json").read_text())
    assert info["task"] == "chat" and info["status"] == "completed" and info["turns"] == 3
    assert info["chat_template_from"] == "the run's data.template"
    assert info["source"]["run"] == str(chat_run)


def test_chat_task_with_a_prompt_template_and_a_finetune_on_its_transcript(
        chat_run, compose_task, monkeypatch, capsys):
    import io

    from genframe.tasks.chat import chat
    from genframe.tasks.finetune import finetune

    monkeypatch.setattr("sys.stdin", io.StringIO("Thanks\n/reset\nBye\n"))
    cfg = compose_task("chat", f"run={chat_run}", "device=cpu", "max_new_tokens=8",
                       "template=qa", "template.vars.question=What is a set?")
    result = chat(cfg)
    assert len(result["replies"]) == 3
    first = result["transcript"][0]
    assert first[0] == {"role": "user", "content": "Question: What is a set?\nAnswer:"}
    assert [m["content"] for m in result["transcript"][1]] == ["Bye", result["replies"][2]]
    assert capsys.readouterr().out.count("\n") >= 3
    # The transcript is chat JSONL: fine-tune on it, with the model's own tokenizer.
    transcript = result["run_dir"] / "transcript.jsonl"
    out = finetune(compose_task("finetune", f"run={chat_run}", "data=chat",
                                f"data.path={transcript}", "data.block_size=64",
                                "data.test_fraction=0",
                                *[o for o in TINY_TRANSFORMER if not o.startswith("model")]))
    # val/loss is the fine-tuned weights' loss on a held-out conversation of the transcript.
    # Recompute it by hand for each conversation read from the file: the default template,
    # each piece encoded with the model's own tokenizer, replies and their "<end>\n" as the
    # only targets, cut to data.block_size + 1 = 65 tokens. It must match one of them.
    import torch.nn.functional as F

    model = out["model"].eval()
    formats = {"system": "<system> {}\n", "user": "<user> {}\n", "assistant": "<assistant> {}<end>\n"}
    losses = []
    for line in transcript.read_text().splitlines():
        ids, mask = [], []
        for m in json.loads(line)["messages"]:
            before, after = formats[m["role"]].split("{}")
            reply = int(m["role"] == "assistant")
            for text, target in ((before, 0), (m["content"], reply), (after, reply)):
                piece = model.tokenizer.encode(text)
                ids, mask = ids + piece, mask + [target] * len(piece)
        ids, mask = torch.tensor(ids[:65]), torch.tensor(mask[:65], dtype=torch.float64)
        with torch.no_grad():
            nll = F.cross_entropy(model(ids[None, :-1])[0].double(), ids[1:], reduction="none")
        losses.append(float((nll * mask[1:]).sum() / mask[1:].sum()))
    assert len(losses) == 2
    val_loss = out["metrics"]["val/loss"]
    assert sum(loss == pytest.approx(val_loss, rel=1e-5) for loss in losses) == 1, (val_loss, losses)


@pytest.mark.skipif(not hasattr(__import__("os"), "openpty"), reason="needs a pseudo-terminal")
def test_chat_on_a_terminal(chat_run, tmp_path):
    """Interactive mode: `you> ` prompts, streamed `assistant> ` replies, Ctrl-C exits 0."""
    import os
    import signal
    import subprocess
    import time

    from tests.conftest import GENFRAME

    master, slave = os.openpty()
    env = {**os.environ, "GENFRAME_OUTPUT_ROOT": str(tmp_path / "outputs")}
    proc = subprocess.Popen([*GENFRAME, "chat", f"run={chat_run}", "max_new_tokens=8"],
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path, env=env, text=True)
    os.close(slave)
    try:
        os.write(master, b"Hello\n/reset\nAgain\n")
        deadline = time.time() + 120
        chat_dir = tmp_path / "outputs" / "chat"
        while time.time() < deadline:  # wait for the second reply to reach the transcript
            files = list(chat_dir.glob("*/transcript.jsonl"))
            if files and len(read_chat_jsonl(files[0])) == 2:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "chatting with 'transformer'" in out and out.count("you> ") >= 3
    assert out.count("assistant> ") == 2 and "(history cleared)" in out
    assert "Traceback" not in err
    convs = read_transcript(next(chat_dir.iterdir()))
    assert [[m["content"] for m in c if m["role"] == "user"] for c in convs] == [["Hello"], ["Again"]]
