"""Serving throughput with and without merging concurrent requests into one batch.

A real uvicorn server on loopback serves a model; `--clients` threads each send
`--requests` requests (one sample each) as fast as answers come. Side by side in one
run, alternating rounds: `batching.max_batch_size=1` (every request its own generate
call) against the default (up to 32 rows, 10 ms window). Printed: requests per second
and the median latency of each, and their ratio.

    python bench/serve_batching.py                          # a digits VAE and a char LM, trained briefly
    python bench/serve_batching.py --clients 16 --rounds 3

Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

def train(root: Path, name: str, args: list[str]) -> Path:
    out = root / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENFRAME_OUTPUT_ROOT": str(root / "outputs")}
    done = subprocess.run([sys.executable, "-m", "genframe", "train", *args, "trainer.enable_progress_bar=false",
                           "num_samples=0", f"hydra.run.dir={out}"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return out


def measure(app, body: dict, clients: int, requests: int) -> tuple[float, float]:
    """(requests per second, median latency in s) of `clients` threads sending `body`."""
    import httpx

    from genframe.serving.app import running

    latencies: list[float] = []
    with running(app) as base, httpx.Client(base_url=base, timeout=120) as http:
        http.post("/generate", json=body).raise_for_status()  # warm-up

        def client(_: int) -> None:
            for _ in range(requests):
                started = time.perf_counter()
                http.post("/generate", json=body).raise_for_status()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        wall = time.perf_counter() - started
    return clients * requests / wall, statistics.median(latencies)


def main() -> None:
    import torch

    from genframe.serving.app import create_app
    from genframe.serving.models import load_served

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = {
            "vae": (train(root, "vae", ["experiment=digits_vae", "trainer.max_epochs=2"]), {"num_samples": 1}),
            "lm": (train(root, "lm", ["experiment=pydoc_char_lm", "trainer.max_steps=30"]),
                   {"num_samples": 1, "prompt": "The ", "sampling": {"max_new_tokens": 32}}),
        }
        print(f"{opts.clients} clients x {opts.requests} requests, {opts.rounds} rounds; "
              f"{os.cpu_count()} CPUs, torch {torch.__version__}")
        print(f"{'model':<6} {'round':>5} {'one-by-one req/s':>17} {'batched req/s':>14} {'speed-up':>9} "
              f"{'median latency 1 / batched (s)':>31}")
        for name, (run, body) in cases.items():
            body = {"model": name, **body}
            for r in range(opts.rounds):
                results = {}
                for size in ((1, 32) if r % 2 == 0 else (32, 1)):
                    served = load_served(name, str(run), max_batch_size=size, window_s=0.01)
                    try:
                        results[size] = measure(create_app([served]), body, opts.clients, opts.requests)
                    finally:
                        served.worker.close()
                (one, one_lat), (many, many_lat) = results[1], results[32]
                print(f"{name:<6} {r + 1:>5} {one:>17.1f} {many:>14.1f} {many / one:>9.2f} "
                      f"{one_lat:>15.3f} / {many_lat:.3f}", flush=True)


if __name__ == "__main__":
    main()
