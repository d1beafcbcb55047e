"""The benchmark suite: run a chosen set of comparisons, one after another, and write one
markdown report (the machine, a table of every ratio with its median and spread over
rounds and its target, then each script's own output).

    python bench/run.py                      # every comparison (~60 min on 2 busy cores, 1 thread)
    python bench/run.py --smoke              # the smallest configurations, for CI (< 2 min, 1 thread)
    python bench/run.py --only peer_lm --only main_job
    python bench/run.py --list

The report goes to ``--out`` (default ``outputs/bench/run-<date>-<time>.md``; outputs/ is
git-ignored) and is printed at the end; the exit status is 1 if a script failed. Each
comparison is a script of its own that also runs alone (``python bench/<script>.py
--help``); the suite runs each in a child process, one at a time (the machines are
small: two benchmarks side by side would measure each other), and reads its results
from ``--json``. The peers (diffusers, transformers) come with the `bench` extra:
``pip install -e ".[bench]"``.

Ratios are genframe / peer of each round, so higher means genframe faster, except peak
memory, where lower is better (its target reads ``<=``). The last column is the most
cores other processes kept busy during a round: rounds wait for a quiet machine (up to
2 minutes) but cannot stop others from starting, and on two cores a busy neighbour
slows two-thread runs 5-50x.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _suite  # noqa: E402

# name -> (script, arguments of the full run, arguments of --smoke or None: not in it)
COMPARISONS: dict[str, tuple[str, list[str], list[str] | None]] = {
    "peer_diffusion": ("peer_diffusion.py", [], ["--smoke"]),
    "peer_lm": ("peer_lm.py", [], ["--smoke"]),
    "family_overhead": ("family_overhead.py", [], ["--smoke"]),
    "main_job": ("family_overhead.py", ["--main-job-only"], None),
    "lm_throughput": ("lm_throughput.py", ["--rounds", "3"], None),
    "cli_startup": ("cli_startup.py", ["--repeat", "5"], ["--repeat", "1"]),
    "log_cost": ("log_cost.py", [], ["--smoke"]),
    # trainer.compile per family, compile time included (~25 min: it compiles 8 models).
    "compile": ("compile_families.py", [], None),
}
# Scripts that take the suite's --json, --max-wait and --retries.
SUITE_SCRIPTS = {"peer_diffusion.py", "peer_lm.py", "family_overhead.py", "log_cost.py"}


def lm_throughput_comparison(text: str) -> _suite.Comparison | None:
    """bench/lm_throughput.py's training rounds as a comparison (it prints a table)."""
    rows = re.findall(r"^(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\|", text, flags=re.M)
    if not rows:
        return None
    return _suite.Comparison(
        "char GPT 0.8M: train tokens/s, genframe train vs plain loop (lm_throughput.py)",
        "tokens/s", [float(r[1]) for r in rows], [float(r[2]) for r in rows], "plain loop", 1.0)


def cli_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("genframe", "python", "import"))]


def run_one(name: str, args, json_path: str) -> tuple[int, float, str]:
    script, full, smoke = COMPARISONS[name]
    argv = list(smoke if args.smoke else full)
    if script in SUITE_SCRIPTS:
        argv += ["--json", json_path]
        if args.max_wait is not None:
            argv += ["--max-wait", str(args.max_wait)]
        if args.retries is not None:
            argv += ["--retries", str(args.retries)]
    if args.threads and script != "cli_startup.py":
        argv += ["--threads", str(args.threads)]
    elif script == "lm_throughput.py":  # its own default is 1 thread: run it as the others run
        argv += ["--threads", str(os.cpu_count())]
    cmd = [sys.executable, os.path.join(_suite.BENCH_DIR, script), *argv]
    shown = "python bench/" + " ".join([script, *[a for a in argv if a != json_path and a != "--json"]])
    print(f"\n### {name}: {shown}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=_suite.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_suite.child_env())
    lines = []
    try:
        for line in proc.stdout:  # shown as it comes: runs are long
            print(line, end="", flush=True)
            lines.append(line)
        proc.wait()
    finally:  # interrupted (Ctrl-C, SIGTERM): take the running benchmark down too
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return proc.returncode, time.perf_counter() - start, shown + "\n" + "".join(lines)


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _stop)  # a killed suite stops its running script
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest configurations only, one torch thread unless --threads")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this comparison (repeatable, or comma-separated)")
    parser.add_argument("--list", action="store_true", help="list the comparisons and exit")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every script (default: torch's, one per core)")
    parser.add_argument("--max-wait", type=float, default=None,
                        help="seconds a round waits for a quiet machine (scripts' default 120)")
    parser.add_argument("--retries", type=int, default=None,
                        help="times a loaded round is repeated (scripts' default 2)")
    parser.add_argument("--out", default=None, help="the markdown report (default under outputs/bench/)")
    args = parser.parse_args(argv)
    if args.list:
        for name, (script, full, smoke) in COMPARISONS.items():
            print(f"{name:<16} python bench/{' '.join([script, *full])}"
                  + ("" if smoke is not None else "   (not in --smoke)"))
        return 0
    only = [n for item in args.only for n in item.split(",") if n]
    unknown = sorted(set(only) - set(COMPARISONS))
    if unknown:
        parser.error(f"unknown comparison {unknown}; choose from {list(COMPARISONS)}")
    names = [n for n in COMPARISONS if (n in only if only else
                                        (not args.smoke or COMPARISONS[n][2] is not None))]
    if args.smoke and only:
        names = [n for n in names if COMPARISONS[n][2] is not None] or names
    if args.smoke and args.threads is None:
        # A smoke run checks that every script runs, not what it measures: one thread
        # keeps it fast on shared CI cores (two threads beside a busy neighbour crawl).
        args.threads = 1
    _suite.set_threads(args.threads)
    machine = _suite.machine_info()
    started = time.strftime("%Y-%m-%d %H:%M")
    comparisons, outputs, main_job, cli, failed = [], [], [], [], []
    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            json_path = os.path.join(tmp, f"{name}.json")
            code, seconds, text = run_one(name, args, json_path)
            outputs.append((name, code, seconds, text))
            if code != 0:
                failed.append(name)
            if os.path.exists(json_path):
                with open(json_path) as f:
                    payload = json.load(f)
                comparisons += payload.get("comparisons", [])
                main_job += payload.get("main_job", [])
            if name == "lm_throughput":
                c = lm_throughput_comparison(text)
                if c is not None:
                    comparisons.append(c.as_dict())
            if name == "cli_startup":
                cli = cli_lines(text)
    total = time.perf_counter() - total

    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# genframe benchmark suite, {started}", "", f"`{command.strip()}`: {total / 60:.1f} min"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), "", "## Machine", ""]
    md += [f"- {line}" for line in _suite.machine_lines(machine)]
    md += ["", "## Ratios", "",
           "genframe / peer per round; median (min-max) over rounds. Higher = genframe faster; "
           "for peak RSS (MB) lower is better.", ""]
    md += [_suite.table(comparisons) if comparisons else "(no comparisons ran)"]
    notes = [c for c in comparisons if c.get("note")]
    if notes:
        md += [""] + [f"- {c['name']}: {c['note']}" for c in notes]
    if main_job:
        md += ["", "## Main job", ""] + [f"- {line}" for line in main_job]
    if cli:
        md += ["", "## CLI start-up (bench/cli_startup.py)", "", "```"] + cli + ["```"]
    md += ["", "## Output of each script", ""]
    for name, code, seconds, text in outputs:
        md += [f"### {name} ({seconds:.0f} s{'' if code == 0 else f', exit status {code}'})", "",
               "```", text.rstrip(), "```", ""]
    report = "\n".join(md) + "\n"
    out = args.out or os.path.join(_suite.ROOT, "outputs", "bench",
                                   time.strftime("run-%Y%m%d-%H%M%S.md"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(report)
    print("\n" + "\n".join(md[: md.index("## Output of each script")]))
    print(f"report: {out} ({total:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
