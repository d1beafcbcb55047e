"""What ``self.log`` costs, side by side: Lightning's own path, which moves the logged
metric to the value's device on every call (`_ResultMetric.to` walks the whole metric),
against genframe's `genframe.loggers.skip_repeated_metric_moves`, which skips a move to
the device the metric is already on.

    python bench/log_cost.py                      # 5 rounds: per call, then the small GAN
    python bench/log_cost.py --families gan,vae --rounds 3 --threads 1
    python bench/log_cost.py --smoke

1. Per call: ``_ResultCollection.log`` of one scalar (on_step and on_epoch, a batch size),
   `--calls` times, microseconds a call, both sides in each round (which goes first
   alternates from round to round).
2. Per training step: `genframe train` steps/s of each family in `--families` (their
   small sizes from bench/family_overhead.py; the GAN logs six values a batch, the VAE
   three) with Lightning's path and with genframe's, against the plain loop in the same
   round; ratio genframe/plain for each.

Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _suite  # noqa: E402


class LightningPath:
    """Within the block, `genframe train` keeps Lightning's own `_ResultMetric.to` (the
    skip is taken out and `build_trainer` is kept from putting it back)."""

    def __enter__(self):
        from pytorch_lightning.trainer.connectors.logger_connector import result

        import genframe.loggers as loggers

        self.result, self.loggers = result, loggers
        self.installed = result._ResultMetric.to
        self.skip = loggers.skip_repeated_metric_moves
        original = getattr(self.installed, "_genframe_original", None)
        if original is not None:
            result._ResultMetric.to = original
        loggers.skip_repeated_metric_moves = lambda: False
        return self

    def __exit__(self, *exc):
        self.result._ResultMetric.to = self.installed
        self.loggers.skip_repeated_metric_moves = self.skip


def microseconds_a_call(calls: int) -> float:
    from pytorch_lightning.trainer.connectors.logger_connector.result import _ResultCollection

    collection = _ResultCollection(training=True)
    value = torch.tensor(0.5)
    for _ in range(20):  # registered, moved once
        collection.log("training_step", "train/loss", value, on_step=True, on_epoch=True, batch_size=64)
    start = time.perf_counter()
    for _ in range(calls):
        collection.log("training_step", "train/loss", value, on_step=True, on_epoch=True, batch_size=64)
    return (time.perf_counter() - start) / calls * 1e6


def per_call(args) -> _suite.Comparison:
    from genframe.loggers import skip_repeated_metric_moves

    if not skip_repeated_metric_moves():
        raise SystemExit("this Lightning's _ResultMetric.to is not the one genframe's skip is made "
                         "for: both sides would run Lightning's path")
    c = _suite.Comparison("self.log: one _ResultCollection.log call", "calls/ms", [], [],
                          "Lightning's to()")

    def one(side: str) -> float:
        if side == "genframe":
            return microseconds_a_call(args.calls)
        with LightningPath():
            return microseconds_a_call(args.calls)

    for r in range(args.rounds):
        sides = ["genframe", "lightning"] if r % 2 == 0 else ["lightning", "genframe"]
        got, foreign = _suite.quiet_round(lambda: {side: one(side) for side in sides},
                                          max_wait=args.max_wait, retries=args.retries)
        c.genframe.append(1e3 / got["genframe"])
        c.peer.append(1e3 / got["lightning"])
        c.foreign_load.append(foreign)
    c.note = (f"{args.calls} calls a side; microseconds a call: genframe "
              f"{1e3 / statistics.median(c.genframe):.0f}, Lightning {1e3 / statistics.median(c.peer):.0f}")
    return c


def per_step(args, family: str) -> list[_suite.Comparison]:
    import _loops
    import family_overhead

    experiment, overrides = family_overhead.spec(family, "small")
    per_batch = family_overhead.STEPS_PER_BATCH.get(family, 1)
    windows = {"genframe": [], "lightning": [], "plain": []}
    order = ["genframe", "lightning", "plain"]
    loads = []

    def one(side: str) -> float:
        if side == "plain":
            return _loops.plain_window(experiment, overrides, args.warmup, args.steps, per_batch).steps_per_s
        with LightningPath() if side == "lightning" else contextlib.nullcontext():
            return _loops.genframe_train_window(experiment, overrides, args.warmup, args.steps,
                                                per_batch).steps_per_s

    for r in range(args.rounds):
        sides = order if r % 2 == 0 else order[::-1]
        got, foreign = _suite.quiet_round(lambda: {side: one(side) for side in sides},
                                          max_wait=args.max_wait, retries=args.retries)
        for side, rate in got.items():
            windows[side].append(rate)
        loads.append(foreign)
        print(f"{family} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in windows.items())
              + f" steps/s (others' load {foreign:.2f})", flush=True)
    return [_suite.Comparison(f"{family} small: genframe train steps/s, {label}", "steps/s",
                              windows[side], windows["plain"], "plain loop", foreign_load=loads)
            for side, label in (("genframe", "genframe's self.log"),
                                ("lightning", "Lightning's self.log"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="self.log calls a side and round")
    parser.add_argument("--families", default="gan", help="comma-separated; '' for none")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smoke", action="store_true", help="1 round, 200 calls, 2 GAN steps")
    parser.add_argument("--json", default=None, help="also write the table here (for bench/run.py)")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="seconds to wait for a quiet machine before each round")
    parser.add_argument("--retries", type=int, default=2, help="repeats of a round others disturbed")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.calls, args.warmup, args.steps = 1, 200, 1, 2
        args.max_wait, args.retries = min(args.max_wait, 5.0), 0
    _suite.set_threads(args.threads)
    _suite.quiet_logs()
    print(f"allocator: {_suite.same_allocator()}")
    comparisons = [per_call(args)]
    for family in filter(None, args.families.split(",")):
        comparisons += per_step(args, family)
    _suite.report(comparisons, args.json, "log_cost.py")


if __name__ == "__main__":
    main()
