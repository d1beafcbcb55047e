"""`genframe generate`: sample from a trained model into a new run directory.

Samples are written as they are made (batch by batch), with a progress line, after a
check that the request fits: the disk space the files will take and the memory one batch
needs, both estimated from one sample made first.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from genframe.errors import Interrupted, UserError, plural
from genframe.files import atomic_write_json
from genframe.runs import start_run, update_run
from genframe.sample_writer import GRID_MAX, SampleWriter, png_bytes
from genframe.samples import Samples
from genframe.tasks.build import to_plain
from genframe.tasks.common import generation_options, mapping_of, resolve_device, source_record
from genframe.terminal import SampleStreamPrinter
from genframe.weights import load_model

KEEP_SAMPLES = 256  # the result's `samples` holds the first batches up to this many samples ...
KEEP_BYTES = 256 * 2**20  # ... and this many bytes
PROGRESS_EVERY_S = 2.0  # seconds between two progress lines
WORK_FACTOR = 4  # memory a batch needs while it is made, in multiples of its output (CPU)
def generate(cfg: DictConfig) -> dict[str, Any]:
    """Generate samples from ``run`` or ``ckpt``.

    Image models make ``num_samples`` images (default 64). Text models continue each
    prompt (``prompt``, the lines of ``prompt_file``, or a ``template`` with its
    variables) ``num_samples`` times (default 1; 4 unconditional texts without a prompt)
    and, with ``stream=true``, print the text as it is made. Samples are made in
    batches of ``batch_size``; batch ``b`` uses seed ``seed + b``, so the same seed and
    batch size give the same samples.

    Each batch's files and ``manifest.jsonl`` lines are written as soon as it is made, and
    a progress line (count, rate, time left) is printed every few seconds; ``grid.png``
    shows the first samples. Before anything is written, one sample is made to estimate
    the space on disk and the memory of one batch, and a request that would not fit is
    refused. An interrupted or failing generation keeps the samples already written, with
    a manifest that lists exactly those, and marks the run ``interrupted`` / ``failed``.

    Returns:
        dict with ``run_dir``, ``folder`` (the samples folder), ``num_samples`` (written),
        ``samples`` (the first batches as `Samples`: at least the first batch, unless it
        is over 256 MB, and more while they hold under 256 samples; the rest are only on
        disk, listed in ``manifest.jsonl``), ``metrics``.

    Raises:
        UserError: a bad value, or a request that would not fit on disk or in memory.
        Interrupted: Ctrl-C; the samples made so far are kept.
    """
    from genframe.tasks.preflight import check_task_config

    check_task_config(cfg, "generate")
    device = resolve_device(cfg.device)
    model, run, weights = load_model(cfg.get("run"), cfg.get("ckpt"), cfg.get("adapter"))
    model.to(device).eval()
    name = model.registered_name
    condition = {k: v for k, v in mapping_of(cfg, "condition", "condition.label=3").items()
                 if v is not None}
    prompts = prompts_of(cfg)
    if prompts is not None:
        if "prompt" not in getattr(model, "condition_keys", ()):
            raise UserError(f"prompt: model '{name}' takes no prompt (it is neither a text nor "
                            "a text-to-image model)")
        if "prompt" in condition:
            raise UserError("give the prompt once: prompt=... or condition.prompt=..., not both")
    elif "prompt" in condition:
        prompts = [str(condition.pop("prompt"))]
    if prompts and getattr(model, "tokenizer", None) is not None:
        from genframe.text.tokenize import report_unknown

        note = report_unknown(model.tokenizer, prompts, "the prompt" if len(prompts) == 1 else "the prompts")
        if note:
            print(f"({note})", file=sys.stderr, flush=True)
    # A model that trains on images makes images, prompt or not (text-to-image).
    text_model = "prompt" in getattr(model, "condition_keys", ()) and "image" not in model.needs
    per_prompt = cfg.num_samples or (1 if prompts else 4 if text_model else 64)
    total = per_prompt * len(prompts) if prompts else per_prompt
    sampling = generation_options(cfg, model)
    # What the manifest records beside the model's own metadata: the file, not its pixels.
    recorded = ({"init_image": str(Path(cfg.init_image).expanduser().resolve())}
                if "init_image" in sampling else {})
    live = bool(cfg.get("stream")) and text_model
    out_dir = Path(cfg.paths.output_dir)
    folder = out_dir / "samples"

    def batch_condition(start: int, n: int) -> dict[str, Any] | None:
        cond = dict(condition)
        if prompts:  # sample i continues prompt i // per_prompt (never a list of all rows)
            cond["prompt"] = [prompts[i // per_prompt] for i in range(start, start + n)]
        return cond or None

    batch = min(cfg.batch_size, total)
    check_fits(_probe(model, batch_condition(0, 1), cfg.seed, sampling, device),
               request=_request(cfg.num_samples, per_prompt, prompts, total),
               total=total, batch=batch, folder=folder, device=device)

    start_run(out_dir, cfg, "generate", source=source_record(run, weights))
    kept: list[Samples] = []
    kept_count = kept_bytes = 0
    progress = _Progress(total, shown=total > batch)
    writer = SampleWriter(folder)
    try:
        for b, start in enumerate(range(0, total, cfg.batch_size)):
            n = min(cfg.batch_size, total - start)
            cond = batch_condition(start, n)
            first_prompt = cond["prompt"][0] if cond and prompts else ""
            printer = SampleStreamPrinter(start, first_prompt) if live else None
            extra = {"stream": printer} if printer else {}
            samples = model.generate(n, condition=cond, seed=cfg.seed + b, **sampling, **extra)
            samples.metadata = {**samples.metadata, **recorded}
            if printer:
                printer.finish(samples)
            writer.add(samples)
            size = _nbytes(samples)
            if kept_count < KEEP_SAMPLES and kept_bytes + size <= KEEP_BYTES:
                kept.append(samples)
                kept_count, kept_bytes = kept_count + n, kept_bytes + size
            progress.update(writer.count)
    except KeyboardInterrupt:
        writer.close()
        update_run(out_dir, status="interrupted", num_samples=writer.count)
        raise Interrupted(f"generation was interrupted: {writer.count} of {total} samples are in "
                          f"{folder} (manifest.jsonl lists them)") from None
    except OSError as exc:
        writer.close()
        update_run(out_dir, status="failed", num_samples=writer.count, error=str(exc))
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"the disk of {folder} is full: {writer.count} of {total} samples "
                            f"were written (manifest.jsonl lists them); free some space or "
                            "ask for fewer samples") from None
        raise
    except BaseException as exc:
        writer.close()
        update_run(out_dir, status="failed", num_samples=writer.count,
                   error=f"{type(exc).__name__}: {exc}")
        raise
    writer.close()
    progress.update(writer.count, final=True)
    update_run(out_dir, status="completed", num_samples=total)
    atomic_write_json(out_dir / "metrics.json", {})
    print(f"run directory: {out_dir}\n  {plural(total, 'sample')} in {folder}", flush=True)
    return {"run_dir": out_dir, "folder": folder, "num_samples": writer.count,
            "samples": kept, "metrics": {}}


# -- will it fit? ---------------------------------------------------------------------------


def _probe(model, condition, seed: int, sampling: dict[str, Any], device) -> dict[str, Any]:
    """Make one sample and measure it: its file's bytes, its manifest line's, its memory."""
    import torch

    cuda = getattr(device, "type", "") == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    samples = model.generate(1, condition=condition, seed=seed, **sampling)
    work = torch.cuda.max_memory_allocated(device) - base if cuda else 0
    if samples.kind == "image":
        c, h, w = samples.images.shape[1:]
        raw = c * h * w + h + 1024  # PNG without compression: pixels, a filter byte a row, headers
        # Other samples compress differently: allow a quarter more than this one, at most raw.
        file_bytes = min(raw, math.ceil(1.25 * len(png_bytes(samples.images[0]))))
        memory = samples.images[0].element_size() * samples.images[0].numel()
    else:
        text = samples.texts[0].encode("utf-8")
        file_bytes = math.ceil(1.25 * len(text))
        memory = len(text) * 2
    record = {"file": "000000.png", "index": 0, "condition": samples.conditions[0], **samples.metadata,
              **{k: column[0] for k, column in samples.per_sample.items()}}
    line = len(json.dumps(record, default=str).encode()) + 16  # + room for larger indices
    return {"kind": samples.kind, "file": file_bytes, "line": line, "memory": memory, "work": work}


def check_fits(probe: dict[str, Any], *, request: str, total: int, batch: int, folder: Path,
               device) -> None:
    """Refuse (UserError) a generation whose files would not fit on the disk of `folder`,
    or whose batch would not fit in memory; the message gives the estimates."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    block = _block_size(existing)
    per_sample = math.ceil(probe["file"] / block) * block + probe["line"]
    # grid.png: the first GRID_MAX images, scaled up to at least 256 px for small ones.
    grid = block + min(total, GRID_MAX) * probe["file"] * 4 if probe["kind"] == "image" else 0
    need = total * per_sample + grid
    if need > free:
        fit = max(0, (free - grid) // per_sample)
        raise UserError(
            f"{request} would need about {_size(need)} in {folder} (about {_size(per_sample)} a "
            f"sample), which has {_size(free)} free; ask for fewer samples (about {fit:,} fit) "
            "or write them elsewhere with hydra.run.dir=DIR")

    # Streamed, a generation holds one batch: the batch being made (the model's working
    # memory: measured on a GPU, a few copies of the output on the CPU) and its output on
    # the CPU, converted to 8-bit pixels as it is written (and kept for the result).
    host = batch * probe["memory"] * 3
    work = batch * max(probe["work"], probe["memory"] * WORK_FACTOR)
    cuda = getattr(device, "type", "") == "cuda"
    checks = [("memory", host + (0 if cuda else work), _host_available())]
    if cuda:
        checks.append((f"memory on {device}", work, _cuda_available(device)))
    for where, wanted, available in checks:
        if available is not None and wanted > available:
            per = wanted / batch
            raise UserError(
                f"batch_size={batch} would need about {_size(wanted)} of {where} (about "
                f"{_size(per)} a sample), which has {_size(available)} available; use a "
                f"smaller batch_size (about {max(1, int(available // per)):,} fit)")


def _request(num_samples, per_prompt: int, prompts, total: int) -> str:
    if prompts and len(prompts) > 1:
        return f"num_samples={per_prompt} for each of {len(prompts)} prompts ({total:,} samples)"
    return f"num_samples={num_samples}" if num_samples is not None else f"{total} samples"


def _block_size(path: Path) -> int:
    """The disk's allocation unit: even a 100-byte file takes one block."""
    try:
        stat = os.statvfs(path)
        return max(512, stat.f_frsize or stat.f_bsize)
    except (AttributeError, OSError):  # no statvfs (Windows)
        return 4096


def _host_available() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _cuda_available(device) -> int | None:
    import torch

    try:
        free, _ = torch.cuda.mem_get_info(device)
    except RuntimeError:
        return None
    return int(free) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} bytes"


def _nbytes(samples: Samples) -> int:
    if samples.images is not None:
        return samples.images.element_size() * samples.images.numel()
    return sum(len(t) for t in samples.texts)


class _Progress:
    """A plain progress line every few seconds (and at the end), e.g.::

        [progress] 1500/3000 samples (50%) | 312 samples/s | elapsed 0:00:04, left 0:00:04
    """

    def __init__(self, total: int, *, shown: bool) -> None:
        self.total = total
        self.shown = shown  # only when there is more than one batch
        self.start = self.last = time.monotonic()
        self.printed = 0

    def update(self, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not self.shown or (not final and (done >= self.total or (
                self.printed and now - self.last < PROGRESS_EVERY_S))):
            return  # the last batch has the final line
        self.last, self.printed = now, self.printed + 1
        elapsed = now - self.start
        parts = [f"[progress] {'done: ' if final else ''}{done}/{self.total} samples "
                 f"({100 * done / self.total:.0f}%)"]
        if elapsed > 0:
            parts.append(f"{done / elapsed:.4g} samples/s")
        timing = f"elapsed {_duration(elapsed)}"
        if not final and done:
            timing += f", left {_duration((self.total - done) * elapsed / done)}"
        parts.append(timing)
        print(" | ".join(parts), file=sys.stdout, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


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
    from genframe.text.sources import jsonl_records, read_lines

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
        # Lines end at newlines only: a U+2028 inside a prompt is part of it.
        prompts = [line for line in read_lines(p) if line.strip()]
    if not prompts:
        raise UserError(f"prompt_file={path}: the file holds no prompt")
    return prompts
