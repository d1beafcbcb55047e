"""Kill a training run with SIGKILL at random moments, continue it with `genframe resume`,
and count how many continuations end with exactly the weights of a run that never stopped.

    python bench/resume_exactness.py [--families vae,transformer,diffusion,gan]
        [--repeats 10] [--seed 0] [--out /tmp/resume_bench]

For each family one uninterrupted reference run is trained (CPU, deterministic mode,
checkpoints every 7 optimizer steps, so most kills land mid-epoch and between
checkpoints). Then, until `--repeats` kills have landed (at most 3 x repeats tries): the
same command starts, is killed with SIGKILL at a moment drawn uniformly between its first
step checkpoint and 95% of the reference's training time, and `genframe resume run=DIR`
continues it; a run that finished before its kill is counted as missed. The continuation is exact when
every tensor of the final ``last.ckpt`` (weights, EMA copies, buffers) equals the
reference's bit for bit. The table gives, per family: exact continuations / repeats, the
steps the kills landed at (the checkpoint each resumed from), and the largest difference
seen. Runs use one thread each (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

COMMON = ["trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0",
          "trainer.enable_progress_bar=false", "trainer.deterministic=true", "num_samples=0",
          "callbacks.checkpoint.every_n_steps=7"]
FAMILIES = {
    "vae": ["model=vae", "model.latent_dim=4", "model.block_out_channels=[8,16]",
            "trainer.max_epochs=6"],
    "transformer": ["experiment=pydoc_char_lm", "model.n_layer=2", "model.n_embd=64",
                    "model.dropout=0.1", "trainer.max_steps=150", "trainer.val_check_interval=50",
                    "model.warmup_steps=10"],
    "diffusion": ["model=diffusion", "model.block_out_channels=[8,16]",
                  "model.blocks_per_level=1", "model.attention_resolutions=[]",
                  "trainer.max_epochs=4"],
    "gan": ["model=gan", "model.g_channels=[16,32]", "model.d_channels=[16,32]",
            "trainer.max_epochs=4", "model.sample_every_n_epochs=0"],
}


def genframe(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "genframe", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{err[-3000:]}")


def last_state(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()),
               default=0.0)


def first_checkpoint(run_dir: Path, proc: subprocess.Popen) -> bool:
    path = run_dir / "checkpoints" / "last.ckpt"
    while proc.poll() is None:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def bench_family(name: str, args: list[str], repeats: int, out: Path, rng: random.Random) -> dict:
    args = [*args, *COMMON]
    ref = out / f"{name}-reference"
    shutil.rmtree(ref, ignore_errors=True)
    start = time.monotonic()
    finish(genframe("train", *args, f"hydra.run.dir={ref}"), f"{name} reference run")
    duration = time.monotonic() - start
    ref_step, ref_state = last_state(ref)
    exact, steps, worst, missed = 0, [], 0.0, 0
    for i in range(3 * repeats):  # until `repeats` kills landed (a run may finish first)
        if len(steps) == repeats:
            break
        run_dir = out / f"{name}-{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.monotonic()
        proc = genframe("train", *args, f"hydra.run.dir={run_dir}")
        if not first_checkpoint(run_dir, proc):
            finish(proc, f"{name} run {i}")
            missed += 1  # it ended before its first checkpoint: no kill happened
            continue
        kill_at = rng.uniform(time.monotonic() - t0, 0.95 * duration)
        time.sleep(max(0.0, kill_at - (time.monotonic() - t0)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.communicate()
        status = json.loads((run_dir / "run.json").read_text()).get("status")
        if proc.returncode != -signal.SIGKILL or status == "completed":
            missed += 1  # it finished (or was tearing down) before the kill
            continue
        steps.append(last_state(run_dir)[0])
        finish(genframe("resume", f"run={run_dir}"), f"{name} resume {i}")
        step, state = last_state(run_dir)
        diff = max_difference(ref_state, state) if step == ref_step else float("inf")
        worst = max(worst, diff)
        exact += diff == 0.0
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"family": name, "exact": exact, "killed": len(steps), "missed": missed,
            "steps": sorted(steps), "worst": worst, "reference_s": duration, "total_steps": ref_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="vae,transformer,diffusion,gan")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/resume_bench"))
    opts = parser.parse_args()
    unknown = set(opts.families.split(",")) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {sorted(FAMILIES)}")
    opts.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(opts.seed)
    rows = []
    for name in opts.families.split(","):
        row = bench_family(name, FAMILIES[name], opts.repeats, opts.out, rng)
        rows.append(row)
        print(f"{name}: {row['exact']}/{row['killed']} exact", flush=True)
    print(f"\n{'family':<12} {'exact':>9} {'missed':>6} {'steps':>6} {'ref s':>6}  "
          f"{'largest diff':>12}  resumed from steps")
    for r in rows:
        print(f"{r['family']:<12} {r['exact']:>4}/{r['killed']:<4} {r['missed']:>6} "
              f"{r['total_steps']:>6} {r['reference_s']:>6.1f}  {r['worst']:>12.3g}  {r['steps']}")


if __name__ == "__main__":
    main()
