"""DDP (2 CPU processes over gloo) against one process, per model family, side by side.

Each family trains the same number of steps on the same global batch: one process with
batch 2b, and `trainer=ddp trainer.devices=2` with batch b per process (the ranks'
batches of a step together are the one process's batch, see
`genframe.data.base.EpochShuffle`). Printed per family: the final validation loss of
both, a second one-process run with another seed (how far noise alone moves it), and
the wall time of each whole command. For the transformer without dropout on fixed
windows (`data.random_offsets=false`), the largest difference between the final
weights of the two runs is printed too.

    python bench/ddp_vs_single.py                 # every family, 40 steps
    python bench/ddp_vs_single.py --steps 20 vae transformer

On 2 cores the two processes share them, so DDP is not faster here; the point is that
it learns the same thing. Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = {
    "vae": (16, ["model=vae", "model.latent_dim=8"]),
    "autoencoder": (16, ["model=autoencoder", "data=shapes", "data.image_size=24", "data.jitter=0",
                         "model.block_out_channels=[16,32]", "model.latent_channels=2"]),
    "gan": (16, ["model=gan"]),
    "diffusion": (16, ["model=diffusion", "model.block_out_channels=[16,32]",
                       "model.blocks_per_level=1", "model.timesteps=100"]),
    "upscaler": (16, ["model=upscaler", "data.image_size=16", "model.block_out_channels=[16,32]",
                      "model.blocks_per_level=1", "model.timesteps=100"]),
    "text2image": (16, ["model=text2image", "data=shapes", "data.image_size=24", "data.jitter=0",
                        "model.block_out_channels=[16,32]", "model.blocks_per_level=1",
                        "model.attention_resolutions=[12]", "model.timesteps=100",
                        "model.text_width=32", "model.text_depth=1"]),
    "transformer": (8, ["data=text", "model=transformer_mini", "model.dropout=0.0",
                        "data.random_offsets=false", "data.block_size=64"]),
}


def run(args: list[str], out: Path) -> tuple[float, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENFRAME_OUTPUT_ROOT": str(out.parent)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "genframe", "train", *args, f"hydra.run.dir={out}"],
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{done.stderr[-3000:]}")
    return wall, json.loads((out / "metrics.json").read_text())


def weight_gap(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=40)
    opts = parser.parse_args()
    common = [f"trainer.max_steps={opts.steps}", "trainer.max_epochs=-1", "trainer.limit_val_batches=4",
              "trainer.check_val_every_n_epoch=1000", "trainer.num_sanity_val_steps=0",
              "trainer.enable_progress_bar=false", "num_samples=0", "callbacks=none"]
    print(f"{'family':<12} {'one val/loss':>13} {'ddp val/loss':>13} {'seed-1 val/loss':>16} "
          f"{'one s':>7} {'ddp s':>7} {'weights max |diff|':>19}")
    with tempfile.TemporaryDirectory() as tmp:
        for family in opts.families:
            batch, args = FAMILIES[family]
            root = Path(tmp) / family
            t_one, one = run([*common, *args, f"data.batch_size={2 * batch}"], root / "one")
            t_ddp, ddp = run([*common, *args, f"data.batch_size={batch}", "trainer=ddp",
                              "trainer.devices=2"], root / "ddp")
            _, other = run([*common, *args, f"data.batch_size={2 * batch}", "seed=1"], root / "seed")
            gap = f"{weight_gap(root / 'one', root / 'ddp'):.2e}" if family == "transformer" else "-"
            print(f"{family:<12} {one['val/loss']:>13.4f} {ddp['val/loss']:>13.4f} "
                  f"{other['val/loss']:>16.4f} {t_one:>7.1f} {t_ddp:>7.1f} {gap:>19}", flush=True)


if __name__ == "__main__":
    main()
