"""The job folders of a sweep: read as summary rows, and told how a job failed.

Jobs that run in other processes (joblib's workers, submitit's jobs) cannot hand an
exception to the command that launched them: `record_job_error` writes a failed job's
exit status into its run.json, where `read_job` finds it (with the status, the error, the
``monitor`` metric and the wall time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# run.json statuses that end a job without its result.
FAILED = ("failed", "interrupted", "diverged")


def record_job_error(out_dir: str | Path, task: str, error: str, exit_code: int) -> None:
    """Keep a failed job's exit status (and its error, when the task wrote none) in its
    run.json, where the command that launched the job finds it."""
    from genframe.runs import RUN_INFO, end_run, update_run

    out_dir = Path(out_dir)
    try:
        if not (out_dir / RUN_INFO).exists():
            end_run(out_dir, "failed", error, task=task)
        info = _read_json(out_dir / RUN_INFO)
        if not isinstance(info, dict):
            return
        changes: dict[str, Any] = {"exit_code": exit_code}
        if info.get("status") in (None, "running", "completed"):
            changes.update(status="failed", error=error)
        elif not info.get("error"):
            changes["error"] = error
        update_run(out_dir, **changes)
    except OSError as exc:  # the job's folder cannot be written: its log keeps the error
        import logging

        logging.getLogger("genframe").warning("cannot record the job's error in %s: %s",
                                              out_dir, exc)


def read_jobs(sweep_dir: Path, monitor: str | None) -> list[dict[str, Any]]:
    """One row per job folder of `sweep_dir`, in job order (see `read_job`)."""
    if not sweep_dir.is_dir():
        return []
    jobs = sorted(sweep_dir.iterdir(), key=lambda p: (len(p.name), p.name))
    return [row for row in (read_job(job_dir, monitor) for job_dir in jobs) if row is not None]


def read_job(job_dir: Path, monitor: str | None) -> dict[str, Any] | None:
    """A job folder of a sweep as a row: ``job``, ``dir``, ``overrides``, ``status``,
    ``metrics``, ``objective`` (the `monitor` metric or None), ``wall_time_s`` and, for a
    failed job, ``error`` and ``exit_code``. None for a folder that is not a job."""
    from omegaconf import OmegaConf

    overrides_path = job_dir / ".hydra" / "overrides.yaml"
    if not job_dir.is_dir() or not overrides_path.exists():
        return None
    overrides = [str(o) for o in OmegaConf.load(overrides_path)]
    metrics = _read_json(job_dir / "metrics.json")
    info = _read_json(job_dir / "run.json")
    info = info if isinstance(info, dict) else {}
    status = info.get("status") or ("completed" if metrics is not None else "failed")
    if status == "running":
        # Nothing runs any more when the sweep ends: the job's process was killed.
        status = "failed"
        info.setdefault("error", "the job stopped without a word (killed?); see its log")
    metrics = metrics if isinstance(metrics, dict) else {}
    row = {"job": job_dir.name, "dir": str(job_dir), "overrides": overrides,
           "status": status, "metrics": metrics,
           "objective": metrics.get(monitor) if monitor else None,
           "wall_time_s": _wall_time(job_dir, info)}
    if status in FAILED:
        row["error"] = info.get("error") or status
        row["exit_code"] = int(info.get("exit_code") or 1)
    return row


def _read_json(path: Path) -> Any:
    """A job's JSON file, or None when it is missing or damaged (the job died writing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _wall_time(job_dir: Path, info: dict[str, Any]) -> float | None:
    """Seconds from run.json's ``started`` to its ``ended`` (or its last write)."""
    started = _timestamp(info.get("started"))
    if started is None:
        return None
    ended = _timestamp(info.get("ended"))
    if ended is None:
        try:
            ended = (job_dir / "run.json").stat().st_mtime
        except OSError:
            return None
    return max(0.0, ended - started)


def _timestamp(text: Any) -> float | None:
    """Seconds since the epoch of a run.json time (``%Y-%m-%dT%H:%M:%S%z``), or None."""
    from datetime import datetime

    try:
        return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None
