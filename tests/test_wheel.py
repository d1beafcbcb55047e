"""A built wheel works in a clean virtual environment, run from any directory.

About 20 s (builds a wheel and a venv). The clean venv gets genframe from the
wheel only; its third-party dependencies are borrowed read-only from this environment
through PYTHONPATH (no network in tests), which adds no genframe code of its own.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_in_clean_venv(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".ci-venv", "outputs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("genframe-*.whl"))
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)],
                           capture_output=True, text=True, check=True).stdout
    assert "genframe/conf/train.yaml" in names
    assert "genframe_plugins/vae/conf/model/vae.yaml" in names
    assert not any(line.split()[0].startswith(("conf/", "plugins/")) for line in names.splitlines()[1:] if line.split())

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages()),
           "GENFRAME_OUTPUT_ROOT": str(tmp_path / "runs")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args):
        return subprocess.run([str(venv / "bin" / "genframe"), *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=600)

    where = subprocess.run([str(py), "-c", "import genframe, genframe_plugins; "
                            "print(genframe.__file__, genframe_plugins.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert str(venv) in where.stdout and str(ROOT) not in where.stdout
    plugins = run("plugins")
    assert plugins.returncode == 0 and "model=vae" in plugins.stdout, plugins.stderr
    result = run("train", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 "trainer.limit_val_batches=1", "num_samples=4", "trainer.enable_progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "runs").rglob("model.safetensors"))
