"""`genframe finetune`: continue from trained weights; what is learned (the data, or a subject
from a few images) and how (all weights, or LoRA adapters) are two separate choices."""

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
from genframe.tasks.common import model_version, source_record
from genframe.tasks.fit import Prepared, fit
from genframe.tasks.preflight import check_generation, check_monitor, check_task_config
from genframe.tasks.subject import subject_model_and_data


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune a trained model: WHAT it learns (``finetune=``) and HOW (``method=``)
    are two choices that compose.

    What (``finetune=``, recorded as ``finetune.learns``):

    - ``data`` (default): the run's own data, or ``data=<choice>``.
    - ``subject``: one subject from a few images (``data.root``), bound to a rare word
      (``token``) of a class the model knows (``class_word``), with prior preservation:
      images of the class the model made itself before tuning (``num_class_images``,
      ``class_prompts``, ``prior_loss_weight``, ``class_guidance``,
      ``class_sampler_steps``; ``prior_preservation=false`` turns it off). DreamBooth,
      Ruiz et al. 2023, https://arxiv.org/abs/2208.12242. Text-to-image models only.

    How (``method=``, recorded as ``finetune.method``), keys under ``finetune.``: ``lr``
    (a new learning rate), ``hparams`` (other constructor arguments to change, such as
    ``warmup_steps`` or ``dropout``; not sizes), ``freeze`` (parameter-name patterns such
    as ``"encoder.*"``) and, for ``method=lora``, ``lora`` (``r``, ``alpha``,
    ``dropout``, ``target_modules`` as module-name patterns, ``merge``).

    Args:
        cfg: the composed `finetune` config: ``run`` or ``ckpt`` to start from, ``data``
            (default: the data of that run), the ``finetune`` node and, for
            ``finetune=subject``, the keys above.

    A model that already carries LoRA adapters (a LoRA run) has them merged into its base
    weights first; ``method=lora`` then trains fresh adapters on top. A LoRA run writes
    ``adapter.safetensors`` (the adapters alone) next to ``model.safetensors`` (base and
    adapters, or the merged model with ``finetune.lora.merge=true``). A subject run also
    writes ``class_images/`` (the class images, their prompts in ``manifest.jsonl``).

    ``genframe train resume=<finetune run>`` continues a fine-tuning run (through
    `prepare_finetuning`).

    Returns:
        As `genframe.tasks.train.train`; run.json records where it started from and both
        choices (``finetune_choices``), and for a subject its token, class and data
        (``subject``).

    Raises:
        UserError: a bad value; for ``finetune=subject`` also a model without captions, a
            subject folder with no readable image, a token the model already knows or
            cannot read, a class word it never saw (`genframe.data.subject.check_token`).
    """
    result = fit(cfg, prepare_finetuning(cfg), task="finetune")
    if (finetune_choices(cfg)["finetune"] == "feedback" and cfg.get("hub") is not None
            and cfg.feedback.get("push", True)):
        from genframe.hub import entry_at, push

        base = entry_at(cfg.run)
        card = base.card() if base is not None else {}
        entry = push(result["run_dir"], base.name if base is not None else str(cfg.hub).split(":")[0],
                     license=card.get("license"),
                     intended_use=f"fine-tuned on the feedback of {base.ref if base else cfg.hub}: "
                                  f"{card.get('intended_use') or 'as the base model'}",
                     limitations=card.get("limitations"))
        print(f"pushed {entry.ref} (use it: genframe generate hub={entry.ref})", flush=True)
        result["hub"] = entry.ref
    return result


def _with_feedback_data(cfg: DictConfig) -> DictConfig:
    """``finetune=feedback``: the training set built from the feedback store becomes
    ``cfg.data`` (and its snapshot ``cfg._feedback_snapshot``, for run.json)."""
    from omegaconf import OmegaConf, open_dict

    from genframe.runs import open_run
    from genframe.tasks.feedback import feedback_training_set

    if cfg.get("_feedback_snapshot") is not None:  # a resumed run: its training set is built
        return cfg
    if cfg.get("data") is not None:
        raise UserError("finetune=feedback builds its training set from the feedback store; "
                        "give no data=")
    if cfg.get("run") is None:
        raise UserError("finetune=feedback needs the model as hub=NAME[:VERSION] or run=DIR "
                        "(the version whose samples were rated)")
    from genframe.feedback import FeedbackStore

    node = cfg.feedback
    run = open_run(cfg.run)
    version = node.get("model_version") or model_version(cfg, run, run.path)
    min_rating = node.get("min_rating", 0.5)
    if isinstance(min_rating, bool) or not isinstance(min_rating, (int, float)) or not -1 <= min_rating <= 1:
        raise UserError(f"feedback.min_rating must be a number in [-1, 1], got {min_rating!r}")
    data, snapshot = feedback_training_set(
        FeedbackStore(node.get("db")), str(version), Path(cfg.paths.output_dir),
        min_rating=float(min_rating), use_corrections=bool(node.get("use_corrections", True)),
        min_samples=int(node.get("min_samples", 8)), base_data=run.data_config,
        objective=str(node.get("objective", "sft")),
        num_classes=int(run.model_spec.kwargs.get("num_classes") or 0))
    data.update(to_plain(node.get("data")) or {})  # feedback.data.*: the built data's settings
    pairs = f"{snapshot['pairs']} preference pairs from " if "pairs" in snapshot else ""
    print(f"feedback training set ({snapshot['objective']}): {pairs}{snapshot['samples']} samples of "
          f"{version} ({snapshot['corrected']} corrected) from {snapshot['store']}", flush=True)
    with open_dict(cfg):
        cfg.data = OmegaConf.create(data)
        cfg._feedback_snapshot = snapshot
    return cfg


def prepare_finetuning(cfg: DictConfig) -> Prepared:
    """The trained model of a `finetune` config, changed as it asks (learning rates,
    hyperparameters, merged adapters, new LoRA adapters, frozen parameters), and its data
    (for ``finetune=subject``: the subject's images mixed with class images)."""
    import pytorch_lightning as pl

    check_task_config(cfg, "finetune")  # every value, before anything is read or built
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    choices = finetune_choices(cfg)
    subject = None
    if choices["finetune"] == "subject":
        model, run, weights, data, data_cfg, subject = subject_model_and_data(cfg)
    else:
        for key in ("token", "class_word"):
            if cfg.get(key) is not None:
                raise UserError(f"{key}={cfg.get(key)}: only finetune=subject reads it; add "
                                f"finetune=subject (and data.root=<the subject's images>)")
        if choices["finetune"] == "feedback":
            cfg = _with_feedback_data(cfg)
        model, run, weights, data, data_cfg = trained_model_and_data(cfg, "finetune")

    changes = dict(to_plain(cfg.finetune.get("hparams")) or {})
    if cfg.finetune.lr is not None:
        changes.update(learning_rate_changes(model, cfg.finetune.lr))
    if changes:
        model = with_hparams(model, changes)
        check_fit(model, data, data_cfg)
    lineage: dict[str, Any] = {"started_from": source_record(run, weights, cfg.get("hub")),
                               "finetune_choices": choices}
    if subject is not None:
        lineage["subject"] = subject
    if choices["finetune"] == "feedback":
        lineage["feedback_snapshot"] = to_plain(cfg.get("_feedback_snapshot"))
    set_reference = getattr(data, "set_reference", None)
    if set_reference is not None:  # preference pairs: DPO against the model as it starts
        set_reference(model, source=model_version(cfg, run, weights))
        lineage["dpo_reference"] = data.reference
    if has_lora(model):
        merge_lora(model)
        lineage["merged_adapters_of_start"] = True
        print("the starting model's LoRA adapters were merged into its base weights", flush=True)
    note = model.on_finetune_start()
    if note:
        lineage["start_weights"] = note
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


#: The choices of the two groups: what is learned, and how.
LEARNS = ("data", "subject", "feedback")
METHODS = ("full", "lora")


def finetune_choices(cfg: DictConfig) -> dict[str, str]:
    """``{"finetune": what is learned, "method": how}`` of a finetune config.

    Each group's file records its choice (``finetune.learns``, ``finetune.method``); a
    config stored before the groups were split (no such keys) is read as ``data`` and
    ``lora`` or ``full`` by whether it holds ``finetune.lora``.

    Raises:
        UserError: a recorded choice that is not one of the group's, a method that does
            not match the keys (``finetune.method=lora`` set by hand without
            ``method=lora``), ``finetune=subject`` with other data than ``data=subject``.
    """
    node = cfg.finetune
    learns = node.get("learns", "data")
    has_lora_keys = node.get("lora") is not None
    method = node.get("method", "lora" if has_lora_keys else "full")
    if learns not in LEARNS:
        raise UserError(f"finetune.learns={learns}: expected one of {valid_list(LEARNS)}; choose "
                        "what is learned with finetune=<choice> (finetune=data, finetune=subject)")
    if method not in METHODS or (method == "lora") != has_lora_keys:
        raise UserError(f"finetune.method={method}: set by the method group, not by hand; choose "
                        f"it with method=<choice> ({valid_list(METHODS)})"
                        + ("" if has_lora_keys else ", e.g. method=lora for LoRA adapters"))
    if learns == "subject":
        data = cfg.get("data")
        name = data.get("name") if data is not None else None
        if name != "subject":
            raise UserError(f"finetune=subject reads the subject's images with data=subject "
                            f"(data.root=<folder>), but data={name} was chosen; leave data out")
    return {"finetune": str(learns), "method": str(method)}


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
    except UserError as exc:
        if "size mismatch" not in str(exc) and "not fit" not in str(exc):
            # A value the model refuses (model.dpo_beta must be > 0): say so, as set here.
            raise UserError(str(exc).replace("model.", "finetune.hparams.")) from exc
        raise _does_not_fit(changes, exc) from exc
    except RuntimeError as exc:
        raise _does_not_fit(changes, exc) from exc


def _does_not_fit(changes: dict[str, Any], exc: Exception) -> UserError:
    changed = ", ".join(f"{k}={v}" for k, v in changes.items())
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else "")[:200]
    return UserError(
        f"finetune.hparams: {changed} does not fit the trained weights ({first}); only "
        "training settings (lr, warm-up, dropout, ...) can change when fine-tuning")


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
        raise UserError(f"finetune.lora.{exc.args[0]}: missing (see conf/method/lora.yaml)") from exc
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
