"""The main job really learns (slow: `pytest -m slow`)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_default_vae_learns_digits(compose_task):
    from genframe.tasks.train import train

    untrained = train(compose_task("train", "trainer.max_epochs=0", "num_samples=0",
                                   "trainer.enable_progress_bar=false"))
    trained = train(compose_task("train", "trainer.max_epochs=30", "num_samples=16",
                                 "trainer.enable_progress_bar=false"))
    before, after = untrained["metrics"]["val/loss"], trained["metrics"]["val/loss"]
    # Untrained ~175 nats per image; 30 epochs reach ~90 (100 epochs: ~84).
    assert after < 0.6 * before, (before, after)
