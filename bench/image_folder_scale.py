"""Start-up time and memory of ``data=image_folder`` on a large folder: lazy vs eager.

    python bench/image_folder_scale.py [--n 100000] [--size 32] [--batches 200]
        [--workers 2] [--root DIR] [--small 5000]

Makes a folder of `n` small PNGs (`size` x `size` RGB noise in 10 class sub-folders; the
bytes of 256 encoded images are copied, so making 100k files takes seconds, not minutes),
unless `--root` names one already made (it is kept then; a made one is deleted at the end).
Then, each in a fresh process, it times ``ImageFolderDataModule`` reading lazily
(``cache=false``: set-up lists the files, loader workers decode each image when read)
against the eager path (``cache=true``: every image decoded at set-up into a uint8
cache, which is what genframe did for every folder before) with the same
``num_workers``:

- set-up time, time from the start to the first training batch, and the time for
  `batches` batches after it;
- peak memory while doing so: the largest sum of the proportional set sizes (PSS) of the
  process and its loader workers, sampled every 20 ms (PSS counts a page shared by
  forked workers once, split between them; the plain RSS sum would count the main
  process's pages once per worker), and the main process's own peak RSS (VmHWM).

`--e2e` also runs ``genframe train data=image_folder data.root=FOLDER model=vae
trainer.max_steps=20`` both ways and reports the seconds from launching the command to the
first training batch (a callback this script adds prints the moment) and to its end.

`--small` also times one training epoch of a small folder (that many images, no workers)
lazily and cached: what ``data.cache=auto`` decides by.

Prints a table with the lazy / eager ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def make_folder(root: Path, n: int, size: int) -> float:
    """`n` PNGs of `size` x `size` RGB noise under root/class_0 .. class_9; seconds taken."""
    import numpy as np
    from PIL import Image

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(256):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        encoded.append(buf.getvalue())
    for c in range(10):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)

    def write(i: int) -> None:
        (root / f"class_{i % 10}" / f"{i:07d}.png").write_bytes(encoded[i % 256])

    with ThreadPoolExecutor(8) as pool:  # file creation waits on the file system
        list(pool.map(write, range(n), chunksize=1000))
    return time.perf_counter() - start


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Samples the PSS of this process plus its children (loader workers) in a thread."""

    def __init__(self, every: float = 0.02) -> None:
        self.every = every
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _children(self) -> list[int]:
        try:
            import psutil

            return [c.pid for c in psutil.Process().children(recursive=True)]
        except ImportError:  # /proc's list of direct children, one per thread
            pids = []
            for task in Path(f"/proc/{os.getpid()}/task").iterdir():
                pids += [int(p) for p in (task / "children").read_text().split()]
            return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            total = _pss_kib(os.getpid()) + sum(_pss_kib(p) for p in self._children())
            self.peak_kib = max(self.peak_kib, total)
            time.sleep(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def __getattr__(name: str):
    """``FirstStepTimer``, made on demand so that the bench's own processes need not
    import Lightning: a callback printing the wall time of the first training batch."""
    if name != "FirstStepTimer":
        raise AttributeError(name)
    import pytorch_lightning as pl

    class FirstStepTimer(pl.Callback):
        def __init__(self) -> None:
            self.done = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if not self.done:
                self.done = True
                print(f"FIRST_BATCH_AT {time.time():.3f}", flush=True)

    return FirstStepTimer


def end_to_end(root: Path, cache: bool, workers: int) -> dict:
    """Seconds from launching ``genframe train`` to its first training batch and its end."""
    genframe = shutil.which("genframe") or os.path.join(os.path.dirname(sys.executable),
                                                        "genframe")
    out = Path(tempfile.mkdtemp(prefix="genframe-e2e-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENFRAME_OUTPUT_ROOT": str(out),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [genframe, "train", "data=image_folder", f"data.root={root}",
           f"data.cache={str(cache).lower()}", f"data.num_workers={workers}", "model=vae",
           "trainer.max_steps=20", "trainer.limit_val_batches=2",
           "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "num_samples=4",
           "+callbacks.first_step._target_=image_folder_scale.FirstStepTimer"]
    start = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
    end = time.time()
    shutil.rmtree(out, ignore_errors=True)
    if run.returncode:
        raise RuntimeError(run.stderr[-3000:])
    first = next(float(line.split()[1]) for line in run.stdout.splitlines()
                 if line.startswith("FIRST_BATCH_AT"))
    return {"first_s": first - start, "total_s": end - start}


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch

    from genframe.data.image_folder import ImageFolderDataModule

    torch.set_num_threads(1)
    base_kib = _pss_kib(os.getpid())
    with PeakMemory() as memory:
        start = time.perf_counter()
        dm = ImageFolderDataModule(root=args.root, image_size=args.size, batch_size=64,
                                   num_workers=args.workers, cache=args.mode == "eager")
        dm.setup("fit")
        setup_s = time.perf_counter() - start
        loader = dm.train_dataloader()
        it = iter(loader)
        next(it)
        first_s = time.perf_counter() - start
        t = time.perf_counter()
        done = 1
        for _ in range(args.batches - 1):
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                next(it)
            done += 1
        batches_s = time.perf_counter() - t
        epoch_s = None
        if args.epoch:
            t = time.perf_counter()
            for _ in loader:
                pass
            epoch_s = time.perf_counter() - t
        del it, loader
    print(json.dumps({"setup_s": setup_s, "first_batch_s": first_s, "batches_s": batches_s,
                      "batches": done, "epoch_s": epoch_s, "peak_pss_mib": memory.peak_kib / 1024,
                      "growth_mib": (memory.peak_kib - base_kib) / 1024,
                      "main_hwm_mib": _hwm_kib() / 1024, "train": len(dm.train_set)}))


def measure(root: Path, mode: str, size: int, batches: int, workers: int,
            epoch: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--root", str(root), "--size", str(size),
           "--batches", str(batches), "--workers", str(workers)] + ["--epoch"] * epoch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[str, float, float, str]]) -> str:
    lines = [f"{'':36} {'lazy':>10} {'eager':>10} {'lazy/eager':>11}"]
    for name, lazy, eager, unit in rows:
        ratio = lazy / eager if eager else float("nan")
        lines.append(f"{name:36} {lazy:>9.2f}{unit} {eager:>9.2f}{unit} {ratio:>10.3f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", default=None, help="an existing folder (kept)")
    parser.add_argument("--small", type=int, default=5000, help="0: skip the epoch timing")
    parser.add_argument("--e2e", action="store_true", help="also time `genframe train`")
    parser.add_argument("--child", choices=("lazy", "eager"), help=argparse.SUPPRESS)
    parser.add_argument("--epoch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.mode = args.child
        child(args)
        return
    made = None
    if args.root is None:
        made = Path(tempfile.mkdtemp(prefix="genframe-scale-"))
        args.root = made / "images"
        seconds = make_folder(Path(args.root), args.n, args.size)
        print(f"made {args.n} {args.size}x{args.size} PNGs in {seconds:.1f} s under {args.root}")
    try:
        n = sum(1 for _ in Path(args.root).rglob("*.png"))
        print(f"{n} images, batch 64, data.num_workers={args.workers}, {os.cpu_count()} CPUs")
        lazy = measure(args.root, "lazy", args.size, args.batches, args.workers)
        eager = measure(args.root, "eager", args.size, args.batches, args.workers)
        print(table([
            ("set-up (s)", lazy["setup_s"], eager["setup_s"], "s"),
            ("start to first batch (s)", lazy["first_batch_s"], eager["first_batch_s"], "s"),
            (f"next {lazy['batches'] - 1} batches (s)", lazy["batches_s"], eager["batches_s"], "s"),
            ("peak memory, PSS + workers (MiB)", lazy["peak_pss_mib"], eager["peak_pss_mib"], " "),
            ("  growth over imports (MiB)", lazy["growth_mib"], eager["growth_mib"], " "),
            ("main process VmHWM (MiB)", lazy["main_hwm_mib"], eager["main_hwm_mib"], " "),
        ]))
        if args.e2e:
            lazy, eager = (end_to_end(Path(args.root), cache, args.workers)
                           for cache in (False, True))
            print(f"\ngenframe train data=image_folder model=vae trainer.max_steps=20 "
                  f"data.num_workers={args.workers}")
            print(table([
                ("launch to first training batch (s)", lazy["first_s"], eager["first_s"], "s"),
                ("launch to exit (s)", lazy["total_s"], eager["total_s"], "s"),
            ]))
        if args.small:
            small = (made or Path(tempfile.mkdtemp(prefix="genframe-scale-"))) / "small"
            make_folder(small, args.small, args.size)
            lazy = measure(small, "lazy", args.size, 1, 0, epoch=True)
            eager = measure(small, "eager", args.size, 1, 0, epoch=True)
            print(f"\nsmall folder: {args.small} images, data.num_workers=0, one epoch "
                  f"({lazy['train']} training images) without a model")
            print(table([
                ("set-up (s)", lazy["setup_s"], eager["setup_s"], "s"),
                ("one epoch of batches (s)", lazy["epoch_s"], eager["epoch_s"], "s"),
                ("peak memory, PSS (MiB)", lazy["peak_pss_mib"], eager["peak_pss_mib"], " "),
            ]))
            if made is None:
                shutil.rmtree(small.parent)
    finally:
        if made is not None:
            shutil.rmtree(made)


if __name__ == "__main__":
    main()
