"""What `genframe train` costs over a plain PyTorch loop, for every model family, at a
small and a medium size: training steps/s and peak memory; and the main job's wall time
and peak memory.

    python bench/family_overhead.py [--families vae,gan,...] [--sizes small,medium]
        [--rounds 3] [--warmup 2] [--steps 10] [--medium-steps 4] [--no-rss]
        [--main-job | --main-job-only] [--threads N] [--smoke] [--profile FAMILY:SIZE]
        [--json FILE]

Prints markdown tables (median and min-max over rounds, the ratio genframe/plain of each
round); `--json FILE` also writes them for `bench/run.py`. Results go in
docs/BENCHMARKS.md.

Each family trains from its `experiment=` preset on the preset's data (scikit-learn's
digits, the generated shapes, Python's pydoc prose); "small" and "medium" are the widths
in `FAMILIES` (the parameter counts are printed). The transformer's medium size is the
10.7M-parameter character GPT (6 layers, 6 heads, width 384, context 256).

- steps/s: `bench/_loops.py`'s two windows in this process, alternating (the first swaps
  each round): the real `genframe train` task (``logger=none callbacks=none``, no
  validation, no samples, a timing callback: the same set-up as bench/lm_throughput.py)
  against the same model, data, optimizers, schedule, clipping and EMA in a plain loop.
  Ratio genframe / plain: 1.0 means Lightning and genframe cost nothing per step.
- peak RSS: one child process per measurement (so peaks are separate), each training
  ``warmup + rss-steps`` steps: the real ``genframe train ...`` command (the same
  overrides, ``hydra.run.dir`` in a temporary folder) against ``python
  bench/family_overhead.py --child FAMILY:SIZE`` (the plain loop); peak RSS over the
  child's whole life (exit included) from a small launcher process (`_suite.run_measured`).
  Ratio genframe / plain (the issue's target for the 10.7M GPT: <= 1.2). The children's
  wall times (start-up included) are printed too; with --threads, the children get it as
  OMP_NUM_THREADS.
- the main job: ``genframe train experiment=digits_vae`` as configured (100 epochs,
  validation, checkpoints, 64 samples), once, in a temporary run directory: wall time and
  peak RSS (targets <= 60 s and <= 500 MB), with --threads as OMP_NUM_THREADS too.
  `bench/cli_startup.py` measures `genframe --help` and `genframe train --cfg job`.

`--profile FAMILY:SIZE` prints cProfile's top functions of one genframe window and one
plain window instead (where the per-step difference goes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _suite  # noqa: E402

# family -> (experiment, overrides of both sizes, {size: overrides})
FAMILIES: dict[str, tuple[str, list[str], dict[str, list[str]]]] = {
    "vae": ("digits_vae", [], {
        "small": [],
        "medium": ["model.block_out_channels=[64,128]", "model.latent_dim=32"]}),
    # The preset's monitor (val/fd) comes from its sample_metrics callback, off here.
    "gan": ("digits_gan", ["monitor=val/loss", "~callbacks.sample_metrics"], {
        "small": ["model.g_channels=[32,64]", "model.d_channels=[32,64]"],
        "medium": []}),
    "diffusion": ("digits_diffusion", [], {
        "small": ["model.block_out_channels=[32,64]"],
        "medium": []}),
    "transformer": ("pydoc_char_lm", [], {
        "small": [],
        "medium": ["model.n_layer=6", "model.n_head=6", "model.n_embd=384",
                   "model.block_size=256", "data.block_size=256"]}),
    # The modern recipe (rotary, RMSNorm, QK-norm, squared ReLU, Muon) at the same sizes.
    "transformer_modern": ("pydoc_char_lm_modern", [], {
        "small": [],
        "medium": ["model.n_layer=6", "model.n_head=6", "model.n_embd=384",
                   "model.block_size=256", "data.block_size=256"]}),
    "autoencoder": ("shapes_autoencoder", [], {
        "small": ["model.block_out_channels=[16,32,32]"],
        "medium": []}),
    "upscaler": ("shapes_upscaler", [], {
        "small": ["model.block_out_channels=[8,16,32]"],
        "medium": []}),
    "text2image": ("shapes_text2image", [], {
        "small": ["model.block_out_channels=[16,32,32]"],
        "medium": []}),
}
STEPS_PER_BATCH = {"gan": 2}  # optimizer steps a batch (Lightning's max_steps counts them)
RSS_TARGET = {("transformer", "medium"): 1.2}  # the issue's: genframe train / plain loop
MAIN_JOB = ["experiment=digits_vae"]
MAIN_TARGETS = {"wall_s": 60.0, "peak_rss_mb": 500.0}


def spec(family: str, size: str) -> tuple[str, list[str]]:
    experiment, common, sizes = FAMILIES[family]
    return experiment, [*common, *sizes[size]]


def steps_for(args, size: str) -> tuple[int, int]:
    return args.warmup, (args.steps if size == "small" else args.medium_steps)


def params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M"


# -- steps/s, in process -------------------------------------------------------------------

def speed(args, family: str, size: str) -> _suite.Comparison:
    import _loops

    experiment, overrides = spec(family, size)
    warmup, steps = steps_for(args, size)
    c = _suite.Comparison(f"{family} {size}", "steps/s", [], [], "plain loop")
    losses = {"genframe": set(), "plain": set()}
    model = None
    for r in range(args.rounds):
        sides = [("genframe", _loops.genframe_train_window), ("plain", _loops.plain_window)]

        def one_round():
            return {name: fn(experiment, overrides, warmup, steps, STEPS_PER_BATCH.get(family, 1))
                    for name, fn in (sides if r % 2 == 0 else sides[::-1])}

        got, foreign = _suite.quiet_round(one_round, max_wait=args.max_wait, retries=args.retries)
        for name, window in got.items():
            (c.genframe if name == "genframe" else c.peer).append(window.steps_per_s)
            losses[name].add(None if window.loss is None else round(window.loss, 4))
            model = window.model
        c.foreign_load.append(foreign)
        print(f"{family} {size} round {r + 1}: genframe {c.genframe[-1]:.2f}, plain {c.peer[-1]:.2f} "
              f"steps/s (others' load {foreign:.2f})", flush=True)
    c.name = f"{family} {size} ({params(model)} trainable)"
    same = losses["genframe"] == losses["plain"] and len(losses["plain"]) == 1
    c.note = (f"{steps} timed steps after {warmup}; last timed loss genframe "
              f"{sorted(losses['genframe'], key=str)}, plain {sorted(losses['plain'], key=str)}"
              + ("" if same else " (differ)"))
    return c


# -- peak RSS, one child per measurement -------------------------------------------------------

def genframe_command() -> str:
    return shutil.which("genframe") or os.path.join(os.path.dirname(sys.executable), "genframe")


def genframe_child(family: str, size: str, warmup: int, steps: int, threads: int | None,
                   extra: list[str] = (), cache_dirs: bool = False):
    """One child ``genframe train experiment=... <extra>`` with the timed window:
    (steps/s, `_suite.Measured`), steps/s None when it failed.

    `cache_dirs`: give the child empty torch.compile caches (a cold compile)."""
    import _loops

    experiment, overrides = spec(family, size)
    env = _suite.child_env()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        if cache_dirs:
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
            env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
        out = os.path.join(tmp, "timer.json")
        cmd = [genframe_command(), "train", f"experiment={experiment}", *overrides,
               *_loops.train_overrides(warmup, steps, out=out,
                                       steps_per_batch=STEPS_PER_BATCH.get(family, 1)),
               *extra, f"hydra.run.dir={tmp}/run"]
        m = _suite.run_measured(cmd, cwd=tmp, env=env)
        if m.returncode != 0:
            return None, m
        with open(out) as f:
            clock = json.load(f)["clock"]
    return (len(clock) - 1) / (clock[-1] - clock[0]), m


def rss_child(family: str, size: str, side: str, warmup: int, steps: int, threads: int | None):
    """(steps/s, peak RSS MB, wall s) of one child process."""
    if side == "genframe":
        rate, m = genframe_child(family, size, warmup, steps, threads)
        if rate is None:
            raise RuntimeError(f"genframe train ({family} {size}) exited {m.returncode}:\n{m.stderr[-3000:]}")
        return rate, m.peak_rss_mb, m.wall_s
    env = _suite.child_env()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{family}:{size}",
           "--warmup", str(warmup), "--steps", str(steps), "--medium-steps", str(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        m = _suite.run_measured(cmd, cwd=tmp, env=env)
    if m.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {m.returncode}:\n{m.stderr[-3000:]}")
    return _suite.parse_result(m.stdout)["steps_per_s"], m.peak_rss_mb, m.wall_s


def memory(args, family: str, size: str) -> tuple[_suite.Comparison, _suite.Comparison]:
    warmup, steps = args.warmup, args.rss_steps
    rss = _suite.Comparison(f"{family} {size}: peak RSS", "MB", [], [], "plain loop",
                            RSS_TARGET.get((family, size)), target_op="<=")
    wall = _suite.Comparison(f"{family} {size}: whole child process, {warmup + steps} steps",
                             "s", [], [], "plain loop")
    for r in range(args.rss_rounds):
        def one_round():
            return {side: rss_child(family, size, side, warmup, steps, args.threads)
                    for side in (("genframe", "plain") if r % 2 == 0 else ("plain", "genframe"))}

        got, foreign = _suite.quiet_round(one_round, max_wait=args.max_wait, retries=args.retries)
        for side, (_, peak, seconds) in got.items():
            (rss.genframe if side == "genframe" else rss.peer).append(peak)
            (wall.genframe if side == "genframe" else wall.peer).append(seconds)
        rss.foreign_load.append(foreign)
        wall.foreign_load.append(foreign)
        print(f"{family} {size} children: peak RSS genframe {rss.genframe[-1]:.0f} MB, plain "
              f"{rss.peer[-1]:.0f} MB; wall {wall.genframe[-1]:.1f} s / {wall.peer[-1]:.1f} s "
              f"(others' load {foreign:.2f})", flush=True)
    return rss, wall


def child(args) -> None:
    """`--child FAMILY:SIZE`: one plain window, then a RESULT line (for `rss_child`)."""
    import _loops

    family, size = args.child.split(":")
    experiment, overrides = spec(family, size)
    warmup, steps = steps_for(args, size)
    window = _loops.plain_window(experiment, overrides, warmup, steps)
    print(_suite.result_line({"steps_per_s": window.steps_per_s, "loss": window.loss,
                              "peak_rss_mb": _suite.peak_rss_mb()}))


# -- the main job --------------------------------------------------------------------------------

def main_job(args) -> list[str]:
    lines = []
    for r in range(args.main_job_rounds):
        def one_round():
            env = _suite.child_env()
            if args.threads:
                env["OMP_NUM_THREADS"] = str(args.threads)
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [genframe_command(), "train", *MAIN_JOB, f"hydra.run.dir={tmp}/run"]
                return cmd, _suite.run_measured(cmd, cwd=tmp, env=env)

        (cmd, m), foreign = _suite.quiet_round(one_round, max_wait=args.max_wait,
                                               retries=min(args.retries, 1))
        if m.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {m.returncode}:\n{m.stderr[-3000:]}")
        ok_wall = m.wall_s <= MAIN_TARGETS["wall_s"]
        ok_rss = m.peak_rss_mb <= MAIN_TARGETS["peak_rss_mb"]
        line = (f"genframe train {' '.join(MAIN_JOB)}: wall {m.wall_s:.1f} s "
                f"(target <= {MAIN_TARGETS['wall_s']:.0f} s: {'met' if ok_wall else 'MISSED'}), "
                f"peak RSS {m.peak_rss_mb:.0f} MB (target <= {MAIN_TARGETS['peak_rss_mb']:.0f} MB: "
                f"{'met' if ok_rss else 'MISSED'}), others' load {foreign:.2f}")
        print(line, flush=True)
        tail = [s for s in m.stdout.splitlines() if s.strip()][-12:]
        print("\n".join("    " + s for s in tail), flush=True)
        lines.append(line)
    return lines


# -- profile -------------------------------------------------------------------------------------

def profile(args) -> None:
    import _loops

    family, size = args.profile.split(":")
    experiment, overrides = spec(family, size)
    warmup, steps = steps_for(args, size)
    for label, fn in [("genframe train", _loops.genframe_train_window), ("plain loop", _loops.plain_window)]:
        holder = {}
        text = _suite.python_profile(
            lambda: holder.setdefault("w", fn(experiment, overrides, warmup, steps,
                                              STEPS_PER_BATCH.get(family, 1))),
            rows=args.profile_rows, sort=args.profile_sort)
        w = holder["w"]
        print(f"\n== cProfile, {label}, {family} {size}: {w.steps_per_s:.2f} steps/s, median step "
              f"{w.median_step_ms:.1f} ms (profiled; set-up included in the table)")
        print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps, small size")
    parser.add_argument("--medium-steps", type=int, default=4, help="timed steps, medium size")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS children")
    parser.add_argument("--rss-steps", type=int, default=3, help="steps after warm-up in a child")
    parser.add_argument("--rss-rounds", type=int, default=1)
    parser.add_argument("--no-speed", action="store_true", help="skip the in-process steps/s")
    parser.add_argument("--main-job", action="store_true", help="also time the main job")
    parser.add_argument("--main-job-only", action="store_true", help="only the main job")
    parser.add_argument("--main-job-rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="seconds a round waits for other processes to go quiet")
    parser.add_argument("--retries", type=int, default=2,
                        help="times a round is repeated when other processes loaded the machine")
    parser.add_argument("--smoke", action="store_true", help="vae small only, 1 round, a few steps")
    parser.add_argument("--profile", default=None, metavar="FAMILY:SIZE", help="print profiles instead")
    parser.add_argument("--profile-rows", type=int, default=25)
    parser.add_argument("--profile-sort", default="tottime")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    _suite.quiet_logs()
    _suite.set_threads(args.threads)
    allocator = _suite.same_allocator()
    if args.child:
        child(args)
        return
    if args.profile:
        profile(args)
        return
    families, sizes = args.families.split(","), args.sizes.split(",")
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {list(FAMILIES)}")
    if args.smoke:
        families, sizes, args.rounds, args.warmup, args.steps, args.rss_steps = ["vae"], ["small"], 1, 1, 3, 1
        args.max_wait, args.retries = min(args.max_wait, 5.0), 0
    speeds, memories, main_lines = [], [], []
    print(allocator, flush=True)
    if not args.main_job_only:
        for family in families:
            for size in sizes:
                if not args.no_speed:
                    with _suite.section(f"steps/s: {family} {size}"):
                        speeds.append(speed(args, family, size))
                if not args.no_rss:
                    with _suite.section(f"peak RSS: {family} {size}"):
                        memories.extend(memory(args, family, size))
    if args.main_job or args.main_job_only:
        with _suite.section("the main job"):
            main_lines = main_job(args)
    comparisons = speeds + memories
    if comparisons:
        _suite.report(comparisons, args.json, "family_overhead", {"main_job": main_lines})
        if speeds:
            ratios = [statistics.median(c.ratio) for c in speeds]
            print(f"steps/s ratio genframe/plain over {len(speeds)} family sizes: median "
                  f"{statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}")
    elif args.json:
        with open(args.json, "w") as f:
            json.dump({"script": "family_overhead", "machine": _suite.machine_info(),
                       "comparisons": [], "main_job": main_lines}, f, indent=1)
    for line in main_lines:
        print(line)


if __name__ == "__main__":
    main()
