"""How fast the CLI answers, beside what importing the training stack costs.

    python bench/cli_startup.py [--repeat 5]

Runs each command `repeat` times in fresh processes and prints the median wall time and
its ratio to `python -c pass` (interpreter start-up) and to importing pytorch_lightning
(what a CLI that imports its training stack up front pays before doing anything).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def median_time(cmd: list[str], repeat: int, cwd: str) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    genframe = shutil.which("genframe") or os.path.join(os.path.dirname(sys.executable), "genframe")
    cases = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import pytorch_lightning": [sys.executable, "-c", "import pytorch_lightning"],
        "genframe --help": [genframe, "--help"],
        "genframe plugins": [genframe, "plugins"],
        "genframe train --cfg job": [genframe, "train", "--cfg", "job"],
        "genframe train --help": [genframe, "train", "--help"],
    }
    with tempfile.TemporaryDirectory() as cwd:
        results = {name: median_time(cmd, args.repeat, cwd) for name, cmd in cases.items()}
    base, stack = results["python -c pass"], results["import pytorch_lightning"]
    print(f"{'command':<28} {'median s':>9} {'x python':>9} {'x import PL':>12}")
    for name, t in results.items():
        print(f"{name:<28} {t:>9.3f} {t / base:>9.1f} {t / stack:>12.2f}")


if __name__ == "__main__":
    main()
