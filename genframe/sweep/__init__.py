"""Multiruns (``-m``): the summary every sweep ends with, and its failed jobs for the CLI.

`SweepSummary`, a Hydra callback (``conf/hydra/default.yaml``): at the end of every
multirun, whatever the launcher (basic, joblib, submitit) or sweeper (basic, Optuna), one
row per job (overrides, status, the ``monitor`` metric, wall time, run directory, error)
goes to ``summary.csv`` and ``summary.jsonl`` in the sweep folder and to the terminal; an
Optuna sweep adds its best trial (from ``optimization_results.yaml``). `take_failed_jobs`
gives the CLI the failed jobs (read from their run.json, see `genframe.sweep.jobs`), so
the exit status is right when the jobs ran in other processes.

Hydra runs this callback in the command's process, and pickles it along with every job
to joblib's and submitit's workers: unpickled there it registers genframe's config
resolvers and adopts the sweep folder the command created (a worker would otherwise make
a new folder of its own for ``${genframe.fresh_dir:...}``).

Beside it: `genframe.sweep.jobs` (a job folder read as a summary row; a job's error
recorded in its run.json), `genframe.sweep.launchers` (Hydra's submitit launchers whose
sweep survives a killed job) and `genframe.sweep.optuna_sweeper` (a resumable Optuna
sweeper, ``hydra/sweeper=genframe_optuna``).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from genframe.sweep.jobs import FAILED, read_jobs

# Hydra's submitit choices -> genframe's launchers standing in for them (see
# genframe.sweep.launchers; the CLI sets hydra.launcher._target_ to these).
SUBMITIT_LAUNCHERS = {
    "submitit_local": "hydra_plugins.genframe_submitit.LocalLauncher",
    "submitit_slurm": "hydra_plugins.genframe_submitit.SlurmLauncher",
}

# Columns of summary.csv, in order; the monitor metric's column is named after the metric.
CSV_COLUMNS = ("job", "status", "overrides", "{monitor}", "wall_time_s", "run_dir", "error")
# The sweeper class conf/hydra/sweeper/genframe_optuna.yaml names (see genframe.sweep.optuna_sweeper).
OPTUNA_SWEEPER = "hydra_plugins.genframe_optuna.OptunaSweeper"


@dataclass
class FailedJob:
    """A failed job of a sweep, as its run directory tells it."""

    overrides: str
    error: str
    exit_code: int


# The failed jobs of the last multirun that ended in this process (see take_failed_jobs).
_LAST_FAILED: list[FailedJob] | None = None


class SweepSummary(Callback):
    """Summarise every multirun: ``summary.csv``, ``summary.jsonl`` and a printed table."""

    def __init__(self) -> None:
        self._claimed: dict[str, str] = {}
        self._plugins: list[str] = []  # genframe's Hydra plugins this sweep uses

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        global _LAST_FAILED
        _LAST_FAILED = None

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        global _LAST_FAILED
        _LAST_FAILED = None
        # (Hydra turns an exception raised here into a warning: nothing here may raise.)
        targets = (config.hydra.sweeper.get("_target_"), config.hydra.launcher.get("_target_"))
        self._plugins = [t for t in targets if t == OPTUNA_SWEEPER or t in SUBMITIT_LAUNCHERS.values()]
        for target in self._plugins:
            _register(target)
        self._pin_sweep_dir(config)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        global _LAST_FAILED
        sweep_dir = Path(config.hydra.sweep.dir)
        monitor = config.get("monitor")
        rows = read_jobs(sweep_dir, monitor)
        _LAST_FAILED = [FailedJob(" ".join(r["overrides"]), r.get("error") or r["status"],
                                  r.get("exit_code") or 1)
                        for r in rows if r["status"] in FAILED]
        if not rows:
            return
        from genframe.files import atomic_write_bytes

        text = "".join(json.dumps(r) + "\n" for r in rows)
        atomic_write_bytes(sweep_dir / "summary.jsonl", text.encode())
        atomic_write_bytes(sweep_dir / "summary.csv", summary_csv(rows, monitor).encode())
        table = _table(rows, config)
        best = best_trial(sweep_dir)
        if best is not None:
            table += "\n" + best
        print(table, flush=True)

    def _pin_sweep_dir(self, config: Any) -> None:
        """Resolve the sweep folder now (``genframe.fresh_dir`` creates it) and remember
        it, so the workers that unpickle this callback resolve it to the same folder."""
        from genframe import runs

        str(config.hydra.sweep.dir)  # resolving claims the folder
        self._claimed = runs.claimed_run_dirs()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled in a joblib or submitit worker: Hydra composes the job's config here
        # and needs genframe's resolvers, with the command's own sweep folder.
        self.__dict__.update(state)
        from omegaconf import OmegaConf

        from genframe import runs
        from genframe.config import required_value

        if not OmegaConf.has_resolver("genframe.required"):
            OmegaConf.register_new_resolver("genframe.required", required_value)
        if not OmegaConf.has_resolver("genframe.fresh_dir"):
            runs.register_run_dir_resolver()
        runs.adopt_run_dirs(self._claimed)
        # Hydra's plugin registry travels to the worker too: genframe's plugin classes
        # must be there (under their hydra_plugins names) before it is unpickled.
        for target in state.get("_plugins", []):
            _register(target)


def _register(target: str) -> None:
    """Register genframe's Hydra plugin named by `target` (a sweeper or a launcher)."""
    if target in SUBMITIT_LAUNCHERS.values():
        from genframe.sweep.launchers import register_submitit_launchers

        register_submitit_launchers()
        return
    try:
        from genframe.sweep.optuna_sweeper import OptunaSweeper  # imports optuna: only here
    except ImportError as exc:
        OptunaSweeper = _missing_sweeper(
            f"hydra/sweeper=genframe_optuna needs Optuna and Hydra's optuna sweeper "
            f"({exc}); install them with `pip install 'genframe[sweeps]'`")
    register_hydra_plugin(OptunaSweeper, OPTUNA_SWEEPER)


def register_hydra_plugin(cls: type, qualified_name: str) -> None:
    """Make `cls` a plugin Hydra can instantiate as `qualified_name`.

    Hydra instantiates only plugin classes of the ``hydra_plugins`` package
    (``hydra_plugins.<module>.<class>``), which it finds by scanning that namespace;
    genframe does not rely on the scan (it misses editable installs): the class gets that
    module name, the module is made in ``sys.modules``, and Hydra's own
    ``Plugins.register`` records the class.
    """
    import sys
    import types

    from hydra.core.plugins import Plugins

    module_name, _, class_name = qualified_name.rpartition(".")
    module = sys.modules.get(module_name)
    if module is None:
        module = types.ModuleType(module_name, f"genframe's {class_name} (registered by genframe)")
        sys.modules[module_name] = module
    cls.__module__, cls.__name__, cls.__qualname__ = module_name, class_name, class_name
    setattr(module, class_name, cls)
    Plugins.instance().register(cls)


def _missing_sweeper(message: str) -> type:
    """A sweeper that stands in for one whose packages are missing: it says `message`
    (a `UserError`, exit status 2) before any job runs."""
    from hydra.plugins.sweeper import Sweeper

    from genframe.errors import UserError

    class MissingSweeper(Sweeper):
        def __init__(self, **params: Any) -> None:
            self.params = params  # the sweeper's settings, unused: setup() refuses to run

        def setup(self, **kwargs: Any) -> None:
            raise UserError(message)

        def sweep(self, arguments: list[str]) -> Any:
            raise UserError(message)

    return MissingSweeper


def take_failed_jobs() -> list[FailedJob] | None:
    """The failed jobs of the multirun that just ended in this process, once (None when
    no multirun ended since the last call)."""
    global _LAST_FAILED
    failed, _LAST_FAILED = _LAST_FAILED, None
    return failed


def job_runs_elsewhere(hydra_cfg: Any) -> bool:
    """Whether the job of `hydra_cfg` runs in another process than the command (a
    multirun with a launcher other than Hydra's basic one: joblib, submitit, ...)."""
    from hydra.types import RunMode

    target = str(hydra_cfg.launcher.get("_target_") or "")
    return hydra_cfg.mode == RunMode.MULTIRUN and not target.endswith(".BasicLauncher")


def summary_csv(rows: list[dict[str, Any]], monitor: str | None) -> str:
    """The rows of `read_jobs` as CSV (`CSV_COLUMNS`; overrides joined by spaces)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([c.format(monitor=monitor or "objective") for c in CSV_COLUMNS])
    for r in rows:
        writer.writerow([r["job"], r["status"], " ".join(r["overrides"]),
                         "" if r["objective"] is None else r["objective"],
                         "" if r["wall_time_s"] is None else f"{r['wall_time_s']:.1f}",
                         r["dir"], r.get("error", "")])
    return out.getvalue()


def best_trial(sweep_dir: Path) -> str | None:
    """A line naming an Optuna sweep's best trial (from ``optimization_results.yaml``)."""
    path = Path(sweep_dir) / "optimization_results.yaml"
    if not path.exists():
        return None
    from omegaconf import OmegaConf

    result = OmegaConf.to_container(OmegaConf.load(path))
    if "best_value" not in result:
        return None
    params = " ".join(f"{k}={v}" for k, v in (result.get("best_params") or {}).items())
    number = result.get("best_trial")
    # The trial's number counts the whole study (failed and earlier runs' trials too); its
    # run directory may be a job of an earlier run of the sweep.
    where = f" (run directory {result['best_run_dir']})" if result.get("best_run_dir") else ""
    count = f" of {result['n_trials']} counted" if result.get("n_trials") is not None else ""
    return (f"best trial{'' if number is None else f' #{number} of the study'}"
            f"{f' ({count.strip()})' if count else ''}: "
            f"{result.get('monitor') or 'value'} {result['best_value']:.6g} with {params or '-'}{where}")


def _table(rows: list[dict], config: Any) -> str:
    monitor = config.get("monitor")
    keys = sorted({k for r in rows for k in r["metrics"] if k.startswith("val/")})
    if monitor in keys:
        keys.remove(monitor)
        keys.insert(0, monitor)
    keys = keys[:4]
    # Show only the overrides that differ between jobs (the swept ones).
    common = set.intersection(*(set(r["overrides"]) for r in rows))
    header = ["job", "status", "swept", *keys, "time"]
    body = [[r["job"], r["status"], " ".join(o for o in r["overrides"] if o not in common) or "-",
             *(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-" for k in keys),
             "-" if r["wall_time_s"] is None else f"{r['wall_time_s']:.0f}s"]
            for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [f"sweep summary ({len(rows)} jobs) in {config.hydra.sweep.dir} "
             "(summary.csv, summary.jsonl)", fmt.format(*header)]
    lines += [fmt.format(*row).rstrip() for row in body]
    return "\n".join(lines)
