"""`genframe finetune`: continue from trained weights, optionally on new data."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError, did_you_mean, valid_list
from genframe.lora import (
    ADAPTER_FILE,
    apply_lora,
    describe,
    generalise_names,
    has_lora,
    merge_lora,
    parameter_counts,
    save_adapter,
)
from genframe.runs import update_run
from genframe.tasks.build import check_fit, to_plain, trained_model_and_data
from genframe.tasks.common import source_record
from genframe.tasks.fit import Prepared, fit
from genframe.tasks.preflight import check_generation, check_monitor, check_task_config


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune a trained model, fully or with LoRA adapters.

    Args:
        cfg: the composed `finetune` config: ``run`` or ``ckpt`` to start from, ``data``
            (default: the data of that run) and the ``finetune`` group: ``lr`` (a new
            learning rate), ``hparams`` (other constructor arguments to change, such as
            ``warmup_steps`` or ``dropout``; not sizes), ``freeze`` (parameter-name patterns such as ``"encoder.*"``)
            and, for ``finetune=lora``, ``lora`` (``r``, ``alpha``, ``dropout``,
            ``target_modules`` as module-name patterns, ``merge``).

    A model that already carries LoRA adapters (a LoRA run) has them merged into its base
    weights first; ``finetune=lora`` then trains fresh adapters on top. A LoRA run writes
    ``adapter.safetensors`` (the adapters alone) next to ``model.safetensors`` (base and
    adapters, or the merged model with ``finetune.lora.merge=true``).

    ``genframe train resume=<finetune run>`` continues a fine-tuning run (through
    `prepare_finetuning`).

    Returns:
        As `genframe.tasks.train.train`; the run records where it started from.
    """
    return fit(cfg, prepare_finetuning(cfg), task="finetune")


def prepare_finetuning(cfg: DictConfig) -> Prepared:
    """The trained model of a `finetune` config, changed as it asks (learning rates,
    hyperparameters, merged adapters, new LoRA adapters, frozen parameters), and its data."""
    import pytorch_lightning as pl

    check_task_config(cfg, "finetune")  # every value, before anything is read or built
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model, run, weights, data, data_cfg = trained_model_and_data(cfg, "finetune")

    changes = dict(to_plain(cfg.finetune.get("hparams")) or {})
    if cfg.finetune.lr is not None:
        changes.update(learning_rate_changes(model, cfg.finetune.lr))
    if changes:
        model = with_hparams(model, changes)
        check_fit(model, data, data_cfg)
    lineage: dict[str, Any] = {"started_from": source_record(run, weights)}
    if has_lora(model):
        merge_lora(model)
        lineage["merged_adapters_of_start"] = True
        print("the starting model's LoRA adapters were merged into its base weights", flush=True)
    lora_cfg = to_plain(cfg.finetune.get("lora"))
    before_save = None
    if lora_cfg is not None:
        lineage["lora"] = _apply_lora(model, lora_cfg)
        before_save = _adapter_writer(bool(lora_cfg.get("merge", False)))
    lineage["frozen_parameters"] = freeze(model, list(cfg.finetune.freeze))
    lineage["finetune"] = to_plain(cfg.finetune)
    check_generation(cfg, model)  # sampling.* now, not after the whole training
    check_monitor(cfg, model, data)
    counts = parameter_counts(model)
    lineage["parameters"] = counts
    print(describe(counts), flush=True)
    return Prepared(model=model, data=data, data_cfg=data_cfg, lineage=lineage,
                    before_save=before_save)


def learning_rate_changes(model, lr: Any) -> dict[str, float]:
    """``finetune.lr`` as constructor-argument changes: every learning rate the model
    declares (`GenerativeModule.learning_rate_keys`: ``lr``, or the GAN's ``lr_g`` and
    ``lr_d``) is set to `lr`.

    Raises:
        UserError: `lr` is not a positive number, or the model has no learning-rate argument.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise UserError(f"finetune.lr must be a positive number, got {lr!r}")
    declared = list(getattr(model, "learning_rate_keys", ("lr",)))
    keys = [k for k in declared if k in model.hparams]  # constructor arguments, defaults too
    if not keys:
        raise UserError(
            f"finetune.lr: model '{model.registered_name}' has no learning-rate argument (it "
            f"declares {declared}; its arguments: {valid_list(model.hparams)}); set its own "
            "argument with finetune.hparams.<name>=..."
        )
    return {k: float(lr) for k in keys}


def with_hparams(model, changes: dict[str, Any]):
    """The model rebuilt with some constructor arguments changed, same weights.

    Meant for training settings (learning rate, warm-up, dropout, ...); a change that
    alters the network's weights (a size) is refused.
    """
    from genframe.weights import build_from_spec

    spec = model.model_spec
    kwargs = list(model.hparams)  # every constructor argument, defaults included
    for key in changes:
        if key not in kwargs:
            raise UserError(
                f"finetune.hparams.{key}: model '{spec.name}' has no such argument."
                f"{did_you_mean(key, kwargs)} Its arguments: {valid_list(kwargs)}"
            )
    new_spec = spec.with_kwargs(**changes)
    try:
        return build_from_spec(new_spec, model.state_dict())
    except (UserError, RuntimeError) as exc:
        changed = ", ".join(f"{k}={v}" for k, v in changes.items())
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else "")[:200]
        raise UserError(
            f"finetune.hparams: {changed} does not fit the trained weights ({first}); only "
            "training settings (lr, warm-up, dropout, ...) can change when fine-tuning"
        ) from exc


_LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "merge")


def _apply_lora(model, lora_cfg: dict[str, Any]) -> dict[str, Any]:
    unknown = set(lora_cfg) - set(_LORA_KEYS)
    if unknown:
        key = min(unknown)
        raise UserError(f"finetune.lora.{key}: unknown key.{did_you_mean(key, _LORA_KEYS)}"
                        f" Valid keys: {valid_list(_LORA_KEYS)}")
    if lora_cfg.get("target_modules") is None:  # the model's own choice
        targets = getattr(model, "lora_target_modules", None)
        if not targets:
            from genframe.lora import supported_modules

            names = valid_list(generalise_names(supported_modules(model)), 30)
            raise UserError(
                f"finetune.lora.target_modules: model '{model.registered_name}' names no default "
                f"layers for LoRA; give patterns, e.g. finetune.lora.target_modules='[encoder.*]'. "
                f"This model's layers LoRA can adapt: {names}")
        lora_cfg = {**lora_cfg, "target_modules": list(targets)}
    try:
        summary = apply_lora(model, r=lora_cfg["r"], alpha=lora_cfg["alpha"],
                             dropout=lora_cfg.get("dropout", 0.0),
                             target_modules=lora_cfg["target_modules"])
    except UserError as exc:
        raise UserError(f"finetune.{exc}") from exc
    except KeyError as exc:
        raise UserError(f"finetune.lora.{exc.args[0]}: missing (see conf/finetune/lora.yaml)") from exc
    names = summary["target_modules"]  # exact names in run.json; layer indices as * here
    print(f"LoRA (r={lora_cfg['r']}, alpha={lora_cfg['alpha']}) on {len(names)} modules matching "
          f"{list(lora_cfg['target_modules'])}: {', '.join(generalise_names(names))}", flush=True)
    return summary


def _adapter_writer(merge: bool):
    """After training: write adapter.safetensors, then merge the adapters if asked."""

    def write(model, out_dir: Path) -> None:
        save_adapter(model, out_dir / ADAPTER_FILE)
        if merge:
            merge_lora(model)
            update_run(out_dir, model=model.model_spec, merged_adapters=True)
        update_run(out_dir, adapter=str(out_dir / ADAPTER_FILE))

    return write


def freeze(model, patterns: list[str]) -> int:
    """Freeze parameters whose names match any glob pattern; return how many tensors."""
    if not patterns:
        return 0
    names = [n for n, _ in model.named_parameters()]
    count = 0
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            top = sorted({n.split(".")[0] + ".*" for n in names})
            raise UserError(
                f"finetune.freeze: pattern '{pattern}' matches no parameter. "
                f"Top-level modules: {valid_list(top)}"
            )
        count += len(hits)
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            param.requires_grad_(False)
    return count
