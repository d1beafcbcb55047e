"""LoRA teaches a small pretrained character model a new answer format from 100 examples.

    python examples/lora_format/demo.py [--base RUN_DIR] [--lr 3e-3] [--epochs 15]
        [--rank 8] [--alpha 16] [--warmup 10] [--seed 0] [--train 100] [--heldout 50]
        [--out DIR]

1. the base model: ``genframe train experiment=pydoc_char_lm`` (skipped with --base);
2. the data: make_data.py writes train.jsonl (100) and heldout.jsonl (50), disjoint words;
3. score.py scores the base on the held-out conversations;
4. ``genframe finetune method=lora data=chat`` trains LoRA adapters on train.jsonl;
5. score.py scores the fine-tuned run; the before/after table is printed and written to
   OUT/summary.json with the trainable fraction, the settings and the wall times.

Runs go under --out (default: $GENFRAME_OUTPUT_ROOT, else examples/lora_format/runs).
The `genframe` next to this Python is used (the venv's), else the one on PATH.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_data
import score

METRICS = ("format_accuracy", "exact_accuracy", "letter_similarity")


def genframe_cli() -> str:
    beside = Path(sys.executable).with_name("genframe")
    return str(beside) if beside.exists() else (shutil.which("genframe") or "genframe")


def run_genframe(args: list[str], log: Path, env: dict[str, str]) -> tuple[Path, float, str]:
    """Run a genframe command, its output to `log`; the run directory it printed, seconds."""
    cmd = [genframe_cli(), *args]
    print("   $ " + " ".join(cmd[:1] + [a if " " not in a else repr(a) for a in cmd[1:]]), flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, text=True, check=False)
    seconds = time.perf_counter() - start
    text = log.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        print("\n".join(text.splitlines()[-20:]))
        raise SystemExit(f"genframe exited with status {proc.returncode}; log: {log}")
    dirs = [ln.split(": ", 1)[1] for ln in text.splitlines() if ln.startswith("run directory: ")]
    return Path(dirs[-1]), seconds, text


def timed_score(run_dir: Path, heldout: Path, out: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    result = score.score(str(run_dir), str(heldout))
    seconds = time.perf_counter() - start
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"   format {result['format_accuracy']:.0%}, exact {result['exact_accuracy']:.0%}, "
          f"letter similarity {result['letter_similarity']:.2f} ({seconds:.0f}s); {out}", flush=True)
    for row in result["rows"][:3]:
        print(f"     {row['expected']!r:24} -> {row['reply']!r}")
    return result, seconds


def best_epoch(run_dir: Path) -> int | None:
    """The epoch of the lowest val/loss in the run's CSV log: the weights genframe kept."""
    path = run_dir / "logs" / "csv" / "metrics.csv"
    if not path.exists():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        rows = [(float(r["val/loss"]), int(r["epoch"])) for r in csv.DictReader(f) if r.get("val/loss")]
    return min(rows)[1] if rows else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, help="an existing pydoc_char_lm run (skips training it)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps (the base run's 100 otherwise)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and of fine-tuning")
    p.add_argument("--train", type=int, default=100, help="training conversations (10%% of them validate)")
    p.add_argument("--heldout", type=int, default=50, help="held-out conversations")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("GENFRAME_OUTPUT_ROOT", HERE / "runs")))
    args = p.parse_args(argv)

    out = args.out.resolve()
    data, logs = out / "data", out / "logs"
    data.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GENFRAME_OUTPUT_ROOT": str(out)}
    seconds: dict[str, float | None] = {}
    t0 = time.perf_counter()

    if args.base is None:
        print("== 1. base model", flush=True)
        base, seconds["train_base"], _ = run_genframe(["train", "experiment=pydoc_char_lm"], logs / "base.log", env)
        print(f"   {base} ({seconds['train_base']:.0f}s)")
    else:
        base, seconds["train_base"] = args.base.resolve(), None
        print(f"== 1. base model: {base} (given)")

    print("== 2. data", flush=True)
    make_data.main(["--out", str(data), "--seed", str(args.seed), "--train", str(args.train),
                    "--heldout", str(args.heldout), "--tokenizer", str(base / "tokenizer.json")])
    train, heldout = data / "train.jsonl", data / "heldout.jsonl"

    print("== 3. scoring the base model", flush=True)
    before, seconds["score_base"] = timed_score(base, heldout, data / "score_base.json")

    print("== 4. LoRA fine-tuning", flush=True)
    overrides = [
        "finetune", f"run={base}", "method=lora", "data=chat", f"data.path={train}",
        "data.block_size=64", f"finetune.lr={args.lr}", f"finetune.lora.r={args.rank}",
        f"finetune.lora.alpha={args.alpha}", f"finetune.hparams.warmup_steps={args.warmup}",
        f"trainer.max_epochs={args.epochs}", f"seed={args.seed}", "num_samples=0",
    ]
    tuned, seconds["finetune"], log = run_genframe(overrides, logs / "finetune.log", env)
    for line in log.splitlines():
        if line.startswith(("LoRA (", "trainable parameters")):
            print("   " + line[:160])
    print(f"   {tuned} ({seconds['finetune']:.0f}s)")

    print("== 5. scoring the fine-tuned model", flush=True)
    after, seconds["score_lora"] = timed_score(tuned, heldout, data / "score_lora.json")
    seconds["total"] = time.perf_counter() - t0

    run = json.loads((tuned / "run.json").read_text(encoding="utf-8"))
    params = run.get("parameters", {})
    n_train = sum(1 for line in train.read_text().splitlines() if line.strip())
    summary = {
        "base_run": str(base), "lora_run": str(tuned),
        "train_conversations": n_train, "heldout_conversations": after["n"],
        "before": {k: before[k] for k in METRICS},
        "after": {k: after[k] for k in METRICS},
        "parameters": params,
        "settings": {"lr": args.lr, "epochs": args.epochs, "rank": args.rank, "alpha": args.alpha,
                     "warmup_steps": args.warmup, "seed": args.seed,
                     "steps": run.get("steps"), "best_epoch": best_epoch(tuned)},
        "seconds": {k: None if v is None else round(v, 1) for k, v in seconds.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")

    print(f"\nheld-out accuracy ({after['n']} conversations; {n_train} in train.jsonl)")
    print(f"  {'':6} {'format':>8} {'exact':>8} {'letters':>8}")
    for name, res in (("base", before), ("LoRA", after)):
        print(f"  {name:6} {res['format_accuracy']:>8.0%} {res['exact_accuracy']:>8.0%} "
              f"{res['letter_similarity']:>8.2f}")
    if params:
        print(f"trainable parameters: {params.get('trainable_parameters'):,} of "
              f"{params.get('total_parameters'):,} ({params.get('trainable_fraction', 0):.2%})")
    print("settings: " + ", ".join(f"{k} {v}" for k, v in summary["settings"].items()))
    print("wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items() if v is not None))
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
