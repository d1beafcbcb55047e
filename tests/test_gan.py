"""The GAN model on its own: the two optimisation steps, losses, generation (no Hydra)."""

from __future__ import annotations

import warnings

import pytest
import torch
from genframe_plugins.gan.model import GAN, d_loss_fn, g_loss_fn

from genframe.errors import UserError
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


@pytest.mark.parametrize("kw", [dict(), dict(num_classes=0, spectral_norm=False, loss="hinge")])
def test_each_step_changes_only_its_own_network(kw):
    m = tiny(**kw).train()
    batch = m.example_batch(8)
    g0, d0 = _snapshot(m.generator), _snapshot(m.discriminator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.d_step(batch)
    assert not any(_changed(g0, m.generator)), "the D step changed a generator parameter"
    assert any(_changed(d0, m.discriminator)), "the D step changed no discriminator parameter"
    g1, d1 = _snapshot(m.generator), _snapshot(m.discriminator)
    m.g_step(batch)
    assert not any(_changed(d1, m.discriminator)), "the G step changed a discriminator parameter"
    assert any(_changed(g1, m.generator)), "the G step changed no generator parameter"
    # requires_grad is restored after each step
    assert all(p.requires_grad for p in m.parameters())


def test_steps_inside_a_lightning_loop_only_touch_their_own_network(tmp_path):
    """In a Trainer the steps use toggle_optimizer/manual_backward: same guarantee."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    m = tiny()
    batch = m.example_batch(8)
    record = {}
    d_step, g_step = m.d_step, m.g_step

    def spy_d(b):
        g0, d0 = _snapshot(m.generator), _snapshot(m.discriminator)
        out = d_step(b)
        record["d"] = (any(_changed(g0, m.generator)), any(_changed(d0, m.discriminator)))
        return out

    def spy_g(b):
        g0, d0 = _snapshot(m.generator), _snapshot(m.discriminator)
        out = g_step(b)
        record["g"] = (any(_changed(g0, m.generator)), any(_changed(d0, m.discriminator)))
        return out

    m.d_step, m.g_step = spy_d, spy_g
    trainer = pl.Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    loader = DataLoader([batch], batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(m, train_dataloaders=loader, val_dataloaders=loader)
    assert record["d"] == (False, True)
    assert record["g"] == (True, False)
    for key in ("train/loss", "train/d_loss", "train/g_loss", "train/d_acc_real",
                "train/d_acc_fake", "val/loss", "val/d_acc_real", "val/d_acc_fake", "val/diversity"):
        assert key in trainer.callback_metrics, key


@pytest.mark.parametrize("loss", ["bce", "hinge"])
def test_losses_are_finite(loss):
    m = tiny(loss=loss).train()
    batch = m.example_batch(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = m.d_step(batch)
        g = m.g_step(batch)
    assert torch.isfinite(d["d_loss"]) and torch.isfinite(g)
    assert 0 <= float(d["d_acc_real"]) <= 1 and 0 <= float(d["d_acc_fake"]) <= 1


def test_loss_values():
    zero = torch.zeros(4)
    assert torch.isclose(d_loss_fn("bce", zero, zero), torch.tensor(2 * 0.6931), atol=1e-3)
    assert torch.isclose(d_loss_fn("hinge", zero, zero), torch.tensor(2.0))
    assert torch.isclose(g_loss_fn("hinge", torch.ones(4)), torch.tensor(-1.0))
    # A perfect discriminator has ~0 hinge loss.
    assert float(d_loss_fn("hinge", torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0


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
    assert [c["label"] for c in m.generate(2, seed=0, condition={"label": [1, 9]}).conditions] == [1, 9]
    with pytest.raises(UserError, match=r"0\.\.9"):
        m.generate(2, seed=0, condition={"label": 10})
    with pytest.raises(UserError, match="2 labels for 3"):
        m.generate(3, seed=0, condition={"label": [1, 2]})
    with pytest.raises(UserError, match="unconditional"):
        tiny(num_classes=0).generate(2, seed=0, condition={"label": 1})
    assert m.needs == {"image", "label"} and tiny(num_classes=0).needs == {"image"}


@pytest.mark.parametrize("key, value", [
    ("loss", "wgan"), ("latent_dim", 0), ("g_channels", []), ("lr_d", 0.0),
    ("d_steps_per_g_step", 0), ("collapse_threshold", 1.5), ("sample_every_n_epochs", -1),
    ("d_backbone_weights", "/x.safetensors"),
])
def test_constructor_validation_names_the_key(key, value):
    with pytest.raises(UserError, match=f"model.{key}"):
        tiny(**{key: value})


def test_timm_backbone_discriminator(tmp_path):
    from safetensors.torch import save_file

    m = tiny(d_backbone="resnet10t")
    batch = m.example_batch(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = m.d_step(batch)
    assert torch.isfinite(d["d_loss"])
    # Local weights load into the trunk.
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
             for k, v in m.discriminator.trunk.state_dict().items()}
    save_file(state, str(tmp_path / "trunk.safetensors"))
    m2 = tiny(d_backbone="resnet10t", d_backbone_weights=str(tmp_path / "trunk.safetensors"))
    first = next(iter(m2.discriminator.trunk.state_dict().values()))
    assert torch.all(first == 0.5)
    with pytest.raises(UserError, match="d_backbone"):
        tiny(d_backbone="resnet_nope")


def test_mode_collapse_warning(tmp_path):
    """A generator that ignores its noise triggers the warning at validation epoch end."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    m = tiny(num_classes=0, sample_every_n_epochs=1)
    with torch.no_grad():
        m.generator.fc.weight.zero_()  # output no longer depends on z
    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(16, 1, 8, 8, generator=gen) * 2 - 1}
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="possible mode collapse"):
        trainer.validate(m, dataloaders=DataLoader([batch], batch_size=None), verbose=False)
    assert trainer.callback_metrics["val/diversity"] < 0.1
