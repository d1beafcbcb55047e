"""Imports flow one way, with no cycles (DESIGN.md, "Imports flow one way").

Every module under ``genframe/`` and ``plugins/`` (installed as ``genframe_plugins``) is
read with `ast`, so imports inside functions count as much as those at the top of a file:
a cycle or an upward arrow hidden in a function is still a dependency, only a later one.
The rules:

- no import cycle between modules;
- the core (every ``genframe.*`` module except ``genframe.tasks.*``, ``genframe.cli``,
  ``genframe.testing`` and ``genframe.__main__``) never imports ``genframe.tasks``;
- ``genframe.layers`` imports nothing of genframe but itself and ``genframe.errors``;
- a built-in plugin never imports ``genframe.tasks``, ``genframe.plugins`` or
  ``genframe.config`` (the tasks, the registry and the config line);
- the core never imports a built-in plugin;
- ``genframe.cli`` is imported by ``genframe.__main__`` only.

The same rules are printed by ``python ../shared/tools/import_rules.py .`` from the
project root.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Source folder -> the package name it is installed as (pyproject.toml's package-dir).
PACKAGES = {"genframe": "genframe", "plugins": "genframe_plugins"}

# genframe modules above the core: they may import the tasks.
FRONT = {"genframe.cli", "genframe.testing", "genframe.__main__"}


@dataclass(frozen=True)
class Import:
    """One arrow of the graph: `source` imports `target` at `path`:`line`."""

    source: str
    target: str
    path: Path
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.path}:{self.line})"


def module_files(root: Path) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of the packages under `root`."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root / folder).with_suffix("").parts
            name = ".".join([package, *(p for p in parts if p != "__init__")])
            modules[name] = path
    return modules


def _imported_names(module: str, path: Path, node: ast.Import | ast.ImportFrom,
                    modules: dict[str, Path]) -> list[str]:
    """The dotted names one import statement brings in, relative imports resolved.

    ``from a.b import c`` names ``a.b.c`` when that is a module and ``a.b`` otherwise (c is
    then an attribute of ``a.b``).
    """
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        # `from .x import y` in a.b.c (a module) is relative to package a.b; in a/b/__init__.py
        # (the package a.b itself) it is relative to a.b. Each extra dot goes one level up.
        package = module.split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that `name` lives in (its longest known prefix), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = ROOT) -> dict[str, list[Import]]:
    """Module name -> the imports of our own modules it makes (the first line of each)."""
    modules = module_files(root)
    graph: dict[str, list[Import]] = {}
    for module, path in modules.items():
        seen: dict[str, Import] = {}
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):  # module level, in functions and classes alike
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported_names(module, path, node, modules):
                target = _owner(name, modules)
                if target and target != module and (
                        target not in seen or node.lineno < seen[target].line):
                    seen[target] = Import(module, target, path.relative_to(root), node.lineno)
        graph[module] = sorted(seen.values(), key=lambda i: i.line)
    return graph


def _is_own_package(module: str, target: str) -> bool:
    """Whether `target` is a package that contains `module` (``genframe`` for ``genframe.x``)."""
    return module.startswith(target + ".")


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """The groups of modules that import each other (strongly connected, more than one).

    An arrow from a module to a package it lives in is left out: Python always runs a
    package's ``__init__`` before its children, so such an arrow adds no order, and the
    loop it closes is a package ``__init__`` re-exporting its own children.
    """
    arrows = {m: [i.target for i in imports if not _is_own_package(m, i.target)]
              for m, imports in graph.items()}
    # Tarjan's algorithm, iterative (no recursion limit on a long chain).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(arrows):
        if start in index:
            continue
        work = [(start, iter(arrows[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(arrows[target])))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        found.append(sorted(group))
    return sorted(found)


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def forbidden(arrow: Import) -> str | None:
    """Why `arrow` breaks a layering rule, or None if it is allowed."""
    src, dst = arrow.source, arrow.target
    core = _in(src, "genframe") and not _in(src, "genframe.tasks") and src not in FRONT
    if core and _in(dst, "genframe.tasks"):
        return "the core imports the tasks"
    if _in(src, "genframe.layers") and _in(dst, "genframe") and not (
            _in(dst, "genframe.layers") or dst == "genframe.errors"):
        return "genframe.layers imports beyond itself and genframe.errors"
    if _in(src, "genframe_plugins") and any(
            _in(dst, p) for p in ("genframe.tasks", "genframe.plugins", "genframe.config")):
        return "a built-in plugin imports the tasks, the registry or the config line"
    if _in(src, "genframe") and _in(dst, "genframe_plugins"):
        return "the core imports a built-in plugin"
    if dst == "genframe.cli" and src != "genframe.__main__":
        return "genframe.cli is imported by something other than genframe.__main__"
    return None


def violations(root: Path = ROOT) -> list[str]:
    """Every cycle and forbidden arrow under `root`, one readable line each."""
    graph = import_graph(root)
    lines = []
    for group in cycles(graph):
        inside = [str(i) for m in group for i in graph[m] if i.target in group
                  and not _is_own_package(m, i.target)]
        lines.append("cycle between " + ", ".join(group) + ":\n      " + "\n      ".join(inside))
    for imports in graph.values():
        for arrow in imports:
            why = forbidden(arrow)
            if why:
                lines.append(f"{why}: {arrow}")
    return lines


# -- the project ---------------------------------------------------------------------------

def test_the_graph_covers_both_packages():
    graph = import_graph()
    # A few modules every version of the project has; an empty graph would pass everything.
    for module in ("genframe.cli", "genframe.__main__", "genframe.plugins", "genframe.layers",
                   "genframe.tasks.train", "genframe_plugins.vae.model"):
        assert module in graph, module
    assert any(i.target == "genframe.cli" for i in graph["genframe.__main__"])


def test_imports_flow_one_way_without_cycles():
    found = violations()
    assert not found, (f"{len(found)} import rule violation(s) (see DESIGN.md, "
                       "'Imports flow one way'):\n  " + "\n  ".join(found))


# -- the checker itself --------------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


CLEAN = {
    "genframe/__init__.py": "",
    "genframe/errors.py": "",
    "genframe/config.py": "",
    "genframe/hookspecs.py": "",
    "genframe/layers/__init__.py": "from .conv import Conv  # re-exports its child\n",
    # A child importing its own package closes no cycle with the re-export above.
    "genframe/layers/conv.py": "from genframe.errors import UserError\nfrom genframe import layers\n",
    "genframe/module.py": "from genframe.layers import Conv\n",
    "genframe/tasks/__init__.py": "",
    "genframe/tasks/train.py": "def train():\n    from ..module import GenerativeModule\n",
    "genframe/cli.py": "from genframe.tasks import train\n",
    "genframe/__main__.py": "from genframe.cli import main\n",
    "plugins/__init__.py": "",
    "plugins/vae/__init__.py": "from genframe.hookspecs import hookimpl\n",
    "plugins/vae/model.py": "from genframe.module import GenerativeModule\nfrom genframe import layers\n",
}


def test_a_clean_tree_passes(tmp_path):
    root = _write(tmp_path, CLEAN)
    graph = import_graph(root)
    # Relative imports resolve, function-level imports count, `from pkg import module`
    # points at the module.
    assert [i.target for i in graph["genframe.tasks.train"]] == ["genframe.module"]
    assert [i.target for i in graph["genframe_plugins.vae.model"]] == [
        "genframe.module", "genframe.layers"]
    assert violations(root) == []


@pytest.mark.parametrize("rel,text,expected", [
    # A two-module cycle made of a function-level and a relative import.
    ("genframe/errors.py", "def f():\n    from .module import GenerativeModule\n",
     "cycle between genframe.errors, genframe.layers, genframe.layers.conv, genframe.module"),
    ("genframe/module.py", "from genframe.layers import Conv\nfrom genframe.tasks.train import train\n",
     "the core imports the tasks: genframe.module -> genframe.tasks.train (genframe/module.py:2)"),
    ("genframe/layers/conv.py", "import genframe.module\n",
     "genframe.layers imports beyond itself and genframe.errors: genframe.layers.conv -> genframe.module"),
    ("plugins/vae/model.py", "from genframe import config\n",
     "a built-in plugin imports the tasks, the registry or the config line: "
     "genframe_plugins.vae.model -> genframe.config"),
    ("genframe/module.py", "def f():\n    from genframe_plugins.vae import model\n",
     "the core imports a built-in plugin: genframe.module -> genframe_plugins.vae.model"),
    ("genframe/tasks/train.py", "from genframe import cli\n",
     "genframe.cli is imported by something other than genframe.__main__: "
     "genframe.tasks.train -> genframe.cli"),
])
def test_the_checker_catches_a_cycle_or_a_forbidden_arrow(tmp_path, rel, text, expected):
    found = violations(_write(tmp_path, {**CLEAN, rel: text}))
    assert any(line.startswith(expected) for line in found), found
