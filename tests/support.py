"""Small models used by tests."""

from __future__ import annotations

from typing import Any

from genframe_plugins.vae.model import VAE


class TokensModel(VAE):
    """A VAE that (wrongly for image data) declares it needs token batches."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.needs = frozenset({"tokens"})


class NaNAfterFirstEpoch(VAE):
    """A VAE whose loss turns NaN from the second epoch on."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.current_epoch >= 1 else loss


def serving(app):
    """`genframe.serving.app.running` on a free loopback port (for the tests)."""
    from genframe.serving.app import running

    return running(app)
