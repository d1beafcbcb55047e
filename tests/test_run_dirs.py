"""Run directories tell the truth and are never damaged: refused commands change no file,
default directories never collide, failed and interrupted runs say so, sweeps survive a
failing job, and the run's log holds genframe's own lines."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from genframe.cli import main
from tests.conftest import FAST, GENFRAME


def tree_digest(root: Path) -> dict[str, str]:
    """Every file below `root` with the SHA-256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def status_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny finished train run, shared by the tests that need an existing run."""
    run_dir = tmp_path_factory.mktemp("existing") / "run"
    assert main(["train", *FAST, "trainer.max_steps=2", f"hydra.run.dir={run_dir}"]) == 0
    return run_dir


def test_refused_run_dir_leaves_every_file_byte_identical(trained, capsys):
    before = tree_digest(trained)
    assert {".hydra/config.yaml", "train.log", "run.json"} <= set(before)
    for task, extra in (("train", FAST), ("generate", [f"run={trained}"]),
                        ("evaluate", [f"run={trained}"])):
        code = main([task, *extra, f"hydra.run.dir={trained}"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "already holds a run" in err and "hydra.run.dir" in err and "Traceback" not in err
    assert tree_digest(trained) == before


def test_refused_sweep_dir_leaves_its_jobs_alone(trained, capsys):
    sweep = trained.parent
    before = tree_digest(sweep)
    code = main(["train", "-m", *FAST, "model.latent_dim=2,3", f"hydra.sweep.dir={sweep}"])
    assert code == 2 and "already holds a sweep" in capsys.readouterr().err
    assert tree_digest(sweep) == before


def test_default_run_dirs_never_collide(tmp_path):
    from genframe.runs import fresh_run_dir, register_run_dir_resolver

    base = str(tmp_path / "train" / "2026-01-01_00-00-00")
    claimed = []
    for _ in range(3):  # three commands started in the same second
        register_run_dir_resolver()
        claimed.append(fresh_run_dir(base))
        assert fresh_run_dir(base) == claimed[-1]  # Hydra resolves it more than once
    assert claimed == [base, base + "_1", base + "_2"]
    assert all(Path(c).is_dir() for c in claimed)


def test_default_run_and_sweep_dirs_use_the_fresh_dir_resolver():
    from omegaconf import OmegaConf

    from genframe.config import conf_dir

    hydra_cfg = OmegaConf.load(conf_dir() / "hydra" / "default.yaml")
    assert hydra_cfg.run._get_node("dir")._value().startswith("${genframe.fresh_dir:")
    assert hydra_cfg.sweep._get_node("dir")._value().startswith("${genframe.fresh_dir:")


@pytest.mark.parametrize("where", ["below_file", "proc", "root_below_file"])
def test_output_folder_that_cannot_be_created(tmp_path, capsys, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    arg = {"below_file": f"hydra.run.dir={a_file}/run",
           "proc": "hydra.run.dir=/proc/genframe_cannot_exist/run",
           "root_below_file": f"paths.root={a_file}"}[where]
    code = main(["train", *FAST, arg])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("genframe: error:") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert a_file.read_text() == "x"


def test_a_failure_after_start_marks_the_run_failed(tmp_path, monkeypatch, capsys):
    import genframe.tasks.fit as fit_module
    from genframe.errors import UserError

    def broken_save(*args, **kwargs):
        raise UserError("disk full (simulated)")

    monkeypatch.setattr(fit_module, "save_weights", broken_save)
    run_dir = tmp_path / "run"
    assert main(["train", *FAST, "trainer.max_steps=1", f"hydra.run.dir={run_dir}"]) == 2
    assert "disk full" in capsys.readouterr().err
    info = status_of(run_dir)
    assert info["status"] == "failed" and "disk full" in info["error"] and "ended" in info


def test_an_unexpected_exception_marks_the_run_failed(tmp_path, monkeypatch):
    import genframe.tasks.fit as fit_module

    def broken_save(*args, **kwargs):
        raise RuntimeError("bug (simulated)")

    monkeypatch.setattr(fit_module, "save_weights", broken_save)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated"):  # a bug keeps its traceback
        main(["train", *FAST, "trainer.max_steps=1", f"hydra.run.dir={run_dir}"])
    info = status_of(run_dir)
    assert info["status"] == "failed" and info["error"] == "RuntimeError: bug (simulated)"


def test_ctrl_c_inside_fit_exits_130_with_the_resume_hint(tmp_path, monkeypatch, capsys):
    """Lightning turns KeyboardInterrupt inside fit into sys.exit(1); genframe makes it 130."""
    import pytorch_lightning as pl

    import genframe.tasks.build as build_module

    class CtrlC(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt

    real_build = build_module.build_trainer
    monkeypatch.setattr("genframe.tasks.fit.build_trainer",
                        lambda cfg, model, **kw: real_build(cfg, model, extra_callbacks=[CtrlC()]))
    run_dir = tmp_path / "run"
    code = main(["train", *FAST, "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 130, err
    assert f"genframe resume run={run_dir}" in err
    assert status_of(run_dir)["status"] == "interrupted"


@pytest.mark.slow
def test_ctrl_c_to_the_process_group(tmp_path):
    """A terminal's Ctrl-C reaches every process of the group; the run still ends cleanly."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "GENFRAME_OUTPUT_ROOT": str(tmp_path)}
    proc = subprocess.Popen(
        [*GENFRAME, "train", *FAST, "trainer.max_epochs=100000", "data.num_workers=1",
         f"hydra.run.dir={run_dir}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "resume=" in err and "Traceback" not in err
    assert status_of(run_dir)["status"] == "interrupted"


def test_sweep_survives_a_job_with_an_unexpected_exception(tmp_path, monkeypatch, capsys):
    import genframe.tasks.train as train_module

    real_prepare = train_module.prepare_training

    def sometimes_broken(cfg):
        if cfg.model.latent_dim == 3:
            raise RuntimeError("bug in one job (simulated)")
        return real_prepare(cfg)

    monkeypatch.setattr(train_module, "prepare_training", sometimes_broken)
    sweep = tmp_path / "sweep"
    code = main(["train", "-m", *[o for o in FAST if "latent_dim" not in o],
                 "model.latent_dim=3,2", f"hydra.sweep.dir={sweep}"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    assert "sweep summary (2 jobs)" in captured.out
    rows = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "completed"]
    assert "bug in one job" in rows[0]["error"]
    assert "val/loss" in rows[1]["metrics"]
    assert "RuntimeError: bug in one job" in (sweep / "0" / "train.log").read_text()


def test_train_log_holds_genframes_own_lines(trained):
    text = (trained / "train.log").read_text()
    assert f"run directory: {trained}" in text
    assert "splits:" in text  # the data summary
    assert "final metrics" in text and "val/loss" in text


def test_files_get_the_usual_permissions(trained):
    probe = trained.parent / "probe"
    probe.write_text("x")
    usual = stat.S_IMODE(probe.stat().st_mode)
    for name in ("run.json", "config.yaml", "metrics.json", "model.safetensors",
                 "samples/manifest.jsonl", "checkpoints/last.ckpt"):
        assert stat.S_IMODE((trained / name).stat().st_mode) == usual, name


def test_metrics_title_names_the_weights_really_used(trained, tmp_path, capsys):
    # The shared run validated once an epoch: a best checkpoint was chosen.
    assert "the best checkpoint's weights" in (trained / "train.log").read_text()
    run_dir = tmp_path / "no_val"
    assert main(["train", *FAST, "trainer.max_steps=1", "trainer.limit_val_batches=0",
                 f"hydra.run.dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "best checkpoint" not in out.split("final metrics")[1].splitlines()[0]
    assert "no checkpoint was chosen as best" in out
    assert "monitor=val/loss was never logged while training" in out
    assert "validation was off (trainer.limit_val_batches=0)" in out



def test_a_refused_command_can_be_repeated_in_the_same_folder(trained, tmp_path, capsys):
    run_dir = tmp_path / "gen"
    for bad in ("seed=abc", "num_samples=0", "batch_size=abc"):
        assert main(["generate", f"run={trained}", bad, f"hydra.run.dir={run_dir}"]) == 2
        assert bad.split("=")[0] in capsys.readouterr().err
        info = status_of(run_dir)  # the folder says how the last command ended
        assert info["status"] == "failed" and bad.split("=")[0] in info["error"]
    assert main(["generate", f"run={trained}", "num_samples=2", f"hydra.run.dir={run_dir}"]) == 0
    assert status_of(run_dir)["status"] == "completed"
    # a run that started is never overwritten
    assert main(["generate", f"run={trained}", "num_samples=2", f"hydra.run.dir={run_dir}"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_resume_of_a_run_refused_before_training_says_why(tmp_path, capsys):
    run_dir = tmp_path / "refused"
    assert main(["train", *FAST, "data.batch_size=abc", f"hydra.run.dir={run_dir}"]) == 2
    capsys.readouterr()
    assert main(["resume", f"run={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "holds no model" in err and "failed before it started" in err
    assert "data.batch_size" in err  # the recorded error, so the user sees what to fix


def test_a_generate_run_that_failed_after_starting_is_not_said_to_have_not_started(
        trained, tmp_path, monkeypatch, capsys):
    import genframe.tasks.generate as generate
    from genframe.errors import UserError

    def fail(*args, **kwargs):
        raise UserError("disk full (simulated)")

    monkeypatch.setattr(generate, "atomic_write_json", fail)  # its metrics.json, at the end
    run_dir = tmp_path / "gen"
    assert main(["generate", f"run={trained}", "num_samples=2", f"hydra.run.dir={run_dir}"]) == 2
    assert status_of(run_dir)["status"] == "failed"
    capsys.readouterr()
    assert main(["resume", f"run={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "this 'generate' run holds no model" in err and "before it started" not in err
    assert "runs of train and finetune hold one" in err and f"run={trained}" in err
    # a checkpoint file given as run= names the run directory holding it
    assert main(["resume", f"run={trained / 'checkpoints' / 'last.ckpt'}"]) == 2
    assert f"the run directory holding it is {trained.resolve()}" in capsys.readouterr().err


def test_a_run_dir_inside_an_existing_run_is_refused(trained, capsys):
    before = tree_digest(trained)
    for inside in ("samples", "checkpoints/new"):
        code = main(["generate", f"run={trained}", "num_samples=2",
                     f"hydra.run.dir={trained / inside}"])
        assert code == 2 and "lies inside the run directory" in capsys.readouterr().err
    assert tree_digest(trained) == before


def test_export_out_is_checked_like_a_run_dir(trained, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, expected in ((trained / "samples" / "x", "lies inside the run directory"),
                          (a_file, "is a file, not a folder"),
                          ("/proc/genframe_cannot_exist", "/proc/genframe_cannot_exist")):
        code = main(["export", f"run={trained}", f"out={out}", f"hydra.run.dir={tmp_path / 'e'}"])
        err = capsys.readouterr().err
        assert code == 2 and expected in err, err
        assert len(err.strip().splitlines()) == 1 and "Error executing job" not in err, err
    assert main(["export", f"run={trained}", "merge=maybe", f"hydra.run.dir={tmp_path / 'm'}"]) == 2
    assert "merge: expected true or false, got 'maybe'" in capsys.readouterr().err


def test_diverged_message_names_the_checkpoint_really_kept(tmp_path):
    from types import SimpleNamespace

    from genframe.callbacks.finite_loss import _kept

    none_yet = SimpleNamespace(checkpoint_callbacks=[SimpleNamespace(last_model_path="", best_model_path="")])
    assert "No checkpoint had been written yet" in _kept(none_yet)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"x")
    saved = SimpleNamespace(checkpoint_callbacks=[SimpleNamespace(last_model_path=str(ckpt), best_model_path="")])
    assert f"The last good checkpoint is kept: {ckpt}" == _kept(saved)


def test_a_run_shorter_than_its_validation_interval_says_so_with_the_numbers(tmp_path, capsys):
    lm = ["model=transformer", "data=text", "model.n_layer=1", "model.n_embd=16", "model.n_head=2",
          "model.block_size=16", "data.block_size=16", "trainer.max_steps=5",
          "trainer.val_check_interval=50", "trainer.check_val_every_n_epoch=null",
          "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "num_samples=0"]
    assert main(["train", *lm, f"hydra.run.dir={tmp_path / 'lm'}"]) == 0
    out = capsys.readouterr().out
    assert "no best checkpoint: monitor=val/loss was never logged while training" in out
    assert "no validation ran before training ended at step 5" in out
    assert "trainer.val_check_interval=50" in out  # the setting to change
