"""The GAN model on its own (no Hydra): the two optimisation steps inside a real Trainer,
losses and regularisers, the strict timm trunk, generation, and the SampleGrid callback."""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from genframe_plugins.gan.augment import diff_augment
from genframe_plugins.gan.losses import d_loss_fn, g_loss_fn, mode_seeking_ratio, r1_penalty
from genframe_plugins.gan.model import GAN
from genframe_plugins.gan.network import MinibatchStdDev
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from genframe.callbacks import SampleGrid
from genframe.errors import UserError
from genframe.module import GenerativeModule
from genframe.samples import Samples

TINY = dict(image_size=8, num_classes=10, latent_dim=8, g_channels=[8, 16], d_channels=[8, 16])


def tiny(**overrides) -> GAN:
    torch.manual_seed(0)
    return GAN(**{**TINY, **overrides})


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _snapshot(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _changed(before: list[torch.Tensor], net: torch.nn.Module) -> list[bool]:
    return [not torch.equal(b, p.detach()) for b, p in zip(before, net.parameters())]


def _trainer(tmp_path: Path, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=str(tmp_path))
    return pl.Trainer(**{**args, **kw})


def _fit(trainer: pl.Trainer, model: pl.LightningModule, batches: list[dict]) -> None:
    loader = DataLoader(batches, batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)


# -- the two steps, through a real Trainer ------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(),
    dict(d_minibatch_std=False, ema_decay=0.0, mode_seeking=0.0),  # plain DCGAN
    dict(num_classes=0, spectral_norm=False, loss="hinge"),
    dict(d_minibatch_std=True, r1_gamma=1.0, augment=["color", "translation", "cutout"],
         ema_decay=0.9, mode_seeking=1.0),
])
def test_each_step_changes_only_its_own_network(tmp_path, kw):
    """Inside a Trainer (the only optimisation path) the D step moves only D and the G
    step only G (and its moving average); every parameter trains again afterwards."""
    m = tiny(**kw)
    batch = m.example_batch(8)
    record: dict[str, list] = {"d": [], "g": []}
    d_step, g_step = m.d_step, m.g_step

    def nets():
        return [n for n in (m.generator, m.discriminator, m.generator_ema) if n is not None]

    def spy(step, key):
        def run(b):
            before = [_snapshot(n) for n in nets()]
            out = step(b)
            record[key].append(tuple(any(_changed(s, n)) for s, n in zip(before, nets())))
            return out
        return run

    m.d_step, m.g_step = spy(d_step, "d"), spy(g_step, "g")
    trainer = _trainer(tmp_path, max_steps=4, limit_val_batches=1, num_sanity_val_steps=0)
    _fit(trainer, m, [batch])
    ema = (m.generator_ema is not None,)
    assert len(record["d"]) == 2 and len(record["g"]) == 2  # max_steps counts both optimisers
    for changed in record["d"]:
        assert changed == (False, True) + (False,) * ema[0], f"D step changed {changed} (G, D, EMA)"
    for changed in record["g"]:
        assert changed == (True, False) + (True,) * ema[0], f"G step changed {changed} (G, D, EMA)"
    # toggled_optimizer restored requires_grad; the EMA copy is never optimised.
    assert all(p.requires_grad for p in [*m.generator.parameters(), *m.discriminator.parameters()])
    if m.generator_ema is not None:
        assert not any(p.requires_grad for p in m.generator_ema.parameters())
    for key in ("train/loss", "train/d_loss", "train/g_loss", "train/d_acc_real", "train/d_acc_fake",
                "val/loss", "val/d_acc_real", "val/d_acc_fake", "val/diversity"):
        assert key in trainer.callback_metrics, key
        assert torch.isfinite(trainer.callback_metrics[key]), key
    if kw.get("r1_gamma"):
        assert float(trainer.callback_metrics["train/r1"]) > 0
        assert float(trainer.callback_metrics["train/mode_seeking"]) > 0


def test_d_steps_per_g_step(tmp_path):
    m = tiny(d_steps_per_g_step=3)
    calls = []
    d_step, g_step = m.d_step, m.g_step
    m.d_step = lambda b: (calls.append("d"), d_step(b))[1]
    m.g_step = lambda b: (calls.append("g"), g_step(b))[1]
    _fit(_trainer(tmp_path, max_epochs=1, limit_val_batches=0), m, [m.example_batch(4)] * 6)
    assert calls == ["d", "d", "d", "g", "d", "d", "d", "g"]


def test_no_optimisation_outside_a_trainer():
    """There is one optimisation path: a step called by hand has no optimisers to use."""
    m = tiny()
    with pytest.raises(RuntimeError):
        m.training_step(m.example_batch(4), 0)


def test_ema_generator_is_what_generate_draws_from(tmp_path):
    m = tiny(ema_decay=0.5)
    _fit(_trainer(tmp_path, max_steps=6, limit_val_batches=0), m, [m.example_batch(8)])
    assert m._g_steps == 3
    pairs = zip(m.generator.parameters(), m.generator_ema.parameters())
    assert any(not torch.equal(a, b) for a, b in pairs), "EMA generator = trained one"
    s = m.generate(4, seed=3)
    z = m.sample_noise(4, torch.Generator().manual_seed(3))
    m.eval()
    with torch.no_grad():
        from_ema = (m.generator_ema(z, torch.arange(4)) + 1) / 2
        from_g = (m.generator(z, torch.arange(4)) + 1) / 2
    assert torch.allclose(s.images, from_ema.clamp(0, 1))
    assert not torch.allclose(s.images, from_g.clamp(0, 1))
    # The averaged weights are part of the state (checkpoints and weights files keep them).
    assert any(k.startswith("generator_ema.") for k in m.state_dict())
    assert not any(k.startswith("generator_ema.") for k in tiny(ema_decay=0.0).state_dict())


# -- objective and regularisers -----------------------------------------------------------


def test_loss_values():
    zero = torch.zeros(4)
    assert torch.isclose(d_loss_fn("bce", zero, zero), torch.tensor(2 * 0.6931), atol=1e-3)
    assert torch.isclose(d_loss_fn("hinge", zero, zero), torch.tensor(2.0))
    assert torch.isclose(g_loss_fn("hinge", torch.ones(4)), torch.tensor(-1.0))
    assert torch.isclose(g_loss_fn("bce", zero), torch.tensor(0.6931), atol=1e-3)
    # A perfect discriminator has ~0 hinge loss.
    assert float(d_loss_fn("hinge", torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0


def test_r1_penalty_is_the_squared_gradient_norm():
    w = torch.randn(1, 3, 4, 4, requires_grad=True)
    x = torch.randn(5, 3, 4, 4)
    penalty = r1_penalty(lambda t: (t * w).flatten(1).sum(1) ** 2 / 2, x)
    # d/dx of (w.x)^2 / 2 is (w.x) w; its squared norm is (w.x)^2 |w|^2.
    wx = (x * w).flatten(1).sum(1)
    expected = (wx ** 2 * w.pow(2).sum()).mean()
    assert torch.allclose(penalty, expected, rtol=1e-5)
    penalty.backward()  # create_graph: the penalty trains D
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_mode_seeking_ratio():
    z = torch.randn(6, 4)
    same = torch.ones(6, 1, 2, 2)
    assert float(mode_seeking_ratio(same, z)) == 0.0  # collapsed: every noise, one image
    fake = torch.zeros(6, 1, 2, 2)
    fake[3:] = 0.5  # pairs (0, 3), (1, 4), (2, 5) differ by 0.5 per pixel
    expected = (0.5 / (z[:3] - z[3:]).abs().mean(dim=1)).mean()
    assert torch.allclose(mode_seeking_ratio(fake, z), expected)


def test_mode_seeking_pairs_share_their_label(tmp_path):
    m = tiny(mode_seeking=1.0)
    seen = []
    forward = m.generator.forward
    m.generator.forward = lambda z, label=None: (seen.append(label), forward(z, label))[1]
    batch = m.example_batch(7)
    _fit(_trainer(tmp_path, max_steps=2, limit_val_batches=0), m, [batch])
    # The D step draws 7 fakes for the batch's labels; the G step 3 pairs of labels.
    d_labels, g_labels = seen[0], seen[1]
    assert torch.equal(d_labels, batch["label"])
    assert torch.equal(g_labels, batch["label"][:3].repeat(2))


def test_minibatch_stddev():
    layer = MinibatchStdDev(group_size=4)
    same = torch.ones(8, 3, 2, 2)
    out = layer(same)
    assert out.shape == (8, 4, 2, 2) and torch.equal(out[:, :3], same)
    assert float(out[:, 3].abs().max()) < 1e-3  # identical samples: (almost) no spread
    varied = torch.randn(6, 3, 2, 2)  # 6 is not divisible by 4: groups of 3
    assert (layer(varied)[:, 3] > 0.1).all()


def test_diff_augment_keeps_shape_and_gradients():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8, requires_grad=True)
    for policy in (["color"], ["translation"], ["cutout"], ["color", "translation", "cutout"]):
        y = diff_augment(x, policy)
        assert y.shape == x.shape
        assert not torch.equal(y, x), policy
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert grad.abs().sum() > 0, policy
    # A translation moves pixels: its output holds input values (or the zero fill).
    y = diff_augment(x, ["translation"]).detach()
    assert set(y.flatten().tolist()) <= set(x.detach().flatten().tolist()) | {0.0}


# -- generation ---------------------------------------------------------------------------


def test_generate_shape_range_seed_and_any_size():
    m = tiny()
    s = m.generate(5, seed=1)
    assert isinstance(s, Samples) and s.images.shape == (5, 1, 8, 8)
    assert float(s.images.min()) >= 0 and float(s.images.max()) <= 1
    assert torch.equal(s.images, m.generate(5, seed=1).images)
    assert not torch.equal(s.images, m.generate(5, seed=2).images)
    assert [c["label"] for c in s.conditions] == [0, 1, 2, 3, 4]  # labels cycle
    odd = GAN(in_channels=3, image_size=7, g_channels=[4, 8, 8], d_channels=[4, 8, 8])
    assert odd.generate(2, seed=0).images.shape == (2, 3, 7, 7)


def test_truncation():
    m = tiny()
    z = m.sample_noise(64, torch.Generator().manual_seed(0), truncation=0.5)
    assert float(z.abs().max()) <= 0.5
    s = m.generate(4, seed=0, truncation=1.0)
    assert s.metadata["truncation"] == 1.0
    assert torch.equal(s.images, m.generate(4, seed=0, truncation=1.0).images)
    for bad in (0, -1.0, float("nan"), "x", True):
        with pytest.raises(UserError, match="truncation"):
            m.generate(2, seed=0, truncation=bad)
    with pytest.raises(UserError, match="sampling.temprature"):
        m.generate(2, seed=0, temprature=1.0)


def test_conditional_labels():
    m = tiny()
    s = m.generate(3, seed=0, condition={"label": 3})
    assert [c["label"] for c in s.conditions] == [3, 3, 3]
    two = m.generate(2, seed=0, condition={"label": [1, 9]})
    assert [c["label"] for c in two.conditions] == [1, 9]
    with pytest.raises(UserError, match=r"0\.\.9"):
        m.generate(2, seed=0, condition={"label": 10})
    with pytest.raises(UserError, match="2 labels for 3"):
        m.generate(3, seed=0, condition={"label": [1, 2]})
    with pytest.raises(UserError, match="unconditional"):
        tiny(num_classes=0).generate(2, seed=0, condition={"label": 1})
    assert m.needs == {"image", "label"} and tiny(num_classes=0).needs == {"image"}


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("loss", "wgan"), ("latent_dim", 0), ("g_channels", []), ("lr_d", 0.0),
    ("d_steps_per_g_step", 0), ("collapse_threshold", 1.5), ("sample_every_n_epochs", -1),
    ("d_backbone_weights", "/x.safetensors"),
    ("d_minibatch_std", "yes"), ("r1_gamma", -1.0), ("r1_gamma", float("nan")),
    ("augment", ["flip"]), ("augment", "translation"), ("augment", ["color", "color"]),
    ("ema_decay", 1.0), ("ema_decay", -0.1), ("mode_seeking", -1.0),
    ("betas", [0.5]), ("betas", [0.5, 1.0]),
])
def test_constructor_validation_names_the_key(key, value):
    with pytest.raises(UserError, match=f"model.{key}"):
        tiny(**{key: value})


def test_minibatch_std_with_a_timm_trunk(monkeypatch):
    """With a timm trunk the statistic is one more input of D's linear head."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tiny(d_backbone="test_resnet").discriminator
    assert d.vector_std is not None
    assert d.head.in_features == d.trunk.num_features + 1
    assert tiny(d_backbone="test_resnet", d_minibatch_std=False).discriminator.head.in_features \
        == d.trunk.num_features
    x = torch.rand(4, 1, 8, 8)
    assert d(x, torch.arange(4)).shape == (4,)


def test_yaml_lists_every_constructor_argument_with_its_default():
    conf = OmegaConf.load(Path(__file__).parents[1] / "plugins/gan/conf/model/gan.yaml")
    params = dict(inspect.signature(GAN.__init__).parameters)
    params.pop("self")
    assert set(conf) - {"name"} == set(params)
    for key, p in params.items():
        value = conf._get_node(key)._value()  # the raw value: interpolations stay strings
        if isinstance(value, str) and value.startswith("${"):
            continue
        value = OmegaConf.to_container(conf[key]) if OmegaConf.is_list(conf[key]) else conf[key]
        default = list(p.default) if isinstance(p.default, tuple) else p.default
        assert value == default, f"{key}: YAML {value!r}, constructor {default!r}"


# -- the timm trunk: one strict reader ----------------------------------------------------


def _timm_state(name: str, in_chans: int = 3, num_classes: int = 0) -> dict[str, torch.Tensor]:
    import timm

    torch.manual_seed(1)
    net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_timm_trunk_loads_rgb_weights_into_a_grey_discriminator(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rgb = _timm_state("test_resnet", in_chans=3, num_classes=7)  # with a classifier head
    assert rgb["conv1.0.weight"].shape[1] == 3 and "fc.weight" in rgb
    save_file(rgb, str(tmp_path / "trunk.safetensors"))
    m = tiny(d_backbone="test_resnet", d_backbone_weights=str(tmp_path / "trunk.safetensors"))
    trunk = m.discriminator.trunk.state_dict()
    # The stem was adapted as timm adapts pretrained weights: one channel = sum of three.
    assert trunk["conv1.0.weight"].shape[1] == 1
    assert torch.allclose(trunk["conv1.0.weight"], rgb["conv1.0.weight"].sum(dim=1, keepdim=True))
    # Every other weight is the file's (nothing dropped); the head was left out.
    for key, value in trunk.items():
        if key != "conv1.0.weight":
            assert torch.equal(value, rgb[key]), key
    assert "fc.weight" not in trunk
    # 3-channel data takes the file as it is; a torch file works too.
    torch.save(rgb, tmp_path / "trunk.pt")
    m3 = tiny(in_channels=3, d_backbone="test_resnet", d_backbone_weights=str(tmp_path / "trunk.pt"))
    assert torch.equal(m3.discriminator.trunk.state_dict()["conv1.0.weight"], rgb["conv1.0.weight"])
    # And the discriminator trains in a Trainer.
    _fit(_trainer(tmp_path, max_steps=2, limit_val_batches=0), m, [m.example_batch(4)])


def test_timm_trunk_refuses_weights_that_do_not_fit(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    other = tmp_path / "efficientnet.safetensors"
    save_file(_timm_state("test_efficientnet"), str(other))
    refused = r"model\.d_backbone_weights: the weights do not fit timm model 'test_resnet'"
    with pytest.raises(UserError, match=refused):
        tiny(d_backbone="test_resnet", d_backbone_weights=str(other))
    # One layer missing is refused too, not half-loaded.
    state = _timm_state("test_resnet")
    del state["layer1.0.conv1.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    with pytest.raises(UserError, match=r"1 key missing .*layer1\.0\.conv1\.weight"):
        tiny(d_backbone="test_resnet", d_backbone_weights=str(partial))
    # A stem of another width is another architecture, not a channel count to adapt.
    state = _timm_state("test_resnet")
    state["conv1.0.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(state, str(partial))
    with pytest.raises(UserError, match=r"1 key of another shape .*conv1\.0\.weight: \(3, 3, 3, 3\) "
                                         r"in the weights, \(16, 1, 3, 3\) in the model"):
        tiny(d_backbone="test_resnet", d_backbone_weights=str(partial))
    (tmp_path / "junk.safetensors").write_bytes(b"not weights")
    with pytest.raises(UserError, match="model.d_backbone_weights"):
        tiny(d_backbone="test_resnet", d_backbone_weights=str(tmp_path / "junk.safetensors"))
    with pytest.raises(UserError, match="no such file"):
        tiny(d_backbone="test_resnet", d_backbone_weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="d_backbone"):
        tiny(d_backbone="resnet_nope")


# -- training health: sample grids and the collapse warning --------------------------------


def test_gan_writes_fixed_noise_grids_through_the_sample_writer(tmp_path):
    m = tiny(sample_every_n_epochs=2)
    batches = [m.example_batch(8)]
    trainer = _trainer(tmp_path, max_epochs=4, limit_val_batches=1, num_sanity_val_steps=0)
    _fit(trainer, m, batches)
    folder = tmp_path / "samples"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_001", "epoch_003"]
    grids = {}
    for epoch in ("epoch_001", "epoch_003"):
        files = sorted(p.name for p in (folder / epoch).iterdir())
        assert files == [f"{i:06d}.png" for i in range(64)] + ["grid.png", "manifest.jsonl"]
        lines = (folder / epoch / "manifest.jsonl").read_text().splitlines()
        manifest = [json.loads(x) for x in lines]
        assert len(manifest) == 64
        assert {r["seed"] for r in manifest} == {0} and {r["model"] for r in manifest} == {"GAN"}
        assert [r["condition"]["label"] for r in manifest[:12]] == [*range(10), 0, 1]
        grids[epoch] = (folder / epoch / "grid.png").read_bytes()
    assert grids["epoch_001"] != grids["epoch_003"]  # same noise, trained further
    assert not list(folder.glob("*.png")) and not list(folder.glob(".*"))  # no loose files
    # A validate after the fit keeps the fit's grid callback (no Lightning "override").
    grid_callbacks = [c for c in trainer.callbacks if isinstance(c, SampleGrid)]
    assert len(grid_callbacks) == 1 and grid_callbacks[0].written[-1] == folder / "epoch_003"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a barely trained tiny GAN: collapse warnings
        trainer.validate(m, dataloaders=DataLoader(batches, batch_size=None), verbose=False)
    assert [c for c in trainer.callbacks if isinstance(c, SampleGrid)] == grid_callbacks
    # sample_every_n_epochs=0: no callback, no folder.
    assert tiny(sample_every_n_epochs=0).configure_callbacks() == []


def test_a_sample_grid_from_the_config_wins_over_the_models(tmp_path):
    m = tiny(sample_every_n_epochs=2)
    mine = SampleGrid(every_n_epochs=1, num_samples=3, seed=5)
    _fit(_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[mine]), m,
         [m.example_batch(4)])
    assert mine.written == [tmp_path / "samples" / "epoch_000"]
    lines = (mine.written[0] / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["seed"] for x in lines] == [5, 5, 5]


class _Blobs(GenerativeModule):
    """A minimal image model that is not a GAN: an RGB colour per label, plus noise."""

    def __init__(self) -> None:
        super().__init__()
        self.colour = torch.nn.Parameter(torch.rand(3, 3))
        self.set_class_conditional(3)

    def training_step(self, batch, batch_idx):
        return (self.colour.mean() - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def sample(self, num_samples, *, condition, generator):
        labels, conditions = self.labels_for(num_samples, condition, 3)
        noise = torch.rand(num_samples, 3, 5, 5, generator=generator) * 0.1
        images = (self.colour.detach()[labels][:, :, None, None] + noise).clamp(0, 1)
        return Samples(images=images, conditions=conditions, metadata={})


def test_sample_grid_callback_works_for_any_image_model(tmp_path):
    m = _Blobs()
    grid = SampleGrid(every_n_epochs=1, num_samples=5, seed=7)
    batch = {"image": torch.rand(4, 3, 5, 5), "label": torch.zeros(4, dtype=torch.long)}
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[grid], limit_val_batches=0)
    _fit(trainer, m, [batch])
    assert grid.written == [tmp_path / "samples" / "epoch_000", tmp_path / "samples" / "epoch_001"]
    manifest = [json.loads(x) for x in (grid.written[1] / "manifest.jsonl").read_text().splitlines()]
    assert [(r["file"], r["seed"], r["model"], r["epoch"], r["condition"]) for r in manifest[:2]] == [
        ("000000.png", 7, "_Blobs", 1, {"label": 0}), ("000001.png", 7, "_Blobs", 1, {"label": 1})]
    from PIL import Image

    with Image.open(grid.written[1] / "grid.png") as img:
        assert img.mode == "RGB" and max(img.size) >= 256  # scaled up to be legible
    with Image.open(grid.written[1] / "000002.png") as img:
        assert img.size == (5, 5)
    for bad in (dict(every_n_epochs=0), dict(every_n_epochs=1, num_samples=0),
                dict(every_n_epochs=True), dict(every_n_epochs=1, seed=-1)):
        with pytest.raises(UserError, match="SampleGrid"):
            SampleGrid(**bad)


def test_mode_collapse_warning(tmp_path):
    """A generator that ignores its noise triggers the warning at validation epoch end."""
    m = tiny(num_classes=0, sample_every_n_epochs=1)
    with torch.no_grad():
        m.generator.fc.weight.zero_()  # output no longer depends on z
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(16, 1, 8, 8, generator=gen) * 2 - 1}
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=0, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="possible mode collapse"):
        trainer.validate(m, dataloaders=DataLoader([batch], batch_size=None), verbose=False)
    assert trainer.callback_metrics["val/diversity"] < 0.1
