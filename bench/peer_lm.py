"""genframe's GPT against Hugging Face transformers' `GPT2LMHeadModel` of the same shape:
training tokens/s and cached greedy generation tokens/s, side by side in one process.

    python bench/peer_lm.py [--sizes 0.8M,10.7M] [--rounds 3] [--warmup 10] [--steps 100]
        [--large-steps 5] [--gen-seconds 1] [--threads N] [--smoke] [--profile] [--json FILE]

Needs the `bench` extra (`pip install -e ".[bench]"`: transformers). Prints a markdown
table (median and min-max over rounds, the ratio of each round, the target); `--json
FILE` also writes it for `bench/run.py`. Results go in docs/BENCHMARKS.md.

Sizes (both on `experiment=pydoc_char_lm`'s character data, batches of 12 windows):

- ``0.8M``: the experiment as it is: 4 layers, 4 heads, width 128, context 64.
- ``10.7M``: nanoGPT's character size (`model=transformer_mini` without dropout): 6
  layers, 6 heads, width 384, context 256 (`data.block_size=256`).

transformers' side: ``GPT2Config(vocab_size, n_positions=block_size, n_embd, n_layer,
n_head, no dropout)`` with its defaults otherwise (biases, tied embeddings, ``gelu_new``,
SDPA attention); genframe's GPT has no biases and exact GELU, so its parameter count is a
little lower (both are printed).

Training (tokens/s over `steps` optimizer steps after `warmup`, timed as
bench/lm_throughput.py does; the three alternate, the first one rotating each round):

- ``genframe train``: the real task in process (`bench/_loops.py`: ``logger=none
  callbacks=none``, no validation, no samples), so Lightning's loop is included;
- ``genframe plain``: the same model, data and AdamW/schedule/clipping in a plain loop;
- ``transformers plain``: `GPT2LMHeadModel` on the same data module's batches, the same
  loss (mean next-token cross-entropy), AdamW (lr 1e-3, betas 0.9/0.95, weight decay 0.1
  on matrices and embeddings), warm-up/cosine schedule and clipping to 1.0.

Ratios: genframe train / transformers plain (the issue's whole-run target >= 1.3 at 0.8M),
genframe plain / transformers plain (the networks alone) and genframe train / genframe
plain (Lightning's cost; bench/lm_throughput.py's measure, target >= 1.00).

Generation: greedy, 4-character prompts (bench/lm_throughput.py's), no stop strings, the
key/value cache on: genframe's ``model.generate(..., temperature=0, use_cache=True)``
against transformers' ``generate(do_sample=False, use_cache=True, min_new_tokens=
max_new_tokens)`` (no end-of-text token, so both always make every token). Untrained
weights (the speed does not depend on them). Each side repeats its call until
`--gen-seconds` have passed (a 60-token generation alone lasts ~0.1 s). Target: genframe /
transformers >= 1.2.

`--profile` prints torch.profiler's and cProfile's tables of one cached generation of
each side at the largest size instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _loops  # noqa: E402
import _suite  # noqa: E402
from lm_throughput import PROMPTS  # noqa: E402

EXPERIMENT = "pydoc_char_lm"
SIZES = {
    "0.8M": [],
    "10.7M": ["model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.block_size=256",
              "data.block_size=256"],
}
# (batch, new tokens) of the generation cases per size; the prompt is 4 tokens.
GENERATION = {"0.8M": [(1, 60), (8, 60)], "10.7M": [(1, 250), (8, 250)]}
TARGETS = {"train_vs_hf": 1.3, "train_vs_plain": 1.0, "generate": 1.2}


def hf_model(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def hf_like(gf_model):
    hp = gf_model.hparams
    return hf_model(hp.vocab_size, hp.block_size, hp.n_layer, hp.n_head, hp.n_embd)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


class HFTrainer:
    """transformers' GPT-2 in a plain loop over the data module genframe builds."""

    def __init__(self, overrides: list[str]) -> None:
        import tempfile

        from genframe.tasks.train import prepare_training

        with tempfile.TemporaryDirectory() as out:
            self.cfg = _loops.compose_train(EXPERIMENT, overrides, out, ["logger=none", "callbacks=none"])
            prepared = prepare_training(self.cfg)
        self.data, self.gf_model = prepared.data, prepared.model
        self.data.setup("fit")

    def window(self, warmup: int, steps: int) -> _loops.Window:
        from genframe_plugins.transformer.model import WarmupCosine

        hp = self.gf_model.hparams
        model = hf_like(self.gf_model).train()
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, WarmupCosine(hp.warmup_steps, warmup + steps + 1, hp.min_lr_ratio))
        clock, loss = [], None
        for _, batch in _loops.timed_batches(self.data.train_dataloader(), warmup, steps, clock):
            tokens = batch["tokens"]
            x, y = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
            logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, hp.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return _loops.Window(clock, float(loss), torch.get_num_threads(), model)


def train_comparisons(args, size: str, tokens_per_step: int):
    overrides = SIZES[size]
    warmup, steps = (args.warmup, args.steps) if size == "0.8M" else (args.large_warmup, args.large_steps)
    hf = HFTrainer(overrides)
    speeds = {"train": [], "plain": [], "hf": []}
    loads = []
    sides = {
        "train": lambda: _loops.genframe_train_window(EXPERIMENT, overrides, warmup, steps),
        "plain": lambda: _loops.plain_window(EXPERIMENT, overrides, warmup, steps),
        "hf": lambda: hf.window(warmup, steps),
    }
    order = list(sides)
    models = {}
    for r in range(args.rounds):
        def one_round():
            got = {}
            for name in order[r % 3:] + order[:r % 3]:
                window = sides[name]()
                got[name] = window.steps_per_s * tokens_per_step
                models[name] = window.model
            return got

        got, foreign = _suite.quiet_round(one_round, max_wait=args.max_wait, retries=args.retries)
        for name, value in got.items():
            speeds[name].append(value)
        loads.append(foreign)
        print(f"{size} round {r + 1}: tokens/s genframe train {speeds['train'][-1]:.0f}, genframe plain "
              f"{speeds['plain'][-1]:.0f}, transformers plain {speeds['hf'][-1]:.0f} "
              f"(others' load {foreign:.2f})", flush=True)
    gf_params, hf_params = count(models["plain"]), count(models["hf"])
    note = (f"parameters: genframe {gf_params:,}, transformers {hf_params:,}; {steps} timed steps "
            f"after {warmup}, {tokens_per_step} tokens a step")
    label = f"char GPT {size}"
    return [
        _suite.Comparison(f"{label}: train tokens/s, genframe train vs transformers plain loop",
                          "tokens/s", speeds["train"], speeds["hf"], "transformers plain",
                          TARGETS["train_vs_hf"] if size == "0.8M" else None, note=note,
                          foreign_load=loads),
        _suite.Comparison(f"{label}: train tokens/s, genframe plain vs transformers plain loop",
                          "tokens/s", speeds["plain"], speeds["hf"], "transformers plain",
                          foreign_load=loads),
        _suite.Comparison(f"{label}: train tokens/s, genframe train vs genframe plain loop",
                          "tokens/s", speeds["train"], speeds["plain"], "genframe plain",
                          TARGETS["train_vs_plain"] if size == "0.8M" else None,
                          foreign_load=loads),
    ], models["train"].tokenizer


def repeated(call, min_seconds: float) -> float:
    """Tokens/s of `call()` (which returns the tokens it made), called again until
    `min_seconds` have passed: one short generation is too brief to time on its own."""
    made, start = 0, time.perf_counter()
    while True:
        made += call()
        seconds = time.perf_counter() - start
        if seconds >= min_seconds:
            return made / seconds


def gf_generate(model, batch: int, new: int, min_seconds: float = 0.0) -> float:
    def call() -> int:
        out = model.generate(batch, condition={"prompt": PROMPTS[:batch]}, seed=0,
                             max_new_tokens=new, temperature=0.0, use_cache=True)
        made = sum(out.per_sample["tokens_generated"])
        assert made == batch * new, f"genframe made {made} tokens, expected {batch * new}"
        return made

    return repeated(call, min_seconds)


def hf_generate(model, ids: torch.Tensor, new: int, min_seconds: float = 0.0) -> float:
    @torch.no_grad()
    def call() -> int:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             use_cache=True, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        made = out[:, ids.shape[1]:].numel()
        assert made == ids.shape[0] * new, f"transformers made {made} tokens, expected {ids.shape[0] * new}"
        return made

    return repeated(call, min_seconds)


def generation_models(size: str, tokenizer):
    """genframe's Transformer (untrained, with the data's tokenizer) and its GPT-2 twin."""
    from genframe.config import compose
    from genframe.tasks.build import to_plain
    from genframe_plugins.transformer.model import Transformer

    cfg = compose("train", [f"experiment={EXPERIMENT}", *SIZES[size], "paths.output_dir=."])
    kwargs = {k: v for k, v in to_plain(cfg.model).items() if k != "name"}
    kwargs["vocab_size"] = tokenizer.vocab_size
    torch.manual_seed(0)
    gf = Transformer(**kwargs)
    gf.set_tokenizer(tokenizer)
    return gf.eval(), hf_like(gf).eval()


def generation_comparisons(args, size: str, tokenizer):
    gf, hf = generation_models(size, tokenizer)
    out = []
    for batch, new in GENERATION[size]:
        ids = torch.tensor([tokenizer.encode(p) for p in PROMPTS[:batch]])  # (B, 4)
        gf_generate(gf, batch, 4)  # warm-up of both paths
        hf_generate(hf, ids, 4)
        c = _suite.Comparison(
            f"char GPT {size}: cached greedy generation tokens/s, batch {batch}, {ids.shape[1]}+{new} tokens",
            "tokens/s", [], [], "transformers generate", TARGETS["generate"],
            note=f"parameters: genframe {count(gf):,}, transformers {count(hf):,}")
        for r in range(args.rounds):
            def one_round():
                got = {}
                for side in (("gf", "hf") if r % 2 == 0 else ("hf", "gf")):
                    got[side] = (gf_generate(gf, batch, new, args.gen_seconds) if side == "gf"
                                 else hf_generate(hf, ids, new, args.gen_seconds))
                return got

            got, foreign = _suite.quiet_round(one_round, max_wait=args.max_wait, retries=args.retries)
            c.genframe.append(got["gf"])
            c.peer.append(got["hf"])
            c.foreign_load.append(foreign)
        print(f"{size} generation batch {batch}: genframe {c.genframe} transformers {c.peer} tokens/s",
              flush=True)
        out.append(c)
    return out


def profile(args) -> None:
    from genframe.config import compose
    from genframe.tasks.build import build_data

    size = args.sizes[-1]
    cfg = compose("train", [f"experiment={EXPERIMENT}", *SIZES[size], "paths.output_dir=."])
    data = build_data(cfg.data)
    data.setup("fit")
    gf, hf = generation_models(size, data.tokenizer)
    batch, new = GENERATION[size][0]
    ids = torch.tensor([data.tokenizer.encode(p) for p in PROMPTS[:batch]])
    gf_generate(gf, batch, 4)
    hf_generate(hf, ids, 4)
    case = f"{size}, batch {batch}, {new} new tokens"
    for label, fn in [(f"genframe generate {case}", lambda: gf_generate(gf, batch, new)),
                      (f"transformers generate {case}", lambda: hf_generate(hf, ids, new))]:
        print(f"\n== torch.profiler: {label} ({fn():.0f} tokens/s unprofiled)")
        print(_suite.torch_profile(fn, rows=args.profile_rows))
        print(f"\n== cProfile: {label}")
        print(_suite.python_profile(fn, rows=args.profile_rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.8M,10.7M", help=f"comma-separated, of {list(SIZES)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps, 0.8M")
    parser.add_argument("--steps", type=int, default=100, help="timed steps, 0.8M")
    parser.add_argument("--large-warmup", type=int, default=1, help="untimed steps, 10.7M")
    parser.add_argument("--large-steps", type=int, default=5, help="timed steps, 10.7M")
    parser.add_argument("--gen-seconds", type=float, default=1.0,
                        help="each generation side repeats its call until this many seconds")
    parser.add_argument("--no-train", action="store_true", help="generation only")
    parser.add_argument("--no-generate", action="store_true", help="training only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--max-wait", type=float, default=120.0,
                        help="seconds a round waits for other processes to go quiet")
    parser.add_argument("--retries", type=int, default=2,
                        help="times a round is repeated when other processes loaded the machine")
    parser.add_argument("--smoke", action="store_true", help="0.8M only, 1 round, a few steps and tokens")
    parser.add_argument("--profile", action="store_true", help="print profiles instead")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.sizes = args.sizes.split(",")
    unknown = set(args.sizes) - set(SIZES)
    if unknown:
        parser.error(f"unknown sizes {sorted(unknown)}; choose from {list(SIZES)}")
    if args.smoke:
        args.sizes, args.rounds, args.warmup, args.steps = ["0.8M"], 1, 2, 5
        args.max_wait, args.retries, args.gen_seconds = 5.0, 0, 0.0
        GENERATION["0.8M"] = [(8, 16)]
    _suite.quiet_logs()
    _suite.set_threads(args.threads)
    print(_suite.same_allocator())
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.profile:
        profile(args)
        return
    from genframe.config import compose

    comparisons = []
    for size in args.sizes:
        cfg = compose("train", [f"experiment={EXPERIMENT}", *SIZES[size], "paths.output_dir=."])
        tokens_per_step = cfg.data.batch_size * cfg.data.block_size
        tokenizer = None
        if not args.no_train:
            with _suite.section(f"training, {size}"):
                rows, tokenizer = train_comparisons(args, size, tokens_per_step)
                comparisons += rows
        if not args.no_generate:
            if tokenizer is None:
                from genframe.tasks.build import build_data

                data = build_data(cfg.data)
                data.setup("fit")
                tokenizer = data.tokenizer
            with _suite.section(f"generation, {size}"):
                comparisons += generation_comparisons(args, size, tokenizer)
    _suite.report(comparisons, args.json, "peer_lm")


if __name__ == "__main__":
    main()
