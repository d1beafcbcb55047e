"""Every family exported to ONNX and TorchScript, at its experiment preset's size.

Each family trains a few steps from its `experiment=` preset (the real network sizes;
the weights have moved off their initial values, so a zero-initialised output layer no
longer hides a wrong graph), then `genframe export format=onnx` and `format=torchscript`
run through the CLI. Printed per network: the largest difference between the exported
file (onnxruntime / torch.jit.load) and PyTorch over the input sets the export checks,
the export time and the file size; and onnxruntime's speed against PyTorch eager on the
example inputs (median of rounds, one thread each).

    python bench/export_families.py                  # every family, 20 training steps
    python bench/export_families.py vae transformer --steps 5

Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAMILIES = {
    "vae": ["experiment=digits_vae"],
    "gan": ["experiment=digits_gan"],
    "diffusion": ["experiment=digits_diffusion"],
    "autoencoder": ["experiment=shapes_autoencoder"],
    "upscaler": ["experiment=shapes_upscaler"],
    "text2image": ["experiment=shapes_text2image"],
    "latent_text2image": ["experiment=shapes_text2image_latent"],  # model.autoencoder added below
    "transformer": ["experiment=pydoc_char_lm"],
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def genframe(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "genframe", *args], env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: genframe {' '.join(args)}\n{done.stderr[-3000:]}")
    return done.stdout


def speed(folder: Path, name: str, rounds: int) -> tuple[float, float]:
    """Seconds per call of onnxruntime and of PyTorch eager on the export's example
    inputs (medians), both on one thread."""
    import onnxruntime as ort
    import torch

    import genframe as gf

    torch.set_num_threads(1)
    info = json.loads((folder / "export.json").read_text())
    run = json.loads((folder / "run.json").read_text())["source"]["run"]
    model = gf.load(run)
    graph = model.export_graphs()[name]
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(folder / info["graphs"][name]["file"]), options)
    kept = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy() for k, v in graph.inputs.items() if k in kept}

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return timed(lambda: session.run(None, feed)), timed(lambda: graph.run(graph.inputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20)
    opts = parser.parse_args()
    common = [f"trainer.max_steps={opts.steps}", "trainer.max_epochs=-1", "trainer.limit_val_batches=1",
              "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=1000",
              "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "num_samples=0"]
    print(f"{'family':<18} {'network':<24} {'onnx max|diff|':>15} {'ts max|diff|':>13} "
          f"{'onnx s':>7} {'ts s':>6} {'MB':>7} {'ort/eager':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family in opts.families:
            args = list(FAMILIES[family])
            if family == "latent_text2image":
                ae = root / "autoencoder" / "run"
                if not ae.exists():
                    genframe("train", *FAMILIES["autoencoder"], *common, f"hydra.run.dir={ae}")
                args.append(f"model.autoencoder={ae}")
            run = root / family / "run"
            if not run.exists():
                genframe("train", *args, *common, f"hydra.run.dir={run}")
            found = {}
            for fmt in ("onnx", "torchscript"):
                out = root / family / fmt
                genframe("export", f"run={run}", f"format={fmt}", f"out={out}")
                found[fmt] = json.loads((out / "export.json").read_text())["graphs"]
            for name, record in found["onnx"].items():
                ts = found["torchscript"][name]
                onnx_file = root / family / "onnx" / record["file"]
                size = sum(p.stat().st_size for p in onnx_file.parent.glob(record["file"] + "*")) / 1e6
                ort_s, eager_s = speed(root / family / "onnx", name, opts.rounds)
                print(f"{family:<18} {name:<24} {record['max_abs_diff']:>15.2e} {ts['max_abs_diff']:>13.2e} "
                      f"{record['export_seconds']:>7.1f} {ts['export_seconds']:>6.1f} {size:>7.2f} "
                      f"{ort_s / eager_s:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
