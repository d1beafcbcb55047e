"""An 8-trial Optuna sweep of a tiny VAE, interrupted and resumed with the same command.

    python bench/optuna_resume.py [--trials 8] [--interrupt-after 3] [--signal INT|TERM|KILL]

Starts ``genframe train -m hydra/sweeper=genframe_optuna hydra.sweeper.n_trials=8 ...`` in
its own process group, sends the signal to the group (Ctrl-C is SIGINT to the whole
group) once the study holds `--interrupt-after` finished trials, then runs the same
command again and prints what the study holds: the trials (completed, and those cut
short), how many the resumed run added, and the best trial. Runs land in a temporary
folder (``--keep`` prints it and keeps it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TINY_VAE = ["trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
            "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
            "num_samples=4", "model.block_out_channels=[8,16]"]


def study_states(db: Path) -> list[str]:
    """The states of the trials in the SQLite file `db`, read-only (Optuna itself would
    create the tables of a missing file, racing the sweep that is creating them)."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return [row[0] for row in con.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:  # the tables are being created
        return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--interrupt-after", type=int, default=3)
    parser.add_argument("--signal", choices=["INT", "TERM", "KILL"], default="INT")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="optuna_resume_"))
    env = {**os.environ, "GENFRAME_OUTPUT_ROOT": str(root / "outputs"), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "genframe", "train", "-m", "hydra/sweeper=genframe_optuna",
               f"hydra.sweeper.n_trials={args.trials}", *TINY_VAE,
               "model.latent_dim=range(2,9)", "model.lr=interval(1e-4,3e-3)"]
    db = root / "outputs" / "train-multirun" / "optuna.db"
    print("command: genframe", " ".join(command[3:]))

    start = time.perf_counter()
    first = subprocess.Popen(command, env=env, cwd=root, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while first.poll() is None:
        if study_states(db).count("COMPLETE") >= args.interrupt_after:
            os.killpg(first.pid, getattr(signal, f"SIG{args.signal}"))
            break
        time.sleep(0.5)
    out1, _ = first.communicate(timeout=300)
    before = study_states(db)
    print(f"first run: SIG{args.signal} after {before.count('COMPLETE')} completed trials, "
          f"exit status {first.returncode}, {time.perf_counter() - start:.1f} s; "
          f"study: {_count(before)}")

    start = time.perf_counter()
    second = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True,
                            timeout=900)
    after = study_states(db)
    log = second.stdout + second.stderr
    progress = re.search(r"optuna study '([^']+)' in \S+: (\d+ of \d+ trials done, \d+ to run)", log)
    print(f"resumed run (same command): exit status {second.returncode}, "
          f"{time.perf_counter() - start:.1f} s; it found {progress.group(2) if progress else '?'}")
    print(f"study {progress.group(1) if progress else '?'}: {_count(after)}; "
          f"completed trials: {after.count('COMPLETE')} (target {args.trials})")
    best = [line for line in log.splitlines() if line.startswith("best trial")]
    print(best[-1] if best else "no best trial line:\n" + log[-3000:])
    if first.returncode not in (130, 143, -9) and args.signal != "KILL":
        print("first run output (tail):\n" + out1[-2000:])
    if args.keep:
        print("kept:", root)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if second.returncode == 0 and after.count("COMPLETE") == args.trials else 1


def _count(states: list[str]) -> str:
    parts = [f"{states.count(s)} {s.lower()}" for s in ("COMPLETE", "FAIL", "RUNNING") if s in states]
    return f"{len(states)} trials ({', '.join(parts) or 'none'})"


if __name__ == "__main__":
    sys.exit(main())
