"""`genframe export`: a self-contained folder with a trained model, adapters merged on request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError
from genframe.lora import ADAPTER_FILE, has_lora, merge_lora, save_adapter
from genframe.runs import WEIGHTS, run_dir_problem, start_run, update_run
from genframe.tasks.common import source_record
from genframe.weights import load_model, save_weights


def export(cfg: DictConfig) -> dict[str, Any]:
    """Write the model of ``run`` or ``ckpt`` to a folder of its own.

    Args:
        cfg: the composed `export` config: ``run`` or ``ckpt``; ``merge`` (fold LoRA
            adapters into the base weights; refused for a model without adapters);
            ``out`` (the folder; default: this task's run directory).

    The folder holds ``model.safetensors`` (the spec in its metadata, so
    ``genframe generate ckpt=<folder>/model.safetensors`` works), ``tokenizer.json`` for a
    text model, ``adapter.safetensors`` when the model carries LoRA adapters, and
    ``run.json``/``config.yaml`` naming the source (``run=<folder>`` works too).

    Returns:
        dict with ``run_dir`` (the folder), ``files`` (what was written), ``metrics`` ({}).
    """
    from genframe.tasks.preflight import check_task_config

    check_task_config(cfg, "export")
    model, run, weights = load_model(cfg.get("run"), cfg.get("ckpt"), cfg.get("adapter"))
    adapted = has_lora(model)
    if cfg.merge and not adapted:
        raise UserError(
            f"merge=true: the model of {weights} carries no LoRA adapters, so there is nothing "
            "to merge; export without merge=true (or from a `method=lora` run)"
        )
    out_dir = Path(cfg.out).expanduser().resolve() if cfg.get("out") else Path(cfg.paths.output_dir)
    if cfg.get("out"):
        problem = run_dir_problem(out_dir, "out")
        if problem:
            raise UserError(problem)
    if (out_dir / WEIGHTS).exists():
        raise UserError(f"out={out_dir}: already holds a {WEIGHTS}; choose an empty folder")
    source = source_record(run, weights)
    start_run(out_dir, cfg, "export", model=model.model_spec, source=source,
              data=run.data_config if run else None)
    files = []
    if adapted:  # the adapters alone, before a merge folds them in
        files.append(save_adapter(model, out_dir / ADAPTER_FILE))
    if cfg.merge:
        merge_lora(model)
    files.append(save_weights(model, out_dir / WEIGHTS))
    if getattr(model, "tokenizer", None) is not None:
        files.append(model.tokenizer.save(out_dir))
    update_run(out_dir, status="completed", model=model.model_spec, merged_adapters=bool(cfg.merge))
    lines = [f"run directory: {out_dir}"]
    if cfg.merge:
        lines.append("  LoRA adapters merged into the base weights")
    lines += [f"  {Path(f).name}" for f in files]
    lines.append(f"generate from it: genframe generate ckpt={out_dir / WEIGHTS}")
    print("\n".join(lines), flush=True)
    return {"run_dir": out_dir, "files": [Path(f) for f in files], "metrics": {}}
