"""The feedback loop end to end, with a measured effect: ratings that prefer one digit.

1. `genframe train experiment=digits_vae` (an unconditional VAE), pushed as `digits:1`.
2. `genframe generate hub=digits` makes N samples; each is recorded in the feedback store.
3. Simulated raters: a digits classifier (trained here on scikit-learn's digits) rates a
   sample up (+1) when it reads the preferred digit with confidence >= 0.5, down (-1)
   otherwise, through the store's `add_feedback` (what `POST /feedback` calls).
4. `genframe finetune finetune=feedback hub=digits` -- the one command of the loop --
   builds the training set from the well-rated samples, fine-tunes and pushes `digits:2`.
5. Both versions generate N samples with the same seeds; the classifier counts the
   preferred digit in each.

    python bench/feedback_loop.py                       # digit 3, 500 samples
    python bench/feedback_loop.py --digit 7 --samples 300 --train-epochs 30

Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def genframe(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "genframe", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: genframe {' '.join(args)}\n{done.stderr[-3000:]}")
    return done.stdout


def digits_classifier():
    from sklearn.datasets import load_digits

    from genframe.metrics.classifier import train_classifier

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, val = order[:1500], order[1500:]
    model, accuracy = train_classifier(images[train], labels[train], images[val], labels[val],
                                       epochs=15, num_classes=10)
    return model.eval(), accuracy


def read_samples(run_dir: Path) -> tuple[list[str], torch.Tensor]:
    from PIL import Image

    rows = [json.loads(line) for line in (run_dir / "samples" / "manifest.jsonl").read_text().splitlines()]
    images = [np.asarray(Image.open(run_dir / "samples" / r["file"]).convert("L"), dtype=np.float32) / 255
              for r in rows]
    return [r["id"] for r in rows], torch.tensor(np.stack(images))[:, None]


def predict(classifier, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        probs = classifier(images).softmax(-1)
    confidence, label = probs.max(-1)
    return label, confidence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digit", type=int, default=3)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--train-epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    classifier, accuracy = digits_classifier()
    print(f"rater: digits classifier, validation accuracy {accuracy:.3f}; preferred digit {opts.digit}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GENFRAME_HUB": str(root / "hub"),
               "GENFRAME_FEEDBACK": str(root / "feedback.sqlite"), "GENFRAME_OUTPUT_ROOT": str(root / "outputs")}
        genframe(env, "train", "experiment=digits_vae", f"trainer.max_epochs={opts.train_epochs}",
                 "trainer.enable_progress_bar=false", f"hydra.run.dir={root / 'base'}")
        genframe(env, "hub", "push", f"run={root / 'base'}", "name=digits")
        genframe(env, "generate", "hub=digits:1", f"num_samples={opts.samples}", "seed=0",
                 f"hydra.run.dir={root / 'rated'}")
        ids, images = read_samples(root / "rated")
        label, confidence = predict(classifier, images)
        liked = (label == opts.digit) & (confidence >= 0.5)
        os.environ["GENFRAME_FEEDBACK"] = env["GENFRAME_FEEDBACK"]
        from genframe.feedback import FeedbackStore

        store = FeedbackStore()
        for sample_id, up in zip(ids, liked.tolist()):
            store.add_feedback(sample_id, rating=1 if up else -1)
        print(f"rated {len(ids)} samples of digits:1: {int(liked.sum())} up, {len(ids) - int(liked.sum())} down")
        out = genframe(env, "finetune", "finetune=feedback", "hub=digits:1", "feedback.min_rating=1",
                       f"trainer.max_epochs={opts.finetune_epochs}", "trainer.enable_progress_bar=false",
                       "num_samples=0", f"hydra.run.dir={root / 'tuned'}")
        print(next(line for line in out.splitlines() if line.startswith("pushed")))
        print(f"{'version':<10} {'share of digit ' + str(opts.digit):>18} {'mean confidence':>16} "
              f"{'distinct classes':>17}")
        for version in ("digits:1", "digits:2"):
            folder = root / f"after-{version.replace(':', '-')}"
            genframe(env, "generate", f"hub={version}", f"num_samples={opts.samples}", "seed=1",
                     "feedback.record=false", f"hydra.run.dir={folder}")
            _, made = read_samples(folder)
            label, confidence = predict(classifier, made)
            share = float(((label == opts.digit) & (confidence >= 0.5)).float().mean())
            print(f"{version:<10} {share:>18.3f} {float(confidence.mean()):>16.3f} "
                  f"{len(set(label.tolist())):>17}", flush=True)


if __name__ == "__main__":
    main()
