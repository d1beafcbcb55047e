"""ProgressLine: plain progress lines for output that is not a terminal.

Tiny registered models run through a real Lightning Trainer with standard output
captured (not a terminal, as in CI or under nohup), and the printed lines are parsed.
"""

from __future__ import annotations

import io
import re
import sys
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from genframe.callbacks import ProgressLine
from genframe.errors import UserError
from genframe.testing import build_tiny

LINE = re.compile(
    r"\[progress\] (?P<done>done: )?epoch (?P<epoch>\d+) \| step (?P<step>\d+)"
    r"(?:/(?P<total>\d+) \((?P<pct>\d+)%\))? \| (?P<values>.*?) \| "
    r"(?P<steps_s>[\d.e+]+) steps/s(?:, (?P<items_s>[\d.e+]+) items/s)? \| "
    r"elapsed (?P<elapsed>\d+:\d\d:\d\d)(?:, left (?P<left>\d+:\d\d:\d\d))?$"
)

# The tiny models have a validation_step; these runs leave validation out on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step`")


class LossRecorder(pl.Callback):
    """The loss each optimizer step returned, by global step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[trainer.global_step] = float(loss)


def fit(model: str, callbacks: list, *, batches: int = 5, batch_size: int = 4, **trainer_args):
    torch.manual_seed(0)
    m = build_tiny(model)
    batch = m.example_batch(batch_size)
    data = DataLoader([batch] * batches, batch_size=None)  # the ready-made batch, `batches` times
    args = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                log_every_n_steps=1)
    trainer = pl.Trainer(**{**args, **trainer_args}, callbacks=callbacks)
    trainer.fit(m, train_dataloaders=data)
    return trainer


def progress_lines(text: str) -> list[re.Match]:
    lines = [line for line in text.splitlines() if line.startswith("[progress]")]
    matches = [LINE.match(line) for line in lines]
    assert all(matches), f"malformed progress lines in:\n{text}"
    return matches  # type: ignore[return-value]


def values(match: re.Match) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split(" ") for kv in match["values"].split(", "))}


def test_lines_at_every_n_steps_with_their_fields(capsys):
    recorder = LossRecorder()
    trainer = fit("vae", [ProgressLine(every_n_steps=3), recorder])  # when="auto": captured, so on
    lines = progress_lines(capsys.readouterr().out)
    assert trainer.global_step == 10

    *during, end = lines
    assert [int(m["step"]) for m in during] == [3, 6, 9]
    assert [int(m["epoch"]) for m in during] == [0, 1, 1]  # 5 batches an epoch
    for m in during:
        assert not m["done"] and int(m["total"]) == 10 and int(m["pct"]) == 10 * int(m["step"])
        assert m["left"] is not None
        # The latest step's loss, not the epoch's running mean.
        assert values(m) == {"train/loss": pytest.approx(recorder.losses[int(m["step"])], rel=1e-3)}
        # Four images a step.
        assert float(m["items_s"]) == pytest.approx(4 * float(m["steps_s"]), rel=0.02)

    # One line at the end, after the last step.
    assert end["done"] and int(end["step"]) == 10 and int(end["epoch"]) == 1
    assert end["left"] is None and end["total"] is None
    assert values(end)["train/loss"] == pytest.approx(recorder.losses[10], rel=1e-3)


def test_a_gan_shows_both_losses_and_counts_both_optimizers(capsys):
    # The GAN steps its discriminator and its generator: global_step counts both, so a
    # run has more optimizer steps than batches, and the total must say so.
    trainer = fit("gan", [ProgressLine(every_n_steps=4)], batches=3, max_epochs=2)
    lines = progress_lines(capsys.readouterr().out)
    steps = trainer.global_step
    assert steps > 6, "expected more optimizer steps than batches"
    *during, end = lines
    # One line on the first step at or past each multiple of 4.
    assert [int(m["step"]) // 4 for m in during] == list(range(1, steps // 4 + 1))
    assert all(int(m["total"]) == steps for m in during)
    assert end["done"] and int(end["step"]) == steps
    for m in lines:
        assert {"train/d_loss", "train/g_loss"} <= set(values(m))


class Endless(IterableDataset):
    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __iter__(self):
        return iter([self.batch] * self.n)


def test_an_unknown_total_shows_no_total_and_no_time_left(capsys):
    torch.manual_seed(0)
    m = build_tiny("vae")
    data = DataLoader(Endless(m.example_batch(4), 4), batch_size=None)  # no length
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[ProgressLine(every_n_steps=2, when="always")])
    trainer.fit(m, train_dataloaders=data)
    lines = progress_lines(capsys.readouterr().out)
    assert [int(m["step"]) for m in lines] == [2, 4, 4]
    assert all(m["total"] is None and m["left"] is None for m in lines)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("when, printed", [("never", False), ("auto", False), ("always", True)])
def test_when_on_a_terminal(when, printed, monkeypatch):
    out = Terminal()
    monkeypatch.setattr(sys, "stdout", out)
    fit("vae", [ProgressLine(every_n_steps=1, when=when)], batches=2, max_epochs=1)
    assert ("[progress]" in out.getvalue()) == printed


def test_never_prints_nothing_when_captured(capsys):
    fit("vae", [ProgressLine(every_n_steps=1, when="never")], batches=2, max_epochs=1)
    assert "[progress]" not in capsys.readouterr().out


def test_only_rank_zero_prints(capsys):
    cb = ProgressLine(every_n_steps=1, when="always")
    for rank_zero in (False, True):
        trainer = SimpleNamespace(is_global_zero=rank_zero, global_step=0, current_epoch=0,
                                  callback_metrics={"train/loss": torch.tensor(1.5)}, max_steps=4,
                                  estimated_stepping_batches=4, world_size=2)
        cb.on_train_start(trainer, torch.nn.Module())
        trainer.global_step = 1
        cb.on_train_batch_end(trainer, torch.nn.Module(), None, {"image": torch.zeros(3, 1, 2, 2)}, 0)
        cb.on_train_end(trainer, torch.nn.Module())
        lines = progress_lines(capsys.readouterr().out)
        assert len(lines) == (2 if rank_zero else 0)
    assert values(lines[0]) == {"train/loss": 1.5} and lines[0]["total"] == "4"


@pytest.mark.parametrize("value", [0, -5, 2.5, True, "10", None])
def test_bad_every_n_steps_is_refused(value):
    with pytest.raises(UserError, match=r"callbacks\.progress\.every_n_steps .*at least 1"):
        ProgressLine(every_n_steps=value)


def test_bad_when_is_refused():
    with pytest.raises(UserError, match=r"callbacks\.progress\.when=alwyas: expected one of auto, "
                                        r"always, never.*'always'"):
        ProgressLine(when="alwyas")


def test_every_training_callbacks_preset_has_the_progress_line(tmp_path):
    from genframe.config import compose
    from genframe.tasks.build import instantiate_group

    for preset in ("default", "early_stopping", "rich", "sample_metrics", "none"):
        cfg = compose("train", [f"callbacks={preset}", f"paths.output_dir={tmp_path}"])
        callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
        progress = [c for c in callbacks if isinstance(c, ProgressLine)]
        if preset == "none":
            assert callbacks == []
        else:
            assert len(progress) == 1, preset
            assert (progress[0].every_n_steps, progress[0].when) == (50, "auto")

    cfg = compose("train", ["callbacks.progress.every_n_steps=0", f"paths.output_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"callbacks\.progress\.every_n_steps"):
        instantiate_group(cfg.callbacks, "callbacks")


def test_evaluate_progress_bar_names_the_split(tmp_path, capsys):
    from pathlib import Path

    from genframe.cli import main

    import shutil

    run = tmp_path / "vae"  # a copy: evaluate appends to the run's evaluations.jsonl
    shutil.copytree(Path(__file__).parent / "data" / "runs_before_format_1" / "vae", run)
    assert main(["evaluate", f"run={run}", "metrics.enabled=false", "trainer.limit_val_batches=1",
                 f"hydra.run.dir={tmp_path / 'eval'}"]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Evaluating (test split)" in text and "Validation" not in text, text[-2000:]


@pytest.mark.parametrize("max_epochs, shown", [(-1, "Epoch 3"), (5, "Epoch 3/4")])
def test_rich_bar_has_no_epoch_total_when_epochs_are_unbounded(max_epochs, shown):
    from genframe.callbacks import RichProgressBar

    bar = RichProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs)  # what the description reads
    description = bar._get_train_description(3)
    assert description.strip() == shown and "-" not in description
    assert len(description) >= len(bar.validation_description)  # padded like Lightning's


def test_training_gets_genframes_bar_by_default_and_keeps_a_chosen_one(compose_task):
    from genframe.callbacks import RichProgressBar, SplitProgressBar
    from genframe.tasks.build import build_trainer
    from genframe.tasks.train import prepare_training
    from tests.conftest import FAST_TRAINING

    fast = [o for o in FAST_TRAINING if not o.startswith("trainer.enable_progress_bar")]
    cfg = compose_task("train", *fast, "logger=none", "model.latent_dim=2", "model.block_out_channels=[8,16]")
    model = prepare_training(cfg).model
    assert isinstance(build_trainer(cfg, model).progress_bar_callback, RichProgressBar)
    chosen = SplitProgressBar("val")
    assert build_trainer(cfg, model, extra_callbacks=[chosen]).progress_bar_callback is chosen
    cfg = compose_task("train", *fast, "logger=none", "trainer.enable_progress_bar=false",
                       "model.latent_dim=2", "model.block_out_channels=[8,16]")
    assert build_trainer(cfg, model).progress_bar_callback is None
