"""`GenerativeModule`: the base class every genframe model plugin builds on."""

from __future__ import annotations

import random
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch

from genframe.samples import Samples


class GenerativeModule(pl.LightningModule):
    """A LightningModule that trains on genframe batches and can generate.

    Subclasses compute their own objective in ``training_step``/``validation_step``
    (logging ``train/loss`` and ``val/loss``), and implement :meth:`generate`.
    Constructor arguments must be plain Python values (the YAML keys of the model's
    config) and be saved with ``self.save_hyperparameters()`` so a checkpoint or a run
    directory can rebuild the model.

    Class attributes:
        needs: batch keys the model reads (``"image"``, ``"label"``, ``"tokens"``,
            ``"caption"``). An instance may narrow or widen it in ``__init__`` (a
            class-conditional model needs ``"label"`` only when it is conditional).
        condition_keys: keys ``generate(condition=...)`` accepts, empty when the model is
            unconditional.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"image"})
    condition_keys: ClassVar[frozenset[str]] = frozenset()
    #: True for text models: genframe hands them their data's tokenizer (`set_tokenizer`).
    uses_tokenizer: ClassVar[bool] = False
    #: Set by genframe's builder: ``{"name": registered name, "kwargs": constructor args}``
    #: (and ``"tokenizer"``, its JSON form, once a tokenizer is set).
    genframe_spec: dict[str, Any] | None = None
    tokenizer: Any = None

    def generate(
        self,
        num_samples: int,
        *,
        condition: dict[str, Any] | None = None,
        seed: int | None = None,
        **sampling: Any,
    ) -> Samples:
        """Generate `num_samples` samples.

        Args:
            num_samples: how many samples to make.
            condition: e.g. ``{"label": 3}``; must only use keys in ``condition_keys``.
            seed: the same seed gives the same samples; None draws a fresh seed, which is
                recorded in the metadata.
            **sampling: model-specific sampling options (temperature, sampler, ...).
        """
        raise NotImplementedError

    def example_batch(self, batch_size: int = 4) -> dict[str, Any]:
        """A random batch this model accepts (used by `genframe.testing`).

        The default suits image models with ``in_channels``/``image_size`` (and
        ``num_classes``) hyperparameters: images uniform in [-1, 1], labels when the
        model reads them. Override it for other batch keys or data grids.
        """
        hp = self.hparams
        if "in_channels" not in hp or "image_size" not in hp:
            raise NotImplementedError(f"{type(self).__name__} must implement example_batch()")
        gen = torch.Generator().manual_seed(0)
        shape = (batch_size, hp.in_channels, hp.image_size, hp.image_size)
        batch: dict[str, Any] = {"image": (torch.rand(shape, generator=gen) * 2 - 1).to(self.device)}
        return self._with_labels(batch, gen)

    def _with_labels(self, batch: dict[str, Any], gen: torch.Generator) -> dict[str, Any]:
        num_classes = self.hparams.get("num_classes", 0)
        if "label" in self.needs and num_classes:
            n = len(batch["image"])
            batch["label"] = torch.randint(0, num_classes, (n,), generator=gen).to(self.device)
        return batch

    def set_tokenizer(self, tokenizer: Any) -> None:
        """Give a text model its tokenizer (genframe calls this with the data's tokenizer
        when training, and with the saved one when rebuilding the model). The tokenizer
        is recorded in the model's spec, so the weights file alone restores it; override
        to check it against the model (call super())."""
        import json

        self.tokenizer = tokenizer
        if self.genframe_spec is not None:
            self.genframe_spec["tokenizer"] = json.loads(tokenizer.to_json())

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients are freed at once.

        Lightning zeroes them inside the next step's closure, after its forward pass, so
        the old gradients would stay allocated through that forward; freeing them here
        (only ever after a real step, so gradient accumulation is unaffected) makes the
        loop measurably faster for small models (bench/lm_throughput.py).
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def should_log_step(self) -> bool:
        """Whether this training step's logged values reach the loggers (every
        ``trainer.log_every_n_steps``), or it is an epoch's last batch (so the latest
        value is always in the trainer's metrics): log per-step values only then when
        ``self.log``'s own cost matters next to the step."""
        trainer = self._trainer
        if trainer is None:  # a step called by hand: nothing would receive the values
            return False
        return bool(getattr(trainer._logger_connector, "should_update_logs", True)
                    or getattr(trainer, "is_last_batch", True))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the model's spec so the checkpoint alone rebuilds it (call super() if
        you override this)."""
        if self.genframe_spec is not None:
            checkpoint["genframe"] = self.genframe_spec

    # -- helpers for subclasses -----------------------------------------------------

    def check_condition(self, condition: dict[str, Any] | None) -> dict[str, Any]:
        """Refuse condition keys the model cannot use (a `UserError`)."""
        from genframe.errors import UserError, valid_list

        condition = dict(condition or {})
        unknown = set(condition) - set(self.condition_keys)
        if unknown:
            if not self.condition_keys:
                raise UserError(
                    f"condition: {type(self).__name__} is unconditional; it cannot use "
                    f"{', '.join(sorted(unknown))}"
                )
            raise UserError(
                f"condition: unknown key(s) {', '.join(sorted(unknown))}; this model "
                f"accepts {valid_list(self.condition_keys)}"
            )
        return condition

    def check_sampling(self, sampling: dict[str, Any], allowed: Any) -> None:
        """Refuse sampling options the model does not know (a `UserError`)."""
        from genframe.errors import UserError, did_you_mean, valid_list

        for key in sampling:
            if key not in allowed:
                raise UserError(
                    f"sampling.{key}: not an option of {type(self).__name__}."
                    f"{did_you_mean(key, allowed)} Valid options: {valid_list(allowed)}"
                )

    def set_class_conditional(self, num_classes: int) -> None:
        """For an image model that is class-conditional when ``num_classes > 0``: it then
        needs ``label`` in its batches and accepts ``condition={"label": k}``."""
        self.needs = frozenset({"image", "label"}) if num_classes else frozenset({"image"})
        self.condition_keys = frozenset({"label"}) if num_classes else frozenset()

    def labels_for(self, num_samples: int, condition: dict[str, Any], num_classes: int):
        """Labels for a class-conditional `generate()` call.

        ``condition["label"]`` may be one label for every sample or a list of
        `num_samples` labels; without it the labels cycle through the classes so a grid
        shows every one. Returns (labels as a long tensor on the model's device, the
        per-sample condition dicts), or (None, empty dicts) for an unconditional model.
        """
        from numbers import Integral

        from genframe.errors import UserError

        if not num_classes:
            return None, [{} for _ in range(num_samples)]
        if condition.get("label") is None:
            labels = [i % num_classes for i in range(num_samples)]
        else:
            value = condition["label"]
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            values = list(value) if isinstance(value, (list, tuple)) else [value] * num_samples
            if len(values) != num_samples:
                raise UserError(f"condition.label: got {len(values)} labels for {num_samples} samples")
            labels = []
            for v in values:
                if isinstance(v, bool) or not isinstance(v, Integral) or not 0 <= v < num_classes:
                    raise UserError(
                        f"condition.label must be an integer in 0..{num_classes - 1} "
                        f"(this model has {num_classes} classes), got {v!r}"
                    )
                labels.append(int(v))
        tensor = torch.tensor(labels, dtype=torch.long, device=self.device)
        return tensor, [{"label": k} for k in labels]

    def make_generator(self, seed: int | None) -> tuple[torch.Generator, int]:
        """A torch.Generator on the model's device seeded with `seed` (or a fresh seed)."""
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        return gen, int(seed)
