"""Language-model throughput: genframe training against a plain PyTorch loop, and
generation with and without the key/value cache, side by side in one run.

    python bench/lm_throughput.py [--steps 200] [--warmup 20] [--rounds 3] [--threads 1]

Training: the `experiment=pydoc_char_lm` model (0.8M parameters, batches of 12 x 64
tokens) trained through the real `genframe train` task in-process, against the same
`Transformer`, DataLoader, AdamW and LR schedule driven by a hand-written loop (forward,
backward, clip to 1.0, step, schedule, zero_grad). Both time `steps` optimizer steps
after `warmup` untimed ones, from the start of step `warmup` to the start of step
`warmup + steps`, so every per-step cost of each loop (Lightning's hooks, logging,
clipping, scheduler, the batch fetch) is inside the window and set-up is not. The two
alternate (the first one swaps each round); the target is a median ratio of at least
0.95. Both seed 0, fp32, CPU, the same torch thread count, so their last timed losses
should agree too.

Generation: greedy (temperature 0), no stop strings, so the cached and uncached paths
make the same number of tokens and must make the same texts; a mismatch is printed. The
0.8M model is the one the last genframe round trained (so its texts are not just one
repeated character), the 10.8M one (context 256) is untrained: the speed does not depend
on the weights.

One torch thread by default: on two shared cores, two OpenMP threads beside another busy
process ran 5-10x slower and far noisier (as tests/conftest.py notes); use --threads 2
on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import statistics
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch

EXPERIMENT = "pydoc_char_lm"
TARGET = 0.95
PROMPTS = ["The ", "In a", "For ", "This", "When", "Each", "If t", "A mo"]  # 4 chars each


class StepTimer(pl.Callback):
    """Clock readings at the start of train batches `warmup` .. `warmup + steps` (so
    the trainer needs ``max_steps >= warmup + steps + 1``); also keeps the loss of the
    last timed batch and the torch thread count during training."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.seen = 0
        self.clock: list[float] = []
        self.loss = None
        self.threads = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.threads = torch.get_num_threads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.warmup <= self.seen <= self.warmup + self.steps:
            self.clock.append(time.perf_counter())
        self.seen += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.seen == self.warmup + self.steps:  # the last timed batch
            self.loss = float(outputs["loss"])


def genframe_run(warmup: int, steps: int):
    """Train through `genframe train`; (clock readings, last timed loss, threads, the
    trained model)."""
    from genframe.config import compose
    from genframe.tasks.train import train

    with tempfile.TemporaryDirectory() as out:
        cfg = compose("train", [
            f"experiment={EXPERIMENT}", "logger=none", "callbacks=none",
            f"+callbacks.timer._target_={__name__}.StepTimer",
            f"+callbacks.timer.warmup={warmup}", f"+callbacks.timer.steps={steps}",
            "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", f"trainer.max_steps={warmup + steps + 1}",
            "num_samples=0", f"paths.output_dir={out}",
        ])
        with contextlib.redirect_stdout(io.StringIO()):  # the run's own report
            result = train(cfg)
    timer = next(c for c in result["trainer"].callbacks if isinstance(c, StepTimer))
    return timer.clock, timer.loss, timer.threads, result["model"]


def plain_run(warmup: int, steps: int):
    """The same model, data and optimiser in a hand-written loop; as `genframe_run`."""
    from genframe_plugins.transformer.model import Transformer

    from genframe.config import compose
    from genframe.tasks.build import build_data, to_plain

    cfg = compose("train", [f"experiment={EXPERIMENT}"])
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # as `train` does
    data = build_data(cfg.data)
    data.setup("fit")
    kwargs = {k: v for k, v in to_plain(cfg.model).items() if k != "name"}
    # genframe decays over the trainer's max_steps; without a trainer, say so.
    kwargs.update(vocab_size=data.vocab_size, lr_decay_steps=warmup + steps + 1)
    model = Transformer(**kwargs)
    model.set_tokenizer(data.tokenizer)
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    params = [p for group in opt.param_groups for p in group["params"]]
    clip = model.hparams.grad_clip
    model.train()
    loader = data.train_dataloader()
    batches = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch
    clock, loss_value = [], None
    for i, batch in enumerate(batches):
        if i >= warmup:
            clock.append(time.perf_counter())
        if i == warmup + steps:
            break
        nll, weights, _ = model.token_nll(batch)  # the loss of Transformer.training_step
        loss = (nll * weights).sum() / weights.sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if i == warmup + steps - 1:
            loss_value = loss.item()
    return clock, loss_value, torch.get_num_threads(), model


def large_model(tokenizer):
    """An untrained 6-layer, 6-head, width-384 model with context 256 (10.8M parameters)."""
    from genframe_plugins.transformer.model import Transformer

    torch.manual_seed(0)
    model = Transformer(vocab_size=tokenizer.vocab_size, block_size=256, n_layer=6, n_head=6,
                        n_embd=384)
    model.set_tokenizer(tokenizer)
    return model.eval()


def time_generate(model, batch: int, new: int, use_cache: bool):
    start = time.perf_counter()
    out = model.generate(batch, condition={"prompt": PROMPTS[:batch]}, seed=0,
                         max_new_tokens=new, temperature=0.0, use_cache=use_cache)
    seconds = time.perf_counter() - start
    return sum(out.per_sample["tokens_generated"]) / seconds, out.texts


def params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both loops")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning|lightning_fabric")

    # -- training ----------------------------------------------------------------------
    from genframe.config import compose

    exp = compose("train", [f"experiment={EXPERIMENT}"])
    batch_size, block_size = exp.data.batch_size, exp.data.block_size
    tokens_per_step = batch_size * block_size
    rows, losses, threads = [], {"genframe": set(), "plain": set()}, set()
    for r in range(args.rounds):
        runs = [("genframe", genframe_run), ("plain", plain_run)]
        speed, step_ms = {}, {}
        for name, fn in runs if r % 2 == 0 else runs[::-1]:
            clock, loss, n, model = fn(args.warmup, args.steps)
            if name == "genframe":
                trained = model.eval()
            speed[name] = args.steps * tokens_per_step / (clock[-1] - clock[0])
            step_ms[name] = 1000 * statistics.median(b - a for a, b in itertools.pairwise(clock))
            losses[name].add(round(loss, 5))
            threads.add(n)
        rows.append((speed["genframe"], speed["plain"], speed["genframe"] / speed["plain"],
                     step_ms["genframe"], step_ms["plain"], step_ms["plain"] / step_ms["genframe"]))
    print(f"training experiment={EXPERIMENT}: batches of {batch_size} x {block_size} tokens, "
          f"{args.steps} timed steps after {args.warmup}, fp32 CPU, torch threads {sorted(threads)}")
    print(f"{'round':<7} {'genframe tok/s':>15} {'plain tok/s':>12} {'ratio':>6} | "
          f"{'genframe ms/step':>16} {'plain ms/step':>13} {'ratio':>6}")
    for i, row in enumerate([*rows, tuple(statistics.median(c) for c in zip(*rows))], 1):
        label = str(i) if i <= len(rows) else "median"
        g, p, ratio, gms, pms, ms_ratio = row
        print(f"{label:<7} {g:>15.0f} {p:>12.0f} {ratio:>6.3f} | {gms:>16.1f} {pms:>13.1f} "
              f"{ms_ratio:>6.3f}")
    print("tok/s over the whole timed window; ms/step: the median step (less sensitive to "
          "bursts of other load), its ratio plain / genframe")
    ratio = statistics.median(r[2] for r in rows)
    verdict = "met" if ratio >= TARGET else "NOT MET"
    print(f"target: median ratio genframe/plain tokens/s >= {TARGET}: {verdict} ({ratio:.3f})")
    same = losses["genframe"] == losses["plain"] and len(losses["plain"]) == 1
    print(f"last timed loss: genframe {sorted(losses['genframe'])}, plain {sorted(losses['plain'])}"
          + ("" if same else "  <-- DIFFERENT (same seed, data and optimiser expected)"))

    # -- generation --------------------------------------------------------------------
    small, large = trained, large_model(trained.tokenizer)
    cases = [(small, 64, 1, 60), (small, 64, 8, 60), (large, 256, 1, 250)]
    for model, _, batch, _ in cases:  # warm-up of each path and shape
        for use_cache in (True, False):
            time_generate(model, batch, 4, use_cache)
    results = []
    for model, ctx, batch, new in cases:
        speeds = {True: [], False: []}
        texts = {True: set(), False: set()}
        for r in range(args.rounds):
            for use_cache in (True, False) if r % 2 == 0 else (False, True):
                speed, out = time_generate(model, batch, new, use_cache)
                speeds[use_cache].append(speed)
                texts[use_cache].add(tuple(out))
        same = len(texts[True] | texts[False]) == 1
        if not same:
            print(f"MISMATCH ({params(model)}, batch {batch}): cached {sorted(texts[True])!r}\n"
                  f"  uncached {sorted(texts[False])!r}")
        cached, uncached = statistics.median(speeds[True]), statistics.median(speeds[False])
        results.append((f"{params(model)} ctx {ctx}", batch, new, cached, uncached, same))
    print(f"\ngeneration: greedy, {len(PROMPTS[0])}-token prompts, median of {args.rounds} rounds")
    print(f"{'model':<14} {'batch':>5} {'new':>4} {'cached tok/s':>13} {'uncached tok/s':>15} "
          f"{'speed-up':>9} {'same texts':>11}")
    for label, batch, new, cached, uncached, same in results:
        print(f"{label:<14} {batch:>5} {new:>4} {cached:>13.0f} {uncached:>15.0f} "
              f"{cached / uncached:>8.2f}x {'yes' if same else 'NO: MISMATCH':>11}")
    if not all(r[-1] for r in results):
        print("MISMATCH: the cached and uncached paths generated different texts")


if __name__ == "__main__":
    main()
