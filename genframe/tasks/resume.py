"""`genframe train resume=DIR`: a new run that continues an earlier one from its last
checkpoint. The run is opened and its config resolved here, in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from genframe.errors import UserError
from genframe.files import looks_like_safetensors, torch_load_weights
from genframe.runs import Run, open_run

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


#: What Lightning needs in a checkpoint to continue training from it.
TRAINING_STATE = ("state_dict", "optimizer_states", "loops", "global_step")


def check_last_checkpoint(run: Run, path: Path, *, where: str) -> None:
    """Check a run's ``last.ckpt`` before Lightning resumes from it: readable without
    unpickling code, holding the training state, and the model run.json records (its
    tensors fitting that model). There is no fall-back: only this file holds the
    optimizer state; the run's weights can still be fine-tuned.

    Raises:
        UserError: naming `where`, what is wrong and the way on.
    """
    from genframe.spec import ModelSpec
    from genframe.weights import SPEC_KEY, build_from_spec, check_run_model

    way_on = (f"; the run cannot be continued. Fine-tune from its weights instead: "
              f"genframe finetune run={run.path}")
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
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run = open_run(cfg.resume, key="resume")
    task = run.info.get("task")
    if task not in ("train", "finetune"):
        raise UserError(f"resume={cfg.resume}: a '{task}' run; only train and finetune runs "
                        "can be resumed")
    last = run.checkpoint("last")
    if last is None:
        raise UserError(f"resume={cfg.resume}: the run has no checkpoints/last.ckpt to resume from")
    check_last_checkpoint(run, last, where=f"resume={cfg.resume}: checkpoints/last.ckpt")
    stored = _migrated(run.config)
    if overrides is None:
        try:
            overrides = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
        except ValueError:  # not inside a Hydra run
            overrides = []
    overrides = [o for o in overrides if not o.startswith("resume=")]
    for ov in OverridesParser.create().parse_overrides(overrides):
        key = ov.key_or_group
        if key in GROUPS:
            raise UserError(
                f"resume keeps the run's config groups; '{ov.input_line}' would change them. "
                "Change values with key=value (e.g. trainer.max_epochs=200)."
            )
        if ov.is_delete():
            OmegaConf.update(stored, key, None, force_add=True)
        else:
            OmegaConf.update(stored, key, ov.value(), force_add=ov.is_add() or ov.is_force_add())
    stored.paths = cfg.paths  # the new run directory
    stored.resume = str(run.path)
    return Resumed(cfg=stored, ckpt_path=str(last), task=task,
                   lineage={"resumed_from": str(last)})
