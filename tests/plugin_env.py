"""A throwaway virtual environment with one plugin package pip-installed into it.

Tests of third-party plugin packages (`tests/test_plugin_package.py`,
`tests/test_plugin_guide.py`) install the package offline (no index, no build isolation,
no dependency resolution) into a new venv that sees this environment's packages through
a `.pth` bridge: genframe's editable install, torch and setuptools load there, while the
plugin goes into the new venv only. So the project's own venv is never modified and
parallel tests never see the plugin.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path


class PluginEnv:
    """A venv under `root`, layered over this one, with a copy of `source` beside it.

    Args:
        root: an empty folder (the venv, the copy and every run's outputs go there).
        source: the plugin package's folder (its ``pyproject.toml`` at the top).
        dist: the distribution name, for ``pip uninstall``.
    """

    def __init__(self, root: Path, source: Path, dist: str) -> None:
        self.root = root
        self.dist = dist
        self.source = root / dist
        # Build artefacts (build/, *.egg-info) land next to the sources: keep them out
        # of the repository by building from a copy.
        shutil.copytree(source, self.source, ignore=shutil.ignore_patterns(
            "build", "*.egg-info", "__pycache__", ".pytest_cache"))
        venv = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        self.python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
        purelib = Path(self._check([str(self.python), "-c",
                                    "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
        # The bridge: the new venv also reads this environment's site-packages (after its
        # own), .pth files included, so genframe's editable install, torch and pip load
        # there while anything pip installs goes into the new venv only.
        parents = "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages())
        (purelib / "_genframe_parent_env.pth").write_text(f"import site; {parents}\n")
        self.installed = False

    def _check(self, cmd: list[str], **kw) -> str:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
        assert result.returncode == 0, (cmd, result.stdout[-3000:], result.stderr[-3000:])
        return result.stdout

    def pip(self, *args: str) -> str:
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
        return self._check([str(self.python), "-m", "pip", *args], env=env, cwd=self.root)

    def install(self) -> None:
        if not self.installed:
            # Offline: no index, no dependency resolution, setuptools from this env.
            self.pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(self.source))
            self.installed = True

    def uninstall(self) -> None:
        if self.installed:
            self.installed = False
            self.pip("uninstall", "-y", self.dist)

    def run(self, *args: str, env: dict | None = None, timeout: int = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run ``python ARGS`` with the venv's interpreter; runs land under root/outputs."""
        full_env = {**os.environ, "GENFRAME_OUTPUT_ROOT": str(self.root / "outputs"),
                    "COLUMNS": "200", **(env or {})}  # a wide `genframe plugins` table
        for key in ("HYDRA_FULL_ERROR", "GENFRAME_PLUGINS", "GENFRAME_DISABLE_PLUGIN_AUTOLOAD"):
            if key not in (env or {}):
                full_env.pop(key, None)
        return subprocess.run([str(self.python), *args], cwd=cwd or self.root,
                              env=full_env, capture_output=True, text=True, timeout=timeout)

    def genframe(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run("-m", "genframe", *args, **kw)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """`result`, after asserting it succeeded (showing the ends of its output if not)."""
    assert result.returncode == 0, (result.returncode, result.stdout[-3000:], result.stderr[-3000:])
    return result
