"""Sweeps beyond the basic launcher: joblib and submitit jobs in other processes, the
resumable Optuna sweeper, and the summary every multirun ends with."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from tests.conftest import FAST
from tests.test_resume import _killer_env

FAST_VAE = [o for o in FAST if "latent_dim" not in o]


def sweep_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "outputs" / "train-multirun").iterdir() if p.is_dir())


def summary_rows(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("launcher", [
    "joblib", pytest.param("submitit_local", marks=pytest.mark.slow)])  # submitit: ~40 s
def test_a_failed_job_in_another_process_never_stops_the_sweep(cli, tmp_path, launcher):
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    # model.lr=-1 composes fine and is refused by the task itself, inside the worker.
    result = cli("train", "-m", f"hydra/launcher={launcher}", *extra, *FAST, "model.lr=1e-3,-1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "model.lr=-1]: model.lr must be > 0" in result.stderr
    [sweep] = sweep_dirs(tmp_path)  # every worker wrote into the command's one sweep folder
    rows = summary_rows(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "failed")]
    assert float(rows[0]["val/loss"]) > 0 and float(rows[0]["wall_time_s"]) >= 0
    assert rows[0]["run_dir"] == str(sweep / "0") and "model.lr=0.001" in rows[0]["overrides"]
    assert "model.lr must be > 0" in rows[1]["error"] and rows[1]["val/loss"] == ""
    assert json.loads((sweep / "1" / "run.json").read_text())["exit_code"] == 2
    assert "sweep summary (2 jobs)" in result.stdout
    if launcher == "submitit_local":
        assert (sweep / ".submitit").is_dir()  # submitit's logs stay inside the sweep


def test_submitit_local_job_reports_through_its_run_dir(cli, tmp_path):
    # One job (a process of its own) refused by the task: the command still knows why.
    result = cli("train", "-m", "hydra/launcher=submitit_local", *FAST, "model.lr=-1")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model.lr=-1]: model.lr must be > 0" in result.stderr
    [sweep] = sweep_dirs(tmp_path)
    assert [r["status"] for r in summary_rows(sweep)] == ["failed"]
    assert (sweep / ".submitit").is_dir()


def test_optuna_sweep_resumes_with_only_the_missing_trials(cli, tmp_path):
    optuna = pytest.importorskip("optuna")
    command = ["train", "-m", "hydra/sweeper=genframe_optuna", *FAST_VAE,
               "model.latent_dim=range(2,6)"]
    first = cli(*command, "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = cli(*command, "hydra.sweeper.n_trials=3")  # the same study: one trial to go
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 of 3 trials done, 1 to run" in second.stdout + second.stderr
    storage = f"sqlite:///{tmp_path / 'outputs' / 'train-multirun' / 'optuna.db'}"
    [summary] = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    old, new = sweep_dirs(tmp_path)
    assert len(summary_rows(old)) == 2 and len(summary_rows(new)) == 1
    results = (new / "optimization_results.yaml").read_text()
    assert f"best_value: {study.best_value}" in results
    assert f"best trial #{study.best_trial.number} of the study (of 3 counted): val/loss" in second.stdout
    assert f"model.latent_dim={study.best_params['model.latent_dim']}" in second.stdout


def test_optuna_sweep_stops_on_a_metric_the_task_never_returns(cli, tmp_path):
    pytest.importorskip("optuna")
    result = cli("train", "-m", "hydra/sweeper=genframe_optuna", "hydra.sweeper.n_trials=8",
                 *FAST_VAE, "model.latent_dim=range(2,6)", "monitor=val/los")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "the Optuna sweep stopped" in result.stderr
    assert "monitor=val/los: model 'vae' never logs this metric" in result.stderr
    [sweep] = sweep_dirs(tmp_path)
    jobs = [p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()]
    assert len(jobs) == 1  # not 8 failed trials
    assert not (jobs[0] / "checkpoints").exists()  # refused before any training


# -- the pieces, without running a task -------------------------------------------------


def make_job(sweep: Path, num: int, overrides: list[str], run: dict | None,
             metrics: dict | None = None) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if run is not None:
        (job / "run.json").write_text(json.dumps(run))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def test_summary_rows_read_status_metric_wall_time_and_error(tmp_path):
    from genframe.sweep import summary_csv
    from genframe.sweep.jobs import read_jobs

    make_job(tmp_path, 0, ["a=1"], {"status": "completed", "started": "2026-01-01T00:00:00+0000",
                                    "ended": "2026-01-01T00:01:30+0000"}, {"val/loss": 0.5})
    make_job(tmp_path, 1, ["a=2"], {"status": "failed", "error": "boom", "exit_code": 2})
    make_job(tmp_path, 10, ["a=3"], {"status": "running", "started": "2026-01-01T00:00:00+0000"})
    (tmp_path / "not_a_job").mkdir()
    rows = read_jobs(tmp_path, "val/loss")
    assert [r["job"] for r in rows] == ["0", "1", "10"]
    assert rows[0]["objective"] == 0.5 and rows[0]["wall_time_s"] == 90.0
    assert (rows[1]["status"], rows[1]["error"], rows[1]["exit_code"]) == ("failed", "boom", 2)
    assert rows[2]["status"] == "failed" and "killed" in rows[2]["error"]  # died running
    table = list(csv.reader(summary_csv(rows, "val/loss").splitlines()))
    assert table[0] == ["job", "status", "overrides", "val/loss", "wall_time_s", "run_dir", "error"]
    assert table[1][:5] == ["0", "completed", "a=1", "0.5", "90.0"] and table[2][6] == "boom"


def test_exit_status_of_jobs_that_failed_elsewhere(monkeypatch, capsys):
    from genframe import cli, sweep

    monkeypatch.setattr(cli, "_JOB_ERRORS", [])  # none in this process: all ran elsewhere
    monkeypatch.setattr(sweep, "_LAST_FAILED", [sweep.FailedJob("a=1", "bad a", 2),
                                                sweep.FailedJob("a=2", "bug", 1)])
    assert cli._report_job_errors() == 2
    err = capsys.readouterr().err
    assert "job [a=1]: bad a" in err and "job [a=2]: bug" in err
    assert cli._report_job_errors() == 0  # read once: the next command starts clean


def test_record_job_error_keeps_the_exit_status(tmp_path):
    from genframe.sweep.jobs import record_job_error

    record_job_error(tmp_path, "train", "refused", 2)  # no run.json yet: a short one
    info = json.loads((tmp_path / "run.json").read_text())
    assert (info["status"], info["error"], info["exit_code"]) == ("failed", "refused", 2)


def test_interrupted_and_refused_trials_do_not_count(tmp_path):
    optuna = pytest.importorskip("optuna")
    from genframe.sweep.optuna_sweeper import _close_stale_trials, _fail, counted_trials

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    study.tell(study.ask(), 1.0)
    _fail(study, study.ask(), "error", "a bug")           # counts: it would fail again
    _fail(study, study.ask(), "refused", "bad monitor")   # does not count
    stale = study.ask()                                    # its sweep was killed
    stale.set_user_attr("genframe_pid", 2 ** 22 + 12345)   # no such process
    stale.set_user_attr("genframe_host", __import__("socket").gethostname())
    alive = study.ask()                                    # another sweep still runs it
    alive.set_user_attr("genframe_pid", os.getpid())
    alive.set_user_attr("genframe_host", __import__("socket").gethostname())
    _close_stale_trials(study)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL", "FAIL", "RUNNING"]
    assert study.trials[3].user_attrs["genframe_failure"] == "interrupted"
    assert [t.number for t in counted_trials(study)] == [0, 1]


def test_optuna_direction_follows_monitor_mode():
    pytest.importorskip("optuna")
    from genframe.errors import UserError
    from genframe.sweep.optuna_sweeper import _direction

    assert (_direction("min"), _direction("max"), _direction("maximize")) == \
        ("minimize", "maximize", "maximize")
    with pytest.raises(UserError, match="hydra.sweeper.direction=up"):
        _direction("up")


def test_same_command_same_study_name():
    pytest.importorskip("optuna")
    from genframe.sweep.optuna_sweeper import default_study_name

    a = default_study_name("train", ["model.lr=interval(0.1,1)", "seed=1"])
    assert a == default_study_name("train", ["seed=1", "model.lr=interval(0.1,1)"])
    assert a != default_study_name("train", ["seed=2", "model.lr=interval(0.1,1)"])
    assert a.startswith("train-")



def test_optuna_sweeper_without_optuna_says_what_to_install(tmp_path, monkeypatch, capsys):
    import sys

    from genframe.cli import main

    monkeypatch.setitem(sys.modules, "genframe.sweep.optuna_sweeper", None)  # as if not installed
    code = main(["train", "-m", "hydra/sweeper=genframe_optuna", *FAST,
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "pip install 'genframe[sweeps]'" in err and "Traceback" not in err
    assert not (tmp_path / "sweep" / "0").exists()  # no job ran


def test_a_submitit_job_killed_from_outside_is_recorded_and_the_sweep_goes_on(cli, tmp_path):
    # Job 0 is killed after its first step; job 1 never reaches step 1000.
    result = cli("train", "-m", "hydra/launcher=submitit_local", *FAST,
                 "+callbacks.kill._target_=killer.KillAt", "+callbacks.kill.step=1,1000",
                 env=_killer_env(tmp_path))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "killed" in result.stderr
    [sweep] = sweep_dirs(tmp_path)
    rows = summary_rows(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "failed"), ("1", "completed")]
    assert "killed" in rows[0]["error"]
    assert "sweep summary (2 jobs)" in result.stdout


def test_optuna_trials_run_in_joblib_workers(cli, tmp_path):
    """The sweeper's class (a Hydra plugin of genframe's) travels to the workers too."""
    pytest.importorskip("optuna")
    result = cli("train", "-m", "hydra/sweeper=genframe_optuna", "hydra/launcher=joblib",
                 "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=2",
                 *FAST_VAE, "model.latent_dim=range(2,6)")
    assert result.returncode == 0, result.stderr[-3000:]
    [sweep] = sweep_dirs(tmp_path)
    assert [r["status"] for r in summary_rows(sweep)] == ["completed", "completed"]
