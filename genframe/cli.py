"""The `genframe` command: `genframe <task> [overrides]`, `genframe plugins`, `--help`.

Hydra runs every task (so `key=value`, `+key`, `~key`, `--cfg`, `--info` and `-m` work as
Hydra users expect). This module only picks the task's primary config, loads plugins,
and turns user mistakes into a short message with exit status 2. torch and Lightning are
imported by the task functions, never here, so `genframe --help` answers at once.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

from genframe import __version__
from genframe.errors import GenframeError, did_you_mean
from genframe.tasks import TASKS
OTHER_COMMANDS = {
    "resume": "continue a train or finetune run in place from its last checkpoint (run=DIR)",
    "plugins": "list loaded plugins and what each registered (--json)",
    "shards": "convert data into WebDataset shards to stream (data=... out=DIR)",
    "hub": "the local model hub: push run=DIR name=N, list, show, pull, rm (name=N:VERSION)",
    "feedback": "what people said about generated samples: report [db=FILE] [model=V] [out=DIR]",
}
# Keys whose children are open-ended (model-specific, or any Trainer argument):
# `sampling.x=1` and `trainer.strategy=ddp_spawn` need no `+`; the task checks the names.
OPEN_KEYS = ("sampling.", "condition.", "template.vars.", "finetune.hparams.", "trainer.", "models.")


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    from genframe.errors import GenframeDeprecationWarning

    # Python hides DeprecationWarnings outside __main__; plugin authors should see these.
    warnings.simplefilter("default", GenframeDeprecationWarning)
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if debug:
        os.environ["GENFRAME_DEBUG"] = "1"
    if from_command_line:
        # What `trainer=ddp` starts again for each further process (Lightning's launcher).
        from genframe.hardware import set_relaunch_command

        set_relaunch_command([sys.argv[0], *argv])
    try:
        return _dispatch(argv)
    except GenframeError as exc:
        if _show_traceback():
            raise
        print(f"genframe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`genframe hub show ... | head`): not an error. Python
        # would report it again when flushing stdout at exit; point stdout at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# HYDRA_FULL_ERROR as the user set it. The CLI sets it itself while Hydra runs (and marks
# that with _OWN_FULL_ERROR), and the processes a task starts inherit both: a DDP rank
# started again by Lightning must not take it for the user's wish for tracebacks.
_OWN_FULL_ERROR = "GENFRAME_SET_HYDRA_FULL_ERROR"
_USER_FULL_ERROR = bool(os.environ.get("HYDRA_FULL_ERROR")) and not os.environ.get(_OWN_FULL_ERROR)


def _show_traceback() -> bool:
    return bool(os.environ.get("GENFRAME_DEBUG") or _USER_FULL_ERROR)


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_help())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"genframe {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "plugins":
        from genframe.plugins_report import print_plugins

        unknown = [a for a in rest if a != "--json"]
        if unknown:
            from genframe.errors import UserError

            raise UserError(f"plugins: unknown {'argument' if len(unknown) == 1 else 'arguments'} "
                            f"{' '.join(unknown)}; only --json is accepted")
        print_plugins(as_json="--json" in rest)
        return 0
    if command == "resume":
        if any(a in ("-h", "--help") for a in rest):
            print("usage: genframe resume run=<run dir> [key=value ...]\n\n"
                  "Continue a train or finetune run in its own directory from its\n"
                  "checkpoints/last.ckpt, with its stored config; key=value changes (e.g.\n"
                  "trainer.max_steps=4000 model.lr=1e-4) are checked against that config.\n"
                  "`genframe train resume=<run dir>` instead starts a new run from it.")
            return 0
        from genframe.tasks.resume import continue_in_place

        continue_in_place(rest)
        return 0
    if command == "shards":
        from genframe.tasks.shards import main as shards_main

        return shards_main(rest)
    if command == "hub":
        from genframe.tasks.hub import main as hub_main

        return hub_main(rest)
    if command == "feedback":
        from genframe.tasks.feedback import main as feedback_main

        return feedback_main(rest)
    if command not in TASKS:
        from genframe.errors import UserError, valid_list

        raise UserError(
            f"unknown command '{command}'.{did_you_mean(command, [*TASKS, *OTHER_COMMANDS])}"
            f" Commands: {valid_list([*TASKS, *OTHER_COMMANDS])} (see `genframe --help`)"
        )
    return run_task(command, rest)


def run_task(task: str, overrides: list[str]) -> int:
    """Run one task through Hydra with the given command-line arguments."""
    from genframe.config import register_plugin_configs
    from genframe.runs import register_run_dir_resolver

    register_plugin_configs()
    register_run_dir_resolver()
    _JOB_ERRORS.clear()
    _check_flags(overrides)
    roots = _config_roots(task)
    overrides = _with_resumed_groups(overrides, roots)
    overrides = [_open_key(a, roots) for a in overrides]
    if any(a in ("-h", "--help") for a in overrides):
        text = _task_help(task, [a for a in overrides if a not in ("-h", "--help")])
        if text is not None:
            print(text)
            return 0
    overrides = _for_rank(task, overrides)
    overrides = _with_genframe_launcher(overrides)
    if "hub" in roots:
        _check_hub_source(overrides)
    if task == "export":
        overrides, export_out = _export_out_as_run_dir(overrides)
        try:
            return _run_hydra(task, overrides)
        finally:
            _remove_unless_completed(export_out)
    return _run_hydra(task, overrides)


def _task_help(task: str, overrides: list[str]) -> str | None:
    """``genframe <task> --help``: the text of Hydra's help template (conf/hydra/default.yaml's
    ``hydra.help``) with the task's config groups and composed config, or None to let Hydra
    answer (other flags given, or an override that does not compose: Hydra then reports it).

    Hydra's own help lists every group's options by composing once per group, its own
    ``hydra/*`` groups included, even where the template does not show them: 2.2 s for
    `genframe train --help` here, against ~0.5 s for this.
    """
    import string

    from omegaconf import OmegaConf

    from genframe.config import compose, conf_dir, config_groups
    from genframe.plugins import get_registry

    if any(a.startswith("-") for a in overrides):
        return None
    try:
        cfg = compose(task, overrides)
    except Exception:  # noqa: BLE001 - Hydra's run reports it, with genframe's messages
        return None
    hydra_cfg = OmegaConf.load(conf_dir() / "hydra" / "default.yaml")
    help_cfg = OmegaConf.to_container(hydra_cfg.help, resolve=False)  # raw ${...} kept
    groups = config_groups([root for _, root in get_registry().config_dirs])
    listing = "\n".join(f"{group}: {', '.join(choices)}" for group, choices in groups.items())
    fill = {"${hydra.help.header}": help_cfg["header"], "${hydra.help.footer}": help_cfg["footer"]}
    text = help_cfg["template"]
    for key, value in fill.items():
        text = text.replace(key, value)
    text = text.replace("${task_name}", task)
    return string.Template(text).safe_substitute(
        APP_CONFIG_GROUPS=listing + "\n", CONFIG=OmegaConf.to_yaml(cfg)).rstrip("\n")


def _run_hydra(task: str, overrides: list[str]) -> int:
    import hydra
    from hydra.errors import HydraException

    from genframe.config import conf_dir
    from genframe.hydra_errors import explain
    # Let Hydra's exceptions reach us so they become our short messages (exit 2).
    user_wants_full = _USER_FULL_ERROR
    os.environ["HYDRA_FULL_ERROR"] = "1"
    if not user_wants_full:
        os.environ[_OWN_FULL_ERROR] = "1"
    saved_argv = sys.argv
    sys.argv = [f"genframe {task}", *overrides]
    try:
        app = hydra.main(config_path=str(conf_dir()), config_name=task, version_base="1.3")(
            _task_entry
        )
        app()
    except SystemExit as exc:  # argparse and --help exit through here
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except KeyboardInterrupt:  # a task's Ctrl-C is in _JOB_ERRORS; else Hydra was starting
        if not _JOB_ERRORS:
            print("genframe: interrupted (Ctrl-C)", file=sys.stderr)
            return 130
    except GenframeError:
        raise
    except Exception as exc:
        if user_wants_full or os.environ.get("GENFRAME_DEBUG"):
            raise
        if isinstance(exc, OSError) and not isinstance(exc, HydraException):
            # Inside a task an OSError reaches _task_entry; here it is Hydra creating the
            # run directory or writing .hydra/ and the log file into it.
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"genframe: error: cannot write the run directory: {where}"
                  f"{exc.strerror or exc}; choose another hydra.run.dir (or paths.root)",
                  file=sys.stderr)
            return 2
        message = explain(exc, task, overrides)
        if message is None:
            raise
        print(f"genframe: error: {message}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
        if not user_wants_full:
            os.environ.pop("HYDRA_FULL_ERROR", None)
            os.environ.pop(_OWN_FULL_ERROR, None)
    return _report_job_errors()


def _report_job_errors() -> int:
    """The command's exit status after Hydra returned: 0, or the highest exit status of
    the jobs that failed (a lone failed run or sweep job is raised as it was). Jobs that
    ran in other processes (joblib, submitit) are read from their run.json."""
    from genframe.sweep import take_failed_jobs

    failed_elsewhere = take_failed_jobs() or []
    if not _JOB_ERRORS:
        for job in failed_elsewhere:
            print(f"genframe: error: job [{job.overrides}]: {job.error}", file=sys.stderr)
        return max((job.exit_code for job in failed_elsewhere), default=0)
    if len(_JOB_ERRORS) == 1:
        raise _JOB_ERRORS[0][1]
    for overrides, exc in _JOB_ERRORS:
        print(f"genframe: error: job [{overrides}]: {exc}", file=sys.stderr)
    return max(exc.exit_code for _, exc in _JOB_ERRORS)


class JobFailed(GenframeError):
    """A sweep job ended by an unexpected exception (its traceback is in the job's log)."""

    exit_code = 1


def _for_rank(task: str, overrides: list[str]) -> list[str]:
    """The overrides of this process of a (possibly) multi-process run.

    Rank zero (or a lone process) checks a given run directory before Hydra writes into
    it. A process of a run launched from outside (torchrun, SLURM: ``WORLD_SIZE`` > 1 in
    the environment) must be given the run directory all ranks share; the ranks other
    than zero join it without writing Hydra's ``.hydra/`` files (Lightning's own
    ``trainer=ddp`` launcher passes the same settings to the processes it starts).
    """
    from genframe.errors import UserError
    from genframe.hardware import launch_environment

    env = launch_environment()
    given = {a.lstrip("+").split("=", 1)[0] for a in overrides}
    multirun = any(a in ("-m", "--multirun") for a in overrides)
    if env.world_size > 1 and env.external and "hydra.run.dir" not in given and not multirun:
        raise UserError(
            f"this process is rank {env.rank} of {env.world_size} started by {env.launcher}: "
            "every rank must write into one run directory, so give it to all of them, "
            f"e.g. `genframe {task} trainer=multinode hydra.run.dir=outputs/{task}/my-run "
            "...` (a folder on storage every node sees)")
    if env.rank == 0:
        _check_given_run_dir(overrides)
        return overrides
    # Every further process logs to <task>_rank<N>.log beside the run's own log, however
    # it was started (Lightning's relaunch names its processes' jobs train_ddp_process_N).
    lightning = re.compile(r"\+*hydra\.job\.name=\w+_ddp_process_\d+$")
    overrides = [a for a in overrides if not lightning.match(a)]
    given = {a.lstrip("+").split("=", 1)[0] for a in overrides}
    extra = [] if "hydra.output_subdir" in given else ["hydra.output_subdir=null"]
    if "hydra.job.name" not in given:
        extra.append(f"hydra.job.name={task}_rank{env.rank}")
    return [*overrides, *extra]


def _export_out_as_run_dir(overrides: list[str]) -> list[str]:
    """``genframe export out=DIR``: DIR becomes the task's run directory, so one command
    makes one folder (not DIR and a run directory under outputs/ besides). Checked here,
    before Hydra creates anything: DIR must be new, or an empty folder outside any run."""
    from pathlib import Path

    from genframe.errors import UserError
    from genframe.runs import run_dir_problem

    given = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in overrides if "=" in a and not a.startswith("-")}
    out = given.get("out")
    if out in (None, "", "null") or "hydra.run.dir" in given or "-m" in overrides or "--multirun" in overrides:
        return overrides, None
    path = Path(out).expanduser().absolute()
    problem = run_dir_problem(path, "out")
    if problem is None and path.is_dir() and any(path.iterdir()):
        problem = (f"out={out} is a folder with files in it; give a new or empty folder "
                   "(nothing was changed)")
    if problem:
        raise UserError(problem)
    missing = None  # the outermost folder this command will create
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return [*overrides, f"hydra.run.dir={path}"], (path, missing)


def _remove_unless_completed(out) -> None:
    """An ``export out=`` folder whose export did not complete (refused, failed,
    interrupted) is taken away again with what Hydra wrote into it, and so are the
    folders above it this command created (an empty folder that was there before stays,
    empty): the command leaves no folder behind but the finished export's."""
    import json
    import shutil

    if out is None or not out[0].is_dir():
        return
    folder, created = out
    try:
        done = json.loads((folder / "run.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        done = False
    if done:
        return
    for child in [created] if created is not None else list(folder.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _check_hub_source(overrides: list[str]) -> None:
    """Refuse ``hub=NAME[:VERSION]`` that names no entry, or comes with ``run=`` or
    ``ckpt=``, before Hydra makes a run directory for a task that could not start. The
    checksums are verified once, by the task, when it reads the entry."""
    from genframe.errors import UserError

    given = {a.lstrip("+").split("=", 1)[0]: a.split("=", 1)[1] for a in overrides if "=" in a}
    ref = given.get("hub")
    if not ref or "${" in ref or ref == "null" or any(a in ("-m", "--multirun") for a in overrides):
        return
    others = [k for k in ("run", "ckpt") if given.get(k) not in (None, "", "null")]
    if others:
        shown = " and ".join(f"{k}={given[k]}" for k in others)
        raise UserError(f"hub={ref} and {shown}: give one source of the model, not both")
    from genframe.hub import resolve

    resolve(ref, key="hub")


def _with_genframe_launcher(overrides: list[str]) -> list[str]:
    """``hydra/launcher=submitit_local`` or ``submitit_slurm``: Hydra's launcher with its
    own settings, run by genframe's class (`genframe.sweep.launchers`), whose sweep goes
    on when a job is killed from outside."""
    from genframe.sweep import SUBMITIT_LAUNCHERS

    choices = [a.split("=", 1)[1] for a in overrides if a.lstrip("+").startswith("hydra/launcher=")]
    given = any(a.lstrip("+").startswith("hydra.launcher._target_=") for a in overrides)
    if len(choices) != 1 or choices[0] not in SUBMITIT_LAUNCHERS or given:
        return overrides
    return [*overrides, f"hydra.launcher._target_={SUBMITIT_LAUNCHERS[choices[0]]}"]


def _check_given_run_dir(overrides: list[str]) -> None:
    """Refuse a ``hydra.run.dir`` / ``hydra.sweep.dir`` given on the command line that
    already holds a run or cannot be created, before Hydra writes anything there."""
    from genframe.errors import UserError
    from genframe.runs import run_dir_problem

    multirun = any(a in ("-m", "--multirun") for a in overrides)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    for arg in overrides:
        name, eq, value = arg.lstrip("+").partition("=")
        value = value.strip().strip("'\"")
        if name != key or not eq or "${" in value or not value:
            continue
        problem = run_dir_problem(value, key) if not multirun else _sweep_dir_problem(value, key)
        if problem:
            raise UserError(problem)


def _sweep_dir_problem(value: str, key: str) -> str | None:
    from pathlib import Path

    from genframe.runs import run_dir_problem

    path = Path(value).expanduser()
    if path.is_dir():
        jobs = [p.name for p in sorted(path.iterdir()) if p.is_dir() and run_dir_problem(p, key)]
        if jobs or (path / "multirun.yaml").exists():
            return (f"{key}={value} already holds a sweep (jobs {', '.join(jobs) or '-'}); give "
                    f"a new folder, or leave {key} out for a fresh one (nothing was changed)")
        return None
    return run_dir_problem(path, key)


def _with_resumed_groups(overrides: list[str], roots: set[str]) -> list[str]:
    """With ``resume=DIR``, compose from the groups that run was composed from (its model,
    data, experiment, ...), so ``model.warmup_steps=5`` is checked against the resumed
    transformer's config and not the default model's. Groups given on the command line
    stay (the resume refuses a change); a folder that is not a run is left to the task's
    own message."""
    values = [a.split("=", 1)[1] for a in overrides if a.startswith("resume=")]
    if len(values) != 1 or not values[0] or "${" in values[0]:
        return overrides
    from genframe.runs import open_run
    from genframe.tasks.resume import run_choices

    try:
        choices = run_choices(open_run(values[0], key="resume"))
    except GenframeError:
        return overrides
    given = {a.lstrip("+~").split("=", 1)[0] for a in overrides}
    added = [f"{g}={c}" for g, c in choices.items() if g in roots and g not in given]
    return [*added, *overrides]


def _config_roots(task: str) -> set[str]:
    """Top-level keys and config groups of a task's primary config."""
    from omegaconf import OmegaConf

    from genframe.config import conf_dir

    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / f"{task}.yaml"))
    groups = {next(iter(d)) for d in cfg.get("defaults", []) if isinstance(d, dict)}
    return set(cfg) | groups


def _open_key(arg: str, roots: set[str]) -> str:
    """``sampling.x=1`` -> ``++sampling.x=1`` when the task has ``sampling`` (else Hydra
    refuses the key, as it should: the task would ignore it)."""
    if arg.startswith(OPEN_KEYS) and "=" in arg and arg.split(".", 1)[0] in roots:
        return "++" + arg
    if arg.startswith("-"):
        _check_flags([arg])
    return arg


_JOB_ERRORS: list[tuple[str, GenframeError]] = []


def _task_entry(cfg):
    from genframe.tasks import run

    try:
        return run(cfg)
    except Exception as exc:
        # Keep user errors away from Hydra's own error printing: the CLI reports them
        # after Hydra returns (in a sweep, after the other jobs ran).
        from hydra.core.hydra_config import HydraConfig
        from hydra.errors import HydraException
        from hydra.types import RunMode
        from omegaconf import OmegaConf

        from genframe.errors import Interrupted, UserError
        from genframe.hydra_errors import explain
        from genframe.sweep import job_runs_elsewhere
        from genframe.sweep.jobs import record_job_error

        hydra_cfg = HydraConfig.get()
        # A job in a joblib or submitit worker must never raise: its exception would stop
        # the whole sweep. (HYDRA_FULL_ERROR is always set there: the CLI sets it while
        # Hydra runs, so only --debug asks a worker for its traceback, in its log.)
        elsewhere = job_runs_elsewhere(hydra_cfg)
        if _show_traceback() and not elsewhere:
            raise
        # The overrides as typed: iterating the ListConfig would resolve `${...}` in them.
        given = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
        job = " ".join(given)
        if isinstance(exc, OSError) and exc.filename and not isinstance(exc, HydraException):
            # A path the user gave (or its folder) cannot be read or written: not a bug.
            exc = UserError(f"{exc.filename}: {exc.strerror or exc}; check the path and its "
                            "permissions (or choose another folder)")
        if not isinstance(exc, GenframeError):
            message = explain(exc, cfg.task_name, given)
            if message is not None:
                exc = UserError(message)
            elif hydra_cfg.mode == RunMode.MULTIRUN:
                # A bug in one job must not cost the sweep its other jobs and summary:
                # keep the traceback in the job's log and on the terminal, go on.
                import logging

                logging.getLogger("genframe").exception("job [%s] failed", job)
                exc = JobFailed(f"{type(exc).__name__}: {exc} (traceback in "
                                f"{hydra_cfg.runtime.output_dir}/{hydra_cfg.job.name}.log)")
            else:
                raise
        elif elsewhere and os.environ.get("GENFRAME_DEBUG"):
            import logging

            logging.getLogger("genframe").exception("job [%s] failed", job)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # The job's exit status goes into its run.json: the command reads it from there
            # for jobs of other processes, and the Optuna sweeper for every job.
            record_job_error(hydra_cfg.runtime.output_dir, cfg.task_name, str(exc),
                             exc.exit_code)
        if not elsewhere:
            _JOB_ERRORS.append((job, exc))
        if isinstance(exc, Interrupted):
            raise KeyboardInterrupt from None  # Ctrl-C stops the whole sweep, not one job
        return None


def main_help() -> str:
    from genframe.config import config_groups

    lines = [
        f"genframe {__version__}: train, fine-tune, evaluate and sample generative models "
        "from YAML configs.",
        "",
        "usage: genframe <command> [KEY=VALUE ...] [GROUP=CHOICE ...] [-m] [--cfg job] [--debug]",
        "",
        "tasks:",
    ]
    lines += [f"  {t.name:<10} {t.help}" for t in TASKS.values()]
    lines += ["", "other commands:"]
    lines += [f"  {t:<10} {h}" for t, h in OTHER_COMMANDS.items()]
    try:
        from genframe.plugins import get_registry

        extra = [d for _, d in get_registry().config_dirs]
    except GenframeError as exc:
        extra = []
        lines += ["", f"(plugins could not be loaded: {exc})"]
    lines += ["", "config groups (GROUP=CHOICE):"]
    for group, choices in config_groups(extra).items():
        lines.append(f"  {group:<10} {', '.join(choices)}")
    lines += [
        "",
        "examples:",
        "  genframe train                                   # VAE on the bundled digits",
        "  genframe train model.latent_dim=8 trainer.max_epochs=20",
        "  genframe train -m model.latent_dim=4,8 trainer.max_epochs=1",
        "  genframe generate run=outputs/train/<time> num_samples=64 seed=0",
        "  genframe train --help                            # a task's groups and config",
        "",
        "--debug (or HYDRA_FULL_ERROR=1) shows tracebacks. Plugins: GENFRAME_PLUGINS=a,b "
        "loads only a and b; GENFRAME_DISABLE_PLUGIN_AUTOLOAD=1 loads none.",
    ]
    return "\n".join(lines)



# Hydra's own flags (argparse) and the values those with a fixed set take; None: any value.
_FLAGS = {"--help": (), "-h": (), "--hydra-help": (), "--version": (), "--resolve": (),
          "--run": (), "-r": (), "--multirun": (), "-m": (), "--shell-completion": (),
          "-sc": (), "--cfg": ("job", "hydra", "all"), "-c": ("job", "hydra", "all"),
          "--package": None, "-p": None, "--info": None, "-i": None,
          "--config-path": None, "-cp": None, "--config-name": None, "-cn": None,
          "--config-dir": None, "-cd": None, "--experimental-rerun": None}


# Hydra's flags that choose what the command does: only one may be given.
_MODES = {"--run": "--run", "-r": "--run", "--multirun": "-m", "-m": "-m", "--cfg": "--cfg",
          "-c": "--cfg", "--info": "--info", "-i": "--info", "--shell-completion": "--shell-completion",
          "-sc": "--shell-completion"}


def _check_flags(args: Sequence[str]) -> None:
    """Refuse a misused flag with the fix, before argparse prints its usage screen:
    ``--cfg`` without job|hydra|all, ``-cfg``, ``--cfg=jobb``, a misspelt flag."""
    from genframe.errors import UserError

    modes = {_MODES[a.partition("=")[0]] for a in args if a.partition("=")[0] in _MODES}
    if len(modes) > 1:
        raise UserError(f"{' and '.join(sorted(modes))} cannot be combined: Hydra takes one of "
                        "--run, -m/--multirun, --cfg, --info and --shell-completion at a time")
    for i, arg in enumerate(args):
        if not arg.startswith("-") or arg in ("-", "--"):
            continue
        flag, eq, value = arg.partition("=")
        if flag == "-cfg":
            raise UserError(f"{arg}: did you mean --cfg job (two dashes)? "
                            "--cfg job|hydra|all prints the composed config")
        if flag not in _FLAGS:
            known = [f for f in _FLAGS if f.startswith("--")]
            raise UserError(f"{arg}: unknown option.{did_you_mean(flag, known)} A task takes "
                            "key=value overrides and Hydra's flags: --cfg job|hydra|all, "
                            "-m/--multirun, --info, --resolve, -p/--package, --help")
        choices = _FLAGS[flag]
        if not choices:
            continue
        given = value if eq else (args[i + 1] if i + 1 < len(args) else None)
        if given is None and not eq and len(args) == 1:
            continue  # the value is the next argument, checked with it in view
        if given not in choices:
            shown = "nothing" if given is None else f"'{given}'"
            raise UserError(f"{flag} takes one of {', '.join(choices)}, got {shown}: "
                            f"e.g. {flag} job prints the task's composed config")


if __name__ == "__main__":
    raise SystemExit(main())
