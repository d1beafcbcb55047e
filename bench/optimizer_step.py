"""What one optimizer step costs, side by side: AdamW foreach against fused (the choice
`genframe.optim.adamw` makes), and Muon's Newton-Schulz iterations in bfloat16 (torch's
`torch.optim.Muon`) against float32 (`genframe.optim.Muon` where bfloat16 is emulated),
on the parameters of the character GPTs (0.8M and 10.7M). Rounds alternate the sides.

    python bench/optimizer_step.py                  # 5 rounds of 20 steps
    python bench/optimizer_step.py --rounds 3 --steps 10

Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from genframe import optim
from genframe_plugins.transformer.network import GPT

SIZES = {"0.8M": (4, 4, 128, 64), "10.7M": (6, 6, 384, 256)}  # n_layer, n_head, n_embd, block


def parameters(size: str) -> list[torch.nn.Parameter]:
    n_layer, n_head, n_embd, block = SIZES[size]
    torch.manual_seed(0)
    params = list(GPT(65, block, n_layer, n_head, n_embd).parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def seconds_per_step(opt: torch.optim.Optimizer, steps: int) -> float:
    opt.step()  # state allocated
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    opts = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 fast: "
          f"{optim.fast_bf16(torch.device('cpu'))}")
    print(f"{'size':<6} {'comparison':<34} {'ms a':>8} {'ms b':>8} {'b / a':>14}")
    for size in SIZES:
        params = parameters(size)
        matrices = [p for p in params if p.dim() == 2 and p.shape[0] != 65]  # not the embedding
        sides = {
            "AdamW foreach -> fused": (lambda: torch.optim.AdamW(params, lr=1e-3, foreach=True),
                                       lambda: optim.adamw(params, lr=1e-3)),
            "Muon bf16 (torch) -> fp32 (ours)": (lambda: torch.optim.Muon(matrices, lr=1e-3),
                                                lambda: optim.Muon(matrices, lr=1e-3)),
        }
        for name, (make_a, make_b) in sides.items():
            a_times, b_times = [], []
            for r in range(opts.rounds):
                first, second = (make_a, make_b) if r % 2 == 0 else (make_b, make_a)
                t1 = seconds_per_step(first(), opts.steps)
                t2 = seconds_per_step(second(), opts.steps)
                a, b = (t1, t2) if r % 2 == 0 else (t2, t1)
                a_times.append(a)
                b_times.append(b)
            ratios = [x / y for x, y in zip(a_times, b_times)]  # speed of b over a
            print(f"{size:<6} {name:<34} {statistics.median(a_times) * 1e3:>8.2f} "
                  f"{statistics.median(b_times) * 1e3:>8.2f} {statistics.median(ratios):>6.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f})", flush=True)


if __name__ == "__main__":
    main()
