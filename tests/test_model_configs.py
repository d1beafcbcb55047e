"""Every model YAML agrees with the class it configures, read from both sides.

Driven by the registry: each ``model/<name>.yaml`` of genframe's config directory and of
every plugin's is checked against the class registered under ``<name>``:

- the file name, its ``name:`` key and a registered model name are the same;
- every other key is a constructor argument (``inspect.signature``), and every
  constructor argument without a default is set;
- a plain value (not a ``${...}`` interpolation) has the argument's type, and in a model's
  base config it *is* the constructor's default, so the YAML documents the code.

A class may be registered under several names: ``transformer`` and the size presets
``transformer_mini`` and ``transformer_small``. A preset's name extends the base's with
``_<size>`` and differs from the defaults on purpose, so for presets only the types are
checked (`genframe.config.check_kwargs`). Names are never hard-coded here: a constructor
argument renamed in the class and the YAML together keeps this test green; one renamed on
one side only fails it.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from genframe.config import check_kwargs, conf_dir
from genframe.plugins import get_registry

REGISTRY = get_registry()


def model_yamls() -> list[tuple[str, Path]]:
    """(provider, path) of every ``model/*.yaml`` in genframe's and each plugin's configs."""
    roots = [("genframe", conf_dir()), *REGISTRY.config_dirs]
    return [(provider, path) for provider, root in roots
            for path in sorted((Path(root) / "model").glob("*.yaml"))]


YAMLS = model_yamls()


def registered_class(name: str) -> type:
    return REGISTRY.models[name].load()


def base_names(name: str) -> list[str]:
    """The registered names of the same class that `name` is a preset of (``transformer``
    for ``transformer_mini``); empty when `name` is a base config itself."""
    cls = registered_class(name)
    return [other for other in REGISTRY.models
            if name.startswith(other + "_") and registered_class(other) is cls]


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The named arguments of ``cls.__init__`` (not self, not ``*args``/``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if n != "self"
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def is_interpolated(value: Any) -> bool:
    """Whether a raw YAML value is (or holds) an interpolation or Hydra's ``???``."""
    if isinstance(value, str):
        return "${" in value or value == "???"
    if isinstance(value, dict):
        return any(is_interpolated(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(is_interpolated(v) for v in value)
    return False


def plain(value: Any) -> Any:
    """Tuples as lists (a YAML list is a list; a default is often a tuple), recursively."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def all_optional(cls: type):
    """``cls.__init__`` as `check_kwargs` sees it, with every argument optional.

    Only the plain values are type-checked; an argument set by interpolation is known
    once the config is composed, so it must not count as missing here.
    """
    init = cls.__init__

    @functools.wraps(init)  # keeps the annotations and the module for get_type_hints
    def view(*args, **kwargs):
        raise NotImplementedError

    sig = inspect.signature(init)
    view.__signature__ = sig.replace(parameters=[
        p.replace(default=None) if p.default is p.empty and p.name != "self"
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) else p
        for p in sig.parameters.values()])
    return view


def read(path: Path) -> dict[str, Any]:
    """The YAML as written: interpolations unresolved, ``# @package`` lines ignored."""
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def test_model_configs_are_found():
    # An empty parametrization would pass everything below.
    assert YAMLS, "no model/*.yaml in genframe's or any plugin's config directory"
    names = [path.stem for _, path in YAMLS]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"model configs defined in more than one config directory: {duplicates}"


@pytest.mark.parametrize("provider,path", YAMLS,
                         ids=[f"{prov}:{path.name}" for prov, path in YAMLS])
def test_model_yaml_matches_its_class(provider, path):
    where = f"{provider}: model/{path.name}"
    node = read(path)
    assert node.get("name") == path.stem, (
        f"{where}: name: {node.get('name')!r} differs from the file name {path.stem!r}")
    assert path.stem in REGISTRY.models, (
        f"{where}: no model named {path.stem!r} is registered "
        f"(registered: {sorted(REGISTRY.models)})")
    cls = registered_class(path.stem)
    params = constructor_parameters(cls)
    # `defaults` is Hydra's defaults list (the data a model trains on by default), not a key.
    keys = {k: v for k, v in node.items() if k not in ("name", "defaults")}

    unknown = sorted(set(keys) - set(params))
    assert not unknown, (f"{where}: {unknown} are not constructor arguments of "
                         f"{cls.__module__}.{cls.__qualname__}; its arguments: {sorted(params)}")
    required = sorted(n for n, p in params.items() if p.default is p.empty)
    missing = [n for n in required if n not in keys]
    assert not missing, f"{where}: constructor arguments without a default are not set: {missing}"

    literals = {k: v for k, v in keys.items() if not is_interpolated(v)}
    # The types of the plain values, as a run would check them (raises UserError).
    check_kwargs(all_optional(cls), literals, where="model", source=lambda key: where)

    bases = base_names(path.stem)
    if bases:  # a size preset: other values than the defaults on purpose
        return
    differ = {k: (v, params[k].default) for k, v in literals.items()
              if params[k].default is not params[k].empty and plain(v) != plain(params[k].default)}
    assert not differ, (
        f"{where} is the base config of {cls.__qualname__}: its plain values must be the "
        f"constructor's defaults; (yaml, default) differ for: {differ}")

