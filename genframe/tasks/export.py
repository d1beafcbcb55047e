"""`genframe export`: a trained model in a folder of its own, as safetensors weights (the
whole model, or its LoRA adapters alone) or as verified ONNX / TorchScript graphs."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError
from genframe.exporters import GRAPH_FORMATS, SUFFIX, check_format, export_graph
from genframe.files import atomic_write_json
from genframe.lora import ADAPTER_FILE, has_lora, merge_lora, save_adapter
from genframe.runs import WEIGHTS, run_dir_problem, start_run, update_run
from genframe.tasks.common import source_record
from genframe.weights import load_model

EXPORT_INFO = "export.json"
STAGING = ".export-partial"


def export(cfg: DictConfig) -> dict[str, Any]:
    """Write the model of ``run``, ``ckpt`` or ``hub`` to a folder of its own.

    Args:
        cfg: the composed `export` config: ``run``/``ckpt``/``hub``; ``format``;
            ``merge`` (fold LoRA adapters into the base weights first; refused for a
            model without adapters); ``adapter_only`` (safetensors: the adapters alone);
            ``out`` (the folder; default: this task's run directory).

    ``format=safetensors`` (default): ``model.safetensors`` (the spec in its metadata, so
    ``genframe generate ckpt=<folder>/model.safetensors`` works), ``tokenizer.json`` for a
    text model, ``adapter.safetensors`` when the model carries LoRA adapters, and
    ``run.json``/``config.yaml`` naming the source (``run=<folder>`` works too). With
    ``adapter_only=true`` only ``adapter.safetensors`` (for ``adapter=`` on the base).

    ``format=onnx|torchscript``: one file per network the model names in
    `GenerativeModule.export_graphs` (``<name>.onnx`` / ``<name>.pt``), each run back
    (onnxruntime / ``torch.jit.load``) against PyTorch right after export; the largest
    difference, the inputs and outputs and what an application needs (value ranges, the
    noise schedule) go to ``export.json``. A LoRA model exports with its adapters in the
    graph, or folded in with ``merge=true``.

    Everything is written to a staging folder first and moved in only once complete and
    verified: a refused or failed export leaves no file of its own behind.

    Returns:
        dict with ``run_dir`` (the folder), ``files`` (what was written), ``metrics``
        ({}), and for graphs ``graphs`` (name -> its `export.json` record).

    Raises:
        UserError: a bad value; a model that exports no networks, or a network the
            format cannot express; an exported file that disagrees with PyTorch; a
            folder that cannot be written.
    """
    from genframe.tasks.preflight import check_task_config

    check_task_config(cfg, "export")
    fmt = str(cfg.get("format", "safetensors"))
    check_format(fmt)
    adapter_only = bool(cfg.get("adapter_only", False))
    if adapter_only and (fmt != "safetensors" or cfg.merge):
        clash = f"format={fmt}" if fmt != "safetensors" else "merge=true"
        raise UserError(f"adapter_only=true writes the LoRA adapters alone as safetensors, so it "
                        f"cannot go with {clash}; drop one of them")
    model, run, weights = load_model(cfg.get("run"), cfg.get("ckpt"), cfg.get("adapter"))
    adapted = has_lora(model)
    if (cfg.merge or adapter_only) and not adapted:
        raise UserError(
            f"{'merge' if cfg.merge else 'adapter_only'}=true: the model of {weights} carries no "
            "LoRA adapters; export without it (or from a `method=lora` run)")
    own = Path(cfg.paths.output_dir).resolve()
    out_dir = Path(cfg.out).expanduser().resolve() if cfg.get("out") else own
    if out_dir != own:  # (the CLI makes out= the run directory, checked before Hydra)
        problem = run_dir_problem(out_dir, "out")
        if problem is None and out_dir.is_dir() and any(out_dir.iterdir()):
            problem = f"out={cfg.out} is a folder with files in it; give a new or empty folder"
        if problem:
            raise UserError(problem)
    taken = [n for n in (WEIGHTS, EXPORT_INFO, ADAPTER_FILE) if (out_dir / n).exists()]
    if taken:
        raise UserError(f"out={out_dir}: already holds {', '.join(taken)}; choose an empty folder")
    graphs = {}
    if fmt in GRAPH_FORMATS:
        if cfg.merge:
            merge_lora(model)
        graphs = model.float().cpu().eval().export_graphs()
        if not graphs:
            raise UserError(f"format={fmt}: model '{model.registered_name}' exports no networks "
                            "(its plugin defines no export_graphs); format=safetensors exports "
                            "every model")

    created = _first_missing(out_dir)
    staging = out_dir / STAGING
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        files, records = _write(model, fmt, graphs, staging, adapted=adapted, merge=bool(cfg.merge),
                                adapter_only=adapter_only)
        start_run(out_dir, cfg, "export", model=model.model_spec,
                  source=source_record(run, weights, cfg.get("hub")), data=run.data_config if run else None)
        for name in files:
            os.replace(staging / name, out_dir / name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    update_run(out_dir, status="completed", model=model.model_spec, format=fmt,
               merged_adapters=bool(cfg.merge), adapter_only=adapter_only)
    _report(out_dir, fmt, files, records, merged=bool(cfg.merge))
    result: dict[str, Any] = {"run_dir": out_dir, "files": [out_dir / f for f in files], "metrics": {}}
    if records:
        result["graphs"] = records
    return result


def _write(model, fmt: str, graphs: dict[str, Any], folder: Path, *, adapted: bool, merge: bool,
           adapter_only: bool) -> tuple[list[str], dict[str, Any]]:
    """Write the export into `folder`; returns (file names, graph records)."""
    from genframe.weights import save_weights

    files: list[str] = []
    records: dict[str, Any] = {}
    if fmt == "safetensors":
        if adapted and not merge:  # the adapters alone, before a merge folds them in
            files.append(save_adapter(model, folder / ADAPTER_FILE).name)
        if merge:
            merge_lora(model)
        if not adapter_only:
            files.append(save_weights(model, folder / WEIGHTS).name)
    else:
        for name, graph in graphs.items():
            path = folder / f"{name}{SUFFIX[fmt]}"
            try:
                records[name] = export_graph(graph, path, fmt)
            except UserError as exc:
                hint = ("; try merge=true (the adapters folded into the weights)"
                        if adapted and not merge else "; format=safetensors exports every model")
                raise UserError(f"format={fmt}: model '{model.registered_name}' cannot export its "
                                f"'{name}' network: {exc}{hint}") from None
            files += sorted(p.name for p in folder.iterdir() if p.name.startswith(path.name))
        atomic_write_json(folder / EXPORT_INFO, _export_info(model, fmt, records, merge))
        files.append(EXPORT_INFO)
    if getattr(model, "tokenizer", None) is not None and not adapter_only:
        files.append(model.tokenizer.save(folder).name)
    return files, records


def _export_info(model, fmt: str, records: dict[str, Any], merged: bool) -> dict[str, Any]:
    import torch

    versions = {"torch": torch.__version__}
    if fmt == "onnx":
        import onnx
        import onnxruntime

        versions.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return {"format": fmt, "model": model.registered_name, "merged_adapters": merged,
            "graphs": records, "versions": versions}


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (None: it exists)."""
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            return missing
        missing = folder
    return missing


def _report(out_dir: Path, fmt: str, files: list[str], records: dict[str, Any], *, merged: bool) -> None:
    lines = [f"run directory: {out_dir}"]
    if merged:
        lines.append("  LoRA adapters merged into the base weights")
    for name in files:
        graph = next((r for r in records.values() if r["file"] == name), None)
        check = (f"  max |{fmt} - torch| = {graph['max_abs_diff']:.3g} "
                 f"({graph['checked_input_sets']} input sets)") if graph else ""
        lines.append(f"  {name}{check}")
    if fmt == "safetensors" and WEIGHTS in files:
        lines.append(f"generate from it: genframe generate ckpt={out_dir / WEIGHTS}")
    elif fmt == "safetensors":
        lines.append(f"add it to the base model: genframe generate run=<base run> "
                     f"adapter={out_dir / ADAPTER_FILE}")
    elif fmt != "safetensors":
        lines.append(f"inputs, outputs and notes: {out_dir / EXPORT_INFO}")
    print("\n".join(lines), file=sys.stdout, flush=True)
