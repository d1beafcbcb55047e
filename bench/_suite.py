"""Shared parts of the benchmark suite (`bench/run.py`): not a benchmark itself.

- the machine's details (CPU model, cores, torch version and threads, whether the CPU has
  AMX / AVX-512 bf16, from /proc/cpuinfo's flags);
- the load other processes put on the machine while a round runs (`ForeignLoad`), and
  `wait_quiet` to start a round only once the machine is quiet (the cores are shared:
  two OpenMP threads beside another busy process ran 5-50x slower here, so a round
  under foreign load says little);
- `Comparison`: one compared quantity over rounds (genframe's values, the peer's, the
  ratio of each round) with its target, and the markdown table of several;
- peak RSS of a child process over its whole life (`run_measured`);
- short torch.profiler / cProfile tables for finding what dominates.

Every script of the suite takes ``--json FILE``: it then writes its comparisons and the
machine's details there, which `bench/run.py` collects into one table.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
CPU_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "avx2")


# -- the machine ------------------------------------------------------------------------

def cpu_info() -> dict[str, Any]:
    """CPU model name and the flags of `CPU_FLAGS` the CPU has (from /proc/cpuinfo)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if model != "unknown" and flags:
                    break
    except OSError:
        pass
    return {"cpu": model, "flags": {f: f in flags for f in CPU_FLAGS}}


def machine_info() -> dict[str, Any]:
    """What a result depends on: CPU, cores, torch version and threads, libraries."""
    import torch

    info = cpu_info()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    from importlib import metadata

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("pytorch-lightning", "diffusers", "transformers", "genframe"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        **info,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "loadavg": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def machine_lines(info: dict[str, Any]) -> list[str]:
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["flags"].items())
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    load = " ".join(f"{x:.2f}" for x in info["loadavg"])
    return [
        f"CPU: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"torch threads {info['torch_threads']}",
        f"CPU flags: {flags}",
        f"versions: {versions}",
        f"load average at start: {load}; {info['date']}",
    ]


def set_threads(threads: int | None) -> None:
    """torch threads for the whole script (None: torch's default, one per core)."""
    import torch

    if threads:
        torch.set_num_threads(threads)


def same_allocator() -> str:
    """Tune the C allocator for this whole process now, as `genframe train` does when it
    builds its trainer (`genframe.hardware.tune_allocator`), so every side of an in-process
    comparison runs on the same malloc settings and the ratios compare code, not
    allocators. ``GENFRAME_MALLOC_TUNING=0`` runs every side on glibc's defaults instead
    (and the children's `genframe train` too). Returns a line for the report."""
    from genframe.hardware import ALLOCATOR_ENV, tune_allocator

    if tune_allocator():
        return "allocator: glibc malloc tuned for every side (genframe.hardware.tune_allocator)"
    return f"allocator: as the process found it (tuning off or not glibc; {ALLOCATOR_ENV}=0 to force off)"


def quiet_logs() -> None:
    """Lightning's and the libraries' info lines and warnings off (a measurement prints
    its own table)."""
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "genframe",
                 "diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# -- load from other processes -----------------------------------------------------------

def _busy_seconds() -> float:
    """CPU seconds every process on the machine has used (from /proc/stat)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ForeignLoad:
    """Cores kept busy by other processes between `start` and `stop` (averaged).

    The machine's busy CPU time (/proc/stat) minus this process's own (and its waited-for
    children's). Approximate (clock ticks), but enough to tell a quiet round (< 0.2) from
    one that shared the cores with a test suite (1-2)."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        self._t, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()

    def stop(self) -> float:
        wall = time.perf_counter() - self._t
        foreign = (_busy_seconds() - self._busy) - (_own_seconds() - self._own)
        return max(0.0, foreign / max(wall, 1e-9))


def wait_quiet(max_wait: float = 120.0, threshold: float = 0.5, probe: float = 1.0) -> float:
    """Wait (at most `max_wait` s) until other processes use less than `threshold` cores
    over a `probe`-second window; return the last foreign load seen."""
    deadline = time.monotonic() + max_wait
    while True:
        load = ForeignLoad()
        time.sleep(probe)
        seen = load.stop()
        if seen < threshold or time.monotonic() >= deadline:
            return seen
        time.sleep(2.0)


def quiet_round(fn: Callable[[], Any], *, max_wait: float = 120.0, retries: int = 2,
                threshold: float = 0.5) -> tuple[Any, float]:
    """Run one round, `fn()`, on a quiet machine: wait for one (`wait_quiet`), run it, and
    run it again (up to `retries` times) when other processes kept more than `threshold`
    cores busy meanwhile. Returns (what the last try returned, the foreign load during
    it); a round still loaded after the retries is kept, and its load shows in the table."""
    for attempt in range(retries + 1):
        wait_quiet(max_wait, threshold)
        load = ForeignLoad()
        result = fn()
        foreign = load.stop()
        if foreign <= threshold or attempt == retries:
            return result, foreign
        print(f"   (others kept {foreign:.2f} cores busy: round repeated)", flush=True)
    raise AssertionError("unreachable")


# -- results ------------------------------------------------------------------------------

def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def fmt(x: float) -> str:
    """A number with 3 significant figures (thousands without decimals)."""
    if x != x:  # NaN
        return "nan"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


@dataclass
class Comparison:
    """One compared quantity over rounds.

    `ratio` holds one value per round, genframe / peer for speeds (higher: genframe
    faster) and for sizes (peak RSS: lower is better, so the target is ``<=``); the
    ratio is taken within each round (the two sides ran back to back), so it is less
    sensitive to the machine's drift than the ratio of medians.
    """

    name: str  # e.g. "diffusion 1.62M: train images/s"
    unit: str
    genframe: list[float]
    peer: list[float]
    peer_name: str
    target: float | None = None
    target_op: str = ">="  # ">=" (speed) or "<=" (memory)
    note: str = ""
    foreign_load: list[float] = field(default_factory=list)  # cores used by others, per round

    @property
    def ratio(self) -> list[float]:
        return [g / p if p else float("nan") for g, p in zip(self.genframe, self.peer)]

    def verdict(self) -> str:
        if self.target is None:
            return "-"
        r = statistics.median(self.ratio)
        ok = r >= self.target if self.target_op == ">=" else r <= self.target
        return "met" if ok else "MISSED"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "verdict": self.verdict()}


def table(comparisons: list[Comparison | dict[str, Any]], *, label: str = "comparison") -> str:
    """Markdown table: medians and spreads (min-max) over rounds, the ratio, the target."""
    lines = [f"| {label} | unit | genframe median (min-max) | peer | peer median (min-max) "
             "| ratio genframe/peer median (min-max) | rounds | target | verdict | others' load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        c = c if isinstance(c, dict) else c.as_dict()
        g, p, r = spread(c["genframe"]), spread(c["peer"]), spread(c["ratio"])
        target = f"{c['target_op']} {c['target']:g}" if c.get("target") is not None else "-"
        load = f"{max(c['foreign_load']):.1f}" if c.get("foreign_load") else "-"
        lines.append(
            f"| {c['name']} | {c['unit']} | {fmt(g[0])} ({fmt(g[1])}-{fmt(g[2])}) | {c['peer_name']} "
            f"| {fmt(p[0])} ({fmt(p[1])}-{fmt(p[2])}) | **{r[0]:.3f}** ({r[1]:.3f}-{r[2]:.3f}) "
            f"| {len(c['ratio'])} | {target} | {c.get('verdict', '-')} | {load} |")
    return "\n".join(lines)


def report(comparisons: list[Comparison], json_path: str | None, script: str,
           extra: dict[str, Any] | None = None) -> None:
    """Print the table; with `json_path` also write it (and the machine) as JSON."""
    print()
    print(table(comparisons))
    notes = [c for c in comparisons if c.note]
    for c in notes:
        print(f"- {c.name}: {c.note}")
    print("others' load: the most cores other processes kept busy in any round (0 = quiet)")
    if json_path:
        payload = {"script": script, "machine": machine_info(),
                   "comparisons": [c.as_dict() for c in comparisons], **(extra or {})}
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=1)


# -- child processes and memory -------------------------------------------------------------

def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB: VmHWM of /proc/self/status, which
    belongs to the process's own memory map. (``getrusage``'s ru_maxrss also keeps the
    high-water mark of the map before ``execve``, that is, of the parent that forked it.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Measured:
    returncode: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str


# Runs the command (argv[2:]) and writes its exit status and peak RSS (KiB) to argv[1].
# Started from this small process, the command's ru_maxrss is its own: a child forked
# straight from a benchmark process would report at least that process's RSS, since
# Linux keeps the pre-exec memory map's high-water mark in ru_maxrss.
_LAUNCHER = ("import json, resource, subprocess, sys\n"
             "rc = subprocess.call(sys.argv[2:])\n"
             "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
             "json.dump({'rc': rc, 'peak_kib': peak}, open(sys.argv[1], 'w'))\n"
             "sys.exit(rc)\n")


def run_measured(cmd: list[str], *, cwd: str | None = None,
                 env: dict[str, str] | None = None) -> Measured:
    """Run `cmd` to its end; its wall time (from here, so the launcher's start-up of
    ~0.05 s included) and peak RSS, with its output."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        stats = os.path.join(tmp, "stats.json")
        with open(os.path.join(tmp, "out"), "w+") as out, open(os.path.join(tmp, "err"), "w+") as err:
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, stats, *cmd], cwd=cwd,
                                    env=env, stdout=out, stderr=err, text=True)
            try:
                proc.wait()
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            wall = time.perf_counter() - start
            out.seek(0)
            err.seek(0)
            text_out, text_err = out.read(), err.read()
        if not os.path.exists(stats):  # the launcher itself failed
            return Measured(proc.returncode, wall, float("nan"), text_out, text_err)
        with open(stats) as f:
            got = json.load(f)
    return Measured(got["rc"], wall, got["peak_kib"] / 1024, text_out, text_err)


def child_env() -> dict[str, str]:
    """The environment of a child: bench/ importable (for the timing callbacks)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (BENCH_DIR, env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def result_line(payload: dict[str, Any]) -> str:
    return "RESULT " + json.dumps(payload)


def parse_result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"no RESULT line in the child's output:\n{stdout[-2000:]}")


# -- profiles ---------------------------------------------------------------------------------

def torch_profile(fn: Callable[[], Any], *, rows: int = 15, sort: str = "self_cpu_time_total") -> str:
    """torch.profiler's operator table of one call of `fn` (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=48)


def python_profile(fn: Callable[[], Any], *, rows: int = 20, sort: str = "tottime") -> str:
    """cProfile's table of one call of `fn`: where the Python time goes."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(sort).print_stats(rows)
    return buf.getvalue()


@contextlib.contextmanager
def section(title: str):
    print(f"\n== {title}", flush=True)
    start = time.perf_counter()
    yield
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
