"""What step checkpoints cost: the character GPT trained with `last.ckpt` written every N
optimizer steps, against epoch-end checkpoints only, side by side in one run.

    python bench/checkpoint_overhead.py [--steps 400] [--every 0,100,20] [--rounds 2]

Each round runs every setting once (alternating, one thread each); the table gives the
median wall time of the whole command per setting, its ratio to the first setting (0: no
step checkpoints) and the number of checkpoints written. A checkpoint holds the weights,
the AdamW moments, the loader position and the random state, written aside, fsynced and
renamed into place.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ARGS = ["experiment=pydoc_char_lm", "trainer.max_epochs=-1", "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0", "num_samples=0",
        "trainer.enable_progress_bar=false"]


def run(steps: int, every: int, root: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tempfile.mkdtemp(dir=root)
    extra = [f"callbacks.checkpoint.every_n_steps={every}"] if every else []
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "genframe", "train", *ARGS,
                           f"trainer.max_steps={steps}", *extra, f"hydra.run.dir={out}/run"],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", default="0,100,20")
    parser.add_argument("--rounds", type=int, default=2)
    opts = parser.parse_args()
    settings = [int(e) for e in opts.every.split(",")]
    times: dict[int, list[float]] = {e: [] for e in settings}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(opts.rounds):
            for every in settings:
                times[every].append(run(opts.steps, every, root))
    base = statistics.median(times[settings[0]])
    print(f"character GPT (experiment=pydoc_char_lm), {opts.steps} steps, {opts.rounds} rounds")
    print(f"{'every_n_steps':>13} {'checkpoints':>11} {'median s':>9} {'ratio':>6}  all")
    for every in settings:
        med = statistics.median(times[every])
        count = opts.steps // every if every else 0
        print(f"{every or '-':>13} {count:>11} {med:>9.1f} {med / base:>6.3f}  "
              f"{', '.join(f'{t:.1f}' for t in times[every])}")


if __name__ == "__main__":
    main()
