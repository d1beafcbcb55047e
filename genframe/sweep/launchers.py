"""Hydra's submitit launchers (``hydra/launcher=submitit_local`` / ``submitit_slurm``), with
a job that dies from outside recorded as failed instead of ending the sweep.

A genframe job never raises (`genframe.cli` records a job's error in its run.json), so the
only jobs submitit reports as failed are those whose process was killed: SLURM's time
limit, the out-of-memory killer, ``scancel``. Upstream, ``job.results()`` then raises in
the command and the sweep ends with a traceback and no summary. Here the job's run.json is
marked failed with submitit's reason (exit status 1), its result is an empty one, and the
sweep goes on to its summary.

The CLI points the two submitit choices at these classes (``hydra.launcher._target_``),
so users keep Hydra's names and settings.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("genframe")



class _KeepGoing:
    """A submitted job whose ``results()`` reports a killed job instead of raising."""

    def __init__(self, job: Any, overrides: list[str], job_dir: Path, task: str) -> None:
        self.job, self.overrides, self.job_dir, self.task = job, overrides, job_dir, task

    def results(self) -> list[Any]:
        from hydra.core.utils import JobReturn, JobStatus
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            return self.job.results()
        except (FailedJobError, UncompletedJobError) as exc:
            from genframe.sweep.jobs import record_job_error

            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            error = f"the job's process was killed (submitit: {reason}); see its log"
            log.error("job [%s]: %s", " ".join(self.overrides), error)
            record_job_error(self.job_dir, self.task, error, exit_code=1)
            return [JobReturn(overrides=self.overrides, working_dir=str(self.job_dir),
                              task_name=self.task, status=JobStatus.COMPLETED)]


def _keep_going(base: type, choice: str) -> type:
    """`base` (an upstream submitit launcher) whose sweep survives a killed job."""

    class KeepGoingLauncher(base):
        def __reduce__(self) -> tuple:
            # submitit pickles the launcher into every job; the worker rebuilds it from
            # genframe (its class lives under a hydra_plugins name no file holds).
            return _rebuild, (choice, self.__dict__)

        def launch(self, job_overrides: Any, initial_job_idx: int) -> Any:
            import submitit

            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            task = str(self.config.get("task_name", "task"))
            upstream = submitit.AutoExecutor.map_array

            def map_array(executor: Any, fn: Any, *iterables: Any) -> list[Any]:
                jobs = upstream(executor, fn, *iterables)
                overrides, _, numbers = iterables[0], iterables[1], iterables[2]
                return [_KeepGoing(job, list(o), sweep_dir / str(n), task)
                        for job, o, n in zip(jobs, overrides, numbers)]

            # The upstream launch builds its executor itself; its jobs are wrapped as they
            # are submitted, for this call only.
            submitit.AutoExecutor.map_array = map_array
            try:
                return super().launch(job_overrides, initial_job_idx)
            finally:
                submitit.AutoExecutor.map_array = upstream

    return KeepGoingLauncher


@functools.cache
def _launchers() -> dict[str, type]:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as upstream

    from genframe.sweep import SUBMITIT_LAUNCHERS, register_hydra_plugin

    classes = {"submitit_local": _keep_going(upstream.LocalLauncher, "submitit_local"),
               "submitit_slurm": _keep_going(upstream.SlurmLauncher, "submitit_slurm")}
    for choice, cls in classes.items():
        register_hydra_plugin(cls, SUBMITIT_LAUNCHERS[choice])
    return classes


def register_submitit_launchers() -> None:
    """Register the two classes with Hydra (see `genframe.sweep.register_hydra_plugin`)."""
    _launchers()


def _rebuild(choice: str, state: dict[str, Any]) -> Any:
    launcher = object.__new__(_launchers()[choice])
    launcher.__dict__.update(state)
    return launcher
