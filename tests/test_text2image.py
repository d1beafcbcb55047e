"""model=text2image: cross-attention conditioning, guidance, negative prompts, prompts in
and out of the tasks, image-to-image from a file, alignment in evaluate, a language-model
text encoder carried by the run, and LoRA with the EMA copy (here and on model=diffusion)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from genframe.errors import UserError
from tests.conftest import FAST_TRAINING
from tests.test_lm_tasks import TINY_LM

# Shapes at the smallest canvas the alignment metric reads, one image per combination.
TINY_DATA = ["data=shapes", "data.image_size=24", "data.jitter=0", "data.per_combination=1",
             "data.batch_size=16"]
TINY_T2I = ["model=text2image", "model.block_out_channels=[8,16]", "model.blocks_per_level=1",
            "model.attention_resolutions=[12]", "model.num_heads=2", "model.timesteps=50",
            "model.default_sampler_steps=3", "model.text_width=16", "model.text_depth=1",
            "model.text_heads=2"]
PROMPT = "a large red square at the top left"


def _randomise(model) -> None:
    """Give every weight a random value: zero-initialised output layers would hide the
    text's effect on an untrained net."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture
def tiny():
    from genframe.testing import build_tiny

    torch.manual_seed(0)
    model = build_tiny("text2image")
    model.example_batch(2)  # gives it a char tokenizer over shapes captions
    _randomise(model)
    return model.eval()


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory):
    from genframe.config import compose
    from genframe.tasks.train import train

    out = tmp_path_factory.mktemp("t2i") / "run"
    return train(compose("train", [*TINY_DATA, *TINY_T2I, *FAST_TRAINING,
                                   f"paths.output_dir={out}"]))


def test_contract(tmp_path):
    from genframe.testing import check_model_contract

    check_model_contract("text2image", tmp_path=tmp_path)


# -- the network ------------------------------------------------------------------------


def test_unet_reads_the_context_and_ignores_padding():
    from genframe_plugins.diffusion.unet import UNet

    torch.manual_seed(0)
    net = UNet(3, 8, [8, 16], blocks_per_level=1, attention_resolutions=[4], num_heads=2, context_dim=6)
    _randomise(net)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 7])
    ctx, mask = torch.randn(2, 4, 6), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = net(x, t, context=ctx, mask=mask)
        assert not torch.allclose(out, net(x, t, context=torch.randn(2, 4, 6), mask=mask))
        padded = ctx.clone()
        padded[~mask] = 99.0  # what padding holds never matters
        torch.testing.assert_close(net(x, t, context=padded, mask=mask), out)
        none = torch.zeros(2, 4, dtype=torch.bool)  # no text: the context's values do not count
        torch.testing.assert_close(net(x, t, context=ctx, mask=none),
                                   net(x, t, context=torch.randn(2, 4, 6), mask=none))
    with pytest.raises(ValueError, match="context"):
        net(x, t)


def test_pooled_text_off_conditions_through_cross_attention_only():
    from genframe.plugins import get_registry
    from genframe.testing import build_tiny

    model = build_tiny("text2image", {**get_registry().model("text2image").tiny, "pooled_text": False})
    assert model.unet.context_embed is None
    assert build_tiny("text2image").unet.context_embed is not None
    model.example_batch(2)
    _randomise(model)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 5])
    with torch.no_grad():
        context, mask = model.encode([PROMPT, "a small blue circle in the centre"])
        out = model.unet(x[:1].expand(2, -1, -1, -1), t, context=context, mask=mask)
    assert not torch.allclose(out[0], out[1])  # the text still gets in


def test_a_fresh_text_encoder_keeps_each_word_apart():
    """The encoder learns only from the image loss; if a word's features start out drowned
    by the blocks' outputs, the words the U-Net reads late collapse into one ("top left"
    and "bottom right" ended 0.2 apart in trained encoders, a colour 3-10 apart)."""
    from genframe_plugins.text2image.text_encoder import TextEncoder

    torch.manual_seed(0)
    encoder = TextEncoder(vocab_size=20, max_length=8, width=64, depth=2, num_heads=4).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]])  # the last word differs
    with torch.no_grad():
        features = encoder(ids, torch.ones_like(ids, dtype=torch.bool))  # (2, 5, 64)
    gap = (features[0, -1] - features[1, -1]).norm()
    assert gap > 0.5 * features[0, -1].norm(), float(gap)


def test_guidance_mixes_the_prompt_with_no_text_or_the_negative_prompt(tiny):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 20])
    net = tiny.sampling_net

    def pred(texts):
        context, mask = tiny.encode(texts)
        return net(x, t, None, context=context, mask=mask)

    with torch.no_grad():
        cond, uncond, neg = pred([PROMPT] * 2), pred(["", ""]), pred(["a blue circle"] * 2)
        assert not torch.allclose(cond, uncond)
        for w, negative, base in ((1.0, None, None), (0.0, None, uncond), (4.0, None, uncond),
                                  (4.0, ["a blue circle"] * 2, neg)):
            got = tiny.text_denoiser([PROMPT] * 2, negative, w)(x, t)
            want = cond if base is None else base + w * (cond - base)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_prompts_seeds_and_the_metadata(tiny):
    a = tiny.generate(2, condition={"prompt": PROMPT}, seed=1, guidance=2.0)
    assert torch.equal(a.images, tiny.generate(2, condition={"prompt": PROMPT}, seed=1, guidance=2.0).images)
    b = tiny.generate(2, condition={"prompt": "a small blue circle in the centre"}, seed=1, guidance=2.0)
    assert not torch.allclose(a.images, b.images)
    assert a.conditions == [{"prompt": PROMPT}] * 2
    assert a.metadata["guidance"] == 2.0 and a.metadata["negative_prompt"] is None
    assert a.metadata["sampler"]["name"] == "ddim" and a.metadata["seed"] == 1
    n = tiny.generate(2, condition={"prompt": PROMPT}, seed=1, guidance=2.0, negative_prompt="a red square")
    assert n.metadata["negative_prompt"] == "a red square" and not torch.allclose(n.images, a.images)
    per_sample = tiny.generate(2, condition={"prompt": [PROMPT, "a small blue circle in the centre"]}, seed=1)
    assert [c["prompt"] for c in per_sample.conditions] == [PROMPT, "a small blue circle in the centre"]


@pytest.mark.parametrize("condition, options, match", [
    ({"prompt": ""}, {}, "empty"),
    ({"prompt": "   "}, {}, "empty"),
    ({"prompt": [PROMPT]}, {}, "1 texts for 2 samples"),
    ({}, {"negative_prompt": "x"}, "needs a prompt"),
    ({"prompt": PROMPT}, {"negative_prompt": "x", "guidance": 1.0}, "guidance=1"),
    ({"prompt": PROMPT}, {"negative_prompt": ""}, "empty"),
    ({"prompt": PROMPT}, {"guidance": 51}, "guidance"),
    ({"label": 3}, {}, "unknown key label"),
])
def test_bad_prompts_are_user_errors(tiny, condition, options, match):
    with pytest.raises(UserError, match=match):
        tiny.generate(2, condition=condition, seed=0, **options)


def test_long_prompts_are_cut_the_same_way_with_a_warning(tiny, caplog):
    long = PROMPT + " and " + "very " * 20 + "bright"
    cut = long[: tiny.max_length]  # a char tokenizer: one token per character
    with caplog.at_level(logging.WARNING, logger="genframe"):
        a = tiny.generate(1, condition={"prompt": long}, seed=0)
    assert "1 text is longer than this model's 48 tokens" in caplog.text
    caplog.clear()
    tiny.generate(1, condition={"prompt": long}, seed=0, guidance=3.0)
    assert "longer" not in caplog.text  # said once per text
    b = tiny.generate(1, condition={"prompt": cut}, seed=0)
    assert torch.equal(a.images, b.images)


def test_caption_dropout_zero_refuses_guidance():
    from genframe.testing import build_tiny
    from genframe.plugins import get_registry

    tiny = dict(get_registry().model("text2image").tiny)
    with pytest.raises(UserError, match="caption_dropout"):
        build_tiny("text2image", {**tiny, "caption_dropout": 0.0})
    model = build_tiny("text2image", {**tiny, "caption_dropout": 0.0, "guidance": 1.0})
    model.example_batch(1)
    with pytest.raises(UserError, match="caption_dropout=0"):
        model.generate(1, condition={"prompt": PROMPT}, guidance=3.0)


# -- the tasks ---------------------------------------------------------------------------


def test_train_gives_the_data_tokenizer_and_writes_prompted_samples(t2i_run):
    run = t2i_run["run_dir"]
    info = json.loads((run / "run.json").read_text())
    assert info["model"]["name"] == "text2image"
    assert info["model"]["kwargs"]["vocab_size"] == json.loads((run / "tokenizer.json").read_text())["vocab"].__len__()
    lines = [json.loads(x) for x in (run / "samples" / "manifest.jsonl").read_text().splitlines()]
    assert all("prompt" in line["condition"] for line in lines)  # validation captions


def test_generate_prompt_file_negative_prompt_and_init_image(t2i_run, compose_task, tmp_path):
    from PIL import Image

    from genframe.tasks.generate import generate

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na small green circle in the centre\n")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "init.png")
    result = generate(compose_task("generate", f"run={t2i_run['run_dir']}", f"prompt_file={prompts}",
                                   "num_samples=2", "guidance=3", "negative_prompt=a blue square",
                                   f"init_image={tmp_path / 'init.png'}", "strength=0.6",
                                   "sampler=ddpm"))
    lines = [json.loads(x) for x in (result["folder"] / "manifest.jsonl").read_text().splitlines()]
    assert [line["condition"]["prompt"] for line in lines] == [PROMPT] * 2 + ["a small green circle in the centre"] * 2
    for line in lines:
        assert line["negative_prompt"] == "a blue square" and line["guidance"] == 3.0
        assert line["init_image"] == str((tmp_path / "init.png").resolve()) and line["strength"] == 0.6
        assert line["sampler"]["name"] == "ddpm" and "seed" in line


@pytest.mark.parametrize("make, args, match", [
    (lambda d: None, ["init_image={d}/missing.png"], "no such file"),
    (lambda d: (d / "bad.png").write_text("not an image"), ["init_image={d}/bad.png"], "Pillow can read"),
    (lambda d: __import__("PIL.Image").Image.new("L", (24, 24)).save(d / "grey.png"),
     ["init_image={d}/grey.png"], "grey image"),
    (lambda d: None, ["strength=0"], r"strength"),
    (lambda d: None, ["strength=1.5"], r"strength"),
    (lambda d: None, ["strength=0.5"], "needs init_image"),
    (lambda d: None, ["prompt=''"], "empty"),
])
def test_bad_generate_inputs(t2i_run, compose_task, tmp_path, make, args, match):
    from genframe.tasks.generate import generate

    make(tmp_path)
    overrides = [a.format(d=tmp_path) for a in args]
    if not any(a.startswith("prompt=") for a in overrides):
        overrides.append(f"prompt={PROMPT}")
    with pytest.raises(UserError, match=match):
        generate(compose_task("generate", f"run={t2i_run['run_dir']}", "num_samples=1", *overrides))


def test_a_prompt_or_negative_prompt_to_an_image_model_exits_2(cli, compose_task):
    from genframe.tasks.train import train

    run = train(compose_task("train", "model=diffusion", "model.block_out_channels=[8,16]",
                             "model.timesteps=20", "model.default_sampler_steps=2",
                             *FAST_TRAINING))["run_dir"]
    for extra, match in ((f"prompt={PROMPT}", "takes no prompt"),
                         ("negative_prompt=x", "takes no negative_prompt")):
        result = cli("generate", f"run={run}", extra, "num_samples=1")
        assert result.returncode == 2, result.stderr[-2000:]
        assert match in result.stderr


def test_train_on_a_captioned_folder(compose_task, tmp_path, caplog):
    from genframe.data.shapes import render
    from genframe.sample_writer import png_bytes
    from genframe.tasks.train import train

    root = tmp_path / "pairs"
    root.mkdir()
    rows = []
    for i, colour in enumerate(["red", "green", "blue", "yellow"] * 3):
        attrs = {"size": "large", "colour": colour, "shape": "circle", "position": "centre"}
        (root / f"{i}.png").write_bytes(png_bytes(render(attrs, 24)))
        rows.append({"file": f"{i}.png", "caption": f"a large {colour} circle in the centre"})
    rows.append({"file": "missing.png", "caption": "no such image"})
    (root / "uncaptioned.png").write_bytes(png_bytes(render(attrs, 24)))
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="genframe"):
        result = train(compose_task("train", "data=captioned_folder", f"data.root={root}",
                                    "data.image_size=24", "data.batch_size=4", *TINY_T2I, *FAST_TRAINING))
    assert json.loads((result["run_dir"] / "run.json").read_text())["status"] == "completed"
    assert "1 image without a caption" in caplog.text and "missing.png" in caplog.text
    captions = {r["caption"] for r in rows}
    lines = [json.loads(x) for x in (result["run_dir"] / "samples" / "manifest.jsonl").read_text().splitlines()]
    assert lines and all(line["condition"]["prompt"] in captions for line in lines)


def test_evaluate_reports_alignment_on_the_held_out_pairs(t2i_run, compose_task):
    from genframe.tasks.evaluate import evaluate

    result = evaluate(compose_task("evaluate", f"run={t2i_run['run_dir']}", "metrics.alignment_prompts=8",
                                   "trainer.enable_progress_bar=false"))
    metrics = result["metrics"]
    for key in ("test/loss", "test/alignment", "test/alignment_colour", "test/alignment_shape"):
        assert 0.0 <= metrics[key] < 10.0, key
    assert "test/fd" not in metrics  # shapes have no labels for the classifier's features


def test_alignment_callback_logs_and_can_be_monitored(compose_task):
    from genframe.tasks.train import train

    result = train(compose_task("train", *TINY_DATA, *TINY_T2I, *FAST_TRAINING, "callbacks=alignment",
                                "callbacks.alignment.num_prompts=4", "callbacks.alignment.steps=2",
                                "monitor=val/alignment", "monitor_mode=max"))
    assert 0.0 <= result["metrics"]["val/alignment"] <= 1.0
    assert "val/alignment_position" in result["metrics"]


# -- a trained language model as the text encoder ---------------------------------------------


def test_a_language_model_run_is_carried_by_the_text2image_run(tmp_path, compose_task):
    from genframe.tasks.generate import generate
    from genframe.tasks.train import train
    from genframe.weights import read_weights

    corpus = tmp_path / "captions.txt"
    corpus.write_text("a large red circle at the top left. a small blue square in the centre.\n" * 30)
    lm = train(compose_task("train", "data=text", "data.source=files", f"data.path={corpus}",
                            *TINY_LM, *FAST_TRAINING, "num_samples=0"))
    lm_dir = tmp_path / "lm"
    shutil.copytree(lm["run_dir"], lm_dir)
    t2i = train(compose_task("train", *TINY_DATA, *TINY_T2I, *FAST_TRAINING,
                             f"model.text_encoder_run={lm_dir}", "model.max_length=40"))
    run = t2i["run_dir"]
    _, lm_state = read_weights(lm_dir / "model.safetensors")
    spec, state = read_weights(run / "model.safetensors")
    assert spec.kwargs["text_encoder_spec"]["name"] == "transformer"
    assert spec.tokenizer == json.loads((lm_dir / "tokenizer.json").read_text())
    for key, value in lm_state.items():  # frozen: copied as it was
        assert torch.equal(state[f"text_encoder.language_model.{key}"], value), key
    shutil.rmtree(lm_dir)  # the text2image run needs it no more
    out = generate(compose_task("generate", f"run={run}", f"prompt={PROMPT}", "num_samples=2"))
    assert out["num_samples"] == 2


def test_text_encoder_run_must_be_a_language_model(t2i_run):
    from genframe.testing import build_tiny
    from genframe.plugins import get_registry

    tiny = dict(get_registry().model("text2image").tiny)
    with pytest.raises(UserError, match="gives no text features"):
        build_tiny("text2image", {**tiny, "text_encoder_run": str(t2i_run["run_dir"])})


# -- LoRA with the EMA copy ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["diffusion", "text2image"])
def test_lora_adapters_reach_the_ema_copy(name):
    from genframe.lora import _adapter_parameters, apply_lora
    from genframe.testing import build_tiny

    torch.manual_seed(0)
    model = build_tiny(name)
    model.example_batch(2)
    _randomise(model)
    model.eval()
    condition = {"prompt": PROMPT} if name == "text2image" else None
    before = model.generate(2, condition=condition, seed=0).images
    apply_lora(model, r=2, alpha=2, target_modules=list(model.lora_target_modules))
    assert any("lora_" in n for n, _ in model.ema_unet.named_parameters())
    assert not any(p.requires_grad for p in model.ema_unet.parameters())
    # zero-initialised adapters on the EMA weights: the samples do not change
    torch.testing.assert_close(model.generate(2, condition=condition, seed=0).images, before)
    with torch.no_grad():  # an adapter update on the online copy reaches the EMA
        for p in _adapter_parameters(model.unet):
            p.add_(0.5)
    model.update_ema(step=10_000)
    assert not torch.allclose(model.generate(2, condition=condition, seed=0).images, before)


def test_finetune_lora_on_text2image(t2i_run, compose_task):
    from genframe.tasks.finetune import finetune
    from genframe.weights import read_weights

    result = finetune(compose_task("finetune", f"run={t2i_run['run_dir']}", "method=lora",
                                   "finetune.lora.r=2", *FAST_TRAINING))
    spec, state = read_weights(result["run_dir"] / "model.safetensors")
    assert any(t.endswith("to_q") for t in spec.lora["target_modules"])
    ema_lora_b = [v for k, v in state.items() if k.startswith("ema_unet.") and "lora_B" in k]
    assert ema_lora_b and any(float(v.abs().sum()) > 0 for v in ema_lora_b)  # the EMA moved
    assert (result["run_dir"] / "adapter.safetensors").is_file()


@pytest.mark.parametrize("trainable", [False, True])
def test_a_language_model_encoder_frozen_or_tuned(trainable):
    from genframe.testing import build_tiny
    from genframe.text.tokenize import build_tokenizer
    from genframe.plugins import get_registry

    torch.manual_seed(0)
    lm = build_tiny("transformer")
    lm.set_tokenizer(build_tokenizer("char", [PROMPT, "a small blue circle in the centre"]))
    tiny = dict(get_registry().model("text2image").tiny)
    model = build_tiny("text2image", {**tiny, "max_length": 40, "text_encoder_trainable": trainable,
                                      "text_encoder_spec": lm.model_spec.to_dict()})
    assert model.max_length == 16  # the language model's context window is the limit
    assert (model.ema_text_encoder is not None) == trainable  # a frozen encoder needs no EMA
    before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    batch = model.example_batch(2)
    model.train()
    assert model.text_encoder.language_model.training == trainable  # frozen: no dropout
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.training_step(batch, 0).backward()
    opt.step()
    changed = any(not torch.equal(before[k], v) for k, v in model.text_encoder.state_dict().items())
    assert changed == trainable
