"""Language models through the tasks: the tokenizer travels with the model, prompts
reach generate, fine-tuning keeps the model's tokenizer and may change training settings."""

from __future__ import annotations

import json

import pytest

from genframe.errors import UserError
from tests.conftest import FAST_TRAINING

TEXT = (
    "The for statement is used to iterate over the elements of a sequence. "
    "A while loop repeats as long as an expression is true. "
    "Functions are defined with the def keyword and return values. "
) * 40
TINY_LM = ["model=transformer", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
           "data.block_size=48", "data.batch_size=4"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A tiny character-level transformer trained a few steps on a text file."""
    from genframe.config import compose
    from genframe.tasks.train import train

    root = tmp_path_factory.mktemp("lm")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    cfg = compose("train", ["data=text", "data.source=files", f"data.path={corpus}", *TINY_LM,
                            *FAST_TRAINING, "++sampling.max_new_tokens=8",
                            f"paths.output_dir={root / 'run'}"])
    return train(cfg)


def test_the_tokenizer_is_saved_with_the_run_and_in_the_weights(lm_run):
    from genframe.text import load_tokenizer
    from genframe.weights import read_weights

    run = lm_run["run_dir"]
    tok = load_tokenizer(run)
    assert tok.kind == "char" and tok.vocab_size == len(set(TEXT)) + 1  # + <unk>
    spec, _ = read_weights(run / "model.safetensors")
    assert spec.kwargs["vocab_size"] == tok.vocab_size  # filled in from the data
    assert spec.tokenizer["vocab"] == tok.itos
    info = json.loads((run / "run.json").read_text())
    assert "tokenizer" not in info["model"]  # run.json names it; tokenizer.json holds it
    assert "val/bpc" in lm_run["metrics"] and "val/ppl" in lm_run["metrics"]
    texts = [p.read_text() for p in sorted((run / "samples").glob("*.txt"))]
    assert len(texts) == 4 and all(set(t) <= set(TEXT) for t in texts)


def test_generate_continues_prompts_repeatably(lm_run, compose_task, capsys):
    from genframe.tasks.generate import generate

    args = (f"run={lm_run['run_dir']}", "prompt=The for", "num_samples=3", "seed=5",
            "++sampling.max_new_tokens=12")
    a = generate(compose_task("generate", *args))
    out = capsys.readouterr().out
    b = generate(compose_task("generate", *args))
    texts = [t for s in a["samples"] for t in s.texts]
    assert texts == [t for s in b["samples"] for t in s.texts]
    assert len(texts) == 3
    # streamed: each sample's header, then prompt + continuation
    for i, text in enumerate(texts):
        assert f"--- sample {i} ---\nThe for{text}" in out
    manifest = [json.loads(line) for line in
                (a["run_dir"] / "samples" / "manifest.jsonl").read_text().splitlines()]
    assert [m["condition"] for m in manifest] == [{"prompt": "The for"}] * 3
    # per-sample details: one value per line, not the whole batch's list on every line
    assert [m["tokens_generated"] for m in manifest] == a["samples"][0].per_sample["tokens_generated"]
    assert all(m["prompt_tokens"] == 7 and m["finish_reasons"] == "length" for m in manifest)


def test_prompt_file_gives_a_batch_of_prompts(lm_run, compose_task, tmp_path):
    from genframe.tasks.generate import generate

    plain = tmp_path / "prompts.txt"
    plain.write_text("A while\n\nFunctions are\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "The\nfor"}) + "\n")
    for path, prompts in ((plain, ["A while", "Functions are"]), (jsonl, ["The\nfor"])):
        result = generate(compose_task("generate", f"run={lm_run['run_dir']}", f"prompt_file={path}",
                                       "num_samples=2", "stream=false", "++sampling.max_new_tokens=4"))
        conds = [c["prompt"] for s in result["samples"] for c in s.conditions]
        assert conds == [p for p in prompts for _ in range(2)]


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("", "holds no prompt"),
    ('{"prompt": "ok"}\nnot json\n', "line 2: not valid JSON"),
    ('{"text": "x"}\n', 'line 1: expected {"prompt"'),
])
def test_bad_prompt_files(lm_run, compose_task, tmp_path, content, message):
    from genframe.tasks.generate import generate

    path = tmp_path / "p.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        generate(compose_task("generate", f"run={lm_run['run_dir']}", f"prompt_file={path}"))


def test_prompt_template_and_prompt_errors(lm_run, compose_task):
    from genframe.tasks.generate import generate

    run = f"run={lm_run['run_dir']}"
    result = generate(compose_task("generate", run, "template=qa", "template.vars.question=What is a for",
                                   "stream=false", "++sampling.max_new_tokens=3"))
    assert result["samples"][0].conditions[0]["prompt"] == "Question: What is a for\nAnswer:"
    with pytest.raises(UserError, match="question"):
        generate(compose_task("generate", run, "template=qa"))  # the variable is missing
    with pytest.raises(UserError, match="not both"):
        generate(compose_task("generate", run, "prompt=a", "++condition.prompt=b"))
    with pytest.raises(UserError, match="context window"):
        generate(compose_task("generate", run, "prompt=" + "a" * 60))


def test_a_prompt_for_an_image_model_is_refused(tmp_path, compose_task):
    from genframe.config import compose
    from genframe.tasks.generate import generate
    from genframe.tasks.train import train
    from tests.conftest import FAST

    run = train(compose("train", [*FAST, "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'r'}"]))
    with pytest.raises(UserError, match="takes no prompt"):
        generate(compose_task("generate", f"run={run['run_dir']}", "prompt=hello"))


def test_finetune_on_new_text_keeps_the_models_tokenizer(lm_run, compose_task, tmp_path):
    from genframe.tasks.finetune import finetune
    from genframe.text import load_tokenizer
    from genframe.weights import read_weights

    other = tmp_path / "other.txt"
    other.write_text("Zebras quickly jump over lazy foxes; XYZ & 42! " * 60)  # new characters
    result = finetune(compose_task(
        "finetune", f"run={lm_run['run_dir']}", "data=text", "data.source=files",
        f"data.path={other}", "data.block_size=16", "++finetune.hparams.warmup_steps=2",
        *FAST_TRAINING))
    base = load_tokenizer(lm_run["run_dir"])
    assert load_tokenizer(result["run_dir"]).itos == base.itos
    spec, _ = read_weights(result["run_dir"] / "model.safetensors")
    assert spec.kwargs["warmup_steps"] == 2
    assert spec.kwargs["vocab_size"] == base.vocab_size
    # The new text was tokenised with the model's ids: its unseen characters became <unk>.
    from genframe.tasks.build import trained_model_and_data

    model, _, _, data, _ = trained_model_and_data(compose_task(
        "finetune", f"run={lm_run['run_dir']}", "data=text", "data.source=files",
        f"data.path={other}", "data.block_size=16"), "finetune")
    data.setup("fit")
    assert data.tokenizer is model.tokenizer
    window = data.train_set[0]["tokens"].tolist()
    assert max(window) < base.vocab_size
    assert data.tokenizer.encode("Z") == [0]  # "Z" is not in the base text


def test_finetune_hparams_refuse_unknown_keys_and_sizes(lm_run, compose_task):
    from genframe.tasks.finetune import finetune

    run = f"run={lm_run['run_dir']}"
    with pytest.raises(UserError, match="Did you mean 'warmup_steps'"):
        finetune(compose_task("finetune", run, "+finetune.hparams.warmup_step=2"))
    with pytest.raises(UserError, match="does not fit the trained weights"):
        finetune(compose_task("finetune", run, "+finetune.hparams.n_embd=32"))


def test_data_windows_longer_than_the_context_are_refused(lm_run, compose_task):
    from genframe.tasks.finetune import finetune

    corpus = lm_run["run_dir"].parent / "corpus.txt"
    with pytest.raises(UserError, match="longer than the context window"):
        finetune(compose_task("finetune", f"run={lm_run['run_dir']}", "data=text",
                              "data.source=files", f"data.path={corpus}", "data.block_size=64"))


def test_base_weights_plus_adapter_file_equal_the_lora_run(lm_run, compose_task):
    import torch

    from genframe.tasks.finetune import finetune
    from genframe.weights import load_model

    lora = finetune(compose_task("finetune", f"run={lm_run['run_dir']}", "method=lora",
                                 "finetune.lr=0.05", "++finetune.hparams.warmup_steps=1",
                                 *FAST_TRAINING))["run_dir"]
    base = str(lm_run["run_dir"])
    combined, _, _ = load_model(base, adapter=str(lora / "adapter.safetensors"))
    tuned, _, _ = load_model(str(lora))
    plain, _, _ = load_model(base)
    tokens = torch.randint(0, plain.net.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = (m.eval()(tokens) for m in (combined, tuned, plain))
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-4)  # the adapters did change the model
    with pytest.raises(UserError, match="already carries LoRA"):
        load_model(str(lora), adapter=str(lora / "adapter.safetensors"))


def test_gradients_are_freed_right_after_each_optimizer_step():
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from genframe.testing import build_tiny

    model = build_tiny("transformer")
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(all(p.grad is None for p in pl_module.parameters()))

    batch = model.example_batch(2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, callbacks=[Probe()],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=2)
    trainer.fit(model, train_dataloaders=DataLoader([batch] * 3, batch_size=None))
    assert seen == [True, True, True]
    assert "train/loss" in trainer.callback_metrics  # logged on logging steps and the last batch


def test_a_lora_finetune_run_resumes_with_its_adapters(lm_run, compose_task):
    from genframe.tasks.finetune import finetune
    from genframe.tasks.train import train

    first = finetune(compose_task("finetune", f"run={lm_run['run_dir']}", "method=lora",
                                  *FAST_TRAINING))
    more = train(compose_task("train", f"resume={first['run_dir']}"),
                 overrides=["trainer.max_epochs=2"])
    info = json.loads((more["run_dir"] / "run.json").read_text())
    assert info["task"] == "finetune" and info["resumed_from"].endswith("last.ckpt")
    assert info["steps"] == 4 and info["epochs"] == 2  # 2 more steps after the first 2
    assert info["model"]["lora"]["r"] == 8
    assert (more["run_dir"] / "adapter.safetensors").exists()


def test_prompt_ids_generate_like_the_same_prompt_text(lm_run):
    from genframe.weights import load_model

    model, _, _ = load_model(str(lm_run["run_dir"]))
    ids = model.tokenizer.encode("The for")
    by_text = model.generate(2, condition={"prompt": "The for"}, seed=1, max_new_tokens=6)
    by_ids = model.generate(2, condition={"prompt_ids": ids}, seed=1, max_new_tokens=6)
    assert by_ids.texts == by_text.texts and by_ids.conditions == by_text.conditions
    per_row = model.generate(2, condition={"prompt_ids": [ids, ids[:3]]}, seed=1, max_new_tokens=6)
    assert per_row.conditions == [{"prompt": "The for"}, {"prompt": "The"}]
    for bad in ([], [ids[0], 10_000], [[1], [2], [3]]):
        with pytest.raises(UserError, match="prompt_ids"):
            model.generate(2, condition={"prompt_ids": bad})
    with pytest.raises(UserError, match="not both"):
        model.generate(1, condition={"prompt": "a", "prompt_ids": ids})


def test_chat_sends_bpe_prompts_encoded_piece_by_piece_as_in_training():
    from genframe.samples import Samples
    from genframe.text.chat_session import ChatSession
    from genframe.text import build_tokenizer
    from genframe.text.chat import ChatTemplate

    tok = build_tokenizer("bpe", ["<user> hello there\n<assistant> hi<end>\n" * 50], vocab_size=300)
    template = ChatTemplate.from_mapping(None)
    messages = [{"role": "user", "content": "hello there"}]
    pieces = template.encode_prompt(messages, tok)
    whole = tok.encode(template.render(messages, add_generation_prompt=True))
    assert pieces != whole  # " hello" is one token in the whole string, two in pieces
    sent = []

    def generate(n, *, condition=None, seed=None, **options):
        sent.append(condition)
        return Samples(texts=["hi<end>"])

    session = ChatSession(generate=generate, count_tokens=lambda text: len(tok.encode(text)),
                          template=template, block_size=64, max_new_tokens=8,
                          encode=lambda msgs: template.encode_prompt(msgs, tok))
    assert session.send("hello there") == "hi"
    assert sent == [{"prompt_ids": pieces}]
