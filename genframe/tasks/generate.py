"""`genframe generate`: sample from a trained model into a new run directory.

Samples are written as they are made (batch by batch), with a progress line, after a
check that the request fits: the disk space the files will take and the memory one batch
needs, both estimated from one sample made first.

With ``upscaler=RUN`` the images of ``run`` are the first stage of a cascade (Ho et al.
2022, https://arxiv.org/abs/2106.15282): each batch is upscaled by that run's
``model=upscaler``, whose low-resolution side must be the base model's image size.
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
from genframe.feedback import new_id, sample_records
from genframe.files import atomic_write_json
from genframe.runs import start_run, update_run
from genframe.sample_writer import GRID_MAX, SampleWriter, png_bytes
from genframe.samples import Samples
from genframe.tasks.build import to_plain
from genframe.tasks.common import (
    feedback_store,
    generation_options,
    mapping_of,
    model_version,
    resolve_device,
    source_record,
)
from genframe.terminal import SampleStreamPrinter
from genframe.weights import load_model

KEEP_SAMPLES = 256  # the result's `samples` holds the first batches up to this many samples ...
KEEP_BYTES = 256 * 2**20  # ... and this many bytes
PROGRESS_EVERY_S = 2.0  # seconds between two progress lines
WORK_FACTOR = 4  # memory a batch needs while it is made, in multiples of its output (CPU)
def generate(cfg: DictConfig) -> dict[str, Any]:
    """Generate samples from ``run`` or ``ckpt``.

    Image models make ``num_samples`` images (default 64; with a list of class labels,
    ``condition.label=[...]``, one image a label). Text models continue each prompt
    (``prompt``, one or a list, then the lines of ``prompt_file``, then a ``template``
    with its variables) ``num_samples`` times (default 1; 4 unconditional texts without
    a prompt)
    and, with ``stream=true``, print the text as it is made. Samples are made in
    batches of ``batch_size``; batch ``b`` uses seed ``seed + b``, so the same seed and
    batch size give the same samples.

    Each batch's files and ``manifest.jsonl`` lines are written as soon as it is made, and
    a progress line (count, rate, time left) is printed every few seconds; ``grid.png``
    shows the first samples. Before anything is written, one sample is made to estimate
    the space on disk and the memory of one batch, and a request that would not fit is
    refused. An interrupted or failing generation keeps the samples already written, with
    a manifest that lists exactly those, and marks the run ``interrupted`` / ``failed``.

    With ``upscaler`` (the run directory of a ``model=upscaler`` run), every batch of the
    base model's images is upscaled by it with the same seed (``upscaler_steps`` DDIM
    steps, its input noised to ``upscaler_noise_augmentation``); the
    final images go to ``samples/``, the base images to ``samples/base/`` (unless
    ``save_base=false``). Each manifest line holds the base model's record, the
    upscaler's under ``upscaler`` and the base image's file (``base_file``); run.json
    names both runs.

    Returns:
        dict with ``run_dir``, ``folder`` (the samples folder), ``num_samples`` (written),
        ``samples`` (the first batches as `Samples`: at least the first batch, unless it
        is over 256 MB, and more while they hold under 256 samples; the rest are only on
        disk, listed in ``manifest.jsonl``), ``metrics``.

    Raises:
        UserError: a bad value, or a request that would not fit on disk or in memory; an
            ``upscaler`` that is missing, is no upscaler, or whose low-resolution size
            or channels do not chain to the base model's images.
        Interrupted: Ctrl-C; the samples made so far are kept.
    """
    from genframe.tasks.preflight import check_task_config

    check_task_config(cfg, "generate")
    _check_upscaler_keys(cfg)
    device = resolve_device(cfg.device)
    model, run, weights = load_model(cfg.get("run"), cfg.get("ckpt"), cfg.get("adapter"))
    model.to(device).eval()
    name = model.registered_name
    cascade = _Cascade.load(cfg, model, device) if cfg.get("upscaler") is not None else None
    producer = cascade if cascade is not None else model
    condition = {k: v for k, v in mapping_of(cfg, "condition", "condition.label=3").items()
                 if v is not None}
    prompts = prompts_of(cfg)
    if prompts is not None:
        if "prompt" not in getattr(model, "condition_keys", ()):
            raise UserError(f"prompt: model '{name}' takes no prompt (it is neither a text nor "
                            "a text-to-image model)")
        if "prompt" in condition:
            raise UserError("give the prompt once: prompt=... or condition.prompt=..., not both")
    elif "prompt" in condition:  # condition.prompt=...: read as prompt=...
        prompts = prompt_list(condition.pop("prompt"), key="condition.prompt")
    if prompts and getattr(model, "tokenizer", None) is not None:
        from genframe.text.tokenize import report_unknown

        note = report_unknown(model.tokenizer, prompts, "the prompt" if len(prompts) == 1 else "the prompts")
        if note:
            print(f"({note})", file=sys.stderr, flush=True)
    # A model that trains on images makes images, prompt or not (text-to-image).
    text_model = "prompt" in getattr(model, "condition_keys", ()) and "image" not in model.needs
    labels = to_plain(condition.get("label"))
    if not isinstance(labels, (list, tuple)) or "label" not in getattr(model, "condition_keys", ()):
        labels = None  # one label for all (or the model's own refusal of a label)
    per_prompt = cfg.num_samples or (len(labels) if labels else 1 if prompts else 4 if text_model else 64)
    total = per_prompt * len(prompts) if prompts else per_prompt
    sampling = generation_options(cfg, model)
    # What the manifest records beside the model's own metadata: the file, not its pixels.
    recorded = ({"init_image": str(Path(cfg.init_image).expanduser().resolve())}
                if "init_image" in sampling else {})
    live = bool(cfg.get("stream")) and text_model
    out_dir = Path(cfg.paths.output_dir)
    folder = out_dir / "samples"

    if labels is not None:  # one label a sample: all checked before anything is written
        if len(labels) != total:
            raise UserError(f"condition.label: {len(labels)} labels for {total} samples: give one "
                            f"label a sample (num_samples={len(labels)}, or leave it unset), or one "
                            "for all (condition.label=3)")
        if callable(getattr(model, "labels_for", None)) and getattr(model, "num_classes", None):
            model.labels_for(total, {"label": labels}, model.num_classes)

    def batch_condition(start: int, n: int) -> dict[str, Any] | None:
        cond = dict(condition)
        if prompts:  # sample i continues prompt i // per_prompt (never a list of all rows)
            cond["prompt"] = [prompts[i // per_prompt] for i in range(start, start + n)]
        if labels is not None:  # sample i gets label i
            cond["label"] = list(labels[start:start + n])
        return cond or None

    batch = min(cfg.batch_size, total)
    check_fits(_probe(producer, batch_condition(0, 1), cfg.seed, sampling, device),
               request=_request(cfg.num_samples, per_prompt, prompts, total),
               total=total, batch=batch, folder=folder, device=device)

    stages = {} if cascade is None else {"upscaler": cascade.source}
    store = feedback_store(cfg)
    version = model_version(cfg, run, weights)
    start_run(out_dir, cfg, "generate", source=source_record(run, weights, cfg.get("hub")), **stages)
    kept: list[Samples] = []
    kept_count = kept_bytes = 0
    progress = _Progress(total, shown=total > batch)
    writer = SampleWriter(folder)
    base_writer = SampleWriter(folder / "base") if cascade is not None and cfg.save_base else None
    try:
        for b, start in enumerate(range(0, total, cfg.batch_size)):
            n = min(cfg.batch_size, total - start)
            cond = batch_condition(start, n)
            first_prompt = cond["prompt"][0] if cond and prompts else ""
            printer = SampleStreamPrinter(start, first_prompt) if live else None
            extra = {"stream": printer} if printer else {}
            samples = producer.generate(n, condition=cond, seed=cfg.seed + b, **sampling, **extra)
            samples.metadata = {**samples.metadata, **recorded}
            if printer:
                printer.finish(samples)
            if base_writer is not None:
                base_writer.add(cascade.base)
                samples.per_sample["base_file"] = [
                    f"base/{i:06d}.png" for i in range(writer.count, writer.count + n)]
            ids = [new_id() for _ in range(n)]
            samples.per_sample["id"] = ids
            first = writer.count
            writer.add(samples)
            if store is not None:
                suffix = ".png" if samples.kind == "image" else ".txt"
                files = [str(folder / f"{first + i:06d}{suffix}") for i in range(n)]
                store.add_samples(sample_records(samples, ids, source="generate", model=name,
                                                 model_version=version, files=files,
                                                 run_dir=str(out_dir)))
            size = _nbytes(samples)
            if kept_count < KEEP_SAMPLES and kept_bytes + size <= KEEP_BYTES:
                kept.append(samples)
                kept_count, kept_bytes = kept_count + n, kept_bytes + size
            progress.update(writer.count)
    except KeyboardInterrupt:
        writer.close()
        _close(base_writer)
        update_run(out_dir, status="interrupted", num_samples=writer.count)
        raise Interrupted(f"generation was interrupted: {writer.count} of {total} samples are in "
                          f"{folder} (manifest.jsonl lists them)") from None
    except OSError as exc:
        writer.close()
        _close(base_writer)
        update_run(out_dir, status="failed", num_samples=writer.count, error=str(exc))
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"the disk of {folder} is full: {writer.count} of {total} samples "
                            f"were written (manifest.jsonl lists them); free some space or "
                            "ask for fewer samples") from None
        raise
    except BaseException as exc:
        writer.close()
        _close(base_writer)
        update_run(out_dir, status="failed", num_samples=writer.count,
                   error=f"{type(exc).__name__}: {exc}")
        raise
    writer.close()
    _close(base_writer)
    progress.update(writer.count, final=True)
    atomic_write_json(out_dir / "metrics.json", {})
    update_run(out_dir, status="completed", num_samples=total)  # last: nothing can fail after it
    print(f"run directory: {out_dir}\n  {plural(total, 'sample')} in {folder}", flush=True)
    return {"run_dir": out_dir, "folder": folder, "num_samples": writer.count,
            "samples": kept, "metrics": {}}


def _close(writer: SampleWriter | None) -> None:
    if writer is not None:
        writer.close()


# -- cascades --------------------------------------------------------------------------------


def _check_upscaler_keys(cfg: DictConfig) -> None:
    """Refuse ``upscaler_*`` values before any model is loaded."""
    up, steps = cfg.get("upscaler"), cfg.get("upscaler_steps")
    if not isinstance(cfg.get("save_base", True), bool):
        raise UserError(f"save_base={cfg.get('save_base')!r}: expected true or false (write the "
                        "base model's images to samples/base/)")
    if up is not None and (not isinstance(up, str) or not up.strip()):
        raise UserError(f"upscaler={up!r}: expected the run directory of a model=upscaler run")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UserError(f"upscaler_steps={steps!r}: expected an integer >= 1 (DDIM steps of the "
                        "upscaler), or null (its model.default_sampler_steps)")
    if up is None:
        given = [k for k in ("upscaler_steps", "upscaler_noise_augmentation")
                 if cfg.get(k) is not None]
        if given:
            raise UserError(f"{', '.join(given)}: set for the upscaler stage, but no upscaler=RUN "
                            "was given")


class _Cascade:
    """Two stages as one producer of samples: the base model's images, upscaled.

    `generate` has the signature of `GenerativeModule.generate`; the base stage's
    `Samples` of the last call stay in `base` (for ``samples/base/``).
    """

    def __init__(self, model, upscaler, options: dict[str, Any], source: dict[str, Any]) -> None:
        self.model, self.upscaler, self.options, self.source = model, upscaler, options, source
        self.base: Samples | None = None

    @classmethod
    def load(cls, cfg: DictConfig, model, device) -> _Cascade:
        """The upscaler of ``cfg.upscaler``, checked against the base `model`.

        Raises:
            UserError: not an upscaler run, or its sizes or channels do not chain.
        """
        from genframe.runs import open_run
        from genframe.samplers.ddim import DDIMSampler

        where = f"upscaler={cfg.upscaler}"
        up_run = open_run(cfg.upscaler, key="upscaler")
        try:
            upscaler, _, up_weights = load_model(str(up_run.path))
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        low = getattr(upscaler, "low_res_size", None)
        if "low_res" not in getattr(upscaler, "condition_keys", ()) or low is None:
            raise UserError(f"{where}: holds model '{upscaler.registered_name}', which is not an "
                            "upscaler; give the run directory of a `genframe train model=upscaler` run")
        hp = model.hparams
        base = f"run={cfg.run}" if cfg.get("run") is not None else f"ckpt={cfg.ckpt}"
        if "image" not in model.needs or "image_size" not in hp or "in_channels" not in hp:
            raise UserError(f"{where}: the base model ({base}, model '{model.registered_name}') "
                            "makes no images to upscale")
        size, channels = int(hp.image_size), int(hp.in_channels)
        up_size, up_channels = int(upscaler.hparams.image_size), int(upscaler.hparams.in_channels)
        if size != low:
            raise UserError(
                f"{where}: the upscaler's sizes do not chain to the base model's: it makes "
                f"{up_size}x{up_size} images from {low}x{low} ones (its model.low_res_size={low}), "
                f"but {base} makes {size}x{size} images (its model.image_size). Use an upscaler "
                f"trained with model.low_res_size={size}, e.g. `genframe train model=upscaler "
                f"data.image_size={2 * size} model.low_res_size={size}` on the base model's data")
        if channels != up_channels:
            raise UserError(
                f"{where}: the upscaler reads {up_channels}-channel images but {base} makes "
                f"{channels}-channel ones; train the upscaler on data with data.channels={channels}")
        options: dict[str, Any] = {}
        if cfg.get("upscaler_steps") is not None:
            options["sampler"] = DDIMSampler(steps=int(cfg.upscaler_steps))
            try:
                upscaler.check_sampler(options["sampler"])  # within its T
            except UserError as exc:
                raise UserError(f"upscaler_steps={cfg.upscaler_steps}: {exc}") from None
        level = cfg.get("upscaler_noise_augmentation")
        if level is not None:
            top = float(upscaler.hparams.get("noise_augmentation_max", 1.0))
            if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 <= level <= top:
                raise UserError(f"upscaler_noise_augmentation={level!r}: expected a number in "
                                f"[0, {top:g}] (a fraction of the upscaler's diffusion steps, at "
                                "most its model.noise_augmentation_max), or null")
            options["noise_augmentation"] = float(level)
        upscaler.check_sampling(options)
        upscaler.to(device).eval()
        return cls(model, upscaler, options, {"run": str(up_run.path), "weights": str(up_weights)})

    def generate(self, num_samples: int, *, condition: dict[str, Any] | None = None,
                 seed: int | None = None, **sampling: Any) -> Samples:
        """The base model's samples upscaled (the same seed for both stages): images from
        the upscaler, conditions and metadata from the base, the upscaler's metadata
        under ``upscaler``."""
        base = self.model.generate(num_samples, condition=condition, seed=seed, **sampling)
        up = self.upscaler.generate(num_samples, condition={"low_res": base.images},
                                    seed=base.metadata.get("seed", seed), **self.options)
        self.base = base
        return Samples(images=up.images, conditions=base.conditions,
                       metadata={**base.metadata, "upscaler": up.metadata},
                       per_sample=dict(base.per_sample))


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

    ``prompt`` is one prompt, or a list of them (``'prompt=[a red circle,a blue
    square]'``). A ``.jsonl`` prompt file holds one ``{"prompt": ...}`` object per line
    (prompts may span lines); any other file holds one prompt per non-empty line.

    The three add up, in that order: ``prompt=hi prompt_file=F`` generates for ``hi`` and
    then for each prompt of F.

    Raises:
        UserError: an empty ``prompt`` list, or a prompt (or list entry) that is a mapping,
            a nested list or null.
    """
    prompts: list[str] = []
    if cfg.get("prompt") is not None:
        prompts += prompt_list(cfg.prompt)
    if cfg.get("prompt_file"):
        prompts += read_prompt_file(cfg.prompt_file)
    from genframe.text.prompts import render_template_config

    rendered = render_template_config(to_plain(cfg.get("template")))
    if rendered is not None:
        prompts.append(rendered)
    return prompts or None


def prompt_list(given: Any, *, key: str = "prompt") -> list[str]:
    """The prompts of one ``prompt=`` value: a text, or a list of texts.

    Raises:
        UserError: an empty list, or a mapping, nested list or null as the prompt or in it.
    """
    from omegaconf import ListConfig

    entries = to_plain(given) if isinstance(given, (ListConfig, DictConfig)) else given
    entries = entries if isinstance(entries, list) else [entries]
    bad = [e for e in entries if isinstance(e, (list, dict)) or e is None]
    if not entries or bad:
        shown = given if isinstance(given, str) else to_plain(given)
        raise UserError(f"{key}={shown}: give one prompt ({key}=\"a text\") or a list of texts "
                        f"('{key}=[first,second]'), "
                        + ("not an empty list" if not entries else f"not {bad[0]!r}"))
    return [str(e) for e in entries]


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
