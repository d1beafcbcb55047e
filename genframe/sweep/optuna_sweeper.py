"""genframe's Optuna sweeper (``hydra/sweeper=genframe_optuna``): hydra-optuna-sweeper's search, made
resumable and safe for genframe tasks.

What it adds to the upstream sweeper (whose search-space parsing it reuses):

- ``n_trials`` counts the whole study: the same command run again after an interrupt
  (same storage, same study) runs only the trials still missing. A trial cut short by
  Ctrl-C, SIGTERM or a killed sweep is marked failed and ``interrupted`` in the study and
  not counted, so it is run again.
- ``study_name: null`` names the study after the task and a hash of the command's
  overrides and search space, so the same command finds its study again and another
  command never mixes its trials into it.
- ``direction`` takes genframe's ``monitor_mode`` (min/max) as well as Optuna's names.
- A failed trial is recorded as failed in the study (with its error as a user attribute),
  never ends the sweep; but when every trial of the first batch is refused by the task's
  checks before training (a ``monitor`` the model never logs, a bad option), or finishes
  without the ``monitor`` metric, the sweep stops with that message (exit status 2)
  instead of repeating it for every trial.
- ``optimization_results.yaml`` also names the best trial's number and run directory.

Hydra instantiates only sweeper classes from the ``hydra_plugins`` package, which it finds
by scanning; genframe does not rely on that scan (it misses editable installs) and
registers the class itself (`genframe.sweep.SweepSummary` does, before Hydra creates the
sweeper).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from omegaconf import OmegaConf
from optuna.trial import TrialState

from genframe.errors import GenframeError, UserError
from genframe.sweep.jobs import read_job

log = logging.getLogger("genframe")

DIRECTIONS = {"min": "minimize", "max": "maximize", "minimize": "minimize",
              "maximize": "maximize"}


class SweepStopped(GenframeError):
    """The first trials were all refused the same way: every trial would be."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class GenframeOptunaSweeper(OptunaSweeperImpl):
    """hydra-optuna-sweeper's sweeper with a resumable trial count (see the module doc).

    Args:
        sampler: an Optuna sampler, or a partial one (``_partial_: true``) that is given
            ``seed`` plus the number of trials the study holds, so a resumed sweep does
            not draw its first trials again.
        direction: ``min``/``max`` (genframe's ``monitor_mode``) or ``minimize``/``maximize``.
        storage: an Optuna storage URL (``sqlite:///path/optuna.db``); its folder is created.
        study_name: the study's name; None derives it from the task and the overrides.
        n_trials: trials of the whole study, counting those a previous run finished.
        n_jobs: trials launched at once (one batch for the launcher).
        max_failure_rate: the share of a batch's trials that may fail before the sweep
            stops (exit status of the first failure); 1.0, the default, never stops.
        seed: the seed of a partial sampler.
        Others: as in hydra-optuna-sweeper.
    """

    def __init__(self, sampler: Any, direction: Any, storage: Any, study_name: str | None,
                 n_trials: int, n_jobs: int, max_failure_rate: float = 1.0,
                 search_space: Any = None, custom_search_space: str | None = None,
                 params: Any = None, seed: int | None = None) -> None:
        super().__init__(sampler, direction, storage, study_name, n_trials, n_jobs,
                         max_failure_rate, search_space, custom_search_space, params)
        self.seed = seed

    def sweep(self, arguments: list[str]) -> None:
        """Run the study's missing trials, in batches of ``n_jobs``."""
        assert self.config is not None and self.launcher is not None
        monitor = self.config.get("monitor")
        if not monitor:
            raise UserError(f"hydra/sweeper=optuna optimises the task's `monitor` metric, and "
                            f"`genframe {self.config.task_name}` has none; sweep with the "
                            "basic sweeper (leave hydra/sweeper out)")
        if self.n_trials < 1:
            raise UserError(f"hydra.sweeper.n_trials={self.n_trials}: must be at least 1")
        self._process_searchspace_config()
        params_conf = [*self._parse_sweeper_params_config(), *arguments]
        space, fixed = create_params_from_overrides(params_conf)
        space = {**(self.search_space_distributions or {}), **space}
        for name in fixed:
            space.pop(name, None)
        directions = [_direction(d) for d in self._get_directions()]
        name = self.study_name or default_study_name(self.config.task_name, params_conf)
        storage = _storage_url(self.storage)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        study = optuna.create_study(study_name=name, storage=storage, directions=directions,
                                    sampler=self._sampler(storage, name), load_if_exists=True)
        _close_stale_trials(study)
        done = len(counted_trials(study))
        to_go = max(0, self.n_trials - done)
        log.info("optuna study '%s' in %s: %d of %d trials done, %d to run",
                 name, storage or "memory", done, self.n_trials, to_go)
        first = True
        while to_go > 0:
            batch = min(to_go, self.n_jobs)
            trials = [study.ask() for _ in range(batch)]
            for trial in trials:
                trial.set_user_attr("genframe_pid", os.getpid())
                trial.set_user_attr("genframe_host", socket.gethostname())
            overrides = self._configure_trials(trials, space, fixed)
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            except BaseException:
                for trial in trials:  # Ctrl-C, SIGTERM, or the launcher broke
                    _fail(study, trial, "interrupted", "the sweep stopped during this trial")
                raise
            self.job_idx += len(returns)
            outcomes = [_outcome(trial, ret, monitor) for trial, ret in zip(trials, returns)]
            # Every trial of the first batch refused the same way: stop, not n_trials times.
            stop = first and all(o.repeats for o in outcomes)
            for trial, o in zip(trials, outcomes):
                if o.value is not None:
                    study.tell(trial, o.value)
                else:
                    _fail(study, trial, "refused" if stop else "error", o.error)
                    log.warning("optuna trial %d failed: %s", trial.number, o.error)
            if stop:
                raise _stopped(outcomes)
            failed = [o for o in outcomes if o.value is None]
            if len(failed) / len(outcomes) > self.max_failure_rate:
                raise SweepStopped(f"{len(failed)} of {len(outcomes)} trials of a batch failed, more "
                                   f"than hydra.sweeper.max_failure_rate={self.max_failure_rate} "
                                   f"allows; the first: {failed[0].error}", failed[0].exit_code)
            first = False
            to_go -= batch
        self._save_results(study, name, storage, monitor, sweep_dir)

    def _sampler(self, storage: str | None, name: str) -> Any:
        """The sampler; a partial one is seeded past the trials the study already holds."""
        if not callable(self.sampler) or isinstance(self.sampler, optuna.samplers.BaseSampler):
            return self.sampler
        held = 0
        if storage is not None:
            try:
                held = len(optuna.load_study(study_name=name, storage=storage).trials)
            except KeyError:  # a new study
                held = 0
        seed = None if self.seed is None else int(self.seed) + held
        return self.sampler(seed=seed)

    def _save_results(self, study: optuna.Study, name: str, storage: str | None,
                      monitor: str, sweep_dir: Path) -> None:
        """Hydra's optuna ``optimization_results.yaml``, with the best trial's number and
        run directory and the study's trial count."""
        results: dict[str, Any] = {"name": "optuna", "study_name": name, "storage": storage,
                                   "monitor": monitor, "n_trials": len(counted_trials(study))}
        complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
        if len(study.directions) > 1:
            results["solutions"] = [{"params": t.params, "values": t.values}
                                    for t in (study.best_trials if complete else [])]
        elif complete:
            best = study.best_trial
            results.update(best_trial=best.number, best_params=best.params,
                           best_value=best.value, best_run_dir=best.user_attrs.get("run_dir"))
            log.info("best trial #%d: %s=%s with %s", best.number, monitor, best.value, best.params)
        OmegaConf.save(OmegaConf.create(results), sweep_dir / "optimization_results.yaml")


class OptunaSweeper(GenframeOptunaSweeper):
    """The class Hydra instantiates (`genframe.sweep.register_hydra_plugin` gives it the
    ``hydra_plugins`` name that ``conf/hydra/sweeper/genframe_optuna.yaml`` names)."""


def default_study_name(task: str, overrides: list[str]) -> str:
    """``<task>-<hash of the overrides>``: the same command finds its study again."""
    digest = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:10]
    return f"{task}-{digest}"


def counted_trials(study: optuna.Study) -> list[Any]:
    """The trials that count towards ``n_trials``: finished ones, except those cut short
    by an interrupt and those a stopped sweep refused (a resumed sweep runs them again)."""
    return [t for t in study.trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and t.user_attrs.get("genframe_failure") == "error")]


@dataclass
class _Outcome:
    """How one trial's job ended: its objective `value`, or its `error` (with the exit
    status) and, when every trial would end so, `repeats` saying how."""

    value: float | None
    error: str = ""
    exit_code: int = 1
    repeats: str = ""


def _outcome(trial: Any, ret: Any, monitor: str) -> _Outcome:
    """Read a finished job (its return value, else its run.json); keep its run directory
    in the trial."""
    from genframe.runs import never_started

    run_dir = str(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg else None
    trial.set_user_attr("run_dir", run_dir)
    if ret.status != JobStatus.COMPLETED:  # only a launcher failure gets here
        return _Outcome(None, f"{type(ret._return_value).__name__}: {ret._return_value}")
    if ret._return_value is not None:
        try:
            return _Outcome(float(ret._return_value))
        except (TypeError, ValueError):
            pass  # not a number: the job's metrics.json below says what it measured
    job = None if run_dir is None else read_job(Path(run_dir), monitor)
    if job is None or job["status"] == "completed":
        logged = sorted((job or {}).get("metrics") or {})
        return _Outcome(None, f"monitor={monitor}: the task finished without this metric (it "
                              f"returned {', '.join(logged) or 'none'})", 2,
                        repeats="finished without the metric it optimises")
    # Stopped by the task's checks before training: the config is wrong for every trial.
    refused = "refused by its checks before training" if never_started(Path(run_dir)) else ""
    return _Outcome(None, job.get("error") or job["status"], job.get("exit_code", 1), refused)


def _direction(value: Any) -> str:
    text = str(getattr(value, "name", value))
    if text not in DIRECTIONS:
        raise UserError(f"hydra.sweeper.direction={text}: must be min or max (or minimize, "
                        "maximize); it follows monitor_mode unless set")
    return DIRECTIONS[text]


def _storage_url(storage: Any) -> str | None:
    """The storage URL; a SQLite file's folder is created."""
    if storage is None:
        return None
    url = str(storage)
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return url


def _fail(study: optuna.Study, trial: Any, kind: str, error: str) -> None:
    """Mark `trial` failed: kind ``error`` counts towards n_trials, ``interrupted`` and
    ``refused`` do not."""
    trial.set_user_attr("genframe_failure", kind)
    trial.set_user_attr("error", error[:2000])
    study.tell(trial, state=TrialState.FAIL)


def _close_stale_trials(study: optuna.Study) -> None:
    """Mark failed (interrupted) the trials a killed sweep of this machine left running."""
    host = socket.gethostname()
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = frozen.user_attrs.get("genframe_pid")
        if pid is None or frozen.user_attrs.get("genframe_host") != host or _alive(int(pid)):
            continue
        trial = optuna.trial.Trial(study, frozen._trial_id)
        _fail(study, trial, "interrupted", "its sweep was killed during this trial")
        log.info("optuna trial %d was cut short by a killed sweep: run again", frozen.number)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _job_row(run_dir: str | None, monitor: str) -> dict[str, Any] | None:
    return None if run_dir is None else read_job(Path(run_dir), monitor)


def _stopped(outcomes: list[_Outcome]) -> SweepStopped:
    first = outcomes[0]
    were = "s were" if len(outcomes) > 1 else " was"
    return SweepStopped(f"the Optuna sweep stopped: its first trial{were} {first.repeats}, and "
                        f"every trial would be: {first.error}", first.exit_code or 2)
