"""The feedback loop on a language model, measured: ratings that prefer one style of
continuation, and the fine-tuned versions writing more of it.

1. `genframe train model=transformer data=text` (a small character model on the default
   corpus), pushed as `lm:1`.
2. `genframe generate hub=lm:1 condition.prompt="The "` makes N continuations, each
   recorded in the feedback store.
3. A simulated rater rates a continuation up (+1) when it holds the word "the", down (-1)
   otherwise, through the store's `add_feedback` (what `POST /feedback` calls).
4. Three one-command loops from the same ratings, each pushed as a new version:
   `genframe finetune finetune=feedback hub=lm:1 feedback.objective=dpo` (preference
   pairs, DPO), the same with `finetune.hparams.rpo_alpha=1` (DPO plus the chosen side's
   next-token loss) and `feedback.objective=sft` (the samples rated up).
5. Every version writes N continuations with the same seeds; the share holding "the" and
   the validation loss on the corpus (does the model still know its text?) are compared.

    python bench/feedback_loop_lm.py                    # 300 samples, 800 + 120 steps, lr 1e-4
    python bench/feedback_loop_lm.py --samples 200 --finetune-steps 60

Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SIZE = ["model=transformer", "data=text", "model.n_layer=2", "model.n_embd=64", "model.n_head=4",
        "model.block_size=64", "data.block_size=64"]
PROMPT = "The "


def genframe(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "genframe", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: genframe {' '.join(args)}\n{done.stderr[-3000:]}")
    return done.stdout


def liked(text: str) -> bool:
    """The preferred style: the continuation holds the word "the"."""
    return re.search(r"\bthe\b", text) is not None


def continuations(run_dir: Path) -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in (run_dir / "samples" / "manifest.jsonl").read_text().splitlines()]
    return [r["id"] for r in rows], [(run_dir / "samples" / r["file"]).read_text() for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--train-steps", type=int, default=800)
    parser.add_argument("--finetune-steps", type=int, default=120)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-4)
    opts = parser.parse_args()
    generation = [f"condition.prompt='{PROMPT}'", f"sampling.max_new_tokens={opts.new_tokens}",
                  f"num_samples={opts.samples}"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GENFRAME_HUB": str(root / "hub"),
               "GENFRAME_FEEDBACK": str(root / "feedback.sqlite"), "GENFRAME_OUTPUT_ROOT": str(root / "outputs")}
        genframe(env, "train", *SIZE, f"trainer.max_steps={opts.train_steps}", "num_samples=0",
                        "trainer.enable_progress_bar=false", f"hydra.run.dir={root / 'base'}")
        genframe(env, "hub", "push", f"run={root / 'base'}", "name=lm")
        genframe(env, "generate", "hub=lm:1", *generation, "seed=0", f"hydra.run.dir={root / 'rated'}")
        ids, texts = continuations(root / "rated")
        os.environ["GENFRAME_FEEDBACK"] = env["GENFRAME_FEEDBACK"]
        from genframe.feedback import FeedbackStore

        store = FeedbackStore()
        up = [liked(t) for t in texts]
        for sample_id, good in zip(ids, up):
            store.add_feedback(sample_id, rating=1 if good else -1)
        print(f"rated {len(ids)} continuations of lm:1 after {PROMPT!r}: {sum(up)} up (hold 'the'), "
              f"{len(up) - sum(up)} down")
        versions = {"lm:1": "base"}
        loops = {"dpo": ["feedback.objective=dpo"],
                 "dpo+rpo": ["feedback.objective=dpo", "finetune.hparams.rpo_alpha=1.0"],
                 "sft": ["feedback.objective=sft"]}
        for name, choice in loops.items():
            out = genframe(env, "finetune", "finetune=feedback", "hub=lm:1", *choice,
                           "feedback.min_rating=1", f"trainer.max_steps={opts.finetune_steps}",
                           f"finetune.lr={opts.lr}", "finetune.hparams.warmup_steps=10",
                           "trainer.enable_progress_bar=false", "num_samples=0",
                           f"hydra.run.dir={root / name}")
            pushed = re.search(r"pushed (lm:\d+)", out).group(1)
            versions[pushed] = name
            print(next(line for line in out.splitlines() if line.startswith("feedback training set")))
        print(f"{'version':<8} {'objective':<9} {'share with the':>15} {'corpus loss':>12} {'the the':>8}")
        for version, objective in versions.items():
            # The corpus's test loss: does the tuned model still know its text?
            evaluated = genframe(env, "evaluate", f"hub={version}", "data=text", "data.block_size=64",
                                 "trainer.enable_progress_bar=false",
                                 f"hydra.run.dir={root / ('eval-' + version.replace(':', '-'))}")
            loss = float(re.search(r"test/loss\s+([0-9.]+)", evaluated).group(1))
            folder = root / f"after-{version.replace(':', '-')}"
            genframe(env, "generate", f"hub={version}", *generation, "seed=1", "feedback.record=false",
                     f"hydra.run.dir={folder}")
            _, made = continuations(folder)
            share = sum(map(liked, made)) / len(made)
            stutter = sum("the the" in t for t in made) / len(made)  # the style overdone
            print(f"{version:<8} {objective:<9} {share:>15.3f} {loss:>12.3f} {stutter:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
