"""The README documents the whole extension surface and the commands it promises."""

from __future__ import annotations

import inspect
from pathlib import Path

from genframe import hookspecs

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _hooks() -> list[str]:
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("genframe_")]


def test_every_hook_is_documented_in_the_readme():
    hooks = _hooks()
    assert len(hooks) >= 3
    for name in hooks:
        assert f"`{name}(register)`" in README, f"hook {name} is not documented in README.md"


def test_every_hook_has_a_docstring():
    for name in _hooks():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name


def test_readme_names_every_config_group_and_env_switch():
    from genframe.config import config_groups
    from genframe.hardware import ALLOCATOR_ENV
    from genframe.plugins import ALLOW_ENV, AUTOLOAD_ENV

    for group in config_groups():
        assert f"`{group}`" in README, group
    assert ALLOW_ENV in README and AUTOLOAD_ENV in README and f"`{ALLOCATOR_ENV}=0`" in README
