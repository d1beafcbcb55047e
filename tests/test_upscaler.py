"""model=upscaler: the low-resolution input reaches the U-Net, noise augmentation in
training, generate() upscaling, and `genframe generate run=BASE upscaler=UP` with the
checks that the two stages chain."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from genframe.errors import UserError
from tests.conftest import FAST_TRAINING

TINY_NET = ["model.block_out_channels=[8,16]", "model.blocks_per_level=1", "model.num_heads=2",
            "model.timesteps=20", "model.default_sampler_steps=2"]
BASE = ["model=diffusion", "data=digits", *TINY_NET]  # 8x8 grey digits, class-conditional
UPSCALER = ["model=upscaler", "data=digits", "data.image_size=16", *TINY_NET]


def _tiny(**changes):
    from genframe.plugins import get_registry
    from genframe.testing import build_tiny

    torch.manual_seed(0)
    return build_tiny("upscaler", {**get_registry().model("upscaler").tiny, **changes})


def _randomise(model) -> None:
    """Random weights everywhere: the zero-initialised output layer would hide what the
    untrained net reads."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_contract(tmp_path):
    from genframe.testing import check_model_contract

    check_model_contract("upscaler", tmp_path=tmp_path)


def _seen_in_training(model, batch):
    """(aug_t, conditioning) the U-Net got in one training step on `batch`."""
    seen = {}

    def spy(module, args, kwargs):
        seen["aug_t"], seen["low_res"] = args[2].clone(), kwargs["low_res"].clone()

    handle = model.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        model.training_step(batch, 0)
    finally:
        handle.remove()
    return seen["aug_t"], seen["low_res"]


def test_training_noises_the_low_res_input_at_random_levels():
    model = _tiny()
    batch = model.example_batch(32)
    x = batch["image"]
    clean = F.interpolate(F.interpolate(x, size=8, mode="area"), size=16, mode="bilinear",
                          align_corners=False)
    aug_t, low_res = _seen_in_training(model, batch)
    assert low_res.shape == x.shape
    assert len(set(aug_t.tolist())) > 10, aug_t  # levels drawn per image, over [0, T)
    error = (low_res - clean).pow(2).mean(dim=(1, 2, 3))  # (B,)
    # The noise grows with the level: the noisiest quarter is far from the clean input,
    # the least noisy quarter close to it.
    order = aug_t.argsort()
    assert error[order[-8:]].mean() > 0.3 > 0.05 > error[order[:8]].mean(), (aug_t, error)

    # With noise_augmentation_max=0 the input is the clean low-resolution image (timestep
    # -1: no step of the forward process).
    model = _tiny(noise_augmentation_max=0.0, noise_augmentation=0.0)
    aug_t, low_res = _seen_in_training(model, batch)
    assert aug_t.eq(-1).all()
    torch.testing.assert_close(low_res, clean)


def test_the_network_reads_the_low_res_image_and_its_level():
    model = _tiny()
    _randomise(model)
    net = model.unet.eval()
    gen = torch.Generator().manual_seed(1)
    x, a, b = (torch.randn(2, 3, 16, 16, generator=gen) for _ in range(3))
    t, aug = torch.tensor([5, 30]), torch.tensor([2, 2])
    out = net(x, t, aug, low_res=a)
    assert out.shape == x.shape  # predicts the image's channels only
    assert not torch.allclose(out, net(x, t, aug, low_res=b), atol=1e-4)
    assert not torch.allclose(out, net(x, t, torch.tensor([40, 40]), low_res=a), atol=1e-4)


def test_generate_upscales_the_given_images():
    model = _tiny()
    _randomise(model)
    model.eval()
    gen = torch.Generator().manual_seed(2)
    low = torch.rand(3, 3, 8, 8, generator=gen)
    samples = model.generate(3, condition={"low_res": low}, seed=4)
    assert samples.images.shape == (3, 3, 16, 16)
    assert 0 <= float(samples.images.min()) and float(samples.images.max()) <= 1
    assert samples.metadata["noise_augmentation"] == 0.1 and samples.metadata["low_res"] is True
    assert torch.equal(samples.images, model.generate(3, condition={"low_res": low}, seed=4).images)
    other = model.generate(3, condition={"low_res": 1 - low}, seed=4).images
    assert not torch.allclose(samples.images, other, atol=1e-3)
    # One image for every sample, and a chosen level.
    one = model.generate(2, condition={"low_res": low[0]}, seed=4, noise_augmentation=0.5)
    assert one.images.shape == (2, 3, 16, 16) and one.metadata["noise_augmentation"] == 0.5
    # Without an image: the unconditional model (pure-noise conditioning, the top level).
    free = model.generate(2, seed=4)
    assert free.metadata["low_res"] is False and free.metadata["noise_augmentation"] == 1.0

@pytest.mark.parametrize("residual", [True, False])
def test_residual_diffuses_the_detail_and_adds_the_bilinear_image_back(residual, monkeypatch):
    model = _tiny(residual=residual)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    seen = {}

    def capture(net, x0, label, generator=None, **kw):
        seen["x0"] = x0
        return x0.sum() * 0

    monkeypatch.setattr(model, "diffusion_loss", capture)
    model._loss(model.unet, x, None)
    bilinear = model.upsample(model.downsample(x))
    expected = x - bilinear if residual else x
    assert torch.allclose(seen["x0"], expected)
    # sampling: a sampler that makes zero detail gives back the bilinear image (residual)
    from genframe.samplers.ddim import DDIMSampler

    monkeypatch.setattr(DDIMSampler, "sample", lambda self, *a, **k: torch.zeros(2, 3, 16, 16))
    low = torch.rand(2, 3, 8, 8)
    out = model.generate(2, condition={"low_res": low}, seed=0, noise_augmentation=0.0).images
    want = ((model.upsample(low * 2 - 1) + 1) / 2).clamp(0, 1) if residual else torch.full_like(out, 0.5)
    assert torch.allclose(out, want, atol=1e-6)



@pytest.mark.parametrize("condition, options, match", [
    ({"low_res": torch.rand(2, 3, 16, 16)}, {}, r"expected shape \(2, 3, 8, 8\)"),
    ({"low_res": torch.rand(2, 1, 8, 8)}, {}, "in_channels and low_res_size"),
    ({"low_res": torch.rand(2, 3, 8, 8) * 2 - 1}, {}, r"values in \[0, 1\]"),
    ({"low_res": [[0.5]]}, {}, "expected a tensor"),
    ({"low_res": torch.rand(2, 3, 8, 8)}, {"noise_augmentation": 1.5}, "noise_augmentation"),
    ({"label": 3}, {}, "accepts low_res"),
])
def test_bad_generate_inputs_are_user_errors(condition, options, match):
    with pytest.raises(UserError, match=match):
        _tiny().generate(2, condition=condition, seed=0, **options)


def test_constructor_checks_and_the_default_low_res_size():
    assert _tiny(low_res_size=None).low_res_size == 8
    assert _tiny(low_res_size=None).model_spec.kwargs["low_res_size"] == 8  # recorded resolved
    with pytest.raises(UserError, match=r"model.low_res_size=16 must be between 1 and model.image_size - 1"):
        _tiny(low_res_size=16)
    with pytest.raises(UserError, match="above model.noise_augmentation_max"):
        _tiny(noise_augmentation=0.3, noise_augmentation_max=0.2)
    partial = _tiny(noise_augmentation_max=0.5)
    with pytest.raises(UserError, match="never learned to sample without a low-resolution image"):
        partial.generate(1, seed=0)
    with pytest.raises(UserError, match=r"in \[0, 0.5\]"):
        partial.generate(1, condition={"low_res": torch.rand(3, 8, 8)}, seed=0, noise_augmentation=0.7)


# -- the cascade in `genframe generate` -----------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny runs: an 8x8 grey base, its 8->16 upscaler, a 4->16 one and an RGB one."""
    from genframe.config import compose
    from genframe.tasks.train import train

    root = tmp_path_factory.mktemp("cascade")

    def make(name, *overrides):
        return train(compose("train", [*overrides, *FAST_TRAINING,
                                       f"paths.output_dir={root / name}"]))["run_dir"]

    return {
        "base": make("base", *BASE),
        "up": make("up", *UPSCALER),
        "up_from_4": make("up4", *UPSCALER, "model.low_res_size=4"),
        "up_rgb": make("up_rgb", *UPSCALER, "data.channels=3"),
    }


def test_generate_runs_both_stages_and_records_them(runs, compose_task):
    from genframe.tasks.generate import generate
    from genframe.weights import load_model

    result = generate(compose_task("generate", f"run={runs['base']}", f"upscaler={runs['up']}",
                                   "num_samples=3", "batch_size=2", "condition.label=3",
                                   "upscaler_steps=3", "upscaler_noise_augmentation=0.2"))
    folder = result["folder"]
    lines = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and len(result["samples"][0]) == 2
    assert result["samples"][0].images.shape == (2, 1, 16, 16)
    for i, line in enumerate(lines):
        assert line["model"] == "diffusion" and line["condition"] == {"label": 3}
        assert line["seed"] == i // 2  # batch b: seed + b, for both stages
        up = line["upscaler"]
        assert up["model"] == "upscaler" and up["seed"] == line["seed"]
        assert up["noise_augmentation"] == 0.2 and up["sampler"]["steps"] == 3
        assert line["base_file"] == f"base/{i:06d}.png" and (folder / line["base_file"]).is_file()
    base_lines = (folder / "base" / "manifest.jsonl").read_text().splitlines()
    assert len(base_lines) == 3 and (folder / "base" / "grid.png").is_file()
    info = json.loads((result["run_dir"] / "run.json").read_text())
    assert info["source"]["run"] == str(runs["base"].resolve())
    assert info["upscaler"]["run"] == str(runs["up"].resolve())

    # The second stage is the upscaler run on the first stage's images, same seed.
    base, _, _ = load_model(str(runs["base"]))
    up, _, _ = load_model(str(runs["up"]))
    from genframe.samplers.ddim import DDIMSampler

    low = base.generate(2, condition={"label": 3}, seed=0).images
    again = up.generate(2, condition={"low_res": low}, seed=0, noise_augmentation=0.2,
                        sampler=DDIMSampler(steps=3)).images
    torch.testing.assert_close(result["samples"][0].images, again)


@pytest.mark.parametrize("which, extra, match", [
    ("up_rgb", [], "reads 3-channel images but run=.* makes 1-channel ones"),
    ("base", [], "holds model 'diffusion', which is not an upscaler"),
    ("missing", [], "upscaler=.*missing: no such directory"),
    ("up", ["upscaler_steps=0"], "upscaler_steps=0: expected an integer >= 1"),
    (None, ["upscaler_steps=3"], "no upscaler=RUN was given"),
    ("up", ["upscaler_noise_augmentation=2.0"], r"upscaler_noise_augmentation=2.0: expected a number in \[0, 1\]"),
    ("up", ["upscaler_steps=50"], "upscaler_steps=50: sampler.steps must be between 1 and 20"),
    ("up", ["save_base=maybe"], "save_base='maybe': expected true or false"),
])
def test_bad_cascades_are_user_errors(runs, compose_task, tmp_path, which, extra, match):
    from genframe.tasks.generate import generate

    up = [] if which is None else [f"upscaler={runs.get(which, tmp_path / which)}"]
    with pytest.raises(UserError, match=match):
        generate(compose_task("generate", f"run={runs['base']}", *up, "num_samples=1", *extra))


def test_sizes_that_do_not_chain_exit_2(runs, cli):
    result = cli("generate", f"run={runs['base']}", f"upscaler={runs['up_from_4']}", "num_samples=1")
    assert result.returncode == 2, result.stderr[-2000:]
    message = " ".join(result.stderr.split())
    assert "do not chain" in message and "from 4x4 ones" in message and "makes 8x8 images" in message
    assert "model.low_res_size=8" in message  # the fix
    assert "Traceback" not in result.stderr
