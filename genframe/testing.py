"""The plugin contract test, for genframe's own suite and for plugin authors.

In a plugin's test suite::

    from genframe.testing import check_model_contract

    def test_contract(tmp_path):
        check_model_contract("mymodel", tmp_path=tmp_path)   # by registered name

or, before the plugin is installed, ``check_model_contract(MyModel, tiny={...})``.

The check builds the model from its tiny preset on CPU and verifies, every training step
inside a real Lightning Trainer (so automatic and manual optimisation are checked the
same way): one training step gives a finite loss and changes the weights; a fast_dev_run
logs ``train/loss`` and ``val/loss``; `generate()` returns `Samples` of the right shape
and range, with the registered name and the seed in the metadata; the same seed gives
the same samples; a safetensors file and a Lightning checkpoint each rebuild a model that
generates the same samples.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from genframe.samples import Samples


def registered_models() -> list[str]:
    """Names of every registered model (for ``pytest.mark.parametrize``)."""
    from genframe.plugins import get_registry

    return sorted(get_registry().models)


def build_tiny(model: str | type, tiny: dict[str, Any] | None = None):
    """Instantiate a registered model (by name) or a class from its tiny preset."""
    from genframe.plugins import get_registry
    from genframe.spec import ModelSpec
    from genframe.weights import instantiate_model

    if isinstance(model, str):
        reg = get_registry().model(model)
        kwargs = dict(tiny if tiny is not None else (reg.tiny or {}))
        return instantiate_model(model, kwargs)
    kwargs = dict(tiny or {})
    m = model(**kwargs)
    m.model_spec = ModelSpec(name=getattr(model, "__name__", "model"), kwargs=kwargs)
    return m


def _rebuild(m, spec, state: dict[str, torch.Tensor]):
    """Rebuild from a spec as genframe does; an unregistered class is rebuilt directly."""
    from genframe.plugins import get_registry
    from genframe.weights import build_from_spec

    if spec.name in get_registry().models:
        return build_from_spec(spec, state)
    rebuilt = type(m)(**spec.kwargs)
    rebuilt.model_spec = spec
    rebuilt.load_state_dict(state)
    return rebuilt


def check_model_contract(model: str | type, *, tiny: dict[str, Any] | None = None,
                         tmp_path: Path | None = None, batch_size: int = 4,
                         num_samples: int = 3) -> None:
    """Run the whole contract on one model; raises AssertionError on the first failure."""
    torch.manual_seed(0)
    m = build_tiny(model, tiny)
    name = m.model_spec.name
    batch = m.example_batch(batch_size)
    assert isinstance(batch, dict), f"{name}: example_batch must return a dict"
    assert set(m.needs) <= set(batch), f"{name}: example_batch lacks needed keys {set(m.needs) - set(batch)}"

    _check_training_step(m, batch, name)
    fresh = build_tiny(model, tiny)  # its own example batch: it may set up a tokenizer
    _check_lightning_loop(fresh, fresh.example_batch(batch_size), name, tmp_path)
    samples = _check_generate(m, name, num_samples)
    _check_round_trip(m, samples, name, tmp_path, num_samples)


def _trainer(root, **kwargs):
    import pytorch_lightning as pl

    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(root), **kwargs)


def _check_training_step(m, batch, name: str) -> None:
    """One optimizer step through a Trainer changes the weights with a finite loss."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    losses: list[torch.Tensor] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is not None:
                losses.append(loss)

    before = [p.detach().clone() for p in m.parameters() if p.requires_grad]
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(tmp, max_steps=1, limit_val_batches=0, num_sanity_val_steps=0,
                           callbacks=[Record()])
        trainer.fit(m, train_dataloaders=DataLoader([batch], batch_size=None))
    if m.automatic_optimization:
        assert losses, f"{name}: training_step returned no loss"
    for loss in losses:
        assert torch.is_tensor(loss) and loss.dim() == 0, f"{name}: loss must be a scalar tensor"
        value = float(loss.detach())
        assert math.isfinite(value), f"{name}: loss is not finite ({value})"
    after = [p.detach() for p in m.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), (
        f"{name}: one training step changed no parameter"
    )
    assert all(torch.isfinite(p).all() for p in after), f"{name}: a training step made weights non-finite"


def _check_lightning_loop(m, batch, name: str, tmp_path: Path | None) -> None:
    from torch.utils.data import DataLoader

    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(tmp_path or tmp, fast_dev_run=1)

        # batch_size=None: the loader yields the ready-made batch as it is.
        loader = DataLoader([batch], batch_size=None)
        trainer.fit(m, train_dataloaders=loader, val_dataloaders=loader)
    for key in ("train/loss",):
        assert key in trainer.callback_metrics, f"{name}: training_step must log '{key}'"
    assert "val/loss" in trainer.callback_metrics, f"{name}: validation_step must log 'val/loss'"


def _check_generate(m, name: str, n: int) -> Samples:
    m.eval()
    samples = m.generate(n, seed=123)
    assert isinstance(samples, Samples), f"{name}: generate() must return genframe.Samples"
    assert len(samples) == n, f"{name}: asked for {n} samples, got {len(samples)}"
    if samples.kind == "image":
        x = samples.images
        assert x.dim() == 4 and x.shape[0] == n, f"{name}: images must be N×C×H×W, got {tuple(x.shape)}"
        assert x.dtype.is_floating_point, f"{name}: images must be float"
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0, f"{name}: images must lie in [0, 1]"
    else:
        assert all(isinstance(t, str) for t in samples.texts), f"{name}: texts must be strings"
    assert samples.metadata.get("model") == m.registered_name, (
        f"{name}: metadata['model'] must be the registered name {m.registered_name!r}, "
        f"got {samples.metadata.get('model')!r}")
    assert samples.metadata.get("seed") == 123, f"{name}: metadata['seed'] must be the seed given"
    again = m.generate(n, seed=123)
    assert _same(samples, again), f"{name}: the same seed gave different samples"
    return samples


def _check_round_trip(m, samples: Samples, name: str, tmp_path: Path | None, n: int) -> None:
    import pytorch_lightning as pl

    from genframe.weights import read_weights, save_weights

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp_path or tmp)
        path = save_weights(m, root / "model.safetensors")
        rebuilt = _rebuild(m, *read_weights(path)).eval()
        assert _same(samples, rebuilt.generate(n, seed=123)), (
            f"{name}: a model rebuilt from safetensors generates different samples"
        )
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, max_epochs=0,
                             default_root_dir=str(root))
        trainer.strategy.connect(m)
        trainer.save_checkpoint(root / "model.ckpt")
        rebuilt = _rebuild(m, *read_weights(root / "model.ckpt")).eval()
        assert _same(samples, rebuilt.generate(n, seed=123)), (
            f"{name}: a model rebuilt from a Lightning checkpoint generates different samples"
        )


def _same(a: Samples, b: Samples) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == "image":
        return a.images.shape == b.images.shape and torch.allclose(a.images, b.images, atol=1e-6)
    return a.texts == b.texts
