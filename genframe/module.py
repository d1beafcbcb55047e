"""`GenerativeModule`: the base class every genframe model plugin builds on."""

from __future__ import annotations

import functools
import inspect
import random
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch

from genframe.errors import GenframeDeprecationWarning
from genframe.samples import Samples
from genframe.spec import ModelSpec

# Parameters of `sample()` that are not sampling options.
_SAMPLE_ARGS = ("self", "num_samples", "condition", "generator")


class GenerativeModule(pl.LightningModule):
    """A LightningModule that trains on genframe batches and can generate.

    A model plugin subclasses it and writes:

    - ``training_step`` / ``validation_step``: its own objective on a dict batch, logging
      ``train/loss`` and ``val/loss``;
    - ``sample(num_samples, *, condition, generator, **options)``: its own sampling (see
      `sample`); `generate` is the public entry and does the shared work;
    - ``configure_optimizers`` only when the default (AdamW from the constructor's ``lr``
      and ``weight_decay``) does not fit.

    Constructor arguments must be plain, type-annotated Python values (the YAML keys of
    the model's config) saved with ``self.save_hyperparameters()``, so a checkpoint or a
    run directory can rebuild the model.

    Class attributes:
        needs: batch keys the model reads (``"image"``, ``"label"``, ``"tokens"``,
            ``"caption"``). An instance may narrow or widen it in ``__init__`` (a
            class-conditional model needs ``"label"`` only when it is conditional).
        also_trains_on: other sets of batch keys the model trains on, each with its own
            objective (a language model: preference pairs, with DPO); data that provides
            one of them fits as well as data that provides `needs`.
        condition_keys: keys ``generate(condition=...)`` accepts, empty when the model is
            unconditional.
        uses_tokenizer: True for text models: genframe hands them their data's tokenizer
            (`set_tokenizer`).
        learning_rate_keys: constructor arguments that are learning rates;
            ``finetune.lr`` sets every one of them (the GAN: ``("lr_g", "lr_d")``).
        renamed_arguments: old constructor-argument name -> new name, so that runs saved
            before a rename still load (``{"channels": "block_out_channels"}``).
        added_arguments: arguments added later -> their value in runs saved before.
        lora_target_modules: module-name patterns LoRA adapts by default
            (``method=lora`` with ``finetune.lora.target_modules=null``).
        ddp_find_unused_parameters: True when some training steps leave trainable
            parameters out of the loss (a GAN's discriminator step never touches the
            generator): DDP must then look for them in every step (a little slower).
    """

    needs: ClassVar[frozenset[str]] = frozenset({"image"})
    also_trains_on: ClassVar[tuple[frozenset[str], ...]] = ()
    ddp_find_unused_parameters: ClassVar[bool] = False
    condition_keys: ClassVar[frozenset[str]] = frozenset()
    uses_tokenizer: ClassVar[bool] = False
    learning_rate_keys: ClassVar[tuple[str, ...]] = ("lr",)
    renamed_arguments: ClassVar[dict[str, str]] = {}
    #: Constructor arguments added in a later version -> the value that reproduces the
    #: behaviour before they existed; a saved run without them is rebuilt with these.
    added_arguments: ClassVar[dict[str, Any]] = {}
    #: Module-name patterns `method=lora` adapts when ``finetune.lora.target_modules``
    #: is null (None: the user must name them).
    lora_target_modules: ClassVar[tuple[str, ...] | None] = None
    #: Constructor arguments the model resolved itself, recorded in its spec in place of
    #: the values given: a part borrowed from another run records that part's
    #: description, so the model rebuilds without that run.
    resolved_arguments: dict[str, Any] = {}
    #: Set by genframe when it builds the model (`genframe.weights.build_model`).
    model_spec: ModelSpec | None = None
    tokenizer: Any = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        legacy = cls.__dict__.get("generate")
        if legacy is not None and not getattr(legacy, "_genframe_entry", False):
            # A plugin written before `sample()` existed: keep it working, say so once.
            warnings.warn(
                f"{cls.__module__}.{cls.__qualname__} overrides generate(); implement "
                "sample(num_samples, *, condition, generator, **options) instead and let "
                "GenerativeModule.generate do the checks, seeding, eval mode and metadata "
                "(see the README's plugin guide). Overriding generate() will stop working "
                "in a later genframe.", GenframeDeprecationWarning, stacklevel=2)
            cls.generate = _recording_name(legacy)

    @property
    def registered_name(self) -> str:
        """The name the model was built under (``model=<name>``; an alias or a subclass
        is recorded as such), or its class name when built by hand."""
        return self.model_spec.name if self.model_spec is not None else type(self).__name__

    def generate(
        self,
        num_samples: int,
        *,
        condition: dict[str, Any] | None = None,
        seed: int | None = None,
        **sampling: Any,
    ) -> Samples:
        """Generate `num_samples` samples (the one public way to sample a model).

        Checks `num_samples`, the condition keys (`condition_keys`) and the sampling
        options (the keyword arguments of `sample`), seeds a `torch.Generator` on the
        model's device, runs `sample` in eval mode without gradients (then restores the
        training mode), and records the registered model name and the seed in the
        metadata. Images come back on the CPU.

        Args:
            num_samples: how many samples to make (a positive integer).
            condition: e.g. ``{"label": 3}`` or ``{"prompt": "..."}``; only keys in
                ``condition_keys``.
            seed: the same seed gives the same samples; None draws a fresh seed, which is
                recorded in ``metadata["seed"]``.
            **sampling: the model's sampling options (the keyword arguments of its
                `sample`, such as ``temperature`` or ``sampler``).

        Raises:
            UserError: a bad `num_samples`, an unknown condition key or sampling option.
        """
        from genframe.errors import UserError

        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise UserError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.check_sampling(sampling)
        condition = self.check_condition(condition)
        generator, seed = self.make_generator(seed)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                samples = self.sample(num_samples, condition=condition, generator=generator,
                                      **sampling)
        finally:
            self.train(was_training)
        if not isinstance(samples, Samples):
            raise TypeError(f"{type(self).__name__}.sample() must return genframe.Samples, "
                            f"got {type(samples).__name__}")
        if samples.images is not None:
            samples.images = samples.images.detach().cpu()
        samples.metadata = {**samples.metadata, "model": self.registered_name, "seed": seed}
        return samples

    generate._genframe_entry = True  # type: ignore[attr-defined]

    def sample(self, num_samples: int, *, condition: dict[str, Any],
               generator: torch.Generator, **options: Any) -> Samples:
        """The model's own sampling, called by `generate` (override this).

        Runs in eval mode under ``torch.no_grad()``; draw every random number from
        `generator` so the same seed gives the same samples.

        Args:
            num_samples: how many samples (already checked: a positive integer).
            condition: the checked condition (a dict, empty when none was given).
            generator: a seeded ``torch.Generator`` on the model's device.
            **options: declare each sampling option as a keyword argument with a type hint
                and its default (``temperature: float = 1.0``); `generate` refuses any
                other name and values that do not fit the hint. (A ``**options`` catch-all
                in an override receives the other names, for the model to check.)

        Returns:
            `Samples`: images float N×C×H×W in [0, 1], or N texts, with the conditions
            used and what else describes how they were made (``metadata``; genframe adds
            ``model`` and ``seed``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement sample()")

    def activation_checkpointing_blocks(self) -> tuple[type[torch.nn.Module], ...]:
        """The module types whose activations ``trainer.activation_checkpointing=true``
        recomputes in the backward pass instead of keeping (the model's repeated blocks,
        see `genframe.callbacks.model_settings.ActivationCheckpointing`); empty: the model
        does not support it. Each such block's forward must be a pure function of its
        arguments while training (no state written)."""
        return ()

    def export_graphs(self) -> dict[str, Any]:
        """The networks `genframe export format=onnx|torchscript` writes, by name (the
        file name): `genframe.exporters.ExportGraph` values holding a module that runs
        one part of sampling (a decoder, a generator, one denoising step, a forward pass)
        on plain tensors, with example inputs. Built on the model's current device, in
        float32. Empty (the default): the model exports no networks, and only
        ``format=safetensors`` serves it."""
        return {}

    def sampling_options(self) -> list[str]:
        """The sampling options `generate` accepts: the keyword arguments of `sample`."""
        params = inspect.signature(self.sample).parameters
        return [n for n, p in params.items()
                if n not in _SAMPLE_ARGS and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

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
        if self.model_spec is not None:
            self.model_spec.tokenizer = json.loads(tokenizer.to_json())

    def on_finetune_start(self) -> str | None:
        """Called by ``genframe finetune`` on the trained model before it changes anything
        (adapters, frozen parameters): make the weights that training will update the
        ones the model generates with. Return a note for the run's lineage, or None.
        The default does nothing; a model that samples from an average of its weights
        (a diffusion model's EMA) starts its online weights from that average."""
        return None

    def on_lora_applied(self) -> None:
        """Called by `genframe.lora.apply_lora` right after it added LoRA adapters (and
        froze the rest). Override to keep other copies of the network in step with the
        adapted one -- a diffusion model's EMA copy gets the same adapters."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The default optimiser: AdamW (Loshchilov & Hutter 2019) over the trainable
        parameters, with the constructor's ``lr`` and ``weight_decay`` (0 when the model
        has none). Override it for anything else (several optimisers, schedules,
        parameter groups); say in `learning_rate_keys` which arguments are learning rates.

        Raises:
            NotImplementedError: the model has no ``lr`` constructor argument.
        """
        if "lr" not in self.hparams:
            raise NotImplementedError(
                f"{type(self).__name__} has no `lr` constructor argument, so the default "
                "optimiser (AdamW from lr and weight_decay) does not apply: define "
                "configure_optimizers()")
        from genframe.optim import adamw

        params = [p for p in self.parameters() if p.requires_grad]
        return adamw(params, lr=float(self.hparams.lr),
                     weight_decay=float(self.hparams.get("weight_decay", 0.0)))

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

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``log``, with ``sync_dist`` on by default: in a multi-process run
        (DDP) every logged value is the mean over the processes, so ``val/loss``, the
        checkpoint's ``monitor`` and ``metrics.json`` describe all the data, not rank
        zero's share. A single process pays nothing for it. Pass ``sync_dist=False`` for
        a value that must stay per-rank. A value logged with ``rank_zero_only=True`` (rank
        zero alone computes it) is never synchronised: the other ranks would wait for it."""
        kwargs.setdefault("sync_dist", not kwargs.get("rank_zero_only", False))
        super().log(name, value, *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the model's spec and the environment in the checkpoint, so the checkpoint
        alone rebuilds the model (call super() if you override this)."""
        from genframe.spec import environment

        if self.model_spec is not None:
            checkpoint["genframe"] = self.model_spec.to_dict()
            checkpoint["genframe_environment"] = environment(self.device)

    # -- helpers for subclasses -----------------------------------------------------

    def image_argument(self, image: Any, num_samples: int, *, key: str, channels: int,
                       size: int, sizes_from: str) -> torch.Tensor:
        """An image given to `generate` (an init image, a low-resolution input) checked
        and shaped: float32 (num_samples, channels, size, size) on the model's device.

        Accepts (N, C, S, S) with N = num_samples or 1, or one image (C, S, S); values in
        [0, 1]. `key` names the argument in messages (``"init_image"``); `sizes_from` says
        which of the model's settings fix C and S (``"in_channels and image_size"``).

        Raises:
            UserError: not a tensor, another shape, or values outside [0, 1] or not finite.
        """
        from genframe.errors import UserError

        C, S = channels, size
        expected = f"({num_samples}, {C}, {S}, {S}) or one image ({C}, {S}, {S}), values in [0, 1]"
        if not isinstance(image, torch.Tensor):
            raise UserError(f"{key}: expected a tensor shaped {expected}, got {type(image).__name__}")
        shape = tuple(image.shape)
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4 or tuple(image.shape[1:]) != (C, S, S) or image.shape[0] not in (
            1, num_samples
        ):
            raise UserError(f"{key}: expected shape {expected} (this model's {sizes_from}), got {shape}")
        image = image.to(device=self.device, dtype=torch.float32)
        if not bool(torch.isfinite(image).all()) or image.min() < 0 or image.max() > 1:
            raise UserError(
                f"{key}: expected values in [0, 1], got [{float(image.min()):.3g}, "
                f"{float(image.max()):.3g}] (images scaled to [-1, 1]? pass (x + 1) / 2)")
        return image.expand(num_samples, C, S, S)

    def check_condition(self, condition: dict[str, Any] | None) -> dict[str, Any]:
        """Refuse condition keys the model cannot use (a `UserError`)."""
        from genframe.errors import UserError, valid_list

        condition = dict(condition or {})
        unknown = set(condition) - set(self.condition_keys)
        if unknown:
            if not self.condition_keys:
                raise UserError(
                    f"condition: model '{self.registered_name}' is unconditional; it cannot use "
                    f"{', '.join(sorted(unknown))}"
                )
            raise UserError(
                f"condition: unknown {'key' if len(unknown) == 1 else 'keys'} {', '.join(sorted(unknown))}; this model "
                f"accepts {valid_list(self.condition_keys)}"
            )
        return condition

    def check_sampling(self, sampling: dict[str, Any], allowed: Any = None) -> None:
        """Refuse sampling options the model does not know, or of the wrong type.

        Args:
            sampling: option name -> value, as given to `generate`.
            allowed: the valid names (any collection of str). Default: the keyword
                arguments of `sample` (`sampling_options`), whose type hints the values
                must fit; a `sample` that also takes ``**options`` gets the other names
                and checks them itself.

        Raises:
            UserError: ``sampling.<name>: not an option of model '<name>'`` with the
                closest valid names, or ``sampling.<name>: expected ...`` for a value of
                the wrong type.
        """
        from genframe.config import check_kwargs
        from genframe.errors import UserError, did_you_mean, valid_list

        declared = allowed is None
        allowed = self.sampling_options() if declared else list(allowed)
        open_ended = declared and type(self).sample is not GenerativeModule.sample and any(
            p.kind == p.VAR_KEYWORD for p in inspect.signature(self.sample).parameters.values())
        for key in sampling:
            if key not in allowed and not open_ended:
                raise UserError(
                    f"sampling.{key}: not an option of model '{self.registered_name}'."
                    f"{did_you_mean(key, allowed)} Valid options: {valid_list(allowed)}"
                )
        if declared:
            check_kwargs(self.sample, sampling, where="sampling", ignore=_SAMPLE_ARGS)

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


def _recording_name(legacy_generate):
    """Wrap a plugin's own ``generate`` (the pre-`sample` interface) so its samples still
    record the registered model name and seed as `GenerativeModule.generate` does."""

    @functools.wraps(legacy_generate)
    def generate(self, num_samples, *args, **kwargs):
        samples = legacy_generate(self, num_samples, *args, **kwargs)
        if isinstance(samples, Samples):
            samples.metadata = {**samples.metadata, "model": self.registered_name}
        return samples

    generate._genframe_entry = True
    return generate


def trains_on(model: Any, provides: Iterable[str]) -> bool:
    """Whether data providing the batch keys `provides` can train `model` (a model or
    its class): it provides the model's `needs`, or one of its `also_trains_on` sets."""
    keys = set(provides)
    return any(set(needs) <= keys for needs in (getattr(model, "needs", ()),
                                                  *getattr(model, "also_trains_on", ())))

