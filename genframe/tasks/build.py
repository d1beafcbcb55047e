"""The one place where config becomes objects: data module, model, trainer, loggers.

Everything built here takes plain Python arguments; a `DictConfig` never goes further.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from genframe.config import check_kwargs
from genframe.errors import UserError, valid_list
from genframe.plugins import get_registry
from genframe.weights import instantiate_model


def to_plain(node: Any) -> Any:
    """A resolved plain-Python copy of a config node."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    return node


def _hydra_state() -> tuple[list[str], dict[str, Any], str | None]:
    """(command-line overrides, group choices, task name) of the running Hydra job;
    empty outside one (tests, notebooks)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        # resolve=False: an override holding `${...}` is reported as typed, not resolved.
        return (OmegaConf.to_container(hc.overrides.task, resolve=False), dict(hc.runtime.choices),
                hc.job.config_name)
    except (ValueError, ImportError):  # not inside a Hydra run
        return [], {}, None


def origin(key: str) -> str:
    """Where the config value at dotted `key` was set, for messages: ``the command line:
    data.batch_size=0``, the experiment file that sets it (``experiment/pydoc_char_lm.yaml``),
    the chosen group file (``data/digits.yaml of data=digits``) or the task's primary config
    (``train.yaml``)."""
    overrides, choices, task = _hydra_state()
    for o in overrides:
        if o.lstrip("+~").split("=", 1)[0] == key:
            # `++` is how the CLI passes open keys (sampling.x, trainer.x): not typed.
            return f"the command line: {o.removeprefix('++')}"
    experiment = choices.get("experiment")
    if experiment and _experiment_sets(str(experiment), key):
        return f"experiment/{experiment}.yaml"
    group = key.split(".", 1)[0]
    if "." in key and choices.get(group):
        return f"{group}/{choices[group]}.yaml of {group}={choices[group]}"
    if "." in key:
        return f"the '{group}' config"
    return f"{task}.yaml" if task else "the config"


def _experiment_sets(name: str, key: str) -> bool:
    """Whether ``experiment/<name>.yaml`` (genframe's or a plugin's) sets `key`."""
    from genframe.config import conf_dir

    roots = [conf_dir()]
    try:
        roots += [root for _, root in get_registry().config_dirs]
    except Exception:  # noqa: BLE001 - the registry's own errors are reported elsewhere
        pass
    for root in roots:
        path = root / "experiment" / f"{name}.yaml"
        if path.is_file():
            node = OmegaConf.load(path)
            return OmegaConf.select(node, key, default=_ABSENT) is not _ABSENT
    return False


_ABSENT = object()


def source_map(group: str) -> Callable[[str], str]:
    """Tell where a key of `group` was set: the command line or the group's YAML file."""
    return lambda key: origin(f"{group}.{key}")


def with_origin(exc: UserError, where: str, keys: Any) -> UserError:
    """`exc` with where its key was set appended, when its message starts with
    ``<where>.<key>`` for one of `keys` and does not say so already."""
    text = str(exc)
    if "(set in " in text:
        return exc
    for key in keys:
        full = f"{where}.{key}"
        if re.match(rf"{re.escape(full)}(?!\w)", text):
            return UserError(f"{text} (set in {origin(full)})")
    return exc


def split_name(node: Mapping[str, Any], group: str) -> tuple[str, dict[str, Any]]:
    kwargs = dict(node)
    name = kwargs.pop("name", None)
    if not name:
        raise UserError(f"{group}: the config has no 'name' key naming a registered {group}")
    return str(name), kwargs


# Model constructor arguments that, left null in the model's config, are taken from the
# data module after its setup (the size of the tokenizer it trained).
_FROM_DATA = ("vocab_size",)


def build_model(model_cfg: Any, data=None):
    """The configured model; `data` fills the arguments left null that the data knows
    (``vocab_size``) and hands a text model the data's tokenizer."""
    name, kwargs = split_name(to_plain(model_cfg), "model")
    wanted = [k for k in _FROM_DATA if k in kwargs and kwargs[k] is None]
    if wanted and data is not None:
        data.setup("fit")
        for key in wanted:
            value = getattr(data, key, None)
            if value is None:
                raise UserError(
                    f"model.{key} is null (to be taken from the data), but data "
                    f"'{type(data).__name__}' has no {key}; set model.{key}=<int>"
                )
            kwargs[key] = value
    try:
        model = instantiate_model(name, kwargs, source=source_map("model"))
    except UserError as exc:  # a value the constructor refused: say where it was set
        raised = with_origin(exc, "model", kwargs)
        if raised is exc:
            raise
        raise raised from exc
    if getattr(model, "uses_tokenizer", False) and data is not None:
        data.setup("fit")
        if getattr(data, "tokenizer", None) is not None:
            model.set_tokenizer(data.tokenizer)
    return model


def build_sampler(sampler_cfg: Any):
    """The `genframe.samplers.Sampler` a ``sampler`` config names (None for None).

    Accepts the config node ``{name: ddim, steps: 50, eta: 0.0}`` (or a bare name); the
    name is looked up in the registry and the other keys are checked against the
    sampler's constructor.
    """
    from genframe.samplers.base import Sampler

    node = to_plain(sampler_cfg)
    if node is None:
        return None
    if isinstance(node, str):
        node = {"name": node}
    if not isinstance(node, Mapping):
        raise UserError(f"sampler: expected a sampler choice like sampler=ddim, got {node!r}")
    kwargs = dict(node)
    name = kwargs.pop("name", None)
    if name is None:
        names = valid_list(get_registry().samplers)
        raise UserError(f"sampler: no name given; choose one of {names} (e.g. sampler=ddim)")
    cls = get_registry().sampler(str(name)).load()
    sampler = cls(**check_kwargs(cls, kwargs, where="sampler", source=source_map("sampler")))
    if not isinstance(sampler, Sampler):
        raise UserError(f"sampler '{name}' is not a genframe.samplers.Sampler")
    return sampler


def build_data(data_cfg: Any):
    name, kwargs = split_name(to_plain(data_cfg), "data")
    cls = get_registry().data_module(name).load()
    kwargs = check_kwargs(cls, kwargs, where="data", source=source_map("data"))
    try:
        return cls(**kwargs)
    except UserError as exc:  # a value the constructor refused: say where it was set
        raised = with_origin(exc, "data", kwargs)
        if raised is exc:
            raise
        raise raised from exc


# Model constructor argument -> data config key that must agree with it.
_SHAPE_KEYS = {"in_channels": "channels", "image_size": "image_size", "num_classes": "num_classes"}


def check_fit(model, data, data_cfg: Mapping[str, Any]) -> None:
    """Refuse a model whose needs the data cannot meet, before any training starts."""
    from genframe.module import trains_on

    needs = set(getattr(model, "needs", ()))
    provides = set(getattr(data, "provides", ()))
    spec = getattr(model, "model_spec", None)
    mname = spec.name if spec is not None else type(model).__name__
    dname = data_cfg.get("name", type(data).__name__)
    missing = needs - provides
    others = [set(keys) for keys in getattr(model, "also_trains_on", ())]
    if not trains_on(model, provides):
        also = "".join(f" (or {valid_list(keys)})" for keys in others)
        raise UserError(
            f"model '{mname}' needs batch keys {valid_list(needs)}{also}, but data '{dname}' "
            f"provides only {valid_list(provides)} (missing: {valid_list(missing)}). Choose data "
            "that provides them, or a model setting that does not need them."
        )
    kwargs = spec.kwargs if spec is not None else {}
    _check_text_fit(kwargs, data, mname, dname)
    for mkey, dkey in _SHAPE_KEYS.items():
        # The data module's attribute wins: it may be filled in from the files (the
        # number of class folders), while the config still says 0.
        dval = getattr(data, dkey, None) or data_cfg.get(dkey)
        if kwargs.get(mkey) and dval:
            if kwargs[mkey] != dval:
                raise UserError(
                    f"model.{mkey}={kwargs[mkey]} but data.{dkey}={dval} "
                    f"(model '{mname}', data '{dname}'): the model was built for other data. "
                    f"Set data.{dkey}={kwargs[mkey]} or train a new model."
                )


def _check_text_fit(kwargs: Mapping[str, Any], data, mname: str, dname: str) -> None:
    """The data's windows must fit the model's context and its tokens the vocabulary."""
    model_ctx, data_ctx = kwargs.get("block_size"), getattr(data, "block_size", None)
    if model_ctx and data_ctx and data_ctx > model_ctx:
        raise UserError(
            f"data.block_size={data_ctx} is longer than the context window of model "
            f"'{mname}' (block_size={model_ctx}); set data.block_size={model_ctx} or less"
        )
    tok = getattr(data, "tokenizer", None)
    vocab = kwargs.get("vocab_size")
    if tok is not None and vocab and tok.vocab_size > vocab:
        raise UserError(
            f"data '{dname}' has a tokenizer of {tok.vocab_size} ids but model '{mname}' "
            f"has vocab_size={vocab}; set model.vocab_size=null to take the data's size"
        )


def instantiate_group(node: Any, group: str) -> list[Any]:
    """Instantiate every ``_target_`` entry of a logger/callbacks config group."""
    from hydra.utils import instantiate

    objects = []
    if node is None:
        return objects
    for key, entry in node.items():
        if not isinstance(entry, (Mapping, DictConfig)) or "_target_" not in entry:
            raise UserError(f"{group}.{key}: expected a mapping with a _target_ class")
        try:
            objects.append(instantiate(entry))
        except Exception as exc:  # instantiate wraps the class's own TypeError
            cause = exc.__cause__ or exc
            if isinstance(cause, UserError):  # the class named the key itself
                raise cause from exc
            raise UserError(f"{group}.{key}: cannot build {entry['_target_']}: {cause}") from exc
    return objects


def trainer_choice() -> tuple[str, str | None]:
    """(the ``trainer`` preset chosen, the launcher's class in a multirun job, else None)
    of the running Hydra job; ``("?", None)`` outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        launcher = str(hc.launcher.get("_target_") or "multirun") if hc.mode == RunMode.MULTIRUN else None
        return str(hc.runtime.choices.get("trainer", "?")), launcher
    except ValueError:
        return "?", None


def build_trainer(cfg: DictConfig, model, *, extra_callbacks: list | None = None, train: bool = True):
    """A Lightning Trainer from `cfg.trainer`, `cfg.logger` and `cfg.callbacks`."""
    import pytorch_lightning as pl

    from genframe.callbacks import AtomicCheckpointIO, FiniteLossGuard, ResumeState
    from genframe.hardware import (
        GENFRAME_TRAINER_KEYS,
        prepare_launch,
        resolve_trainer_kwargs,
        tune_allocator,
    )
    from genframe.loggers import skip_repeated_metric_moves

    kwargs = to_plain(cfg.trainer)
    settings = {key: kwargs.pop(key, None) for key in GENFRAME_TRAINER_KEYS}
    choice, launcher = trainer_choice()
    n_params = sum(p.numel() for p in model.parameters())
    kwargs = resolve_trainer_kwargs(kwargs, n_params, choice, source=source_map("trainer"))
    if train:
        prepare_launch(kwargs, launcher=launcher, choice=choice)
        tune_allocator()  # training steps reuse freed memory instead of faulting it in
    skip_repeated_metric_moves()  # self.log without Lightning's per-call device walk
    if getattr(model, "ddp_find_unused_parameters", False) and kwargs.get("strategy") in ("ddp", "ddp_spawn"):
        kwargs["strategy"] += "_find_unused_parameters_true"  # Lightning's registered name
    kwargs = check_kwargs(pl.Trainer, kwargs, where="trainer", source=source_map("trainer"))
    loggers = instantiate_group(cfg.get("logger"), "logger") if train else []
    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks") if train else []
    callbacks += [FiniteLossGuard(), ResumeState()]
    if train:
        callbacks += model_settings(model, **settings)
    callbacks += extra_callbacks or []
    if train and kwargs.get("enable_progress_bar", True):
        callbacks += default_progress_bar(callbacks)
    # Checkpoints are written aside and renamed into place (a kill never tears one).
    plugins = [*(kwargs.pop("plugins", None) or []), AtomicCheckpointIO()]
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        return pl.Trainer(
            **kwargs,
            logger=loggers or False,
            callbacks=callbacks,
            plugins=plugins,
            enable_checkpointing=any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks),
            default_root_dir=str(cfg.paths.output_dir),
        )
    except (MisconfigurationException, ValueError) as exc:
        # Lightning's own checks of argument combinations (strategy vs accelerator, a
        # progress-bar callback with enable_progress_bar=false, ...).
        raise UserError(f"trainer (preset '{choice}'): {exc}") from exc


def default_progress_bar(callbacks: list) -> list:
    """The progress bar Lightning would add to `callbacks` (rich's when rich is installed),
    as genframe's `RichProgressBar` (no ``Epoch 3/-2`` for ``max_epochs=-1``); nothing
    when a progress bar is configured or rich is missing (Lightning's tqdm bar then)."""
    import pytorch_lightning as pl
    from lightning_utilities.core.imports import RequirementCache

    from genframe.callbacks import RichProgressBar

    if any(isinstance(c, pl.callbacks.ProgressBar) for c in callbacks):
        return []
    return [RichProgressBar()] if RequirementCache("rich>=10.2.2") else []  # Lightning's own test


def model_settings(model, *, compile: Any = None, activation_checkpointing: Any = None) -> list:
    """The callbacks of ``trainer.compile`` and ``trainer.activation_checkpointing``."""
    from genframe.callbacks.model_settings import (
        ActivationCheckpointing,
        TorchCompile,
        compile_mode,
    )

    callbacks = []
    if activation_checkpointing:
        callbacks.append(ActivationCheckpointing(model))
    mode = compile_mode(compile)
    if mode is not None:
        callbacks.append(TorchCompile(mode))
    return callbacks


def resolve_hub(cfg):
    """``hub=NAME[:VERSION]``: the verified hub entry becomes ``cfg.run`` (an entry is a
    run directory); returns `cfg`. Checked every time it is used (`genframe.hub.verify`).

    Raises:
        UserError: ``hub=`` with ``run=`` or ``ckpt=``; an unknown or damaged entry.
    """
    ref = cfg.get("hub")
    if ref is None:
        return cfg
    from pathlib import Path

    from genframe.hub import verified

    entry = verified(ref, key="hub")
    # A config this function already resolved (a resumed finetune run's) names the entry twice.
    same = (cfg.get("run") is not None
            and Path(str(cfg.run)).expanduser().resolve() == entry.path.resolve())
    given = [k for k in ("run", "ckpt") if cfg.get(k) is not None and not (k == "run" and same)]
    if given:
        shown = " and ".join(f"{k}={cfg.get(k)}" for k in given)
        raise UserError(f"hub={ref} and {shown}: give one source of the "
                        "model, not both")
    cfg.run = str(entry.path)
    return cfg


def trained_model_and_data(cfg, task: str):
    """The model of ``cfg.run``/``cfg.ckpt`` and the data to use with it.

    The data is ``cfg.data`` when the user chose one, else the data the run trained on.
    Returns (model, run or None, weights path, data module, plain data config).
    """
    from genframe.weights import load_model

    model, run, weights = load_model(cfg.get("run"), cfg.get("ckpt"))
    if cfg.get("data") is not None:
        data_cfg = to_plain(cfg.data)
    elif run is not None and run.data_config:
        data_cfg = run.data_config
    else:
        raise UserError(f"{task} from a checkpoint file needs data=<choice> (and its keys)")
    data = build_data(data_cfg)
    if getattr(model, "tokenizer", None) is not None:
        data.use_tokenizer(model.tokenizer)  # the model's ids, not a newly trained set
    check_fit(model, data, data_cfg)
    return model, run, weights, data, data_cfg
