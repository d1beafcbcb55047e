"""`genframe evaluate`: a trained model's metrics on validation data."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.runs import atomic_write_json, start_run, update_run
from genframe.tasks.build import build_trainer, trained_model_and_data
from genframe.tasks.fit import report


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Validate ``run`` (or ``ckpt``) on its data (or ``data=...``).

    Writes ``metrics.json`` into the new run directory and appends a line to the
    evaluated run's ``evaluations.jsonl``.
    """
    import pytorch_lightning as pl

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model, run, weights, data, data_cfg = trained_model_and_data(cfg, "evaluate")
    out_dir = Path(cfg.paths.output_dir)
    start_run(out_dir, cfg, "evaluate", source={"run": str(run.path) if run else None,
                                               "weights": str(weights)}, data=data_cfg)
    trainer = build_trainer(cfg, model, train=False)
    results = trainer.validate(model, datamodule=data, verbose=False)
    metrics = {k: float(v) for k, v in sorted((results[0] if results else {}).items())}
    if cfg.metrics.enabled and "image" in model.needs:
        metrics.update(_image_metrics(cfg, model, data))
    atomic_write_json(out_dir / "metrics.json", metrics)
    update_run(out_dir, status="completed")
    if run is not None:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "evaluate_run": str(out_dir),
                "data": data_cfg, "metrics": metrics}
        with open(run.path / "evaluations.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    report(out_dir, metrics, f"metrics of {weights}:")
    return {"run_dir": out_dir, "metrics": metrics, "objective": metrics.get("val/loss")}


def _image_metrics(cfg: DictConfig, model, data) -> dict[str, float]:
    """FD, precision/recall and class accuracy of generated images, keyed ``val/...``."""
    from genframe.metrics.model_metrics import data_image_metrics, model_image_metrics
    from genframe.tasks.generate import generation_options

    m = cfg.metrics
    image_metrics = data_image_metrics(
        data, extractor=m.extractor, timm_model=m.timm_model, timm_weights=m.timm_weights,
        timm_image_size=m.timm_image_size, k=m.k, real=m.real,
    )
    values = model_image_metrics(model, image_metrics, m.num_samples, batch_size=m.batch_size,
                                 seed=cfg.seed, **generation_options(cfg, model))
    out = {f"val/{k}": v for k, v in values.items()}
    out["metrics/num_samples"] = float(m.num_samples)
    out["metrics/num_real"] = float(image_metrics.num_real)
    if image_metrics.classifier is not None:
        out["metrics/classifier_val_accuracy"] = float(image_metrics.classifier.val_accuracy)
    return out
