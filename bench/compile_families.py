"""`trainer.compile=true` against eager, for every model family: does torch.compile pay,
compile time included?

    python bench/compile_families.py [--families vae,gan,...] [--size small] [--warmup 30]
        [--steps 20] [--threads N] [--json FILE]

For each family, two child processes run the real command, one after the other:
``genframe train experiment=<the family's preset> <size> trainer.compile=<false|true>``
with `bench/_loops.py`'s timed window (``logger=none callbacks=none``, no validation, no
samples; `warmup` untimed steps, then `steps` timed ones; the first step compiles, and a
shorter last batch of an epoch compiles again, for dynamic shapes, so the default warm-up
runs past the first epoch of the digits presets).
The families and sizes are `bench/family_overhead.py`'s.

Printed per family: the steady steps/s of each side and their ratio (compiled / eager,
higher = compile faster per step); each child's whole wall time (imports and compiling
included; each child compiles cold, with an empty inductor cache); the compile cost,
estimated as the wall-time difference less the steps' difference; and the break-even:
how many steps a run needs before the compiled one finishes first (``-`` when a compiled step is not faster). `--json FILE` also writes the
rows; `bench/run.py` (its `compile` entry) shows the printed table in its report. Results
go in docs/BENCHMARKS.md: `trainer.compile` stays off by
default wherever the break-even is beyond what the family's presets train.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _suite  # noqa: E402
import family_overhead  # noqa: E402


def run_side(family: str, size: str, compiled: bool, warmup: int, steps: int,
             threads: int | None) -> dict:
    """One child `genframe train` (`family_overhead.genframe_child`, compiling cold):
    steady steps/s, wall seconds, peak RSS MB."""
    rate, m = family_overhead.genframe_child(
        family, size, warmup, steps, threads, extra=[f"trainer.compile={str(compiled).lower()}"],
        cache_dirs=True)
    if rate is None:
        return {"error": f"exit {m.returncode}: {m.stderr.strip().splitlines()[-1:]}"}
    return {"steps_per_s": rate, "wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb}


def compare(family: str, args) -> dict:
    eager = run_side(family, args.size, False, args.warmup, args.steps, args.threads)
    compiled = run_side(family, args.size, True, args.warmup, args.steps, args.threads)
    row = {"family": family, "size": args.size, "eager": eager, "compiled": compiled}
    if "error" in eager or "error" in compiled:
        return row
    step_e, step_c = 1 / eager["steps_per_s"], 1 / compiled["steps_per_s"]
    total = args.warmup + args.steps + 1
    compile_s = (compiled["wall_s"] - eager["wall_s"]) - total * (step_c - step_e)
    row["ratio"] = compiled["steps_per_s"] / eager["steps_per_s"]
    row["compile_s"] = compile_s
    row["break_even_steps"] = compile_s / (step_e - step_c) if step_c < step_e else None
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| family | eager steps/s | compiled steps/s | ratio compiled/eager | wall eager / compiled (s) "
             "| compile cost (s) | break-even (steps) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ratio" not in r:
            err = r["eager"].get("error") or r["compiled"].get("error")
            lines.append(f"| {r['family']} {r['size']} | failed: {err} | | | | | |")
            continue
        e, c = r["eager"], r["compiled"]
        even = "-" if r["break_even_steps"] is None else f"{r['break_even_steps']:,.0f}"
        lines.append(f"| {r['family']} {r['size']} | {e['steps_per_s']:.2f} | {c['steps_per_s']:.2f} "
                     f"| **{r['ratio']:.3f}** | {e['wall_s']:.1f} / {c['wall_s']:.1f} "
                     f"| {r['compile_s']:.1f} | {even} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(family_overhead.FAMILIES),
                        help=f"comma-separated, of {', '.join(family_overhead.FAMILIES)}")
    parser.add_argument("--size", default="small", choices=["small", "medium"])
    parser.add_argument("--warmup", type=int, default=30,
                        help="untimed steps: the first compiles, and an epoch's short last batch recompiles")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the children")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(family_overhead.FAMILIES))
    if unknown:
        parser.error(f"unknown families {unknown}; known: {sorted(family_overhead.FAMILIES)}")
    _suite.set_threads(args.threads)  # the machine lines report it; the children get it below
    print("\n".join(_suite.machine_lines(_suite.machine_info())), flush=True)
    print(f"children: OMP_NUM_THREADS={args.threads or 'unset (torch: one thread per core)'}, "
          f"{args.warmup} untimed + {args.steps} timed steps, size {args.size}", flush=True)
    rows = []
    print(markdown([]), flush=True)  # the header; each family's row as it comes
    for family in families:
        rows.append(compare(family, args))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print("\nbreak-even: the steps a run needs before the compiled one finishes first "
          "('-': a compiled step is not faster, so never)\n\n" + markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
