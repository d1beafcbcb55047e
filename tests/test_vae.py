"""The VAE model on its own: likelihood, objective, learning, generation (no Hydra)."""

from __future__ import annotations

import math

import pytest
import torch

from genframe.errors import UserError
from genframe.layers import ConvDecoder, ConvEncoder, downsampled_sizes
from genframe.samples import Samples
from genframe_plugins.vae.model import VAE, discretized_gaussian_log_prob, quantize

TINY = dict(image_size=8, num_levels=17, latent_dim=4, block_out_channels=[8, 16])


def digits(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits scaled to [-1, 1] (17 grey levels), and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(data.target, dtype=torch.long)
    return images[:n], labels[:n]


# -- shared layers ----------------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 7, 5, (6, 9), 1])
@pytest.mark.parametrize("widths", [[8], [8, 16], [8, 16, 16]])
def test_conv_trunks_round_trip_any_size(size, widths):
    h, w = (size, size) if isinstance(size, int) else size
    enc = ConvEncoder(3, widths, size)
    dec = ConvDecoder(5, widths, size)
    feats = enc(torch.randn(2, 3, h, w))
    assert feats.shape == (2, *enc.out_shape)
    assert dec.in_shape == enc.out_shape
    assert dec(feats).shape == (2, 5, h, w)


def test_downsampled_sizes_round_up():
    assert downsampled_sizes(7, 2) == [(7, 7), (4, 4), (2, 2)]
    assert downsampled_sizes((8, 5), 1) == [(8, 5), (4, 3)]


# -- the discretized Gaussian likelihood ------------------------------------------------


@pytest.mark.parametrize("num_levels", [2, 17, 256])
@pytest.mark.parametrize(
    "mean, log_scale",
    [(0.0, 0.0), (0.9, -3.0), (-1.5, -7.0), (0.3, 2.0), (5.0, -1.0), (0.01, -7.0)],
)
def test_discretized_gaussian_sums_to_one(num_levels, mean, log_scale):
    levels = torch.linspace(-1, 1, num_levels, dtype=torch.float64).float()  # every bin
    logp = discretized_gaussian_log_prob(
        levels, torch.tensor(mean), torch.tensor(log_scale), num_levels
    )
    assert torch.isfinite(logp).all()
    assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-5)


def test_discretized_gaussian_matches_density_for_narrow_bins():
    # A bin much narrower than the scale holds ~ density * bin width.
    x, mean, log_scale = torch.tensor(0.2 + 2 / 255), torch.tensor(0.1), torch.tensor(-1.0)
    logp = discretized_gaussian_log_prob(quantize(x, 256), mean, log_scale, 256)
    normal = torch.distributions.Normal(mean, log_scale.exp())
    expected = normal.log_prob(quantize(x, 256)) + math.log(2 / 255)
    assert logp.item() == pytest.approx(expected.item(), abs=1e-3)


def test_discretized_gaussian_gradients_finite_in_the_tails():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5])
    mean = torch.tensor([50.0, -50.0, -50.0, 0.5], requires_grad=True)
    log_scale = torch.full((4,), -7.0, requires_grad=True)
    logp = discretized_gaussian_log_prob(x, mean, log_scale, 17)
    logp.sum().backward()
    assert torch.isfinite(logp).all()
    assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


# -- objective ----------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["discretized_gaussian", "gaussian", "bernoulli"])
@pytest.mark.parametrize("num_classes", [0, 10])
def test_loss_is_finite_and_differentiable(likelihood, num_classes):
    torch.manual_seed(0)
    model = VAE(**TINY, likelihood=likelihood, num_classes=num_classes)
    batch = model.example_batch(6)
    terms = model(batch["image"], batch.get("label"))
    assert terms["recon"].shape == terms["kl"].shape == (6,)
    loss = (terms["recon"] + terms["kl"]).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_untrained_loss_is_near_uniform_guess():
    # At initialisation the decoder predicts N(0, 1) for every pixel, so the bound should
    # be in the same range as coding 64 pixels of 17 levels uniformly (64 ln 17 nats).
    torch.manual_seed(0)
    model = VAE(**TINY)
    images, _ = digits(128)
    with torch.no_grad():
        terms = model(images)
    nelbo = (terms["recon"] + terms["kl"]).mean().item()
    assert 0.5 * 64 * math.log(17) < nelbo < 2 * 64 * math.log(17)


@pytest.fixture
def one_thread():
    # Tiny convs gain nothing from intra-op threads, and on a busy machine with few cores
    # OpenMP spin-waiting can make them 10x slower; one thread keeps the test ~5 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_lowers_validation_negative_elbo(one_thread):
    torch.manual_seed(0)
    images, _ = digits()
    train, val = images[:1024], images[-256:]
    model = VAE(**TINY, lr=2e-3)
    opt = model.configure_optimizers()

    def val_nelbo() -> float:
        torch.manual_seed(1)  # same posterior noise for both evaluations
        with torch.no_grad():
            terms = model(val)
        return (terms["recon"] + terms["kl"]).mean().item()

    before = val_nelbo()
    order = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, len(train), (64,), generator=order)
        terms = model(train[idx])
        loss = (terms["recon"] + terms["kl"]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_nelbo()
    # Measured: about 169 -> 94 nats per image.
    assert after < 0.7 * before, (before, after)


def test_lightning_fit_logs_the_agreed_metrics(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from genframe.data.base import DictDataset

    images, labels = digits(64)
    loader = DataLoader(DictDataset({"image": images, "label": labels}), batch_size=32)
    model = VAE(**TINY, num_classes=10, kl_warmup_steps=10)
    trainer = pl.Trainer(
        max_steps=2, limit_val_batches=1, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader, loader)
    metrics = trainer.callback_metrics
    for key in ["train/loss", "train/recon", "train/kl", "val/loss", "val/recon", "val/kl",
                "val/bpd"]:
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert metrics["val/bpd"].item() == pytest.approx(
        metrics["val/loss"].item() / (64 * math.log(2)), rel=1e-5
    )


def test_kl_warmup_and_optimizer_follow_hparams():
    model = VAE(**TINY, kl_warmup_steps=4)
    assert model.kl_anneal() == pytest.approx(0.25)  # step 0 of 4
    assert VAE(**TINY).kl_anneal() == 1.0
    model.hparams.lr = 5e-5  # what a fine-tuning task does before fit
    assert model.configure_optimizers().param_groups[0]["lr"] == 5e-5


def test_rebuilds_from_hparams():
    model = VAE(**TINY, num_classes=3)
    clone = VAE(**model.hparams)
    clone.load_state_dict(model.state_dict())
    assert clone.hparams == model.hparams
    assert isinstance(model.hparams["block_out_channels"], list)


def test_needs_and_condition_keys():
    assert VAE(**TINY).needs == {"image"}
    assert VAE(**TINY).condition_keys == frozenset()
    assert VAE(**TINY, num_classes=10).needs == {"image", "label"}
    assert VAE(**TINY, num_classes=10).condition_keys == {"label"}


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"likelihood": "gausian"}, "model.likelihood"),
        ({"latent_dim": 0}, "model.latent_dim"),
        ({"block_out_channels": []}, "model.block_out_channels"),
        ({"num_levels": 1}, "model.num_levels"),
        ({"lr": 0.0}, "model.lr"),
    ],
)
def test_bad_values_are_user_errors(kwargs, key):
    with pytest.raises(UserError, match=key):
        VAE(**{**TINY, **kwargs})


def test_likelihood_error_lists_choices():
    with pytest.raises(UserError, match="discretized_gaussian") as err:
        VAE(**TINY, likelihood="gausian")
    assert "Did you mean 'gaussian'" in str(err.value)


# -- generation ---------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["discretized_gaussian", "gaussian", "bernoulli"])
@pytest.mark.parametrize("mean", [True, False])
def test_generate_shape_range_and_seed(likelihood, mean):
    from genframe.weights import instantiate_model

    # Built as genframe builds it, so the metadata names the registered model.
    model = instantiate_model("vae", {**TINY, "image_size": 7, "in_channels": 3,
                                      "likelihood": likelihood})
    samples = model.generate(5, seed=7, mean=mean, temperature=0.8)
    assert isinstance(samples, Samples)
    assert samples.images.shape == (5, 3, 7, 7)
    assert samples.images.min() >= 0 and samples.images.max() <= 1
    assert samples.metadata == {"model": "vae", "seed": 7, "temperature": 0.8, "mean": mean}
    assert samples.conditions == [{}] * 5
    again = model.generate(5, seed=7, mean=mean, temperature=0.8)
    assert torch.equal(samples.images, again.images)
    other = model.generate(5, seed=8, mean=mean, temperature=0.8)
    assert not torch.equal(samples.images, other.images)


def test_generate_without_seed_records_one():
    samples = VAE(**TINY).generate(2)
    assert isinstance(samples.metadata["seed"], int)


def test_generate_restores_training_mode():
    model = VAE(**TINY)
    model.train()
    model.generate(2, seed=0)
    assert model.training
    model.eval()
    model.generate(2, seed=0)
    assert not model.training


def test_conditional_generate():
    model = VAE(**TINY, num_classes=10)
    samples = model.generate(4, condition={"label": 3}, seed=0)
    assert samples.conditions == [{"label": 3}] * 4
    cycled = model.generate(12, seed=0)
    assert [c["label"] for c in cycled.conditions] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    listed = model.generate(3, condition={"label": [2, 0, 9]}, seed=0)
    assert listed.conditions == [{"label": 2}, {"label": 0}, {"label": 9}]
    # The label changes what is decoded from the same latents.
    assert not torch.equal(
        model.generate(2, condition={"label": 1}, seed=0).images,
        model.generate(2, condition={"label": 7}, seed=0).images,
    )


@pytest.mark.parametrize("label", [10, -1, "3", True, 2.0])
def test_conditional_generate_refuses_bad_labels(label):
    model = VAE(**TINY, num_classes=10)
    with pytest.raises(UserError, match=r"0\.\.9"):
        model.generate(2, condition={"label": label}, seed=0)


def test_generate_refuses_unknown_options_and_conditions():
    with pytest.raises(UserError, match="temperature"):
        VAE(**TINY).generate(2, temprature=0.5)
    with pytest.raises(UserError, match="unconditional"):
        VAE(**TINY).generate(2, condition={"label": 1})
    with pytest.raises(UserError, match="label"):
        VAE(**TINY, num_classes=10).generate(2, condition={"caption": "a 3"})
    with pytest.raises(UserError, match="temperature"):
        VAE(**TINY).generate(2, temperature=-1.0)


def test_example_batch_is_on_the_data_grid():
    model = VAE(**TINY, num_classes=10)
    batch = model.example_batch(8)
    assert batch["image"].shape == (8, 1, 8, 8)
    assert torch.equal(quantize(batch["image"], 17), batch["image"])
    assert batch["label"].dtype == torch.long and batch["label"].max() < 10
