"""Training windows for the suite (`bench/run.py`), for any model family: not a benchmark.

Two ways to train the same model on the same batches, both timed the way
`bench/lm_throughput.py` times them (whose `StepTimer` this reuses): `steps` optimizer
steps after `warmup` untimed ones, from the start of step `warmup` to the start of step
`warmup + steps`, so every per-step cost (hooks, logging, clipping, scheduler, EMA, the
batch fetch) is inside the window and set-up is not.

- `genframe_train_window`: the real `genframe train` task in process (`logger=none
  callbacks=none`, no validation, no progress bar, no samples, plus the timing callback).
  `train_overrides` gives the same overrides for the `genframe train` command line.
- `plain_window`: the model, data module, optimizers and schedule genframe builds
  (as `genframe.tasks.train.prepare_training` does, the same seed), driven by a
  hand-written loop:
  ``training_step`` (genframe's own objective; its ``self.log`` calls do nothing without a
  trainer), backward, gradient clipping where genframe clips, optimizer step, scheduler
  step, ``zero_grad(set_to_none=True)``, and the EMA update of the diffusion family. The GAN
  (manual optimisation, which needs a trainer) gets the same D and G steps as
  `GAN.d_step` / `GAN.g_step` written out (they use its private helpers, so a change there
  may need a change here).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lm_throughput, _suite

from lm_throughput import StepTimer  # noqa: E402


class WindowTimer(StepTimer):
    """`lm_throughput.StepTimer` that also accepts the outputs of manual optimisation
    (the GAN) and, given `out`, writes its readings there as JSON when training ends (for
    a `genframe train` command run as a child process)."""

    def __init__(self, warmup: int, steps: int, out: str | None = None) -> None:
        super().__init__(warmup, steps)
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.seen == self.warmup + self.steps:
            value = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.loss = None if value is None else float(value)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.out:
            with open(self.out, "w") as f:
                json.dump({"clock": self.clock, "loss": self.loss, "threads": self.threads}, f)


@dataclass
class Window:
    clock: list[float]
    loss: float | None
    threads: int
    model: Any

    @property
    def steps_per_s(self) -> float:
        return (len(self.clock) - 1) / (self.clock[-1] - self.clock[0])

    @property
    def median_step_ms(self) -> float:
        import statistics

        return 1000 * statistics.median(b - a for a, b in itertools.pairwise(self.clock))


def timed_batches(loader, warmup: int, steps: int, clock: list[float]):
    """(step index, batch) for `warmup + steps` steps of a plain loop, epoch after epoch;
    `clock` gets the time at the start of each timed step and after the last one, as
    `StepTimer` times `genframe train`."""
    batches = (batch for _ in itertools.count() for batch in loader)
    for i, batch in enumerate(batches):
        if i >= warmup:
            clock.append(time.perf_counter())
        if i == warmup + steps:
            return
        yield i, batch


def train_overrides(warmup: int, steps: int, out: str | None = None,
                    steps_per_batch: int = 1) -> list[str]:
    """What turns `genframe train` into a timed window (beside the experiment's own).

    `steps_per_batch`: optimizer steps a batch makes (Lightning's ``max_steps`` counts
    those: the GAN's D and G steps are 2 a batch)."""
    timer = f"{WindowTimer.__module__}.WindowTimer"
    extra = [f"+callbacks.timer.out={out}"] if out else []
    return [
        "logger=none", "callbacks=none",
        f"+callbacks.timer._target_={timer}",
        f"+callbacks.timer.warmup={warmup}", f"+callbacks.timer.steps={steps}", *extra,
        "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        f"trainer.max_steps={steps_per_batch * (warmup + steps + 1)}",
        "num_samples=0",
    ]


def compose_train(experiment: str, overrides: list[str], out: str, extra: list[str] = ()):
    from genframe.config import compose

    return compose("train", [f"experiment={experiment}", *overrides, *extra,
                             "num_samples=0", f"paths.output_dir={out}"])


def genframe_train_window(experiment: str, overrides: list[str], warmup: int, steps: int,
                          steps_per_batch: int = 1) -> Window:
    """`genframe train experiment=... <overrides>` in process, timed."""
    from genframe.tasks.train import train

    with tempfile.TemporaryDirectory() as out:
        cfg = compose_train(experiment, overrides, out,
                            train_overrides(warmup, steps, steps_per_batch=steps_per_batch))
        with contextlib.redirect_stdout(io.StringIO()):  # the run's own report
            result = train(cfg)
    timer = next(c for c in result["trainer"].callbacks if isinstance(c, WindowTimer))
    return Window(timer.clock, timer.loss, timer.threads, result["model"])


def _optimizers(conf: Any):
    """(optimizers, per-step schedulers) of what ``configure_optimizers`` returned."""
    if isinstance(conf, torch.optim.Optimizer):
        return [conf], []
    if isinstance(conf, dict):
        sched = conf.get("lr_scheduler")
        if isinstance(sched, dict):
            sched = sched["scheduler"]
        return [conf["optimizer"]], [sched] if sched is not None else []
    if isinstance(conf, (list, tuple)):
        if len(conf) == 2 and isinstance(conf[0], (list, tuple)):
            return list(conf[0]), list(conf[1])
        return list(conf), []
    raise TypeError(f"configure_optimizers returned {type(conf).__name__}")


def _automatic_step(model, cfg):
    hp = model.hparams
    (opt,), scheds = _optimizers(model.configure_optimizers())
    params = [p for group in opt.param_groups for p in group["params"]]
    clip = cfg.trainer.get("gradient_clip_val") or hp.get("grad_clip", 0) or 0
    has_ema = callable(getattr(model, "update_ema", None))

    def step(batch, i):
        out = model.training_step(batch, i)
        loss = out["loss"] if isinstance(out, dict) else out
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        for s in scheds:
            s.step()
        opt.zero_grad(set_to_none=True)
        if has_ema:  # Diffusion.optimizer_step's EMA update (diffusion, text2image, upscaler)
            model.update_ema(i + 1)
        return loss.detach()

    return step


def _gan_step(model):
    """`GAN.d_step` then `GAN.g_step` without Lightning (toggling D off for G's step as
    Lightning's `toggled_optimizer` does)."""
    from genframe_plugins.gan.losses import d_loss_fn, g_loss_fn, mode_seeking_ratio, r1_penalty

    hp = model.hparams
    opt_g, opt_d = _optimizers(model.configure_optimizers())[0]

    def step(batch, i):
        x, label = model._batch(batch)
        with torch.no_grad():
            fake = model.generator(model._noise(x.shape[0]), label)
        real_logits = model.discriminate(x, label)
        fake_logits = model.discriminate(fake, label)
        loss = d_loss_fn(model.loss_kind, real_logits, fake_logits)
        if hp.r1_gamma > 0:
            loss = loss + hp.r1_gamma / 2 * r1_penalty(lambda t: model.discriminate(t, label), x)
        opt_d.zero_grad(set_to_none=True)
        loss.backward()
        opt_d.step()
        if (i + 1) % hp.d_steps_per_g_step:
            return loss.detach()
        n = x.shape[0]
        if hp.mode_seeking > 0 and n >= 2:
            half = n // 2
            label = None if label is None else label[:half].repeat(2)
            n = 2 * half
        model.discriminator.requires_grad_(False)
        z = model._noise(n)
        fake = model.generator(z, label)
        g_loss = g_loss_fn(model.loss_kind, model.discriminate(fake, label))
        loss = g_loss
        if hp.mode_seeking > 0 and n >= 2:
            loss = loss + hp.mode_seeking / (mode_seeking_ratio(fake, z) + 1e-5)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        model.discriminator.requires_grad_(True)
        model._g_steps += 1
        model._update_ema()
        return g_loss.detach()

    return step


def plain_window(experiment: str, overrides: list[str], warmup: int, steps: int,
                 steps_per_batch: int = 1) -> Window:
    """The same model and batches as `genframe_train_window`, in a hand-written loop
    (`steps_per_batch` is `genframe_train_window`'s, unused: the signatures match)."""
    import pytorch_lightning as pl

    from genframe.tasks.build import build_data, build_model
    from genframe.tasks.preflight import resolved_model_config

    with tempfile.TemporaryDirectory() as out:
        cfg = compose_train(experiment, overrides, out, ["logger=none", "callbacks=none"])
        # As `genframe.tasks.train.prepare_training` builds them (seed, data, model), so
        # the first batches and the initial weights are genframe's; its checks (a trial
        # fit for the monitor, a trial sample) are left out: they are set-up, not steps.
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        data = build_data(cfg.data)
        model = build_model(resolved_model_config(cfg), data)
    if "lr_decay_steps" in model.hparams and model.hparams.lr_decay_steps is None:
        # genframe decays over the trainer's max_steps; without a trainer, say so.
        model.hparams.lr_decay_steps = warmup + steps + 1
    model.train()
    step = (_automatic_step(model, cfg) if model.automatic_optimization
            else _gan_step(model))
    data.setup("fit")
    clock, loss = [], None
    for i, batch in timed_batches(data.train_dataloader(), warmup, steps, clock):
        loss = step(batch, i)
    return Window(clock, None if loss is None else float(loss), torch.get_num_threads(), model)
