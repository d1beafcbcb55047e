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


@pytest.mark.slow
def test_char_transformer_beats_the_unigram_baseline(compose_task):
    from genframe.data.text import TextDataModule
    from genframe.tasks.train import train

    data = TextDataModule(source="pydoc", tokenizer="char", block_size=64, batch_size=12)
    data.setup("fit")
    result = train(compose_task("train", "experiment=pydoc_char_lm", "trainer.max_steps=400",
                                "trainer.val_check_interval=200", "num_samples=0",
                                "trainer.enable_progress_bar=false"))
    loss = result["metrics"]["val/loss"]
    # Untrained ~4.64 nats per character (ln 104), unigram 3.30; 2000 steps reach 1.57.
    assert loss < 0.75 * data.unigram_loss, (loss, data.unigram_loss)
