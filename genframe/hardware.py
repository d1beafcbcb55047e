"""Hardware checks and the `auto` choices of the trainer presets."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from genframe.errors import UserError, plural

CUDA_ONLY_STRATEGIES = ("fsdp", "deepspeed")

#: ``trainer.*`` keys that are genframe's own, not ``pytorch_lightning.Trainer`` arguments
#: (see `genframe.callbacks.model_settings`).
GENFRAME_TRAINER_KEYS = ("compile", "activation_checkpointing")


@functools.lru_cache(maxsize=1)
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU has AMX bf16 tiles (read once from /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: What `tune_allocator` sets: blocks under 32 MiB come from the heap, and up to 256 MiB
#: of free heap is kept rather than handed back (growing it 64 MiB at a time).
ALLOCATOR_SETTINGS = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 256 << 20, _M_TOP_PAD: 64 << 20}
#: Set to 0 to leave the C allocator as it is.
ALLOCATOR_ENV = "GENFRAME_MALLOC_TUNING"


_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on", "")


def allocator_tuning_wanted() -> bool:
    """``GENFRAME_MALLOC_TUNING``: on when unset, empty or 1/true/yes/on; off for
    0/false/no/off (any case).

    Raises:
        UserError: any other value.
    """
    value = os.environ.get(ALLOCATOR_ENV, "").strip().lower()
    if value in _OFF or value in _ON:
        return value not in _OFF
    raise UserError(f"{ALLOCATOR_ENV}={os.environ[ALLOCATOR_ENV]!r}: expected 0 (leave glibc's "
                    "malloc as it is) or 1 (tune it for training; the default)")


@functools.lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Make glibc's malloc keep and reuse freed tensor memory in this process; True if set.

    With its default thresholds, glibc serves large blocks (a step's activations and
    gradients) with mmap and returns them with munmap, and trims the heap when its top is
    free, so the next training step faults the same pages in again, zero-filled by the
    kernel. Raising the mmap and trim thresholds (what PyTorch's CPU performance guide
    gets from jemalloc or tcmalloc) keeps them. Measured (docs/BENCHMARKS.md, "The
    allocator"): the 0.8M character GPT's `genframe train` went from 0.97x to 1.00x of a
    plain loop's speed, transformers' GPT-2 loop 4% faster, the U-Net's steps 2-3%; the
    VAE's small tensors did not change. The cost is memory kept after a peak: up to
    256 MiB of free heap per arena stays resident (the main job's peak RSS: 1,043 against
    1,033 MB).

    Does nothing (False) off glibc, when ``GENFRAME_MALLOC_TUNING=0`` (or false, no,
    off; `allocator_tuning_wanted`), when any
    ``MALLOC_*`` variable or a ``glibc.malloc.*`` tunable in ``GLIBC_TUNABLES`` is set
    (the user tuned glibc already) or when ``LD_PRELOAD`` brings another allocator
    (jemalloc, tcmalloc, mimalloc).

    Raises:
        UserError: a ``GENFRAME_MALLOC_TUNING`` value that is neither on nor off.
    Applied once per process, by `genframe train`/`finetune`.
    """
    import ctypes

    if not allocator_tuning_wanted():
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    done = [mallopt(option, value) == 1 for option, value in ALLOCATOR_SETTINGS.items()]
    return all(done)


#: `trainer.accelerator` values genframe knows how to check (Lightning's built-in ones).
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def check_hardware(kwargs: Mapping[str, Any], source: Callable[[str], str] | None = None) -> None:
    """Refuse (`UserError`) a ``trainer.accelerator``, ``trainer.devices`` or
    ``trainer.strategy`` this machine cannot run, naming what it has.

    Args:
        kwargs: the plain ``trainer`` config.
        source: maps a trainer key to where it was set (for messages).
    """
    import torch

    def where(key: str) -> str:
        return f" (set in {source(key)})" if source else ""

    accel = str(kwargs.get("accelerator", "auto")).lower()
    has_cuda = torch.cuda.is_available()
    n_gpus = torch.cuda.device_count() if has_cuda else 0
    if accel not in ACCELERATORS:
        from genframe.errors import did_you_mean

        raise UserError(f"trainer.accelerator={accel}{where('accelerator')}: expected one of "
                        f"{', '.join(ACCELERATORS)}.{did_you_mean(accel, ACCELERATORS)}")
    if accel in ("gpu", "cuda") and not has_cuda:
        raise UserError(
            f"trainer.accelerator={accel}{where('accelerator')} asks for a CUDA GPU, but this "
            "machine has none (torch.cuda.is_available() is False); expected trainer=cpu, "
            "trainer=auto or trainer.accelerator=cpu")
    if accel == "tpu" and not _has_module("torch_xla"):
        raise UserError(
            f"trainer.accelerator=tpu{where('accelerator')}: this machine has no TPU runtime "
            f"(torch_xla is not installed); expected {'gpu, ' if has_cuda else ''}cpu or auto")
    if accel == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError(
            f"trainer.accelerator=mps{where('accelerator')}: this machine has no Apple MPS "
            f"device; expected {'gpu, ' if has_cuda else ''}cpu or auto")
    strategy = str(kwargs.get("strategy", "auto"))
    if any(strategy.startswith(s) for s in CUDA_ONLY_STRATEGIES) and not has_cuda:
        raise UserError(f"trainer.strategy={strategy}{where('strategy')} needs CUDA GPUs; this "
                        "machine has none; expected trainer.strategy=auto (or ddp_spawn on the CPU)")
    if strategy.startswith("deepspeed") and not _has_module("deepspeed"):
        raise UserError(f"trainer.strategy={strategy}{where('strategy')} needs DeepSpeed, which "
                        'is not installed; pip install "genframe[deepspeed]" (or choose trainer=fsdp)')
    on_gpu = accel in ("gpu", "cuda") or (accel == "auto" and has_cuda)
    if on_gpu or accel == "cpu" or (accel == "auto" and not has_cuda):
        _check_devices(kwargs.get("devices", "auto"), on_gpu, n_gpus, strategy, where("devices"))


def _check_devices(devices: Any, on_gpu: bool, n_gpus: int, strategy: str, where: str) -> None:
    """``trainer.devices``: how many devices (or which indices) against what exists."""
    if devices in (-1, "-1") and not on_gpu:
        raise UserError(f"trainer.devices=-1{where} means every GPU, and this run uses the CPU; "
                        "expected a number of processes >= 1 (e.g. trainer.devices=2 with "
                        "trainer=ddp) or auto")
    if devices in ("auto", None, -1, "-1"):
        return
    if isinstance(devices, bool):
        raise UserError(f"trainer.devices={devices}{where}: expected a number of devices, "
                        "a list of device indices or auto")
    if isinstance(devices, str):
        parts = [p.strip() for p in devices.split(",") if p.strip()]
        if not all(p.lstrip("-").isdigit() for p in parts) or not parts:
            raise UserError(f"trainer.devices={devices}{where}: expected a number of devices, "
                            "a list of device indices or auto")
        numbers = [int(p) for p in parts]
        devices = numbers[0] if len(numbers) == 1 and "," not in devices else numbers
    if isinstance(devices, (list, tuple)):
        if not on_gpu:
            raise UserError(f"trainer.devices={list(devices)}{where}: device indices need GPUs, "
                            "and this run uses the CPU; expected trainer.devices=1")
        bad = [d for d in devices if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < n_gpus]
        if bad or not devices:
            raise UserError(f"trainer.devices={list(devices)}{where}: this machine has "
                            f"{plural(n_gpus, 'CUDA GPU')}, indices 0..{n_gpus - 1}; "
                            "expected indices among them")
        return
    if not isinstance(devices, int) or devices < 1:
        raise UserError(f"trainer.devices={devices}{where}: expected a number of devices >= 1, "
                        "a list of device indices, or auto")
    if on_gpu:
        if devices > n_gpus:
            raise UserError(f"trainer.devices={devices}{where}: this machine has "
                            f"{plural(n_gpus, 'CUDA GPU')}; expected trainer.devices={n_gpus} "
                            "or less (or auto)")
        return
    cores = _cpu_cores()
    if devices > 1 and not strategy.startswith("ddp"):
        raise UserError(
            f"trainer.devices={devices}{where}: this machine has 1 CPU device and no CUDA GPU "
            f"(torch.cuda.device_count() is 0); expected trainer.devices=1 (several processes "
            f"on the CPU need trainer=ddp or trainer=ddp_spawn, and at most {cores}, one per core)")
    if devices > cores:
        raise UserError(
            f"trainer.devices={devices}{where}: this machine has {cores} CPU cores for "
            f"{devices} processes; expected trainer.devices={cores} or less")


def resolve_trainer_kwargs(kwargs: dict[str, Any], num_parameters: int, choice: str,
                           source: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Check the machine can run `kwargs` (`check_hardware`) and fill in ``precision: auto``.

    Args:
        kwargs: the plain ``trainer`` config.
        num_parameters: the model's size, for ``precision: auto``.
        choice: the trainer preset chosen (``cpu``, ``auto``, ...).
        source: maps a trainer key to where it was set (for messages).
    """
    import torch

    kwargs = dict(kwargs)
    check_hardware(kwargs, source)
    accel = str(kwargs.get("accelerator", "auto"))
    if kwargs.get("precision") == "auto":
        kwargs["precision"] = auto_precision(accel, torch.cuda.is_available(), num_parameters)
    return kwargs


def auto_precision(accelerator: str, has_cuda: bool, num_parameters: int) -> str:
    """bf16-mixed where it pays off, else full precision.

    On CUDA GPUs with bf16 it always does. On CPUs with AMX a large bf16 matmul is ~6x
    faster than fp32, but for small models the casts cost more than they save; about
    2M parameters (width ~256) is where it starts to win.
    """
    import torch

    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and has_cuda)
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if cpu_has_amx_bf16() and num_parameters >= 2_000_000:
        return "bf16-mixed"
    return "32-true"


def global_rank() -> int:
    """This process's rank among all processes of a distributed run (0 when alone).

    Lightning reads it from the launcher's environment (``RANK``, ``LOCAL_RANK``,
    ``SLURM_PROCID``) when it is imported and sets it again once the process group is up,
    so it is right both before training (a process started by torchrun, SLURM or
    ``trainer=ddp``) and during it.
    """
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_rank_zero() -> bool:
    """Whether this process writes the run directory (run.json, weights, samples,
    metrics): every other rank of a distributed run only trains."""
    return global_rank() == 0


@dataclasses.dataclass(frozen=True)
class LaunchEnvironment:
    """How this process was started, read from the environment.

    Attributes:
        rank: the global rank (0 when alone).
        world_size: the number of processes of the run (1 when alone).
        launcher: ``torchrun``, ``SLURM``, ``trainer=ddp`` (a process Lightning started
            for genframe) or ``none``.
        external: whether a launcher outside genframe started every process (torchrun,
            SLURM), so Lightning starts none.
    """

    rank: int
    world_size: int
    launcher: str
    external: bool


def launch_environment(environ: Mapping[str, str] | None = None) -> LaunchEnvironment:
    """The `LaunchEnvironment` of this process (`environ`: default ``os.environ``)."""
    env = os.environ if environ is None else environ

    def number(*keys: str, default: int) -> int:
        for key in keys:
            value = env.get(key, "")
            if value.strip().isdigit():
                return int(value)
        return default

    if "TORCHELASTIC_RUN_ID" in env:
        return LaunchEnvironment(number("RANK", default=0), number("WORLD_SIZE", default=1),
                                 "torchrun", True)
    if "SLURM_PROCID" in env and number("SLURM_NTASKS", default=1) > 1:
        return LaunchEnvironment(number("SLURM_PROCID", default=0),
                                 number("SLURM_NTASKS", default=1), "SLURM", True)
    if "LOCAL_RANK" in env:
        local = number("LOCAL_RANK", default=0)
        per_node = max(number("WORLD_SIZE", default=1) // max(number("NUM_NODES", default=1), 1), 1)
        rank = number("RANK", default=number("NODE_RANK", default=0) * per_node + local)
        return LaunchEnvironment(rank, number("WORLD_SIZE", default=1), "trainer=ddp", False)
    return LaunchEnvironment(0, 1, "none", False)


#: The command line `trainer=ddp` restarts for its further processes (set by the CLI).
_RELAUNCH: list[str] | None = None


def set_relaunch_command(argv: list[str] | None) -> None:
    """Record the genframe command line of this process (program and arguments), which
    `trainer=ddp` starts again once per further process; None: not started from the
    command line (a test or notebook calling the CLI or a task in-process)."""
    global _RELAUNCH
    _RELAUNCH = list(argv) if argv is not None else None


def starts_processes(kwargs: Mapping[str, Any]) -> bool:
    """Whether a trainer with these arguments has Lightning start the further processes
    by running the command again (``strategy: ddp`` with more than one process, and no
    torchrun or SLURM that started them all)."""
    strategy = str(kwargs.get("strategy", "auto"))
    if not strategy.startswith("ddp") or strategy.startswith("ddp_spawn") or \
            strategy.startswith("ddp_fork") or launch_environment().external:
        return False
    return _process_count(kwargs) * int(kwargs.get("num_nodes", 1) or 1) > 1


def _process_count(kwargs: Mapping[str, Any]) -> int:
    """Processes per node that ``trainer.devices`` asks for."""
    import torch

    devices = kwargs.get("devices", "auto")
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([p for p in text.split(",") if p.strip()])
    if text.lstrip("-").isdigit() and int(text) >= 1:
        return int(text)
    on_gpu = str(kwargs.get("accelerator", "auto")) != "cpu" and torch.cuda.is_available()
    return torch.cuda.device_count() if on_gpu else 1  # auto, -1


def check_launch(kwargs: Mapping[str, Any], *, launcher: str | None = None,
                 choice: str = "?") -> None:
    """Refuse process layouts that cannot work: several nodes without a launcher, a
    torchrun/SLURM launch the trainer does not match, ``ddp_spawn`` in joblib's workers,
    and what `trainer=ddp`'s relaunch cannot do.

    Args:
        kwargs: the plain ``trainer`` config.
        launcher: in a multirun job, the Hydra launcher's class (``_target_``); None
            outside a multirun.
        choice: the trainer preset chosen (for messages).

    Raises:
        UserError: ``trainer.num_nodes`` > 1 with no torchrun, SLURM or ``NODE_RANK``; a
            torchrun/SLURM world size other than devices x nodes; ``ddp_spawn`` with
            several processes in a joblib worker (its processes cannot start there);
            ``ddp`` inside a multirun (the relaunch would run the whole sweep again in
            every process), or when genframe was not started from its command line (a
            test or notebook: there is no command to start again).
    """
    multirun = launcher is not None
    strategy_name = str(kwargs.get("strategy", "auto"))
    if launcher and "joblib" in launcher.lower() and strategy_name.startswith("ddp_spawn") \
            and _process_count(kwargs) > 1:
        raise UserError(
            f"trainer.strategy={strategy_name} (trainer={choice}) cannot start its processes "
            "inside joblib's workers (their start method is joblib's own); use the basic "
            "launcher (leave hydra/launcher out) or hydra/launcher=submitit_local for DDP "
            "jobs, or trainer.devices=1 with joblib")
    nodes = int(kwargs.get("num_nodes", 1) or 1)
    env = launch_environment()
    if nodes > 1 and not env.external and "NODE_RANK" not in os.environ:
        raise UserError(
            f"trainer.num_nodes={nodes} (trainer={choice}): a run over several machines is "
            "started on every node by torchrun or SLURM's srun (or with MASTER_ADDR, "
            "MASTER_PORT and NODE_RANK set on each); started alone it would wait for the "
            "other nodes forever. See the README's \"Several GPUs and several nodes\", or "
            "set trainer.num_nodes=1")
    if env.external and env.world_size > 1:
        per_node = _process_count(kwargs)
        if str(kwargs.get("strategy", "auto")) == "auto" or per_node * nodes != env.world_size:
            raise UserError(
                f"{env.launcher} started {env.world_size} processes, but the trainer (trainer="
                f"{choice}) runs {per_node * nodes} (trainer.devices={kwargs.get('devices')} x "
                f"trainer.num_nodes={nodes}, strategy {kwargs.get('strategy', 'auto')}): each "
                "process would train a model of its own. Use trainer=multinode with "
                "trainer.num_nodes x trainer.devices equal to the processes started (nodes x "
                "processes per node)")
    if not starts_processes(kwargs):
        return
    strategy = f"trainer.strategy={kwargs.get('strategy')} (trainer={choice})"
    if multirun:
        raise UserError(
            f"{strategy} cannot run inside a multirun (-m): it starts the genframe command "
            "again for every further process, which would run the whole sweep again in "
            "each. Use trainer=ddp_spawn in sweeps, or launch the processes from outside "
            "with torchrun (trainer=multinode, see the README)")
    if _RELAUNCH is None:
        raise UserError(
            f"{strategy} starts the genframe command again for every further process, but "
            "this task was not started from the genframe command (it runs inside Python); "
            "use trainer=ddp_spawn here, or run `genframe ...` from a shell")


def prepare_launch(kwargs: Mapping[str, Any], *, launcher: str | None = None,
                   choice: str = "?") -> None:
    """`check_launch`, then point ``sys.argv`` at the genframe command line, which
    Lightning's launcher (``_SubprocessScriptLauncher``) runs again for each further
    process, adding the run directory to it."""
    import sys

    check_launch(kwargs, launcher=launcher, choice=choice)
    if starts_processes(kwargs) and launch_environment().rank == 0:
        sys.argv = list(_RELAUNCH)
