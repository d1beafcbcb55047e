"""The diffusion model on its own: network, objective, EMA, guidance, generation (no Hydra)."""

from __future__ import annotations

import warnings

import pytest
import torch
from genframe_plugins.diffusion.model import Diffusion
from genframe_plugins.diffusion.unet import UNet

from genframe.errors import UserError
from genframe.layers import SelfAttention2d, timestep_embedding
from genframe.samplers.ddim import DDIMSampler
from genframe.samplers.ddpm import DDPMSampler
from genframe.spec import ModelSpec
from genframe.tasks.build import build_sampler
from genframe.samples import Samples

TINY = dict(
    image_size=8, num_classes=10, block_out_channels=[8, 16], blocks_per_level=1,
    attention_resolutions=[4], num_heads=2, timesteps=50, default_sampler_steps=5,
)


def tiny(**overrides) -> Diffusion:
    torch.manual_seed(0)
    return Diffusion(**{**TINY, **overrides})


def digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n of scikit-learn's bundled 8x8 digits in [-1, 1], and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.tensor(data.target[:n], dtype=torch.long)


def train_steps(m: Diffusion, batch: dict, steps: int) -> list[float]:
    """Optimizer steps with an EMA update after each, as the Lightning loop does."""
    opt = m.configure_optimizers()
    m.train()
    losses = []
    with warnings.catch_warnings():  # self.log() outside a Trainer only warns
        warnings.simplefilter("ignore")
        for step in range(1, steps + 1):
            loss = m.training_step(batch, 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            m.update_ema(step)
            losses.append(float(loss))
    return losses


@pytest.fixture(autouse=True)
def one_thread():
    # Two cores shared with other work: OpenMP spin-waiting makes small ops much slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- shared layers ------------------------------------------------------------------


def test_timestep_embedding_shapes_and_values():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 16)
    assert emb.shape == (3, 16)
    assert torch.allclose(emb[0, :8], torch.ones(8)) and torch.allclose(emb[0, 8:], torch.zeros(8))
    assert timestep_embedding(t, 7).shape == (3, 7)  # odd widths are padded
    assert not torch.allclose(emb[1], emb[2])


def test_self_attention_starts_as_identity_and_mixes_positions():
    attn = SelfAttention2d(8, num_heads=2)
    x = torch.randn(2, 8, 3, 5)
    assert torch.equal(attn(x), x)  # zero-initialised projection
    torch.nn.init.normal_(attn.proj.weight)
    y = attn(x)
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0  # one position changes: every position's output changes
    assert (attn(x2) - y)[:, :, 2, 4].abs().sum() > 0
    with pytest.raises(ValueError, match="divide"):
        SelfAttention2d(6, num_heads=4)


@pytest.mark.parametrize("size, channels, attention", [
    (8, [8, 16], [4]), (7, [8, 16, 16], [4, 2]), ((9, 6), [8, 16], [9]), (5, [8], []),
])
def test_unet_any_image_size(size, channels, attention):
    h, w = (size, size) if isinstance(size, int) else size
    net = UNet(3, size, channels, blocks_per_level=2, attention_resolutions=attention,
               num_heads=2, num_classes=4)
    assert sum(isinstance(m, SelfAttention2d) for m in net.modules()) >= 1  # the middle block
    out = net(torch.randn(2, 3, h, w), torch.tensor([0, 7]), torch.tensor([1, 4]))
    assert out.shape == (2, 3, h, w)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised head


def test_bad_architecture_is_a_user_error():
    with pytest.raises(UserError, match=r"attention_resolutions: \[3\] match no U-Net level.*\[8, 4\]"):
        tiny(attention_resolutions=[3])
    with pytest.raises(UserError, match="num_heads=3 must divide"):
        tiny(num_heads=3)
    with pytest.raises(UserError, match="default_sampler_steps"):
        tiny(default_sampler_steps=51)
    with pytest.raises(UserError, match="label_dropout"):
        tiny(guidance=3.0, label_dropout=0.0)


# -- the objective ----------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_loss_is_finite_and_drops_on_a_fixed_digit_batch(prediction):
    images, labels = digits(32)
    batch = {"image": images, "label": labels}
    m = tiny(prediction=prediction, lr=3e-3, ema_decay=0.0)

    def gen():  # the same draw of t and noise each time
        return torch.Generator().manual_seed(0)

    with torch.no_grad():
        before = float(m.diffusion_loss(m.unet, images, labels, generator=gen()))
    losses = train_steps(m, batch, 60)
    with torch.no_grad():
        after = float(m.diffusion_loss(m.unet, images, labels, generator=gen()))
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert after < 0.7 * before, (before, after)


def test_validation_loss_uses_a_fixed_draw_and_the_ema():
    images, labels = digits(16)
    batch = {"image": images, "label": labels}
    m = tiny()
    train_steps(m, batch, 5)
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = (float(m.validation_step(batch, 3)) for _ in range(2))
        c = float(m.validation_step(batch, 4))
    assert a == b and a != c  # the draw depends on the batch index only
    gen = torch.Generator().manual_seed(10_003)
    assert a == pytest.approx(float(m.diffusion_loss(m.ema_unet, images, labels, generator=gen)))


def test_label_dropout_feeds_the_null_label():
    m = tiny(label_dropout=0.5)
    seen = []
    m.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[2].clone()))
    images, labels = digits(64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m.training_step({"image": images, "label": labels}, 0)
    fed = seen[0]
    dropped = fed == m.null_label
    assert 10 < int(dropped.sum()) < 54
    assert torch.equal(fed[~dropped], labels[~dropped])


def test_conditional_model_needs_labels_unconditional_does_not():
    assert tiny().needs == {"image", "label"} and tiny().condition_keys == {"label"}
    m = tiny(num_classes=0)
    assert m.needs == {"image"} and not m.condition_keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(m.training_step(m.example_batch(4), 0))


# -- EMA ----------------------------------------------------------------------------


def test_ema_warms_up_and_starts_late():
    m = tiny(ema_decay=0.999, ema_start_step=10)
    assert m.ema_decay_at(0) == 0.0 and m.ema_decay_at(10) == 0.0
    assert m.ema_decay_at(11) == pytest.approx(2 / 11)
    assert m.ema_decay_at(100_000) == 0.999
    assert tiny(ema_decay=0.0).ema_unet is None


def test_ema_is_kept_apart_and_used_for_sampling():
    m = tiny(ema_decay=0.99)
    train_steps(m, m.example_batch(8), 20)
    online = dict(m.unet.named_parameters())
    ema = dict(m.ema_unet.named_parameters())
    assert not all(torch.equal(online[k], ema[k]) for k in online)
    assert not any(p.requires_grad for p in m.ema_unet.parameters())
    opt_params = {id(p) for g in m.configure_optimizers().param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in m.unet.parameters()}
    assert any(k.startswith("ema_unet.") for k in m.state_dict())

    # Sampling uses the EMA: a model without EMA that holds the EMA weights samples the same.
    plain = tiny(ema_decay=0.0)
    plain.unet.load_state_dict(m.ema_unet.state_dict())
    a = m.generate(4, seed=3)
    assert torch.allclose(a.images, plain.generate(4, seed=3).images, atol=1e-6)
    plain.unet.load_state_dict(m.unet.state_dict())
    assert not torch.allclose(a.images, plain.generate(4, seed=3).images, atol=1e-4)


def test_ema_follows_the_lightning_loop(tmp_path):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    m = tiny(ema_decay=0.9)
    init = {k: v.clone() for k, v in m.ema_unet.state_dict().items()}
    steps = []
    update = m.update_ema
    m.update_ema = lambda step=None: (steps.append(step), update(step))
    batch = m.example_batch(4)
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         accumulate_grad_batches=2, default_root_dir=str(tmp_path))
    trainer.fit(m, train_dataloaders=DataLoader([batch] * 8, batch_size=None))
    assert trainer.global_step == 3
    assert steps == [1, 2, 3]  # once per optimizer step (not per batch), counted as done
    assert any(not torch.equal(init[k], v) for k, v in m.ema_unet.state_dict().items())


# -- generation ---------------------------------------------------------------------


def test_generate_shape_range_conditions_and_metadata():
    m = tiny()
    s = m.generate(12, seed=5)
    assert isinstance(s, Samples) and s.images.shape == (12, 1, 8, 8)
    assert float(s.images.min()) >= 0 and float(s.images.max()) <= 1
    assert [c["label"] for c in s.conditions] == [i % 10 for i in range(12)]
    assert s.metadata["seed"] == 5 and s.metadata["guidance"] == 1.0
    assert s.metadata["sampler"] == {"name": "ddim", "steps": 5, "eta": 0.0}
    s = m.generate(3, condition={"label": 7}, seed=5, guidance=2.0, sampler=build_sampler({"name": "ddpm"}))
    assert [c["label"] for c in s.conditions] == [7, 7, 7]
    assert s.metadata["sampler"] == {"name": "ddpm"} and s.metadata["guidance"] == 2.0
    u = tiny(num_classes=0, in_channels=3, image_size=7, attention_resolutions=[])
    s = u.generate(2, seed=1)
    assert s.images.shape == (2, 3, 7, 7) and s.conditions == [{}, {}]
    assert s.metadata["guidance"] is None


def test_same_seed_same_images_any_sampler():
    m = tiny()
    train_steps(m, m.example_batch(8), 3)
    for sampler in (None, DDIMSampler(steps=10, eta=1.0), DDPMSampler(), DDIMSampler(steps=4)):
        a = m.generate(3, seed=11, sampler=sampler, guidance=2.0).images
        b = m.generate(3, seed=11, sampler=sampler, guidance=2.0).images
        assert torch.equal(a, b), sampler
    assert not torch.equal(m.generate(3, seed=11).images, m.generate(3, seed=12).images)


def test_guidance_mixes_conditional_and_unconditional_predictions():
    m = tiny()
    train_steps(m, m.example_batch(8), 5)
    m.eval()
    labels = torch.tensor([1, 2])
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 40])
    net = m.sampling_net
    with torch.no_grad():
        cond = net(x, t, labels)
        uncond = net(x, t, torch.full_like(labels, m.null_label))
        assert torch.allclose(m.denoiser(labels, 1.0)(x, t), cond)
        assert torch.allclose(m.denoiser(labels, 0.0)(x, t), uncond)
        assert torch.allclose(m.denoiser(labels, 3.0)(x, t), uncond + 3 * (cond - uncond), atol=1e-5)
    g1 = m.generate(2, seed=0, guidance=1.0).images
    assert not torch.allclose(g1, m.generate(2, seed=0, guidance=4.0).images)


@pytest.mark.parametrize("guidance", [-0.5, 50.5, "3", True, float("nan")])
def test_guidance_out_of_range_is_a_user_error(guidance):
    # Out of range: the model's message; not a number: the type check of sample()'s options.
    with pytest.raises(UserError, match="guidance must be a number between 0 and 50|"
                                        r"sampling.guidance: expected a number or null"):
        tiny().generate(2, seed=0, guidance=guidance)


def test_guidance_needs_a_conditional_model_trained_with_label_dropout():
    with pytest.raises(UserError, match="unconditional"):
        tiny(num_classes=0).generate(2, seed=0, guidance=2.0)
    with pytest.raises(UserError, match="label_dropout=0"):
        tiny(label_dropout=0.0).generate(2, seed=0, guidance=2.0)
    tiny(label_dropout=0.0).generate(2, seed=0, guidance=1.0)  # plain conditional is fine


@pytest.mark.parametrize("label", [10, -1, 2.0, "3", [1, 2, 3]])
def test_label_outside_the_trained_classes_is_a_user_error(label):
    with pytest.raises(UserError, match=r"condition.label.*(0\.\.9|2 samples)"):
        tiny().generate(2, condition={"label": label}, seed=0)


def test_condition_on_an_unconditional_model_is_a_user_error():
    with pytest.raises(UserError, match="unconditional"):
        tiny(num_classes=0).generate(2, condition={"label": 3}, seed=0)
    with pytest.raises(UserError, match="unknown key"):
        tiny().generate(2, condition={"caption": "a seven"}, seed=0)


def test_bad_sampler_choices_are_user_errors():
    m = tiny()
    with pytest.raises(UserError, match="no sampler named 'dim'.*'ddim'"):
        build_sampler({"name": "dim"})
    with pytest.raises(UserError, match="sampler.step: unknown key.*steps"):
        build_sampler({"name": "ddim", "step": 10})
    # The model takes a built sampler, never a config to look up (the tasks build it).
    with pytest.raises(UserError, match="expected a genframe.samplers.Sampler.*sampler=ddim"):
        m.generate(2, sampler={"name": "ddim", "steps": 10})
    with pytest.raises(UserError, match="sampler.steps must be between 1 and 50"):
        m.generate(2, sampler=build_sampler({"name": "ddim", "steps": 51}))
    with pytest.raises(UserError, match=r"sampler.eta must be in \[0, 1\]"):
        m.generate(2, sampler=build_sampler({"name": "ddim", "eta": 2.0}))
    with pytest.raises(UserError, match="sampler=ddim sampler.steps=10"):
        m.generate(2, steps=10)
    with pytest.raises(UserError, match="sampling.temperature: not an option"):
        m.generate(2, temperature=0.5)


def test_ddim_with_all_steps_and_eta1_matches_ddpm_on_the_model():
    m = tiny()
    train_steps(m, m.example_batch(8), 3)
    a = m.generate(3, seed=2, sampler=build_sampler("ddpm"), guidance=2.0).images
    b = m.generate(3, seed=2, sampler=build_sampler({"name": "ddim", "steps": 50, "eta": 1.0}), guidance=2.0).images
    assert torch.allclose(a, b, atol=1e-4)
    assert DDPMSampler().num_model_calls(m.schedule) == 50


def test_safetensors_round_trip_keeps_the_ema(tmp_path):
    from genframe.weights import build_from_spec, read_weights, save_weights

    m = tiny(ema_decay=0.9)
    m.model_spec = ModelSpec(name="diffusion", kwargs=dict(TINY, ema_decay=0.9))
    train_steps(m, m.example_batch(8), 5)
    path = save_weights(m, tmp_path / "model.safetensors")
    spec, state = read_weights(path)
    assert any(k.startswith("ema_unet.") for k in state)
    rebuilt = build_from_spec(spec, state).eval()
    for k, v in m.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k]), k
    a = m.generate(4, seed=9, guidance=2.0).images
    assert torch.equal(a, rebuilt.generate(4, seed=9, guidance=2.0).images)


def test_yaml_config_builds_the_model(compose_task):
    """Every key of model/diffusion.yaml is a checked constructor argument."""
    from genframe.tasks.build import build_model

    cfg = compose_task("train", "model=diffusion", "model.block_out_channels=[8,16]")
    m = build_model(cfg.model)
    assert isinstance(m, Diffusion)
    assert m.num_classes == cfg.data.num_classes == 10
    assert m.hparams.block_out_channels == [8, 16]


@pytest.mark.slow
def test_default_diffusion_draws_the_requested_digits(compose_task):
    """The issue's bar: DDIM-50 samples a digit classifier labels as requested >= 90%.

    Measured (2 cores): 50 epochs (~4.5 min) give 94% at guidance 1 and 99.5% at 1.5;
    30 epochs here keep the test near 3 minutes.
    """
    import numpy as np
    from sklearn.svm import SVC

    from genframe.tasks.train import train

    torch.set_num_threads(2)
    out = train(compose_task("train", "model=diffusion", "trainer.max_epochs=30", "num_samples=0",
                             "trainer.enable_progress_bar=false"))
    model = out["model"].eval()
    images, labels = digits(1797)
    svc = SVC(gamma=0.001, C=10).fit(((images.flatten(1) + 1) * 8).numpy(), labels.numpy())
    requested = [k for k in range(10) for _ in range(20)]
    for guidance, bar in ((1.0, 0.85), (2.0, 0.9)):
        s = model.generate(len(requested), condition={"label": requested}, seed=0,
                           sampler=build_sampler({"name": "ddim", "steps": 50}), guidance=guidance)
        predicted = svc.predict((s.images.flatten(1) * 16).numpy())
        accuracy = float((predicted == np.array(requested)).mean())
        assert accuracy >= bar, (guidance, accuracy)


@pytest.mark.parametrize("name", ["diffusion", "text2image"])
def test_finetuning_starts_from_the_ema_weights(name):
    """The trained model samples with its EMA: fine-tuning continues from those weights."""
    from genframe.testing import build_tiny

    model = build_tiny(name)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # the online weights now differ from the EMA copies
    pairs = model.ema_pairs()
    assert pairs and any(not torch.equal(a, b) for o, e in pairs
                         for a, b in zip(o.parameters(), e.parameters()))
    assert "EMA" in model.on_finetune_start()
    for online, ema in pairs:
        for a, b in zip(online.state_dict().values(), ema.state_dict().values()):
            assert torch.equal(a, b)
