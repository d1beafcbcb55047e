"""model=autoencoder (a spatial KL latent) and latent diffusion: model=diffusion and
model=text2image with model.autoencoder=<run>."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from genframe.errors import UserError
from genframe.plugins import get_registry
from genframe.testing import build_tiny, check_model_contract
from tests.conftest import FAST_TRAINING
from tests.test_text2image import PROMPT, TINY_DATA, TINY_T2I

TINY_AE = ["model=autoencoder", "model.block_out_channels=[8,16]", "model.latent_channels=2",
           "model.blocks_per_level=1"]


def _tiny(name: str, **changes):
    return {**get_registry().model(name).tiny, **changes}


@pytest.fixture(scope="module")
def ae_spec():
    torch.manual_seed(0)
    return build_tiny("autoencoder").model_spec.to_dict()


@pytest.fixture(scope="module")
def shapes_ae_run(tmp_path_factory):
    """An autoencoder trained for two batches on 24x24 shapes: a 2x12x12 latent."""
    from genframe.config import compose
    from genframe.tasks.train import train

    out = tmp_path_factory.mktemp("ae") / "run"
    return train(compose("train", [*TINY_DATA, *TINY_AE, *FAST_TRAINING, f"paths.output_dir={out}"]))


# -- the autoencoder ----------------------------------------------------------------------


def test_autoencoder_latent_is_spatial_and_reconstructs_after_training():
    torch.manual_seed(0)
    ae = build_tiny("autoencoder", _tiny("autoencoder", block_out_channels=[16, 32]))
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    assert ae.latent_shape == (2, 4, 4)
    assert ae.encode_latents(x).shape == (8, 2, 4, 4)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)

    def error() -> float:
        with torch.no_grad():
            return float((ae.decode_latents(ae.encode_latents(x)) - x).abs().mean())

    before = error()
    for _ in range(150):
        opt.zero_grad()
        terms = ae._terms(x, sample=True)
        (terms["rec"] + ae.hparams.kl_weight * terms["kl"]).backward()
        opt.step()
    assert error() < 0.5 * before  # it learns to reconstruct, not just to exist


def test_autoencoder_reconstructs_a_given_image():
    ae = build_tiny("autoencoder")
    image = torch.rand(3, 1, 8, 8)
    out = ae.generate(3, condition={"image": image}, seed=0)
    assert out.images.shape == (3, 1, 8, 8) and out.metadata["reconstruction"] is True
    with pytest.raises(UserError, match="expected shape"):
        ae.generate(2, condition={"image": torch.rand(2, 3, 8, 8)})


def test_autoencoder_refuses_more_levels_than_the_image_has():
    with pytest.raises(UserError, match="block_out_channels"):
        build_tiny("autoencoder", _tiny("autoencoder", image_size=4, block_out_channels=[8, 8, 8, 8]))


# -- latent diffusion: the model ------------------------------------------------------------


@pytest.mark.parametrize("name", ["diffusion", "text2image"])
def test_contract_in_latent_space(name, ae_spec, tmp_path):
    tiny = _tiny(name, attention_resolutions=None)
    if name == "text2image":
        ae3 = build_tiny("autoencoder", _tiny("autoencoder", in_channels=3))
        tiny["autoencoder_spec"] = ae3.model_spec.to_dict()
    else:
        tiny["autoencoder_spec"] = ae_spec
    check_model_contract(name, tiny=tiny, tmp_path=tmp_path)


def test_the_unet_works_at_the_latent_shape_and_the_autoencoder_stays_frozen(ae_spec):
    torch.manual_seed(0)
    model = build_tiny("diffusion", _tiny("diffusion", attention_resolutions=None, autoencoder_spec=ae_spec))
    assert model.net_shape == (2, 4, 4)
    frozen = {n: p.clone() for n, p in model.autoencoder.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model.training_step(model.example_batch(4), 0).backward()
        opt.step()
    for n, p in model.autoencoder.named_parameters():
        assert torch.equal(p, frozen[n]), n
    samples = model.generate(2, seed=0, condition={"label": 3})
    assert samples.images.shape == (2, 1, 8, 8)
    assert samples.metadata["latent_space"]["shape"] == [2, 4, 4]
    assert samples.metadata["clip_x0"] is False  # a unit-variance latent is not clipped


def test_latent_scale_is_one_over_the_first_batch_std_and_then_kept(ae_spec):
    torch.manual_seed(0)
    model = build_tiny("diffusion", _tiny("diffusion", attention_resolutions=None, autoencoder_spec=ae_spec))
    assert float(model.latent_scale) == 0.0  # not measured yet
    batch = model.example_batch(8)
    z = model.autoencoder.encode_latents(batch["image"])
    scaled = model.to_latent(batch["image"])
    assert float(model.latent_scale) == pytest.approx(1 / float(z.std()), rel=1e-5)
    assert float(scaled.std()) == pytest.approx(1.0, rel=1e-4)
    model.to_latent(batch["image"] * 0.1)  # a second batch does not move it
    assert float(model.latent_scale) == pytest.approx(1 / float(z.std()), rel=1e-5)
    given = build_tiny("diffusion", _tiny("diffusion", attention_resolutions=None,
                                          autoencoder_spec=ae_spec, latent_scale=0.5))
    given.to_latent(batch["image"])
    assert float(given.latent_scale) == 0.5


def test_an_unmeasured_latent_scale_is_recorded_and_clip_x0_in_latent_space_refused(ae_spec):
    model = build_tiny("diffusion", _tiny("diffusion", attention_resolutions=None, autoencoder_spec=ae_spec))
    untrained = model.generate(1, seed=0, condition={"label": 1})
    assert untrained.metadata["latent_space"]["latent_scale"] is None
    model.to_latent(model.example_batch(2)["image"])
    with pytest.raises(UserError, match="clip_x0"):
        model.generate(1, seed=0, condition={"label": 1}, clip_x0=True)


@pytest.mark.parametrize("changes,match", [
    (dict(in_channels=3), "encodes 1x8x8 images, but this model's are 3x8x8"),
    (dict(image_size=16), "encodes 1x8x8 images, but this model's are 1x16x16"),
    (dict(block_out_channels=[8, 16, 16, 16]), "4 U-Net levels halve the input 3 times"),
    (dict(attention_resolutions=[8]), r"2x4x4 latent"),
    (dict(latent_scale=0.0), "latent_scale must be > 0"),
])
def test_a_latent_that_does_not_fit_is_refused(ae_spec, changes, match):
    tiny = _tiny("diffusion", attention_resolutions=None, autoencoder_spec=ae_spec)
    with pytest.raises(UserError, match=match):
        build_tiny("diffusion", {**tiny, **changes})


def test_latent_scale_without_an_autoencoder_is_refused():
    with pytest.raises(UserError, match="set model.autoencoder too"):
        build_tiny("diffusion", _tiny("diffusion", latent_scale=0.2))


# -- latent diffusion: the tasks ------------------------------------------------------------


def test_a_latent_text2image_run_carries_its_autoencoder(shapes_ae_run, compose_task, tmp_path):
    from genframe.tasks.generate import generate
    from genframe.tasks.train import train
    from genframe.weights import read_weights

    ae_dir = tmp_path / "ae"
    shutil.copytree(shapes_ae_run["run_dir"], ae_dir)
    t2i = train(compose_task("train", *TINY_DATA, *TINY_T2I, *FAST_TRAINING,
                             f"model.autoencoder={ae_dir}", "model.attention_resolutions=[12]"))
    run = t2i["run_dir"]
    _, ae_state = read_weights(ae_dir / "model.safetensors")
    spec, state = read_weights(run / "model.safetensors")
    assert spec.kwargs["autoencoder_spec"]["name"] == "autoencoder"
    for key, value in ae_state.items():  # frozen: copied as it was
        assert torch.equal(state[f"autoencoder.{key}"], value), key
    assert float(state["latent_scale"]) > 0
    shutil.rmtree(ae_dir)  # the latent run needs it no more
    out = generate(compose_task("generate", f"run={run}", f"prompt={PROMPT}", "num_samples=2"))
    assert out["num_samples"] == 2
    manifest = [json.loads(x) for x in (out["run_dir"] / "samples" / "manifest.jsonl").read_text().splitlines()]
    assert manifest[0]["latent_space"]["shape"] == [2, 12, 12]
    with pytest.raises(UserError, match="has no spatial latent"):  # a run, but no autoencoder
        build_tiny("diffusion", _tiny("diffusion", in_channels=3, image_size=24,
                                      autoencoder=str(run)))


def test_bad_autoencoder_runs_exit_2(shapes_ae_run, cli):
    fast = [*FAST_TRAINING, "num_samples=0"]
    wrong_size = cli("train", "data=digits", "model=diffusion",
                     f"model.autoencoder={shapes_ae_run['run_dir']}", *fast)
    assert wrong_size.returncode == 2, wrong_size.stderr
    assert "encodes 3x24x24 images" in wrong_size.stderr and "1x8x8" in wrong_size.stderr
    not_given = cli("train", "experiment=shapes_text2image_latent", *fast)
    assert not_given.returncode == 2, not_given.stderr
    assert "model.autoencoder: required but not set" in not_given.stderr, not_given.stderr


def test_a_missing_autoencoder_run_names_the_key(tmp_path):
    with pytest.raises(UserError, match="model.autoencoder="):
        build_tiny("diffusion", _tiny("diffusion", autoencoder=str(tmp_path / "nope")))
