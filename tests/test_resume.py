"""Resume that can be trusted: `genframe resume run=DIR` continues a run in place and
exactly; `genframe train resume=DIR` starts a new run from it with the new values taking
effect; checkpoints every N steps hold the loader's position; writes are atomic; bad
inputs leave the run directory as it was."""

from __future__ import annotations

import csv
import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST_TRAINING

VAE = [*FAST_TRAINING, "model.latent_dim=2", "model.block_out_channels=[8,16]"]
# A character GPT on a small text file: 8 windows of 16 characters per epoch.
GPT = ["data=text", "model=transformer", "data.source=files", "data.block_size=16",
       "data.batch_size=4", "data.val_fraction=0.25", "data.test_fraction=0",
       "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.dropout=0.1",
       "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
       "trainer.enable_progress_bar=false", "num_samples=0"]
# Learning rate per step in metrics.csv.
LR_MONITOR = ["+callbacks.lr._target_=pytorch_lightning.callbacks.LearningRateMonitor",
              "+callbacks.lr.logging_interval=step", "trainer.log_every_n_steps=1"]

KILLER = '''
import os, signal
import pytorch_lightning as pl

class KillAt(pl.Callback):
    """SIGKILL this process right after optimizer step `step` (no handler runs)."""
    def __init__(self, step):
        self.step = step
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture
def corpus(tmp_path):
    """Four short documents of English-like text (the GPT's data)."""
    return _write_corpus(tmp_path / "corpus")


def _write_corpus(folder: Path) -> Path:
    folder.mkdir()
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    for d in range(4):
        text = " ".join(words[(d * 3 + i) % len(words)] for i in range(160))
        (folder / f"doc{d}.txt").write_text(text + ".\n")
    return folder


def _killer_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "killer.py").write_text(textwrap.dedent(KILLER))
    return {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}


def _state(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _lr_by_step(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    key = next(k for k in rows[0] if k.startswith("lr-"))
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


# -- exact continuation after SIGKILL ------------------------------------------------


DIFFUSION = [*FAST_TRAINING, "model=diffusion", "model.block_out_channels=[8,16]",
             "model.blocks_per_level=1", "model.attention_resolutions=[]", "num_samples=0"]


@pytest.mark.parametrize("family,kill,resumed_from", [
    ("vae", 13, 10), ("transformer", 13, 10), ("diffusion", 13, 10),
    ("vae", 19, 16),  # from the checkpoint at the end of epoch 2
])
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(
        family, kill, resumed_from, cli, tmp_path, corpus):
    """Killed (SIGKILL) mid-epoch (8 batches an epoch), with checkpoints every 5 steps and
    at each epoch's end: `genframe resume` continues from the latest checkpoint and ends
    with the same weights (and EMA copies) as a run that never stopped (deterministic
    mode, CPU)."""
    args = {"vae": VAE, "transformer": [*GPT, f"data.path={corpus}"], "diffusion": DIFFUSION}[family]
    args = [*args, "trainer.max_epochs=3", "trainer.limit_train_batches=8",
            "trainer.deterministic=true", "callbacks.checkpoint.every_n_steps=5",
            "trainer.log_every_n_steps=1", "logger=many"]
    env = _killer_env(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    done = cli("train", *args, f"hydra.run.dir={full}", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = cli("train", *args, "+callbacks.kill._target_=killer.KillAt",
                 f"+callbacks.kill.step={kill}", f"hydra.run.dir={part}", env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((part / "run.json").read_text())["status"] == "running"  # no handler ran
    assert _state(part)[0] == resumed_from
    resumed = cli("resume", f"run={part}", "~callbacks.kill", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    (step_a, a), (step_b, b) = _state(full), _state(part)
    assert step_a == step_b == 24
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    info = json.loads((part / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["resumes"][0]["from_step"] == resumed_from
    assert info["resumes"][0]["overrides"] == ["~callbacks.kill"]
    # The same CSV log goes on: rows up to the checkpoint were flushed when it was saved,
    # the continued run adds the rest.
    assert _logged_steps(part) == _logged_steps(full)
    # TensorBoard goes on in the same folder: each step's loss once, as if never stopped.
    assert _tensorboard_steps(part) == _tensorboard_steps(full)


def _tensorboard_steps(run_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    tag = "train/loss_step" if "train/loss_step" in tags else "train/loss"
    return sorted(e.step for e in events.Scalars(tag))


def _logged_steps(run_dir: Path) -> set[int]:
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as f:
        return {int(r["step"]) for r in csv.DictReader(f)}


# -- the four faults of `train resume=` ------------------------------------------------


@pytest.fixture(scope="module")
def _gpt20(tmp_path_factory):
    """A 20-step GPT run with a warm-up/cosine schedule over its total steps."""
    from tests.conftest import run_cli

    root = tmp_path_factory.mktemp("gpt20")
    run_dir = root / "run"
    done = run_cli("train", *GPT, f"data.path={_write_corpus(root / 'corpus')}", "trainer.max_steps=20",
                   "trainer.max_epochs=-1", "model.warmup_steps=2", "model.lr=1e-3", *LR_MONITOR,
                   f"hydra.run.dir={run_dir}", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


@pytest.fixture
def gpt_run(_gpt20, tmp_path):
    """A copy of the 20-step GPT run (tests change it)."""
    import shutil

    return Path(shutil.copytree(_gpt20, tmp_path / "gpt20"))


def test_resumed_schedule_and_new_lr_follow_the_new_config(gpt_run, cli, tmp_path, corpus):
    """20 -> 40 steps with a new model.lr: from step 20 on, the learning rate is the one a
    fresh 40-step run with that lr has (before: the old 20-step schedule at its floor, and
    the old lr)."""
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    done = cli("train", f"resume={gpt_run}", "trainer.max_steps=40", "model.lr=3e-3",
               f"hydra.run.dir={resumed}")
    assert done.returncode == 0, done.stderr[-2000:]
    done = cli("train", *GPT, f"data.path={corpus}", "trainer.max_steps=40", "trainer.max_epochs=-1",
               "model.warmup_steps=2", "model.lr=3e-3", *LR_MONITOR, f"hydra.run.dir={fresh}")
    assert done.returncode == 0, done.stderr[-2000:]
    # The new run's weights are its own: never the source run's best checkpoint.
    best = json.loads((resumed / "run.json").read_text())["best_checkpoint"]
    assert best is None or best.startswith(str(resumed))
    got, want = _lr_by_step(resumed), _lr_by_step(fresh)
    steps = sorted(s for s in got if 20 <= s < 40)
    assert len(steps) >= 15
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    assert got[steps[0]] > 1e-3  # the new lr, mid-decay: not the old schedule's floor (1e-4)


def test_train_resume_checks_overrides_against_the_run_config(gpt_run, cli, tmp_path):
    """model.warmup_steps is a transformer key: it was refused against the default VAE
    config ("did you mean kl_warmup_steps")."""
    out = tmp_path / "more"
    done = cli("train", f"resume={gpt_run}", "model.warmup_steps=5", "trainer.max_steps=24",
               f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    cfg = (out / "config.yaml").read_text()
    assert "warmup_steps: 5" in cfg
    nothing = cli("train", f"resume={gpt_run}", "trainer.max_steps=10")
    assert nothing.returncode == 2 and "leaves nothing to train" in nothing.stderr, nothing.stderr
    typo = cli("train", f"resume={gpt_run}", "model.warmup_step=5")
    assert typo.returncode == 2
    assert "warmup_steps" in typo.stderr and "kl_warmup" not in typo.stderr


def test_resume_with_changed_data_keeps_the_tokenizer(gpt_run, cli, tmp_path):
    """New text with characters the run never saw: the resumed run tokenises with the
    run's own tokenizer (unknown characters become <unk>), not a new one whose ids would
    mean other characters to the kept weights."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("ZYXW VUTS 0123456789 " * 40)
    (other / "b.txt").write_text("QRPO NMLK !?;: " * 40)
    out = tmp_path / "newdata"
    done = cli("train", f"resume={gpt_run}", f"data.path={other}", "data.val_fraction=0.5",
               "trainer.max_steps=22", f"hydra.run.dir={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(
        (gpt_run / "tokenizer.json").read_text())


# -- genframe resume: in place, and its refusals -------------------------------------


def test_resume_in_place_takes_new_values_and_keeps_the_log(gpt_run, cli):
    before = _lr_by_step(gpt_run)
    done = cli("resume", f"run={gpt_run}", "trainer.max_steps=26", "model.lr=2e-3")
    assert done.returncode == 0, done.stderr[-2000:]
    after = _lr_by_step(gpt_run)
    assert {s: after[s] for s in before} == before  # earlier rows kept, not deleted
    assert max(after) == 25
    info = json.loads((gpt_run / "run.json").read_text())
    assert info["status"] == "completed" and info["steps"] == 26
    assert info["resumes"][-1]["overrides"] == ["trainer.max_steps=26", "model.lr=2e-3"]
    assert "lr: 0.002" in (gpt_run / "config.yaml").read_text()


def _refused(cli, run_dir: Path, *args: str, match: str):
    before = _tree_digest(run_dir)
    done = cli("resume", f"run={run_dir}", *args)
    assert done.returncode == 2, done.stderr[-2000:]
    assert match in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert _tree_digest(run_dir) == before  # nothing in the run directory changed


def test_resume_refusals_leave_the_run_unchanged(gpt_run, cli, tmp_path):
    _refused(cli, gpt_run, "model=vae", match="keeps its config groups")
    _refused(cli, gpt_run, "trainer.max_steps=30", "model.n_embd=32", match="keeps its network")
    before = _tree_digest(gpt_run)
    again = cli("resume", f"run={gpt_run}")  # a requeued job whose run completed
    assert again.returncode == 0 and "already completed" in again.stderr, again.stderr
    assert _tree_digest(gpt_run) == before
    _refused(cli, gpt_run, "model.warmup_step=3", match="Did you mean 'model.warmup_steps'")
    _refused(cli, gpt_run, "paths.root=/tmp", match="cannot change")
    _refused(cli, gpt_run, "~model.lr", match="only callbacks can be removed")
    _refused(cli, gpt_run, "trainer.max_steps=10", match="leaves nothing to train")
    _refused(cli, gpt_run, "model.lr=1e-2", match="the run completed at step 20")
    # A bad callback value is refused before the run records anything.
    _refused(cli, gpt_run, "trainer.max_steps=30", "callbacks.checkpoint.every_n_steps=0",
             match="callbacks.checkpoint.every_n_steps must be a positive integer")

    torn = tmp_path / "torn"
    import shutil

    shutil.copytree(gpt_run, torn)
    last = torn / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    _refused(cli, torn, "trainer.max_steps=30", match="cannot be continued")

    (torn / "checkpoints" / "last.ckpt").unlink()
    _refused(cli, torn, "trainer.max_steps=30", match="no checkpoints/last.ckpt")


def test_resume_refuses_another_models_checkpoint(gpt_run, cli, tmp_path):
    vae = tmp_path / "vae"
    done = cli("train", *VAE, f"hydra.run.dir={vae}")
    assert done.returncode == 0, done.stderr[-2000:]
    (vae / "checkpoints" / "last.ckpt").write_bytes((gpt_run / "checkpoints" / "last.ckpt").read_bytes())
    _refused(cli, vae, "trainer.max_epochs=2", match="cannot be continued")


def test_resume_refuses_a_run_being_written(gpt_run, cli):
    from filelock import FileLock

    with FileLock(str(gpt_run / "run.lock")):
        _refused(cli, gpt_run, "trainer.max_steps=30", match="still being written")


def test_resume_needs_one_run(cli, tmp_path):
    for args, match in ((["trainer.max_steps=3"], "give the one run"),
                        ([f"run={tmp_path / 'nowhere'}"], "no such directory"),
                        ([f"run={tmp_path}"], "not a genframe run directory")):
        done = cli("resume", *args)
        assert done.returncode == 2 and match in done.stderr, done.stderr


# -- the pieces ------------------------------------------------------------------------


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint whole and no stray file."""
    from genframe.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()

    def torn_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("key,value", [("every_n_steps", 0), ("every_n_steps", 2.5),
                                       ("every_n_minutes", 0), ("every_n_minutes", "x")])
def test_checkpoint_intervals_are_checked(key, value, tmp_path):
    from genframe.callbacks import LastCheckpoint
    from genframe.errors import UserError

    with pytest.raises(UserError, match=f"callbacks.checkpoint.{key}"):
        LastCheckpoint(dirpath=str(tmp_path), **{key: value})


# -- a fine-tuning run, a sweep's job, the W&B run ------------------------------------


def test_resume_continues_a_killed_finetuning_run(cli, tmp_path):
    env = _killer_env(tmp_path)
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    done = cli("train", *VAE, f"hydra.run.dir={base}", env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = cli("finetune", f"run={base}", *FAST_TRAINING, "trainer.max_epochs=2",
                 "trainer.limit_train_batches=6", "callbacks.checkpoint.every_n_steps=4",
                 "finetune.lr=1e-4", "+callbacks.kill._target_=killer.KillAt",
                 "+callbacks.kill.step=9", f"hydra.run.dir={tuned}", env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = cli("resume", f"run={tuned}", "~callbacks.kill", env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    info = json.loads((tuned / "run.json").read_text())
    assert info["task"] == "finetune" and info["status"] == "completed" and info["steps"] == 12
    assert info["resumes"][0]["from_step"] == 8
    assert info["started_from"]  # the fine-tuning lineage is kept


def test_resume_continues_a_sweep_job_and_the_same_wandb_run(cli, tmp_path):
    sweep = tmp_path / "sweep"
    done = cli("train", "-m", *VAE, "model.latent_dim=2,3", "logger=wandb",
               f"hydra.sweep.dir={sweep}", env={"WANDB_MODE": "offline"})
    assert done.returncode == 0, done.stderr[-2000:]
    job = sweep / "1"
    wandb_id = json.loads((job / "run.json").read_text())["logger_runs"]["wandb"]
    resumed = cli("resume", f"run={job}", "trainer.max_epochs=2", env={"WANDB_MODE": "offline"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    info = json.loads((job / "run.json").read_text())
    assert info["epochs"] == 2 and info["model"]["kwargs"]["latent_dim"] == 3
    assert info["logger_runs"]["wandb"] == wandb_id
    # Both sessions wrote to the run with that id (a new id would start another run).
    offline = sorted(p.name for p in (job / "logs" / "wandb").glob("offline-run-*"))
    assert offline and all(name.endswith(wandb_id) for name in offline)


def test_checkpoint_every_n_minutes_saves_mid_epoch(cli, tmp_path):
    """With a tiny interval every step is due: killed after step 3, the run holds the
    checkpoint of step 2 (the kill runs before that step's checkpoint)."""
    env = _killer_env(tmp_path)
    run_dir = tmp_path / "timed"
    killed = cli("train", *VAE, "trainer.limit_train_batches=8", "callbacks.checkpoint.every_n_minutes=1e-6",
                 "+callbacks.kill._target_=killer.KillAt", "+callbacks.kill.step=3",
                 f"hydra.run.dir={run_dir}", env=env)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _state(run_dir)[0] == 2


@pytest.mark.parametrize("make", ["epoch_shuffle", "mixed_batches"])
def test_training_samplers_continue_from_their_saved_position(make):
    """A sampler rebuilt in a new process and given the saved state hands out the rest of
    the interrupted epoch, then the next epochs, as the uninterrupted one does."""
    from genframe.data.base import EpochShuffle
    from genframe.data.subject import MixedBatches

    def build():
        return EpochShuffle(23, seed=5) if make == "epoch_shuffle" else MixedBatches(7, 20, (2, 2), 4, 5)

    whole = build()
    epochs = []
    for epoch in range(3):
        whole.set_epoch(epoch)
        epochs.append(list(whole))
    assert epochs[0] != epochs[1]  # a new order every epoch

    first = build()
    first.set_epoch(1)
    it = iter(first)
    head = [next(it) for _ in range(5)]
    second = build()
    second.load_state_dict(first.state_dict())
    assert head + list(second) == epochs[1]
    second.set_epoch(2)
    assert list(second) == epochs[2]
