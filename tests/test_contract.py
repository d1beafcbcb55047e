"""The plugin contract, run over every registered model (the same check plugin authors run)."""

from __future__ import annotations

import pytest

from genframe.testing import check_model_contract, registered_models


@pytest.mark.parametrize("name", registered_models())
def test_model_contract(name, tmp_path):
    check_model_contract(name, tmp_path=tmp_path)


def test_every_model_has_a_tiny_preset_and_a_config():
    from genframe.config import config_groups
    from genframe.plugins import get_registry

    registry = get_registry()
    choices = config_groups([d for _, d in registry.config_dirs])["model"]
    for name, reg in registry.models.items():
        assert reg.tiny, f"model '{name}' registers no tiny preset"
        assert name in choices, f"model '{name}' has no model/{name}.yaml"


def test_contract_catches_a_broken_model():
    """The check must fail for a model whose generate() leaves [0, 1]."""
    from genframe_plugins.vae.model import VAE

    class OutOfRange(VAE):
        def generate(self, num_samples, **kw):
            samples = super().generate(num_samples, **kw)
            samples.images = samples.images * 2 - 1
            return samples

    from genframe.plugins import get_registry

    tiny = get_registry().model("vae").tiny
    with pytest.raises(AssertionError, match=r"\[0, 1\]"):
        check_model_contract(OutOfRange, tiny=tiny)
