"""Subject tuning (`finetune=subject`, DreamBooth) and the finetune groups: what is learned
(`finetune=data|subject`) and how (`method=full|lora`) compose."""

from __future__ import annotations

import json

import pytest
import torch

from genframe.errors import UserError
from tests.conftest import FAST, FAST_TRAINING
from tests.test_text2image import TINY_DATA, TINY_T2I

CAPTIONS = ["a large red circle at the top left", "a small green square in the centre",
            "a small blue triangle at the bottom right", "a large yellow circle at the top right"]


def _ring(path, size: int = 40, offset: int = 0) -> None:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size))
    r = size // 4
    c = size // 2 + offset
    ImageDraw.Draw(image).ellipse([c - r, c - r, c + r, c + r], outline=(255, 255, 255), width=3)
    image.save(path)


@pytest.fixture
def subject_dir(tmp_path):
    folder = tmp_path / "subject"
    folder.mkdir()
    for i in range(5):
        _ring(folder / f"ring_{i}.png", offset=i - 2)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def t2i_bpe_run(tmp_path_factory):
    from genframe.config import compose
    from genframe.tasks.train import train

    out = tmp_path_factory.mktemp("t2i_bpe") / "run"
    return train(compose("train", [*TINY_DATA, "data.tokenizer=bpe", *TINY_T2I, *FAST_TRAINING,
                                   f"paths.output_dir={out}"]))


# -- the two groups ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["full", "lora"])
def test_what_and_how_compose(method):
    from genframe.config import compose

    cfg = compose("finetune", ["finetune=subject", f"method={method}", "token=sks",
                               "class_word=circle", "data.root=/somewhere"])
    assert (cfg.finetune.learns, cfg.finetune.method) == ("subject", method)
    assert ("lora" in cfg.finetune) == (method == "lora")
    assert cfg.data.name == "subject" and cfg.data.token == "sks" and cfg.data.class_word == "circle"
    assert cfg.prior_preservation is True and cfg.prior_loss_weight == 1.0
    plain = compose("finetune", [])
    assert (plain.finetune.learns, plain.finetune.method, plain.get("data")) == ("data", "full", None)
    assert plain.finetune.lr is None and compose("finetune", ["method=lora"]).finetune.lr == 1e-3


def test_the_old_choices_point_to_method(cli):
    for old in ("lora", "full"):
        res = cli("finetune", f"finetune={old}")
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"use method={old}" in res.stderr, res.stderr
    res = cli("finetune", "finetune.lora.r=4")  # a LoRA key without method=lora
    assert res.returncode == 2 and "method=lora finetune.lora.r=4" in res.stderr, res.stderr


# -- the token ----------------------------------------------------------------------------


def _bpe():
    from genframe.text.tokenize import build_tokenizer

    return build_tokenizer("bpe", CAPTIONS * 20, 512)


def test_a_token_the_model_knows_is_refused():
    from genframe.data.subject import check_token
    from genframe.text.tokenize import build_tokenizer

    for tok in (_bpe(), build_tokenizer("char", CAPTIONS)):
        with pytest.raises(UserError, match=r"token=small: a word the model already knows .*e\.g\. token="):
            check_token("small", "circle", tok, CAPTIONS)
        with pytest.raises(UserError, match="is the class word"):
            check_token("Circle", "circle", tok, CAPTIONS)
        for bad in ("", " ", "two words", "{x}"):
            with pytest.raises(UserError, match="token="):
                check_token(bad, "circle", tok, CAPTIONS)
        with pytest.raises(UserError, match=r"class_word=circel: the model never saw .*Did you mean circle"):
            check_token("srs", "circel", tok, CAPTIONS)
    # Without the captions, BPE still knows its whole-word entries.
    with pytest.raises(UserError, match="whole-word entry"):
        check_token("square", "circle", _bpe(), None)


def test_a_token_the_model_cannot_read_is_refused():
    from genframe.data.subject import check_token
    from genframe.text.tokenize import build_tokenizer

    char = build_tokenizer("char", CAPTIONS)
    with pytest.raises(UserError, match=r"token=sks: the model cannot read it: .*'k' as <unk>"):
        check_token("sks", "circle", char, CAPTIONS)
    found = check_token("srs", "circle", char, CAPTIONS)  # every character is in the captions
    assert found["token_pieces"] == ["s", "r", "s"] and found["untrained_pieces"] == []
    # Byte-level BPE reads any word; pieces no caption has are readable but untrained.
    found = check_token("sks", "circle", _bpe(), CAPTIONS)
    assert "".join(found["token_pieces"]).replace("Ġ", "") == "sks"
    assert "k" in found["untrained_pieces"] and found["class_word_captions"] == 2


def test_class_prompts_come_from_the_captions():
    from genframe.data.subject import class_prompts_from, instance_caption

    prompts = class_prompts_from(CAPTIONS, "circle", 5)
    assert len(prompts) == 5 and set(prompts) == {CAPTIONS[0], CAPTIONS[3]}
    assert class_prompts_from(CAPTIONS, "star", 2) == ["a star", "a star"]
    assert class_prompts_from(None, "circle", 1) == ["a circle"]
    assert instance_caption("a photo of {token} {class_word}", "sks", "dog") == "a photo of sks dog"
    with pytest.raises(UserError, match="data.instance_prompt"):
        instance_caption("a {class_word}", "sks", "dog")


# -- the data -------------------------------------------------------------------------------


def _data(root, **kw):
    from genframe.data.subject import SubjectDataModule

    return SubjectDataModule(root=str(root), token="sks", class_word="circle", image_size=24,
                             channels=3, **kw)


@pytest.mark.parametrize("weight, split", [(1.0, (4, 4)), (3.0, (2, 6))])
def test_batches_mix_subject_and_class_examples(subject_dir, weight, split):
    data = _data(subject_dir, prior_loss_weight=weight, repeats=4)
    data.set_class_images(torch.rand(10, 3, 24, 24), [f"a circle {i}" for i in range(10)])
    data.setup("fit")
    assert [p.name for p, _ in data.skipped] == ["broken.png"]  # skipped and counted
    assert data.summary()["subject_images"] == 5 and data.summary()["skipped_files"] == ["broken.png"]
    batches = list(data.train_dataloader())
    assert len(batches) == -(-5 * 4 // split[0])  # each subject image `repeats` times an epoch
    for batch in batches:
        assert batch["image"].shape == (8, 3, 24, 24)
        assert batch["caption"][:split[0]] == ["a sks circle"] * split[0]
        assert all(c.startswith("a circle") for c in batch["caption"][split[0]:])
    assert batches[0]["image"].min() >= -1 and batches[0]["image"].max() <= 1
    val = data.dataset("val")
    assert len(val) == 5 + min(10, round(weight * 5))


def test_without_prior_preservation_every_example_is_the_subject(subject_dir):
    data = _data(subject_dir, batch_size=4, repeats=2)
    data.setup("fit")
    captions = [c for b in data.train_dataloader() for c in b["caption"]]
    assert set(captions) == {"a sks circle"} and len(captions) >= 10


def test_a_folder_without_a_readable_image_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(b"nope")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"data.root: none of the 2 image files .* could be read"):
        _data(tmp_path).setup("fit")
    with pytest.raises(UserError, match="does not exist"):
        _data(tmp_path / "missing")


# -- the task -----------------------------------------------------------------------------


SUBJECT = ["finetune=subject", "token=sks", "class_word=circle", "num_class_images=4",
           "class_sampler_steps=2", *FAST_TRAINING]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_subject_tuning_runs_with_either_method(t2i_bpe_run, subject_dir, compose_task, method):
    from genframe.tasks.finetune import finetune
    from genframe.weights import read_weights

    extra = ["finetune.lora.r=2"] if method == "lora" else []
    result = finetune(compose_task("finetune", f"run={t2i_bpe_run['run_dir']}", *SUBJECT,
                                   f"method={method}", f"data.root={subject_dir}", *extra))
    run = result["run_dir"]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["finetune_choices"] == {"finetune": "subject", "method": method}
    subject = info["subject"]
    assert subject["token"] == "sks" and subject["instance_prompt"] == "a sks circle"
    assert subject["subject_images"] == 5 and subject["skipped_files"] == ["broken.png"]
    assert subject["class_images"] == 4 and subject["class_prompts_from"] == "the base run's captions"
    assert all("circle" in p for p in subject["class_prompts"])
    lines = (run / "class_images" / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 4 and (run / "class_images" / "grid.png").is_file()
    assert {json.loads(x)["condition"]["prompt"] for x in lines} == set(subject["class_prompts"])
    assert info["data"]["image_size"] == 24 and info["data"]["name"] == "subject"
    assert (run / "adapter.safetensors").is_file() == (method == "lora")
    spec, _ = read_weights(run / "model.safetensors")
    assert (spec.lora is not None) == (method == "lora")


def test_subject_tuning_without_prior_preservation(t2i_bpe_run, subject_dir, compose_task):
    from genframe.tasks.finetune import finetune

    result = finetune(compose_task("finetune", f"run={t2i_bpe_run['run_dir']}", *SUBJECT,
                                   "prior_preservation=false", f"data.root={subject_dir}"))
    info = json.loads((result["run_dir"] / "run.json").read_text())
    assert info["subject"]["class_images"] == 0 and not (result["run_dir"] / "class_images").exists()


def test_subject_tuning_refusals(t2i_bpe_run, subject_dir, compose_task, tmp_path):
    from genframe.config import compose
    from genframe.tasks.finetune import finetune
    from genframe.tasks.train import train

    base = f"run={t2i_bpe_run['run_dir']}"
    with pytest.raises(UserError, match="token=None: finetune=subject needs a rare word"):
        finetune(compose_task("finetune", base, "finetune=subject", "class_word=circle",
                              f"data.root={subject_dir}"))
    with pytest.raises(UserError, match="token=sks: only finetune=subject reads it"):
        finetune(compose_task("finetune", base, "token=sks"))
    with pytest.raises(UserError, match="finetune=subject reads the subject's images with data=subject"):
        finetune(compose_task("finetune", base, *SUBJECT, "data=shapes"))
    with pytest.raises(UserError, match=r"class images \(class_sampler_steps=5000, .*sampler.steps must be"):
        finetune(compose_task("finetune", base, *SUBJECT, "class_sampler_steps=5000",
                              f"data.root={subject_dir}"))
    for bad in ("0", "100000000"):  # none, or more than is made in memory before tuning
        with pytest.raises(UserError, match="num_class_images: expected an integer from 1 to 10000"):
            finetune(compose_task("finetune", base, *SUBJECT, f"num_class_images={bad}",
                                  f"data.root={subject_dir}"))
    vae = train(compose("train", [*FAST, f"paths.output_dir={tmp_path / 'vae'}"]))
    with pytest.raises(UserError, match="model 'vae' reads no captions"):
        finetune(compose_task("finetune", f"run={vae['run_dir']}", *SUBJECT,
                              f"data.root={subject_dir}"))


def test_cli_exit_status_2_for_bad_subject_input(t2i_bpe_run, subject_dir, cli, tmp_path):
    base = f"run={t2i_bpe_run['run_dir']}"
    empty = tmp_path / "unreadable"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"no image")
    res = cli("finetune", base, *SUBJECT, f"data.root={empty}")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "none of the 1 image file" in res.stderr and "could be read" in res.stderr
    res = cli("finetune", base, *SUBJECT[:1], "token=large", "class_word=circle",
              f"data.root={subject_dir}")
    assert res.returncode == 2 and "token=large: a word the model already knows" in res.stderr, res.stderr
