"""A third-party plugin package becomes selectable when pip-installed, and not before.

`examples/genframe-ppca` is a plugin written only against genframe's public API. These
tests pip-install it (offline, no build isolation) into a throwaway virtual environment
that sees this environment's packages through a `.pth` bridge, so the project's own venv
is never modified and parallel tests never see the plugin. Then they drive the real CLI
in subprocesses: `genframe plugins` lists it, `genframe train model=ppca` trains it, the
plugin switches hide it, the plugin author's own tests pass, and `pip uninstall` makes
`model=ppca` an unknown choice again. No file of genframe is edited at any point.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.conftest import FAST_TRAINING as FAST
from tests.plugin_env import PluginEnv, ok

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "genframe-ppca"
DIST = "genframe-ppca"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    env = PluginEnv(tmp_path_factory.mktemp("ppca-plugin"), EXAMPLE, DIST)
    try:
        yield env
    finally:  # even after a failure: never leave the plugin installed
        env.uninstall()


@pytest.fixture
def installed(plugin_env):
    plugin_env.install()
    return plugin_env


def ppca_row(plugins_output: str) -> str | None:
    """The `genframe plugins` table row of the ppca plugin, or None."""
    rows = [line for line in plugins_output.splitlines() if DIST in line or "model=ppca" in line]
    return rows[0] if rows else None


def assert_unknown_model_choice(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert "model=ppca" in result.stderr, result.stderr
    # Either other models are loaded (and listed), or none is and the message says so.
    assert "Valid choices" in result.stderr or "No model plugin is loaded" in result.stderr, result.stderr


def test_genframe_plugins_lists_the_installed_package(installed):
    row = ppca_row(ok(installed.genframe("plugins")).stdout)
    assert row is not None, "ppca is missing from `genframe plugins`"
    cells = [c.strip() for c in row.strip("│| ").split("│")]
    assert cells[:5] == ["ppca", DIST, "0.1.0", "1", "model=ppca"], cells  # "1": plugin API


def test_train_model_ppca_writes_a_run(installed):
    result = ok(installed.genframe("train", "model=ppca", *FAST))
    runs = sorted((installed.root / "outputs" / "train").glob("*/model.safetensors"))
    assert runs, result.stdout[-2000:]
    run_dir = runs[-1].parent
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["val/loss"]) and math.isfinite(metrics["val/bpd"]), metrics
    assert (run_dir / "samples" / "grid.png").is_file()
    info = json.loads((run_dir / "run.json").read_text())
    assert info["plugins"]["ppca"] == {"distribution": DIST, "version": "0.1.0"}, info["plugins"]
    assert info["model"]["name"] == "ppca"


@pytest.mark.parametrize("switch", [
    {"GENFRAME_PLUGINS": "vae"},
    {"GENFRAME_DISABLE_PLUGIN_AUTOLOAD": "1"},
], ids=["allow-list", "no-autoload"])
def test_plugin_switches_hide_the_installed_package(installed, switch):
    listing = ok(installed.genframe("plugins", env=switch)).stdout
    assert ppca_row(listing) is None, listing
    assert_unknown_model_choice(installed.genframe("train", "model=ppca", *FAST, env=switch))


def test_the_plugin_authors_own_tests_pass(installed):
    """The example's suite, genframe's contract test included, against the installed plugin."""
    where = installed.run("-c", (
        "from genframe.plugins import get_registry; r = get_registry(); "
        "print(r.models['ppca'].plugin, r.plugins['ppca'].distribution)"))
    assert ok(where).stdout.split() == ["ppca", DIST]  # found through its entry point
    result = installed.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests",
                           cwd=installed.source, timeout=600)
    ok(result)
    assert "passed" in result.stdout and "failed" not in result.stdout, result.stdout[-2000:]


def test_uninstalling_removes_the_choice(installed):
    installed.uninstall()
    assert ppca_row(ok(installed.genframe("plugins")).stdout) is None
    assert_unknown_model_choice(installed.genframe("train", "model=ppca", *FAST))
