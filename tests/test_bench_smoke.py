"""The benchmarks' smallest configurations still run (they are not timed here: figures
come from running them by hand, docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_the_gpu_script_runs_on_the_cpu_at_a_tiny_size(tmp_path):
    done = _run(str(BENCH / "gpu_perf.py"), "--device", "cpu", "--tiny", "--steps", "1", "--new-tokens", "2",
                "--ddim", "2", "--no-compile", "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "gpu_perf.json").read_text())
    assert results["lm_train"]["tokens_per_s"] > 0 and results["lm_train"]["mfu"] is None  # no GPU peak
    assert results["lm_generate"]["genframe_tokens_per_s"] > 0
    assert results["diffusion"]["genframe_ddim2_images_per_s"] > 0


def test_the_suite_smoke_run_completes(tmp_path):
    pytest.importorskip("diffusers", reason="the peers come with the bench extra (in dev)")
    done = _run(str(BENCH / "run.py"), "--smoke", "--out", str(tmp_path / "report.md"), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "| " in report and "diffusers" in report
