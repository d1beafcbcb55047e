"""Continuing a run from its last checkpoint, in two ways:

- ``genframe resume run=DIR`` continues the run **in place**: the same run directory, its
  exact stored config (with any ``key=value`` changes, checked against that config), the
  loggers going on with their step count. What a pre-empted cluster job needs when it is
  requeued with the same command (`continue_in_place`).
- ``genframe train resume=DIR`` starts a **new** run that continues from that run's
  checkpoint, recorded in its lineage (`resolve_resume`).

Both keep the run's config groups and its tokenizer, and let new values (a longer
``trainer.max_steps``, a new ``model.lr``) take effect (`genframe.callbacks.ResumeState`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from genframe.errors import UserError
from genframe.files import looks_like_safetensors, torch_load_weights
from genframe.runs import Run, open_run

log = logging.getLogger("genframe")

# Config groups a resumed run keeps: changing one would make it another run.
GROUPS = ("data", "model", "trainer", "logger", "callbacks", "experiment", "debug", "paths",
          "finetune", "method")


@dataclass
class Resumed:
    """What continuing a run needs.

    Attributes:
        cfg: the run's stored config with the new ``key=value`` overrides applied and
            ``paths`` pointing at the new run directory.
        ckpt_path: the run's ``checkpoints/last.ckpt``.
        task: the task that made the run (``train`` or ``finetune``); its preparation
            rebuilds the model and data.
        lineage: what the new run records about where it came from.
    """

    cfg: DictConfig
    ckpt_path: str
    task: str
    lineage: dict[str, Any] = field(default_factory=dict)
    run: Run | None = None

    def prepare(self):
        """The model and data of the continued run (`genframe.tasks.fit.Prepared`), built by
        the preparation of the task that made the run. Text data uses the run's own
        tokenizer, never a newly trained one (its ids are what the kept weights mean), and
        the checkpoint's tensors must fit the model the config now builds.

        Raises:
            UserError: a changed value changes the network's shapes.
        """
        from genframe.files import load_state_dict_strict
        from genframe.tasks import TASKS

        options = {}
        if self.task == "train" and self.run is not None:
            options["tokenizer"] = run_tokenizer(self.run)
        prepared = TASKS[self.task].prepare()(self.cfg, **options)
        prepared.lineage = {**self.lineage, **prepared.lineage}
        state = torch_load_weights(Path(self.ckpt_path), where=self.ckpt_path)["state_dict"]
        try:
            load_state_dict_strict(prepared.model, state, where=f"{self.ckpt_path}")
        except UserError as exc:
            raise UserError(
                f"{exc}. A resumed run keeps its network: a changed value changes its shapes; "
                "give only values that do not (lr, warmup_steps, ...), or train a network of "
                "the new size as a new run (genframe train)"
            ) from exc
        return prepared


def run_tokenizer(run: Run):
    """The tokenizer a run trained with (its ``tokenizer.json``), or None."""
    from genframe.text.tokenize import FILENAME, load_tokenizer

    return load_tokenizer(run.path) if (run.path / FILENAME).is_file() else None


def run_choices(run: Run) -> dict[str, str]:
    """The config-group choices a run was composed from (``model: transformer``), read from
    its ``.hydra/hydra.yaml``; only the groups a resumed run keeps (`GROUPS`)."""
    path = run.path / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}
    try:
        choices = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.choices") or {}
    except Exception:  # noqa: BLE001 - an unreadable Hydra record only loses this check
        return {}
    return {str(k): str(v) for k, v in choices.items() if k in GROUPS and v is not None}


def _migrated(stored: DictConfig) -> DictConfig:
    """A stored config with the model's old argument names (``renamed_arguments``) renamed,
    so runs saved before a rename resume."""
    from genframe.plugins import get_registry

    model = stored.get("model")
    if model is None or model.get("name") not in get_registry().models:
        return stored
    cls = get_registry().model(model.name).load()
    for old, new in (getattr(cls, "renamed_arguments", None) or {}).items():
        if old in model and new not in model:
            model[new] = model.pop(old)
    return stored


# What `~key` may remove on resume (a callback that should not run again); other keys
# stay, so the run's config keeps every key its model and data were built with.
DELETABLE = ("callbacks.",)

# Keys that say where a run and its base are: a continued run keeps them.
FIXED = ("paths", "hydra", "resume", "run", "task_name")

#: What Lightning needs in a checkpoint to continue training from it.
TRAINING_STATE = ("state_dict", "optimizer_states", "loops", "global_step")


def check_last_checkpoint(run: Run, path: Path, *, where: str) -> tuple[int, int]:
    """Check a run's ``last.ckpt`` before Lightning resumes from it: readable without
    unpickling code, holding the training state, and the model run.json records (its
    tensors fitting that model). There is no fall-back: only this file holds the
    optimizer state; the run's weights can still be fine-tuned.

    Returns:
        the checkpoint's global step and epoch.

    Raises:
        UserError: naming `where`, what is wrong and the way on.
    """
    from genframe.spec import ModelSpec
    from genframe.weights import SPEC_KEY, build_from_spec, check_run_model

    has_weights = run.weights() is not None or run.checkpoint("best") is not None
    way_on = ("; the run cannot be continued" + (
        f". Fine-tune from its weights instead: genframe finetune run={run.path}" if has_weights
        else " (it has no other weights: train it again)"))
    try:
        if looks_like_safetensors(path):
            raise UserError(f"{where}: a safetensors weights file, which holds no training "
                            "state to continue from (a Lightning checkpoint does)")
        ckpt = torch_load_weights(path, where=where)
        if not isinstance(ckpt, dict) or SPEC_KEY not in ckpt:
            raise UserError(f"{where}: not a genframe checkpoint (no model spec inside)")
        lacking = [k for k in TRAINING_STATE if k not in ckpt]
        if lacking or not isinstance(ckpt["state_dict"], dict):
            raise UserError(f"{where}: holds no training state to continue from "
                            f"(no {', '.join(lacking) or 'state_dict'})")
        spec = ModelSpec.from_dict(ckpt[SPEC_KEY], where=where)
        check_run_model(run, spec, where=where)
        build_from_spec(spec, ckpt["state_dict"], source=where)  # the tensors fit it
    except UserError as exc:
        raise UserError(f"{exc}{way_on}") from exc
    return int(ckpt["global_step"]), int(ckpt.get("epoch", 0))


def resolve_resume(cfg: DictConfig, overrides: list[str] | None = None) -> Resumed:
    """Read ``cfg.resume`` (a run directory) and build the config that continues it.

    Args:
        cfg: the composed `train` config with ``resume`` set.
        overrides: the ``key=value`` overrides to apply; by default the command line's
            (from Hydra). Group choices are refused: a resumed run keeps its groups.

    Raises:
        UserError: not a run directory, no ``last.ckpt``, a ``last.ckpt`` that is damaged,
            carries code, holds another model than run.json records or lacks the training
            state (`check_last_checkpoint`), a run of another task, or an override that
            changes a config group.
    """
    from hydra.core.hydra_config import HydraConfig

    run = open_run(cfg.resume, key="resume")
    task = run.info.get("task")
    if task not in ("train", "finetune"):
        raise UserError(f"resume={cfg.resume}: a '{task}' run; only train and finetune runs "
                        "can be resumed")
    last = run.checkpoint("last")
    if last is None:
        raise UserError(f"resume={cfg.resume}: the run has no checkpoints/last.ckpt to resume from")
    step, epoch = check_last_checkpoint(run, last, where=f"resume={cfg.resume}: checkpoints/last.ckpt")
    stored = _migrated(run.config)
    if overrides is None:
        try:
            overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
        except ValueError:  # not inside a Hydra run
            overrides = []
    # The new run's directory (paths.*) is already in `cfg`.
    overrides = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "paths."))]
    apply_overrides(stored, overrides, run_choices(run), open_keys=())
    _check_limits(stored, run, step, epoch, f"resume={cfg.resume}")
    stored.paths = cfg.paths  # the new run directory
    stored.resume = str(run.path)
    return Resumed(cfg=stored, ckpt_path=str(last), task=task,
                   lineage={"resumed_from": str(last)}, run=run)


def apply_overrides(stored: DictConfig, overrides: list[str], choices: dict[str, str], *,
                    open_keys: tuple[str, ...]) -> list[str]:
    """Apply ``key=value`` overrides to a run's stored config, checked against it.

    A group choice equal to the run's (``model=transformer`` on a transformer run) is
    accepted and changes nothing; another choice is refused. A ``key=value`` must name a
    key of the stored config, unless it lies under one of `open_keys` (``trainer.``,
    ``sampling.``) or is added with ``+``/``++``; ``~key`` removes one.

    Returns:
        the overrides that changed something, as typed.

    Raises:
        UserError: a changed group, a key the run's config does not have (with the closest
            names), or a key that cannot change on resume (``paths.*``, ``hydra.*``).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from genframe.errors import did_you_mean

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as exc:
        raise UserError(f"cannot read the overrides: {exc}") from exc
    changed = []
    for ov in parsed:
        key = ov.key_or_group
        if key in GROUPS:
            if choices.get(key) == str(ov.value()):
                continue
            was = f" (it was composed with {key}={choices[key]})" if key in choices else ""
            raise UserError(
                f"a resumed run keeps its config groups; '{ov.input_line}' would change them{was}. "
                "Change values with key=value (e.g. trainer.max_steps=2000), or start a new "
                "run with genframe train / genframe finetune."
            )
        if key.split(".", 1)[0] in FIXED:
            raise UserError(f"'{ov.input_line}': {key} cannot change when a run is continued "
                            "(it says where the run and its base are)")
        exists = OmegaConf.select(stored, key, default=_ABSENT) is not _ABSENT
        if ov.is_delete() and not key.startswith(DELETABLE):
            raise UserError(f"'{ov.input_line}': a continued run keeps its config's keys; only "
                            f"callbacks can be removed ({', '.join(p + '*' for p in DELETABLE)}); "
                            "change a value with key=value instead")
        if ov.is_delete():
            if not exists:
                raise UserError(f"'{ov.input_line}': the run's config has no key {key}")
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(stored, parent) if parent else stored
            node.pop(leaf)
        else:
            adding = ov.is_add() or ov.is_force_add() or key.startswith(open_keys)
            if not exists and not adding:
                parent, _, leaf = key.rpartition(".")
                node = OmegaConf.select(stored, parent, default=None) if parent else stored
                siblings = [str(k) for k in node] if OmegaConf.is_dict(node) else []
                names = [f"{parent}.{k}" if parent else k for k in siblings]
                raise UserError(
                    f"'{ov.input_line}': the run's config has no key {key}."
                    f"{did_you_mean(key, names)} Keys are checked against the run's own "
                    "config.yaml; add a new one with +key=value")
            OmegaConf.update(stored, key, ov.value(), force_add=True)
        changed.append(ov.input_line)
    return changed


_ABSENT = object()


# Keys whose children are open-ended (any Trainer argument, model sampling options): a
# continued run may set one its config does not list yet.
OPEN_KEYS = ("trainer.", "sampling.", "finetune.hparams.")


def continue_in_place(args: list[str]) -> dict[str, Any]:
    """``genframe resume run=DIR [key=value ...]``: continue a train or finetune run in its
    own directory from ``checkpoints/last.ckpt``, exactly where it stopped.

    Everything is checked before anything in the run directory changes: the directory,
    its lock (a live process writing it is refused), its checkpoint (readable, holding the
    training state, of the model run.json records), the overrides (against the run's own
    config.yaml; group changes refused) and the model they build (the checkpoint must fit
    it). Then config.yaml takes the changed values, run.json records the continuation in
    ``resumes`` and is ``running`` again, and training goes on: the same loggers (CSV rows
    appended, TensorBoard events purged from the checkpoint's step on, the same W&B run),
    the data loader at its saved position, the random number generators restored.

    Returns:
        the training task's result (``run_dir``, ``metrics``, ...).

    Raises:
        UserError: no ``run=``, not a run directory, a run being written, no or a bad
            checkpoint, a bad override. A completed run with nothing to change is left
            as it is (a note, no error: a requeued job may find its run finished).
    """
    import sys
    import time

    from genframe.hardware import global_rank
    from genframe.runs import continue_run_record, run_lock
    from genframe.tasks import guarded
    from genframe.tasks.build import instantiate_group
    from genframe.tasks.fit import fit

    usage = "genframe resume run=<run dir> [key=value ...]"
    runs = [a.split("=", 1)[1] for a in args if a.startswith("run=")]
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise UserError(f"resume: {flags[0]} is not accepted here; usage: {usage}")
    if len(runs) != 1 or not runs[0]:
        raise UserError(f"resume: give the one run to continue; usage: {usage}")
    overrides = [a for a in args if not a.startswith("run=")]
    run = open_run(runs[0], key="run")
    task = run.info.get("task")
    if task not in ("train", "finetune"):
        raise UserError(f"run={runs[0]}: a '{task}' run; only train and finetune runs can be "
                        "continued")
    where = f"run={runs[0]}"
    with run_lock(run.path, key="run"):
        last = run.checkpoint("last")
        if last is None:
            raise UserError(
                f"{where}: the run has no checkpoints/last.ckpt to continue from (it stopped "
                "before its first checkpoint); start it again, and save checkpoints more often "
                "with callbacks.checkpoint.every_n_steps=N (nothing was changed)")
        step, epoch = check_last_checkpoint(run, last, where=f"{where}: checkpoints/last.ckpt")
        if run.info.get("status") == "completed" and not overrides:
            # A requeued job whose run finished meanwhile: nothing to do, not an error.
            print(f"genframe: {where}: the run already completed (step {step}); nothing to "
                  "continue. To train it further, give a larger limit (e.g. "
                  "trainer.max_steps=N or trainer.max_epochs=N)", file=sys.stderr)
            return {"run_dir": run.path, "metrics": {}}
        stored = _migrated(run.config)
        changed = apply_overrides(stored, overrides, run_choices(run), open_keys=OPEN_KEYS)
        record = OmegaConf.create(OmegaConf.to_container(stored, resolve=False))
        stored.paths.output_dir = str(run.path)
        resumed = Resumed(cfg=stored, ckpt_path=str(last), task=task, run=run)
        prepared = resumed.prepare()  # every remaining check: values, data, model shapes
        instantiate_group(stored.get("callbacks"), "callbacks")  # their values, now
        _check_limits(stored, run, step, epoch, where)
        entry = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": step,
                 "previous_status": run.info.get("status"), "overrides": changed}
        # config.yaml keeps its interpolations; it changes only when a value did. The
        # further processes of a DDP run (started again by Lightning) only train.
        rank = global_rank()
        if rank == 0:
            continue_run_record(run.path, record if changed else None, entry)
        train_cfg = _continued_loggers(stored, run, step)
        name = stored.get("task_name", task) + (f"_rank{rank}" if rank else "")
        with _job_log(run.path / f"{name}.log"):
            log.info("continuing %s from checkpoints/last.ckpt (step %d, epoch %d)%s", run.path,
                     step, epoch, f" with {' '.join(changed)}" if changed else "")
            return guarded(task, run.path, lambda: fit(train_cfg, prepared, task=task,
                                                       ckpt_path=str(last), continued=True))


def _check_limits(cfg: DictConfig, run: Run, step: int, epoch: int, where: str) -> None:
    """Refuse limits that leave nothing to train: below where the checkpoint is, or, for a
    completed run, not beyond where it ended (Lightning would fail, or only validate and
    rewrite the run's results)."""
    trainer = cfg.get("trainer") or {}
    limits = {k: trainer.get(k) for k in ("max_steps", "max_epochs")}
    limits = {k: v for k, v in limits.items() if isinstance(v, int) and not isinstance(v, bool) and v >= 0}
    completed = run.info.get("status") == "completed"
    reached = {"max_steps": int(run.info.get("steps", step)) if completed else step,
               "max_epochs": int(run.info.get("epochs", epoch)) if completed else epoch}
    low = [f"trainer.{k}={v}" for k, v in limits.items() if v <= reached[k]]
    if low:
        at = f"step {reached['max_steps']}, epoch {reached['max_epochs']}"
        what = "completed at" if completed else "is at"
        raise UserError(f"{where}: {', '.join(low)} leaves nothing to train: the run {what} {at}; "
                        "give a larger trainer.max_steps or trainer.max_epochs (nothing was changed)")


def _continued_loggers(cfg: DictConfig, run: Run, step: int) -> DictConfig:
    """`cfg` with its loggers set to go on with the run's own logger runs: TensorBoard
    hides events from `step` on (the continued run writes them again), W&B and MLflow
    reopen the run ids run.json recorded."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    ids = run.info.get("logger_runs", {})
    for entry in (cfg.get("logger") or {}).values():
        target = str(entry.get("_target_", "")) if OmegaConf.is_dict(entry) else ""
        if target.endswith("TensorBoardLogger"):
            entry.purge_step = step
        elif target.endswith("WandbLogger") and ids.get("wandb"):
            entry.id = ids["wandb"]
            entry.resume = "allow"
        elif target.endswith("MLFlowLogger") and ids.get("mlflow"):
            entry.run_id = ids["mlflow"]
    return cfg


@contextlib.contextmanager
def _job_log(path: Path):
    """Log as a Hydra job does (INFO to the terminal and to the run's log file), appending
    to the log the run started, while a run continued outside Hydra trains."""
    import logging
    import sys

    root = logging.getLogger()
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(path, mode="a")]
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.setLevel(level)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
