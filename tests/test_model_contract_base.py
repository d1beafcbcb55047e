"""The base class's shared work: `generate()` over a model's `sample()`, the default
optimiser, learning-rate keys for `finetune.lr`, renamed arguments, the plugin API."""

from __future__ import annotations

import warnings

import pytest
import torch

from genframe import GenerativeModule, Samples, plugins
from genframe.errors import GenframeDeprecationWarning, UserError
from genframe.hookspecs import PLUGIN_API_VERSION, hookimpl
from genframe.spec import ModelSpec


class Dots(GenerativeModule):
    """A minimal image model: one learned mean image plus noise."""

    def __init__(self, image_size: int = 4, lr: float = 0.1, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.mean = torch.nn.Parameter(torch.zeros(1, 1, image_size, image_size))
        self.seen_training: list[bool] = []

    def training_step(self, batch, batch_idx):
        loss = ((batch["image"] - self.mean) ** 2).mean()
        self.log("train/loss", loss)
        return loss

    def sample(self, num_samples, *, condition, generator, scale: float = 0.1):
        self.seen_training.append(self.training)
        assert not torch.is_grad_enabled()
        noise = torch.randn(num_samples, 1, self.hparams.image_size, self.hparams.image_size,
                            generator=generator)
        images = ((self.mean + scale * noise).clamp(-1, 1) + 1) / 2
        return Samples(images=images, metadata={"scale": scale, "model": "not-this"})


def test_generate_does_the_shared_work():
    m = Dots()
    m.train()
    a = m.generate(3, seed=5, scale=0.5)
    assert m.training and m.seen_training == [False]  # eval inside, training mode restored
    assert a.metadata == {"scale": 0.5, "model": "Dots", "seed": 5}  # genframe's name wins
    assert torch.equal(a.images, m.generate(3, seed=5, scale=0.5).images)
    assert not torch.equal(a.images, m.generate(3, seed=6, scale=0.5).images)
    assert isinstance(m.generate(1).metadata["seed"], int)  # a drawn seed is recorded


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_generate_refuses_a_bad_count(bad):
    with pytest.raises(UserError, match="num_samples must be a positive integer"):
        Dots().generate(bad)


def test_generate_refuses_unknown_options_and_conditions():
    with pytest.raises(UserError, match=r"sampling.scal: not an option.*Did you mean 'scale'"):
        Dots().generate(2, scal=0.3)
    with pytest.raises(UserError, match="unconditional"):
        Dots().generate(2, condition={"label": 1})
    assert Dots().sampling_options() == ["scale"]
    with pytest.raises(UserError, match=r"sampling.scale: expected a number, got 'big'"):
        Dots().generate(2, scale="big")


def test_a_sample_with_a_catch_all_gets_the_other_options():
    class Open(Dots):
        def sample(self, num_samples, *, condition, generator, scale: float = 0.1, **extra):
            samples = super().sample(num_samples, condition=condition, generator=generator,
                                     scale=scale)
            samples.metadata["extra"] = extra
            return samples

    assert Open().generate(1, seed=0, style="x").metadata["extra"] == {"style": "x"}
    with pytest.raises(UserError, match="sampling.scale: expected a number"):
        Open().generate(1, scale=[1])


def test_the_registered_name_is_recorded_for_an_alias():
    class Plugin:
        @staticmethod
        @hookimpl
        def genframe_register_models(register):
            register("dots_alias", Dots)

    plugins.add_plugin("dots", Plugin)
    try:
        from genframe.weights import instantiate_model

        m = instantiate_model("dots_alias", {"image_size": 4})
        assert m.generate(2, seed=0).metadata["model"] == "dots_alias"
    finally:
        plugins.remove_plugin("dots")


def test_a_plugin_that_overrides_generate_still_works_with_a_warning():
    with pytest.warns(GenframeDeprecationWarning, match="implement sample"):
        class OldStyle(Dots):
            def generate(self, num_samples, *, condition=None, seed=None, **sampling):
                gen, seed = self.make_generator(seed)
                images = torch.rand(num_samples, 1, 4, 4, generator=gen)
                return Samples(images=images, metadata={"seed": seed, "model": "oldstyle"})

    m = OldStyle()
    m.model_spec = ModelSpec("old_alias")
    s = m.generate(2, seed=1)
    assert s.images.shape == (2, 1, 4, 4) and s.metadata == {"seed": 1, "model": "old_alias"}


def test_default_optimiser_is_adamw_from_lr_and_weight_decay():
    opt = Dots(lr=0.02, weight_decay=0.3).configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 0.02 and opt.defaults["weight_decay"] == 0.3

    class NoLr(GenerativeModule):
        def __init__(self, width: int = 2) -> None:
            super().__init__()
            self.save_hyperparameters()

    with pytest.raises(NotImplementedError, match="no `lr` constructor argument"):
        NoLr().configure_optimizers()


def test_default_optimiser_skips_frozen_parameters():
    m = Dots()
    extra = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    m.register_parameter("frozen", extra)
    params = m.configure_optimizers().param_groups[0]["params"]
    assert any(p is m.mean for p in params) and not any(p is extra for p in params)


def test_finetune_lr_sets_every_learning_rate_and_refuses_a_model_without_one():
    from genframe.tasks.finetune import learning_rate_changes
    from genframe.weights import instantiate_model

    gan = instantiate_model("gan", {"image_size": 8, "latent_dim": 4, "g_channels": [8, 16],
                                    "d_channels": [8, 16]})
    assert learning_rate_changes(gan, 1e-5) == {"lr_g": 1e-5, "lr_d": 1e-5}
    vae = instantiate_model("vae", {"image_size": 8, "block_out_channels": [8, 16]})
    assert learning_rate_changes(vae, 0.5) == {"lr": 0.5}
    with pytest.raises(UserError, match="finetune.lr must be a positive number"):
        learning_rate_changes(vae, -1.0)

    class NoLr(Dots):
        learning_rate_keys = ("step_size",)

    nolr = NoLr()
    nolr.model_spec = ModelSpec("nolr", {"image_size": 4})  # as genframe's builder sets it
    with pytest.raises(UserError, match="finetune.lr: model 'nolr' has no learning-rate argument"):
        learning_rate_changes(nolr, 0.1)


def test_an_old_argument_name_is_migrated_from_saved_runs_and_refused_on_the_command_line():
    from genframe.weights import instantiate_model

    m = instantiate_model("vae", {"image_size": 8, "channels": [8, 16]}, migrate=True)
    assert m.hparams.block_out_channels == [8, 16]
    assert m.model_spec.kwargs["block_out_channels"] == [8, 16] and "channels" not in m.model_spec.kwargs
    with pytest.raises(UserError, match="model.channels: renamed to block_out_channels"):
        instantiate_model("vae", {"image_size": 8, "channels": [8, 16]})


def test_plugins_report_a_plugin_api_mismatch(capsys):
    class Current:
        GENFRAME_PLUGIN_API = PLUGIN_API_VERSION

    class Future:
        GENFRAME_PLUGIN_API = PLUGIN_API_VERSION + 1

    class Silent:
        pass

    for name, obj in (("current", Current), ("future", Future), ("silent", Silent)):
        plugins.add_plugin(name, obj)
    try:
        info = plugins.get_registry().plugins
        assert info["current"].api_problem is None
        assert f"written for plugin API {PLUGIN_API_VERSION + 1}" in info["future"].api_problem
        assert "declares no plugin API version" in info["silent"].api_problem
        assert all(info[n].api_problem is None for n in ("vae", "diffusion", "gan", "transformer"))
        from genframe.plugins_report import plugins_as_dicts, print_plugins

        rows = {r["plugin"]: r for r in plugins_as_dicts()}
        assert rows["future"]["plugin_api"] == PLUGIN_API_VERSION + 1 and rows["future"]["problem"]
        print_plugins()
        out = capsys.readouterr().out
        assert "plugin 'future' written for plugin API" in out
        assert "plugin 'current'" not in out.split("genframe plugins")[-1].split("warning")[-1]
    finally:
        for name in ("current", "future", "silent"):
            plugins.remove_plugin(name)


def test_contract_check_catches_a_model_that_records_nothing(tmp_path):
    """`genframe.testing` fails a model whose training step does not train."""
    from genframe.testing import check_model_contract

    class Frozen(Dots):
        def training_step(self, batch, batch_idx):
            loss = (self.mean * 0).sum() + 1.0
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", torch.tensor(1.0))

        def example_batch(self, batch_size=4):
            return {"image": torch.zeros(batch_size, 1, 4, 4)}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AssertionError, match="changed no parameter"):
            check_model_contract(Frozen, tiny={"image_size": 4}, tmp_path=tmp_path)


def test_plugins_report_a_model_yaml_whose_name_does_not_match(tmp_path, capsys):
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "dots.yaml").write_text("name: dotz\nimage_size: 4\n")
    (conf / "other.yaml").write_text("name: other\n")

    class Plugin:
        GENFRAME_PLUGIN_API = "1"

        @staticmethod
        @hookimpl
        def genframe_register_models(register):
            register("dots", Dots)

        @staticmethod
        @hookimpl
        def genframe_register_configs(register):
            register(tmp_path / "conf")

    plugins.add_plugin("dotsplugin", Plugin)
    try:
        from genframe.plugins_report import config_problems, print_plugins

        problems = config_problems("dotsplugin")
        assert any("dots.yaml: name: 'dotz' differs from the file name 'dots'" in p for p in problems)
        assert any("other.yaml: name: 'other' is no registered model" in p for p in problems)
        assert config_problems("vae") == []
        assert "expected the integer" in plugins.get_registry().plugins["dotsplugin"].api_problem
        print_plugins()
        assert "differs from the file name" in capsys.readouterr().out
    finally:
        plugins.remove_plugin("dotsplugin")
