"""`genframe generate`: sample from a trained model into a new run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import UserError
from genframe.files import atomic_write_json
from genframe.runs import start_run, update_run
from genframe.sample_writer import write_samples
from genframe.tasks.build import to_plain
from genframe.tasks.common import generation_options, mapping_of, resolve_device, source_record
from genframe.terminal import SampleStreamPrinter
from genframe.weights import load_model


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Generate samples from ``run`` or ``ckpt``.

    Image models make ``num_samples`` images (default 64). Text models continue each
    prompt (``prompt``, the lines of ``prompt_file``, or a ``template`` with its
    variables) ``num_samples`` times (default 1; 4 unconditional texts without a prompt)
    and, with ``stream=true``, print the text as it is made. Samples are made in
    batches of ``batch_size``; batch ``b`` uses seed ``seed + b``, so the same seed and
    batch size give the same samples.

    Returns:
        dict with ``run_dir``, ``samples`` (a list of `Samples`, one per batch), ``metrics``.
    """
    if cfg.num_samples is not None and cfg.num_samples < 1:
        raise UserError(f"num_samples must be at least 1, got {cfg.num_samples}")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {cfg.batch_size}")
    device = resolve_device(cfg.device)
    model, run, weights = load_model(cfg.get("run"), cfg.get("ckpt"), cfg.get("adapter"))
    model.to(device).eval()
    name = model.registered_name
    condition = {k: v for k, v in mapping_of(cfg, "condition", "condition.label=3").items()
                 if v is not None}
    prompts = prompts_of(cfg)
    if prompts is not None:
        if "prompt" not in getattr(model, "condition_keys", ()):
            raise UserError(f"prompt: model '{name}' takes no prompt (it is not a text model)")
        if "prompt" in condition:
            raise UserError("give the prompt once: prompt=... or condition.prompt=..., not both")
    elif "prompt" in condition:
        prompts = [str(condition.pop("prompt"))]
    text_model = "prompt" in getattr(model, "condition_keys", ())
    per_prompt = cfg.num_samples or (1 if prompts else 4 if text_model else 64)
    rows = [p for p in prompts for _ in range(per_prompt)] if prompts else None
    total = len(rows) if rows else per_prompt
    sampling = generation_options(cfg, model)
    live = bool(cfg.get("stream")) and text_model
    out_dir = Path(cfg.paths.output_dir)
    start_run(out_dir, cfg, "generate", source=source_record(run, weights))
    batches = []
    for b, start in enumerate(range(0, total, cfg.batch_size)):
        n = min(cfg.batch_size, total - start)
        cond = dict(condition)
        if rows:
            cond["prompt"] = rows[start:start + n]
        printer = SampleStreamPrinter(start, rows[start] if rows else "") if live else None
        extra = {"stream": printer} if printer else {}
        samples = model.generate(n, condition=cond or None, seed=cfg.seed + b, **sampling, **extra)
        if printer:
            printer.finish(samples)
        batches.append(samples)
    folder = write_samples(batches, out_dir)
    update_run(out_dir, status="completed", num_samples=total)
    atomic_write_json(out_dir / "metrics.json", {})
    print(f"run directory: {out_dir}\n  {total} samples in {folder}", flush=True)
    return {"run_dir": out_dir, "samples": batches, "metrics": {}}


def prompts_of(cfg: DictConfig) -> list[str] | None:
    """The prompts of ``prompt``, ``prompt_file`` and ``template`` (None if no prompt).

    A ``.jsonl`` prompt file holds one ``{"prompt": ...}`` object per line (prompts may
    span lines); any other file holds one prompt per non-empty line.
    """
    prompts: list[str] = []
    if cfg.get("prompt") is not None:
        prompts.append(str(cfg.prompt))
    if cfg.get("prompt_file"):
        prompts += read_prompt_file(cfg.prompt_file)
    from genframe.text.prompts import render_template_config

    rendered = render_template_config(to_plain(cfg.get("template")))
    if rendered is not None:
        prompts.append(rendered)
    return prompts or None


def read_prompt_file(path: str) -> list[str]:
    from genframe.text.sources import jsonl_records, read_text

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"prompt_file={path}: no such file")
    if p.suffix == ".jsonl":
        prompts = []
        for where, record in jsonl_records(p):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise UserError(f'prompt_file={where}: expected {{"prompt": "..."}}')
            prompts.append(record["prompt"])
    else:
        prompts = [line for line in read_text(p).splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt_file={path}: the file holds no prompt")
    return prompts
