"""The README's plugin guide is a working plugin package, so it cannot drift from the code.

The guide's code blocks are the files of a package, each headed by a comment naming its
path (``# genframe_foo/model.py``). These tests take the blocks out of README.md's
"Plugin guide" section, write them into a folder, pip-install that package offline into
a throwaway venv (`tests.plugin_env`), and drive the real CLI there: `genframe plugins`
lists it with no plugin-API warning, `genframe train model=foo` trains it,
`genframe generate run=DIR` samples from the run, and the guide's own contract test
passes. A renamed block, a changed hook or a changed model API makes them fail.

The CLI runs take a few minutes on two cores, so they are `slow`; the default suite still
checks the blocks, the installed package's listing, and the guide's model against
genframe's contract in-process.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from genframe.hookspecs import PLUGIN_API_VERSION
from tests.conftest import FAST_TRAINING
from tests.plugin_env import PluginEnv, ok

README = Path(__file__).resolve().parents[1] / "README.md"
DIST = "genframe-foo"
# The package the guide writes: pyproject, hooks, model, config, the author's test.
FILES = {
    "pyproject.toml",
    "genframe_foo/__init__.py",
    "genframe_foo/model.py",
    "genframe_foo/conf/model/foo.yaml",
    "tests/test_contract.py",
}
# Blocks of these languages are commands to type, not files.
COMMAND_LANGUAGES = {"bash", "console", "sh", "shell"}


def guide_section(text: str) -> str:
    """README.md from ``## Plugin guide`` up to the next ``## `` heading."""
    match = re.search(r"^## Plugin guide.*?(?=^## )", text, flags=re.M | re.S)
    assert match, "README.md has no '## Plugin guide' section followed by another '## ' section"
    return match.group(0)


def guide_files(text: str) -> dict[str, str]:
    """Path -> content of every file block of the guide (commands are left out)."""
    files: dict[str, str] = {}
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```\s*$", guide_section(text),
                                 flags=re.M | re.S):
        if lang in COMMAND_LANGUAGES:
            continue
        first = body.splitlines()[0] if body.strip() else ""
        label = re.fullmatch(r"#\s*(\S+)\s*", first)
        assert label, f"a ```{lang} block of the plugin guide does not start with '# <path>': {first!r}"
        path = label.group(1)
        assert not Path(path).is_absolute() and ".." not in Path(path).parts, path
        assert path not in files, f"two blocks of the plugin guide are {path}"
        files[path] = body
    return files


def write_package(files: dict[str, str], root: Path) -> Path:
    for path, body in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    return root


def test_the_guide_blocks_are_the_files_of_one_package():
    files = guide_files(README.read_text())
    assert set(files) == FILES
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads(files["pyproject.toml"])
    assert pyproject["build-system"]["build-backend"]
    assert pyproject["project"]["name"] == DIST
    assert pyproject["project"]["entry-points"]["genframe"] == {"foo": "genframe_foo"}
    for path, body in files.items():
        if path.endswith(".py"):
            compile(body, path, "exec")
    hooks = ast.parse(files["genframe_foo/__init__.py"])
    api = [node.value.value for node in hooks.body if isinstance(node, ast.Assign)
           and any(getattr(t, "id", None) == "GENFRAME_PLUGIN_API" for t in node.targets)]
    assert api == [PLUGIN_API_VERSION]
    assert yaml.safe_load(files["genframe_foo/conf/model/foo.yaml"])["name"] == "foo"


def test_the_guide_model_meets_the_contract(tmp_path, monkeypatch):
    """In-process and fast: the registered tiny preset of the guide's model passes the
    contract (the slow test below runs the guide's own test file on the installed package)."""
    from genframe.testing import check_model_contract

    monkeypatch.syspath_prepend(str(write_package(guide_files(README.read_text()), tmp_path / "src")))
    try:
        hooks = importlib.import_module("genframe_foo")
        registered = {}
        hooks.genframe_register_models(lambda name, target, **kw: registered.update({name: (target, kw)}))
        target, kw = registered["foo"]
        module, _, cls = target.partition(":")
        model = getattr(importlib.import_module(module), cls)
        check_model_contract(model, tiny=kw["tiny"], tmp_path=tmp_path)
    finally:  # no other test may see this copy of the package
        for name in [m for m in sys.modules if m == "genframe_foo" or m.startswith("genframe_foo.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def guide_env(tmp_path_factory):
    """The guide's package, pip-installed into a throwaway venv."""
    source = write_package(guide_files(README.read_text()), tmp_path_factory.mktemp("guide-src"))
    env = PluginEnv(tmp_path_factory.mktemp("guide-plugin"), source, DIST)
    env.install()
    try:
        yield env
    finally:
        env.uninstall()


def test_genframe_plugins_lists_it_with_no_api_warning(guide_env):
    listing = ok(guide_env.genframe("plugins", "--json"))
    foo = {p["plugin"]: p for p in json.loads(listing.stdout)}["foo"]
    assert foo["distribution"] == DIST and foo["version"] == "0.1.0", foo
    assert foo["plugin_api"] == PLUGIN_API_VERSION and foo["problem"] is None, foo
    assert "model=foo" in foo["registered"], foo
    table = ok(guide_env.genframe("plugins")).stdout
    assert "foo" in table and "plugin 'foo'" not in table, table  # no "warning: plugin 'foo' ..."


def _run_dir(result) -> Path:
    found = re.search(r"^run directory: (.+)$", result.stdout, flags=re.M)
    assert found, result.stdout[-2000:]
    return Path(found.group(1).strip())


@pytest.mark.slow
def test_train_and_generate_with_the_guide_model(guide_env):
    train = ok(guide_env.genframe("train", "model=foo", *FAST_TRAINING, timeout=600))
    run = _run_dir(train)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val/loss"] > 0, metrics
    assert json.loads((run / "run.json").read_text())["model"]["name"] == "foo"

    generate = ok(guide_env.genframe("generate", f"run={run}", "num_samples=3", "seed=5",
                                     "condition.label=3", "sampling.temperature=0.5"))
    folder = _run_dir(generate) / "samples"
    lines = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all((folder / line["file"]).is_file() for line in lines)
    # genframe, not the model, records the registered name and the seed.
    assert {(r["model"], r["seed"], r["temperature"]) for r in lines} == {("foo", 5, 0.5)}
    assert [r["condition"] for r in lines] == [{"label": 3}] * 3


@pytest.mark.slow
def test_the_guides_contract_test_passes(guide_env):
    result = guide_env.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py",
                           cwd=guide_env.source, timeout=600)
    ok(result)
    assert "1 passed" in result.stdout, result.stdout[-2000:]
