"""Checks that run before a task does any work.

Every value that can be checked from the config is checked here, first, so that a
value no run could use ends in one line that names the key, where it was set, the
value and what would be valid, not in a traceback from torch or Lightning after the
model summary (or after a whole training):

- `check_task_config`: the task's own top-level keys (``seed``, ``num_samples``,
  ``monitor_mode``, ...), the ``trainer`` values and the hardware they ask for, the
  ``finetune`` and ``metrics`` groups. Needs neither data nor model.
- `check_generation`: the ``sampling``/``sampler``/``guidance`` options, on the built
  model, by generating one sample with them.
- `check_monitor`: the metric that ``monitor`` (and any callback's ``monitor``) names is
  one the model logs, found by one training and one validation batch on a copy of the
  model.
- `check_data_choice`: the chosen model's needs against the chosen data's batch keys,
  before the model's config (which may interpolate keys of the data) is resolved.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from omegaconf import DictConfig

from genframe.config import check_kwargs
from genframe.errors import UserError, did_you_mean, valid_list
from genframe.hardware import GENFRAME_TRAINER_KEYS, check_hardware, check_launch
from genframe.tasks.build import origin, to_plain, trainer_choice, with_origin

# -- value rules -------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Prior-preservation images are all made, and held in memory, before tuning starts.
MAX_CLASS_IMAGES = 10_000


def _int_at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: _is_int(v) and v >= low


def _optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or rule(v)


def _fraction_or_count(low_count: int, zero_float: bool) -> Callable[[Any], bool]:
    """Lightning's batch limits: an integer count, or a float share of the batches."""
    def rule(v: Any) -> bool:
        if _is_int(v):
            return v >= low_count
        return _is_number(v) and (0.0 <= v <= 1.0 if zero_float else 0.0 < v <= 1.0)
    return rule


def _path(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


SEED_MAX = 2**32 - 1  # numpy's (and so Lightning's seed_everything's) bound

#: Top-level keys of the task configs: key -> (rule, what is valid).
TOP_LEVEL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: _is_int(v) and 0 <= v <= SEED_MAX,
             f"an integer from 0 to {SEED_MAX}, e.g. seed=0"),
    "num_samples": (_int_at_least(0), "an integer >= 0 (0: no samples), e.g. num_samples=16"),
    "monitor": (_path, "a metric key the model logs, e.g. monitor=val/loss"),
    "monitor_mode": (lambda v: v in ("min", "max"), "min or max"),
    "resume": (_optional(_path), "a run directory, or null"),
    "run": (_optional(_path), "a run directory, or null"),
    "ckpt": (_optional(_path), "a checkpoint file (.ckpt or .safetensors), or null"),
    "guidance": (_optional(lambda v: _is_number(v) and v >= 0),
                 "a number >= 0 (classifier-free guidance scale), or null"),
    "split": (lambda v: v in ("test", "val"),
              "test (held out from training and checkpoint choice) or val"),
    "sampling": (_optional(lambda v: isinstance(v, Mapping)),
                 "keys under sampling, e.g. sampling.temperature=0.8"),
    "feedback.record": (lambda v: isinstance(v, bool), "true or false"),
    "feedback.db": (_optional(_path), "the path of an SQLite file, or null"),
    # finetune=subject (the token and class word are checked against the model)
    "prior_preservation": (lambda v: isinstance(v, bool), "true or false"),
    "num_class_images": (lambda v: _is_int(v) and 1 <= v <= MAX_CLASS_IMAGES,
                         f"an integer from 1 to {MAX_CLASS_IMAGES} (class images made before "
                         "tuning; DreamBooth uses 100-200)"),
    "class_prompts": (_optional(lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                                and all(_path(p) for p in v)),
                      'a non-empty list of prompts, e.g. \'class_prompts=["a circle"]\', or null'),
    "prior_loss_weight": (lambda v: _is_number(v) and 0 < v <= 10,
                          "a number in (0, 10] (class examples per subject example in a batch)"),
    "class_guidance": (_optional(lambda v: _is_number(v) and v >= 0),
                       "a number >= 0 (guidance of the class images), or null"),
    "class_sampler_steps": (_optional(_int_at_least(1)), "an integer >= 1 (DDIM steps), or null"),
}

#: Keys `genframe generate` reads differently from the training tasks.
GENERATE: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_samples": (_optional(_int_at_least(1)),
                    "an integer >= 1, or null (64 images; 1 text per prompt)"),
    "batch_size": (_int_at_least(1), "an integer >= 1 (samples made at once), e.g. batch_size=64"),
    "negative_prompt": (_optional(lambda v: isinstance(v, str)),
                        'a text, e.g. negative_prompt="a blue square", or null'),
    "init_image": (_optional(_path), "an image file, e.g. init_image=photo.png, or null"),
    "strength": (_optional(lambda v: _is_number(v) and 0 < v <= 1),
                 "a number in (0, 1] (how much of the reverse process runs from init_image), or null"),
}

#: ``trainer.*`` values Lightning would refuse late, or accept and then do nothing with.
TRAINER: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_epochs": (_optional(lambda v: _is_int(v) and v >= -1),
                   "an integer >= 1, 0 (no training: the untrained model is validated), "
                   "or -1 for no limit"),
    "min_epochs": (_optional(_int_at_least(0)), "an integer >= 0, or null"),
    "max_steps": (lambda v: _is_int(v) and (v == -1 or v >= 1), "an integer >= 1, or -1 for no limit"),
    "min_steps": (_optional(_int_at_least(0)), "an integer >= 0, or null"),
    "max_time": (_optional(lambda v: isinstance(v, (str, Mapping))),
                 "a duration DD:HH:MM:SS, or null"),
    "check_val_every_n_epoch": (_optional(_int_at_least(1)), "an integer >= 1, or null"),
    "val_check_interval": (_optional(_fraction_or_count(1, zero_float=False)),
                           "an integer >= 1 (training batches) or a share in (0, 1]"),
    "log_every_n_steps": (_optional(_int_at_least(0)), "an integer >= 0"),
    "accumulate_grad_batches": (_int_at_least(1), "an integer >= 1"),
    "gradient_clip_val": (_optional(lambda v: _is_number(v) and v >= 0), "a number >= 0, or null"),
    "gradient_clip_algorithm": (_optional(lambda v: v in ("norm", "value")), "norm or value"),
    "limit_train_batches": (_optional(_fraction_or_count(1, zero_float=False)),
                            "an integer >= 1 (batches) or a share in (0, 1]; 0 would train nothing"),
    "limit_val_batches": (_optional(_fraction_or_count(0, zero_float=True)),
                          "an integer >= 0 (batches) or a share in [0, 1]"),
    "limit_test_batches": (_optional(_fraction_or_count(0, zero_float=True)),
                           "an integer >= 0 (batches) or a share in [0, 1]"),
    "limit_predict_batches": (_optional(_fraction_or_count(0, zero_float=True)),
                              "an integer >= 0 (batches) or a share in [0, 1]"),
    "overfit_batches": (_fraction_or_count(0, zero_float=True),
                        "an integer >= 0 (batches) or a share in [0, 1]"),
    "num_sanity_val_steps": (_optional(_int_at_least(-1)), "an integer >= 0, or -1 for all"),
    "fast_dev_run": (lambda v: isinstance(v, bool) or _int_at_least(0)(v),
                     "true, false or a number of batches >= 0"),
    "num_nodes": (_int_at_least(1), "an integer >= 1"),
    "deterministic": (_optional(lambda v: isinstance(v, bool) or v == "warn"), "true, false or warn"),
    "enable_progress_bar": (_optional(lambda v: isinstance(v, bool)), "true or false"),
    "benchmark": (_optional(lambda v: isinstance(v, bool)), "true, false or null"),
    "activation_checkpointing": (lambda v: isinstance(v, bool), "true or false"),
}

#: Lightning's precision names (`trainer.precision`), plus genframe's ``auto``.
PRECISIONS = ("auto", "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed",
              "transformer-engine", "transformer-engine-float16", "64", "32", "16", "bf16",
              64, 32, 16)

#: ``finetune.*`` values.
FINETUNE: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (_optional(lambda v: _is_number(v) and v > 0), "a number > 0 (a new learning rate), or null"),
    "hparams": (_optional(lambda v: isinstance(v, Mapping)),
                "keys under finetune.hparams, e.g. finetune.hparams.warmup_steps=10"),
    "freeze": (_optional(lambda v: isinstance(v, (list, tuple)) and all(_path(p) for p in v)),
               'a list of parameter-name patterns, e.g. finetune.freeze=["encoder.*"]'),
    "lora.r": (_int_at_least(1), "an integer >= 1 (the adapters' rank)"),
    "lora.alpha": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "lora.dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "lora.target_modules": (_optional(lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                                      and all(_path(p) for p in v)),
                            'a non-empty list of module-name patterns, e.g. ["*.attn.*"], or '
                            "null for the model's default"),
    "lora.merge": (lambda v: isinstance(v, bool), "true or false"),
}


def _refuse(key: str, value: Any, expected: str, extra: str = "") -> UserError:
    return UserError(f"{key}: expected {expected}, got {value!r}{extra} (set in {origin(key)})")


def _check_rules(node: Mapping[str, Any], rules: Mapping[str, tuple], prefix: str) -> None:
    for key, (rule, expected) in rules.items():
        value, found = _lookup(node, key)
        if found and not rule(value):
            raise _refuse(f"{prefix}{key}", value, expected)


def _lookup(node: Mapping[str, Any], dotted: str) -> tuple[Any, bool]:
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None, False
        node = node[part]
    return node, True


# -- the config alone ------------------------------------------------------------------


def check_task_config(cfg: DictConfig, task: str) -> None:
    """Refuse (`UserError`) a value of the task's config that no run could use, before
    any data is read or model built: top-level keys (`TOP_LEVEL`), ``trainer.*`` and the
    hardware it asks for, ``finetune.*`` and ``metrics.*``.

    Args:
        cfg: the composed task config.
        task: the task's name (``train``, ``finetune``, ``evaluate``, ...).
    """
    plain = {k: to_plain(cfg.get(k)) for k in cfg if k not in ("data", "model", "hydra")}
    if task == "export":
        from genframe.exporters import FORMATS

        boolean = (lambda v: isinstance(v, bool), "true or false")
        rules = {"merge": boolean, "adapter_only": boolean,
                 "format": (lambda v: v in FORMATS, " or ".join(FORMATS))}
        _check_rules({k: v for k, v in plain.items() if k in rules}, rules, "")
    if task == "generate":
        _check_rules(plain, GENERATE, "")
        plain = {k: v for k, v in plain.items() if k not in GENERATE}
    _check_rules(plain, TOP_LEVEL, "")
    trainer = plain.get("trainer")
    if isinstance(trainer, Mapping):
        import pytorch_lightning as pl

        # Any Trainer argument may be given (trainer.strategy=ddp_spawn); a typo is refused.
        # precision may be genframe's `auto` (resolved per machine and model later).
        check_kwargs(pl.Trainer, {k: v for k, v in trainer.items()
                                  if k != "precision" and k not in GENFRAME_TRAINER_KEYS},
                     where="trainer", source=lambda key: origin(f"trainer.{key}"))
        check_trainer_values(trainer)
        check_hardware(trainer, source=lambda key: origin(f"trainer.{key}"))
        choice, launcher = trainer_choice()
        if task in ("train", "finetune"):
            check_launch(trainer, launcher=launcher, choice=choice)
        elif str(trainer.get("strategy", "auto")).startswith(("ddp", "fsdp", "deepspeed")):
            raise UserError(
                f"trainer.strategy={trainer['strategy']} (trainer={choice}): genframe {task} runs "
                "in one process; several processes are for training. Use trainer=cpu, "
                "trainer=gpu or trainer=auto")
    if isinstance(plain.get("finetune"), Mapping):
        _check_rules(plain["finetune"], FINETUNE, "finetune.")
    if task == "evaluate" and isinstance(plain.get("metrics"), Mapping):
        check_metrics_config(plain["metrics"])


def check_trainer_values(trainer: Mapping[str, Any]) -> None:
    """Refuse ``trainer.*`` values Lightning would reject late (or accept and then train
    nothing): step and epoch limits, batch limits, intervals, precision."""
    _check_rules(trainer, TRAINER, "trainer.")
    if "compile" in trainer:
        from genframe.callbacks.model_settings import compile_mode

        try:
            compile_mode(trainer["compile"])
        except UserError as exc:
            raise UserError(f"{exc} (set in {origin('trainer.compile')})") from None
    if "precision" in trainer and trainer["precision"] not in PRECISIONS:
        shown = [str(p) for p in PRECISIONS if isinstance(p, str) and not p.isdigit()]
        raise _refuse("trainer.precision", trainer["precision"], f"one of {', '.join(shown)}",
                      did_you_mean(str(trainer["precision"]), shown))
    for low, high in (("min_epochs", "max_epochs"), ("min_steps", "max_steps")):
        lo, hi = trainer.get(low), trainer.get(high)
        # max_epochs=0 validates the untrained model whatever min_epochs says (Lightning
        # stops at the maximum first).
        if _is_int(lo) and _is_int(hi) and hi > 0 and lo > hi:
            raise UserError(
                f"trainer.{low}={lo} is more than trainer.{high}={hi} (set in "
                f"{origin(f'trainer.{low}')} and {origin(f'trainer.{high}')}); expected "
                f"trainer.{low} <= trainer.{high}")


def check_metrics_config(metrics: Mapping[str, Any], key: str = "metrics") -> None:
    """Refuse ``metrics.*`` (evaluate's image metrics) values before the validation loop."""
    from genframe.metrics.model_metrics import check_metric_options

    if not isinstance(metrics.get("enabled", True), bool):
        raise _refuse(f"{key}.enabled", metrics["enabled"], "true or false")
    options = {k: v for k, v in metrics.items() if k != "enabled"}
    try:
        check_metric_options(**options, key=key)
    except UserError as exc:
        name = str(exc).split("=", 1)[0].split(":", 1)[0].split(" ", 1)[0]
        raise UserError(f"{exc} (set in {origin(name)})") from exc
    except TypeError as exc:  # an unknown key under metrics
        raise UserError(f"{key}: {exc}") from exc


# -- the model and data ----------------------------------------------------------------


def check_data_choice(cfg: DictConfig) -> None:
    """Refuse a model whose batch needs the chosen data cannot meet, by the names in the
    config alone, before the model's config is resolved (it may interpolate data keys,
    such as ``${data.block_size}``, that the wrong data lacks). Names the data and
    experiment choices that do fit."""
    from genframe.plugins import get_registry

    mname, dname = cfg.model.get("name"), cfg.data.get("name")
    registry = get_registry()
    if mname not in registry.models or dname not in registry.data:
        return  # unknown names get their own message where they are built
    from genframe.module import trains_on

    model_class = registry.model(str(mname)).load()
    needs = set(getattr(model_class, "needs", ()))
    data_classes = {name: registry.data_module(name).load() for name in registry.data}
    provides = set(getattr(data_classes[dname], "provides", ()))
    if trains_on(model_class, provides):
        return
    fitting = [f"data={n}" for n, c in data_classes.items() if trains_on(model_class, getattr(c, "provides", ()))]
    fitting += [f"experiment={e}" for e in _experiments_with_model(str(mname))]
    raise UserError(
        f"model '{mname}' needs batch keys {valid_list(needs)}, but data '{dname}' (set in "
        f"{origin('data')}) provides only {valid_list(provides)} (missing: "
        f"{valid_list(needs - provides)}). Choose data that fits: "
        f"{', '.join(fitting) or '(no installed data module provides them)'}")


def resolved_model_config(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.model`` resolved to plain values; a ``${data.<key>}`` the chosen data lacks
    is a `UserError` naming both sides (not OmegaConf's "Interpolation key not found")."""
    from omegaconf.errors import InterpolationResolutionError

    try:
        return to_plain(cfg.model)
    except InterpolationResolutionError as exc:
        key = str(getattr(exc, "full_key", "") or "model")
        text = str(exc).splitlines()[0]
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:  # a resolver's own message (genframe.required)
            raise UserError(f"{key}: {cause} (set in {origin('model')})") from exc
        data = cfg.get("data")
        dname = data.get("name") if data is not None else None
        raise UserError(
            f"{key}: cannot take its value from the data config: {text} (model "
            f"'{cfg.model.get('name')}', data '{dname}' set in {origin('data')}); set "
            f"{key}=<value> or choose data that has it") from exc


def _experiments_with_model(model: str) -> list[str]:
    """The experiment configs that choose `model` (``override /model: <model>``)."""
    from omegaconf import OmegaConf

    from genframe.config import conf_dir
    from genframe.plugins import get_registry

    found = []
    roots = [conf_dir(), *(root for _, root in get_registry().config_dirs)]
    for root in roots:
        for path in sorted((root / "experiment").glob("*.yaml")):
            defaults = OmegaConf.load(path).get("defaults") or []
            for entry in defaults:
                if isinstance(entry, Mapping) and any(
                        str(k).split("@")[0].strip().endswith("/model") and v == model
                        for k, v in entry.items()):
                    found.append(path.stem)
    return found


def check_generation(cfg: DictConfig, model, *, num_samples: int | None = None) -> dict[str, Any]:
    """Check the ``sampling``/``sampler``/``guidance`` options of `cfg` on `model` now,
    not after training: the option names and types (`GenerativeModule.check_sampling`),
    then their values, by generating one sample with them (what the task would do at
    its end), with the random state left as it was.

    Args:
        cfg: the task config.
        model: the built model.
        num_samples: the samples the task will generate; 0 skips the trial sample (the
            names are still checked). Default: ``cfg.num_samples``.

    Returns:
        the generation options (`genframe.tasks.common.generation_options`).
    """
    from genframe.tasks.common import generation_options

    sampling = to_plain(cfg.get("sampling")) or {}
    sampler = to_plain(cfg.get("sampler")) or {}
    try:
        options = generation_options(cfg, model)
        model.check_sampling(options)
        count = cfg.get("num_samples", 1) if num_samples is None else num_samples
        if count:
            with kept_random_state():
                model.generate(1, seed=int(cfg.get("seed", 0)), **options)
    except UserError as exc:  # say where the refused option was set
        raised = with_origin(exc, "sampling", sampling if isinstance(sampling, Mapping) else {})
        if raised is exc and isinstance(sampler, Mapping):
            raised = with_origin(exc, "sampler", sampler)
        if raised is exc:
            raise
        raise raised from exc
    return options


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Python's, NumPy's and torch's random states restored on exit, so a check that
    draws random numbers does not change the run that follows."""
    import random

    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def check_monitor(cfg: DictConfig, model, data) -> set[str]:
    """Refuse a ``monitor`` (or a callback's ``monitor``) that the model never logs, and a
    ``monitor_mode`` other than min/max, before training starts.

    The keys logged are found by Lightning itself, on a copy of the model (the model and
    the random state stay as they were): one validation batch, and only when that does
    not log every watched key (a ``train/*`` monitor, a wrong name), one training batch
    and one validation batch; plus the keys that configured callbacks declare
    (``metric_keys``). A training step costs a backward pass and the optimiser's state,
    so the usual ``val/*`` monitor is checked without one.

    Returns:
        the metric keys found: those validation logs and the callbacks declare, or, when
        the fitting probe ran, every key a run logs.
    """
    callbacks = to_plain(cfg.get("callbacks")) or {}
    watched = [("monitor", cfg.get("monitor"))]
    for name, entry in callbacks.items():
        if isinstance(entry, Mapping) and entry.get("monitor") is not None:
            watched.append((f"callbacks.{name}.monitor", entry["monitor"]))
        if isinstance(entry, Mapping) and "mode" in entry and entry.get("monitor") is not None \
                and entry["mode"] not in ("min", "max"):
            key = "monitor_mode" if entry["mode"] == cfg.get("monitor_mode") else f"callbacks.{name}.mode"
            raise _refuse(key, entry["mode"], "min or max")
    declared = _callback_metric_keys(callbacks, model)
    try:
        logged = logged_metrics(model, data, train=False) | declared
    except Exception:  # noqa: BLE001 - validation may need what fitting sets up (a plugin's
        logged = set()  # on_fit_start); the probe below fits and raises what is really wrong
    if any(metric not in logged for _, metric in watched):
        import gc

        gc.collect()  # the first probe's copy (trainer and model refer to each other) goes first
        logged = logged_metrics(model, data) | declared
    for key, metric in watched:
        if metric in logged:
            continue
        if key != "monitor" and metric == cfg.get("monitor"):
            key = "monitor"  # the callback follows ${monitor}: the user's key is monitor
        mname = getattr(getattr(model, "model_spec", None), "name", type(model).__name__)
        raise UserError(
            f"{key}={metric}: model '{mname}' never logs this metric (set in {origin(key)})."
            f"{did_you_mean(str(metric), logged)} It logs: {valid_list(logged)}")
    return logged


def _callback_metric_keys(callbacks: Mapping[str, Any], model) -> set[str]:
    """Metric keys that configured callbacks log (their class's ``metric_keys``)."""
    from hydra.utils import get_class

    keys: set[str] = set()
    for entry in callbacks.values():
        if not isinstance(entry, Mapping) or "_target_" not in entry:
            continue
        try:
            cls = get_class(entry["_target_"])
        except Exception:  # noqa: BLE001 - a bad _target_ is reported when the callbacks are built
            continue
        if hasattr(cls, "metric_keys"):
            settings = {k: v for k, v in entry.items() if not k.startswith("_")}
            keys |= set(cls.metric_keys(model, settings))
    return keys


def logged_metrics(model, data, *, train: bool = True) -> set[str]:
    """The metric keys `model` logs in training and validation, as Lightning records
    them: one training batch and one validation batch of `data` on a copy of `model`,
    on the CPU, writing nothing; with ``train=False``, one validation batch alone (the
    ``val/*`` keys, without a backward pass or an optimiser)."""
    import copy
    import logging
    import tempfile
    import warnings

    import pytorch_lightning as pl

    with kept_random_state():  # a lazy set-up of the data may draw random numbers
        val_loader = data.val_dataloader()
    if not train and val_loader is None:
        return set()
    probe = copy.deepcopy(model)
    lightning_log = logging.getLogger("pytorch_lightning")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), kept_random_state():
            warnings.simplefilter("ignore")
            trainer = pl.Trainer(
                accelerator="cpu", devices=1, max_steps=1, max_epochs=1, limit_train_batches=1,
                limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp)
            if train:
                trainer.fit(probe, train_dataloaders=data.train_dataloader(),
                            val_dataloaders=val_loader)
            else:
                trainer.validate(probe, dataloaders=val_loader, verbose=False)
            keys = set(trainer.callback_metrics)
    finally:
        lightning_log.setLevel(level)
    # Lightning adds `x_step`/`x_epoch` copies of values logged both ways.
    return {k for k in keys if not (k.endswith(("_step", "_epoch")) and k.rsplit("_", 1)[0] in keys)}
