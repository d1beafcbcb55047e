"""The language model's modern recipe against the GPT-2 one, on the default corpus.

`experiment=pydoc_char_lm` (0.8M parameters; learned positions, LayerNorm, GELU, AdamW)
against `experiment=pydoc_char_lm_modern` (the same size and data; rotary positions,
RMSNorm, QK-norm, squared ReLU, Muon for the blocks' matrices: the modded-nanoGPT line
of work), and the modern network with AdamW (what Muon adds on its own):

1. equal steps: each recipe for `--steps` optimizer steps; validation loss at the end;
2. equal wall time: each other recipe again for the number of steps that takes the GPT-2
   recipe's wall time at its own measured speed (its schedule fitted to that length).

Rounds alternate the recipes; the table gives the median (and range) over rounds.

    python bench/lm_recipe.py                    # 2000 steps, 1 round
    python bench/lm_recipe.py --steps 500 --rounds 2

Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPES = {
    "gpt2": ["experiment=pydoc_char_lm"],
    "modern": ["experiment=pydoc_char_lm_modern"],
    "modern-adamw": ["experiment=pydoc_char_lm_modern", "model.optimizer=adamw", "model.lr=1e-3"],
}


def train(recipe: str, steps: int, out: Path, seed: int) -> tuple[float, float]:
    """(validation loss, seconds) of one `genframe train` of `recipe` for `steps` steps."""
    args = [*RECIPES[recipe], f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            "trainer.enable_progress_bar=false", "num_samples=0", f"seed={seed}", f"hydra.run.dir={out}"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "genframe", "train", *args], capture_output=True, text=True,
                          env={**os.environ, "GENFRAME_OUTPUT_ROOT": str(out.parent)})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed: genframe train {' '.join(args)}\n{done.stderr[-2000:]}")
    return float(re.search(r"val/loss\s+([0-9.]+)", done.stdout).group(1)), seconds


def spread(values: list[float], fmt: str = "{:.4f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1)
    opts = parser.parse_args()
    results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(opts.rounds):
            order = list(RECIPES) if r % 2 == 0 else list(reversed(RECIPES))
            equal_steps = {}
            for recipe in order:
                loss, seconds = train(recipe, opts.steps, Path(tmp) / f"{recipe}-{r}", seed=r)
                equal_steps[recipe] = (loss, seconds)
                results.setdefault((recipe, "equal steps"), []).append((loss, seconds, opts.steps))
                print(f"round {r}: {recipe} {opts.steps} steps: val/loss {loss:.4f} in {seconds:.1f} s", flush=True)
            budget = equal_steps["gpt2"][1]
            for recipe in order:
                if recipe == "gpt2":
                    results.setdefault((recipe, "equal time"), []).append((*equal_steps[recipe], opts.steps))
                    continue
                steps = max(1, round(opts.steps * budget / equal_steps[recipe][1]))
                loss, seconds = train(recipe, steps, Path(tmp) / f"{recipe}-{r}-time", seed=r)
                results.setdefault((recipe, "equal time"), []).append((loss, seconds, steps))
                print(f"round {r}: {recipe} {steps} steps (the GPT-2 recipe's {budget:.0f} s): val/loss "
                      f"{loss:.4f} in {seconds:.1f} s", flush=True)
    print(f"\n{'recipe':<14} {'budget':<12} {'steps':>6} {'val/loss':>22} {'seconds':>18} {'vs gpt2 (nats)':>15}")
    for (recipe, budget), rows in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        losses = [row[0] for row in rows]
        base = [row[0] for row in results[("gpt2", budget)]]
        gain = statistics.median(b - x for b, x in zip(base, losses))
        print(f"{recipe:<14} {budget:<12} {int(statistics.median(row[2] for row in rows)):>6} "
              f"{spread(losses):>22} {spread([row[1] for row in rows], '{:.1f}'):>18} {gain:>15.4f}")


if __name__ == "__main__":
    main()
