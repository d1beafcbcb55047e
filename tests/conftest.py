"""Shared fixtures: offline, CPU-only, every run in a temporary directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

GENFRAME = [sys.executable, "-m", "genframe"]

# Tiny models on two shared cores: one thread avoids OpenMP contention (10x slowdowns
# were seen with two threads while another process was busy).
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Classifier caches go to a per-session temporary folder, never to ~/.cache."""
    monkeypatch.setenv("GENFRAME_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `genframe ARGS` in a subprocess; runs land under `cwd`/outputs."""
    full_env = {**os.environ, "GENFRAME_OUTPUT_ROOT": str(Path(cwd) / "outputs"), **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([*GENFRAME, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def cli(tmp_path):
    def _run(*args: str, **kw) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=tmp_path, **kw)

    return _run


# Small and fast training settings for task tests: any model, then the VAE made tiny.
FAST_TRAINING = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "num_samples=4",
]
FAST = [*FAST_TRAINING, "model.latent_dim=2", "model.block_out_channels=[8,16]"]


@pytest.fixture
def compose_task(tmp_path):
    """Compose a task's config as the CLI would, with its run directory in tmp_path."""
    from genframe.config import compose

    counter = iter(range(1000))

    def _compose(task: str, *overrides: str):
        out = tmp_path / f"{task}-{next(counter)}"
        return compose(task, [*overrides, f"paths.output_dir={out}"])

    return _compose


def _train_once(tmp_path_factory, name: str, overrides: list[str]) -> Path:
    """A run trained once per test session (per worker), with the session's cache."""
    from genframe.config import compose
    from genframe.tasks.train import train

    out = tmp_path_factory.mktemp(name) / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GENFRAME_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        return train(compose("train", [*overrides, f"paths.output_dir={out}"]))["run_dir"]


@pytest.fixture(scope="session")
def tiny_lm_run(tmp_path_factory) -> Path:
    """A small character language model (2 layers, width 32, context 32), 20 steps."""
    return _train_once(tmp_path_factory, "tiny_lm", [
        "model=transformer", "data=text", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
        "model.block_size=32", "data.block_size=32", "trainer.max_steps=20",
        "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "num_samples=1"])


@pytest.fixture(scope="session")
def tiny_vae_run(tmp_path_factory) -> Path:
    """The tiny digits VAE of `FAST`, one short epoch."""
    return _train_once(tmp_path_factory, "tiny_vae", FAST)
