"""`genframe evaluate`: a trained model's metrics on its data's test (or validation) split."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError
from genframe.files import atomic_write_json
from genframe.runs import start_run, update_run
from genframe.tasks.build import build_trainer, to_plain, trained_model_and_data
from genframe.tasks.common import generation_options, report, source_record
from genframe.tasks.preflight import check_generation, check_task_config

log = logging.getLogger("genframe")

#: The splits `genframe evaluate` reports on (``split=...``); the first is the default.
EVAL_SPLITS = ("test", "val")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the model's validation step over one split of ``run``'s (or ``ckpt``'s) data
    (or of ``data=...``) and report its metrics.

    ``split=test`` (the default) uses the test split, which neither trained the model nor
    chose its checkpoint; ``split=val`` the validation split that chose the checkpoint.
    Keys carry the split's prefix (``test/loss``, ``test/fd``, ...; ``val/...``), the
    image metrics' too. Writes ``metrics.json`` into the new run directory and appends a
    line (with the split) to the evaluated run's ``evaluations.jsonl`` -- not for
    ``hub=``: a hub entry never changes (its card holds the test metrics of the run
    pushed).
    """
    import pytorch_lightning as pl

    check_task_config(cfg, "evaluate")  # every value, before anything is read or built
    split = str(cfg.get("split", EVAL_SPLITS[0]))
    if split not in EVAL_SPLITS:
        raise UserError(f"split={split}: expected one of {', '.join(EVAL_SPLITS)} "
                        "(test: held out from training and checkpoint choice)")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model, run, weights, data, data_cfg = trained_model_and_data(cfg, "evaluate")
    if getattr(data, "set_reference", None) is not None:
        _with_reference(cfg, run, data)
    loader = data.dataloader(split)  # refuses data without this split before any output
    image_metrics = cfg.metrics.enabled and "image" in model.needs
    prompts = alignment_prompts(cfg, model, data, split)
    if image_metrics and cfg.metrics.extractor == "classifier" and "label" not in data.provides:
        if prompts is None:
            raise UserError(
                f"metrics.extractor=classifier needs labelled images, and data "
                f"'{data_cfg.get('name')}' has no labels; use metrics.extractor=timm with local "
                "weights (metrics.timm_model, metrics.timm_weights), or metrics.enabled=false")
        log.warning("image metrics (FD, precision, recall) are left out: metrics.extractor="
                    "classifier needs labelled images and data '%s' has captions, not labels "
                    "(metrics.extractor=timm with local weights measures them); text-image "
                    "alignment is measured", data_cfg.get("name"))
        image_metrics = False
    # sampler.*, guidance and sampling.* now, not after the validation loop.
    check_generation(cfg, model, num_samples=1 if image_metrics else 0)
    if run is not None and cfg.get("data") is None:
        _warn_if_trained_before_test_splits(run.path, data, data_cfg, split)
    out_dir = Path(cfg.paths.output_dir)
    from genframe.callbacks import SplitProgressBar

    bar = [SplitProgressBar(split)] if cfg.trainer.get("enable_progress_bar", True) else []
    trainer = build_trainer(cfg, model, train=False, extra_callbacks=bar)
    start_run(out_dir, cfg, "evaluate", device=trainer.strategy.root_device,
              source=source_record(run, weights, cfg.get("hub")), data=data_cfg)
    # The model's validation step logs val/...; over another split they are that split's.
    results = trainer.validate(model, dataloaders=loader, verbose=False)
    metrics = {_with_prefix(k, split): float(v)
               for k, v in sorted((results[0] if results else {}).items())}
    if image_metrics:
        metrics.update(_image_metrics(cfg, model, data, split))
    if prompts:
        metrics.update(_alignment_metrics(cfg, model, prompts, split))
    atomic_write_json(out_dir / "metrics.json", metrics)
    update_run(out_dir, status="completed")
    from genframe.hub import entry_at

    if run is not None and entry_at(run.path) is None:  # a hub entry never changes
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "evaluate_run": str(out_dir),
                "split": split, "data": data_cfg, "metrics": metrics,
                "sampling": to_plain(cfg.get("sampling")) or {}}
        if image_metrics:
            line["real"] = str(cfg.metrics.real)
        with open(run.path / "evaluations.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    report(out_dir, metrics, f"{split} metrics of {weights}:")
    return {"run_dir": out_dir, "metrics": metrics, "split": split,
            "objective": metrics.get(f"{split}/loss")}


def _with_reference(cfg, run, data) -> None:
    """Preference pairs are scored against a reference model (DPO): ``reference=`` or
    the one the evaluated run was fine-tuned against (run.json's ``dpo_reference``)."""
    from genframe.weights import load_model

    reference = cfg.get("reference") or (run.info.get("dpo_reference") if run is not None else None)
    if reference is None:
        raise UserError("evaluate on preference pairs measures DPO against a reference model, and "
                        "this model's run records none; give reference=<run dir> or "
                        "reference=hub:NAME:VERSION (e.g. the model it was fine-tuned from)")
    reference = str(reference)
    if reference.startswith("hub:"):
        from genframe.hub import verified

        source = str(verified(reference.removeprefix("hub:"), key="reference").path)
    else:
        source = reference
    try:
        model, _, _ = load_model(source, None)
    except UserError as exc:
        raise UserError(f"reference={reference}: {exc}") from exc
    data.set_reference(model, source=reference)


def _with_prefix(key: str, split: str) -> str:
    """``val/loss`` -> ``test/loss`` for split=test; other keys stay as they are."""
    return f"{split}/{key[len('val/'):]}" if key.startswith("val/") else key


def _warn_if_trained_before_test_splits(run_path: Path, data, data_cfg: dict, split: str) -> None:
    """A run whose data config has a val_fraction but no test_fraction was trained before
    data modules had test splits; say where its splits now overlap its training data."""
    test_fraction = getattr(data, "test_fraction", None)
    val_fraction = data_cfg.get("val_fraction")
    if "test_fraction" in data_cfg or val_fraction is None or not test_fraction:
        return
    # That run trained on all but the first val_fraction of the split permutation; today
    # the first test_fraction are the test split and the next val_fraction the validation
    # split (genframe.data.base.split_indices).
    if split == "val" or test_fraction > val_fraction:
        log.warning(
            "%s was trained before data had a test split (its data config has no "
            "test_fraction): part of today's %s split was in its training data, so these "
            "%s/* figures are optimistic; split=test holds images it never trained on "
            "while test_fraction (%s) <= its val_fraction (%s)",
            run_path, split, split, test_fraction, val_fraction)


def alignment_prompts(cfg: DictConfig, model, data, split: str) -> list[str] | None:
    """The captions of `split` to measure text-image alignment with, or None when it
    does not apply: metrics off, a model without prompts, data without captions, or
    captions that are not shapes captions (the metric reads shapes; said in the log)."""
    from genframe.data.shapes import parse_caption
    from genframe.data.base import split_captions

    if not (cfg.metrics.enabled and "prompt" in model.condition_keys and "image" in model.needs
            and "caption" in getattr(data, "provides", ())):
        return None
    limit = cfg.metrics.get("alignment_prompts")
    captions = split_captions(data, split, limit)
    if not any(parse_caption(c) is not None for c in captions):
        log.info("text-image alignment is not measured: the %s captions are not shapes "
                 "captions (data=shapes), which the alignment metric reads", split)
        return None
    return captions


def _alignment_metrics(cfg: DictConfig, model, prompts: list[str], split: str) -> dict[str, float]:
    """Alignment of one generated image per caption of the split, keyed ``<split>/...``."""
    from genframe.metrics.model_metrics import model_alignment

    started = time.perf_counter()
    values = model_alignment(model, prompts, batch_size=cfg.metrics.batch_size, seed=cfg.seed,
                             **generation_options(cfg, model))
    log.info("alignment: %d images generated and read in %.0f s", len(prompts),
             time.perf_counter() - started)
    return {f"{split}/{k}": v for k, v in values.items()}


def _image_metrics(cfg: DictConfig, model, data, split: str) -> dict[str, float]:
    """FD, precision/recall and class accuracy of generated images against the
    ``metrics.real`` images, keyed ``<split>/...``."""
    from genframe.metrics.model_metrics import data_image_metrics, model_image_metrics

    m = cfg.metrics
    image_metrics = data_image_metrics(
        data, extractor=m.extractor, timm_model=m.timm_model, timm_weights=m.timm_weights,
        timm_image_size=m.timm_image_size, k=m.k, real=m.real,
    )
    values = model_image_metrics(model, image_metrics, m.num_samples, batch_size=m.batch_size,
                                 seed=cfg.seed, **generation_options(cfg, model))
    out = {f"{split}/{k}": v for k, v in values.items()}
    out["metrics/num_samples"] = float(m.num_samples)
    out["metrics/num_real"] = float(image_metrics.num_real)
    if image_metrics.classifier is not None:
        out["metrics/classifier_val_accuracy"] = float(image_metrics.classifier.val_accuracy)
    return out
