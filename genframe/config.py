"""Where configs come from and how a config node becomes constructor arguments.

- `conf_dir()`: genframe's own config tree (`conf/` in the source, `genframe.conf` when
  installed).
- `register_plugin_configs()`: puts every plugin's config directory into Hydra's
  ConfigStore, so ``model=<plugin model>`` is a valid choice.
- `check_kwargs()`: the config-line check. A node's keys must be the target's constructor
  arguments and each value must fit the argument's type hint; a typo or a wrong type is
  a `UserError` naming the key, where it was set, and the closest valid keys.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from genframe.errors import UserError, did_you_mean, valid_list

def conf_dir() -> Path:
    """The directory of genframe's own Hydra configs."""
    from importlib.resources import files

    return Path(str(files("genframe.conf")))


def config_groups(extra_dirs: Sequence[Path] = ()) -> dict[str, list[str]]:
    """Config groups and their choices, read from the YAML files (no Hydra import)."""
    groups: dict[str, set[str]] = {}
    for root in [conf_dir(), *extra_dirs]:
        for path in Path(root).rglob("*.yaml"):
            rel = path.relative_to(root)
            if len(rel.parts) < 2 or rel.parts[0] == "hydra":
                continue
            groups.setdefault("/".join(rel.parts[:-1]), set()).add(path.stem)
    return {g: sorted(c) for g, c in sorted(groups.items())}


_STORED: list[tuple[str | None, str]] | None = None


def required_value(hint: str) -> Any:
    """The ``${genframe.required:'<hint>'}`` resolver: a value a config cannot have a
    default for (an experiment's ``model.autoencoder``), which stays required even where
    it is merged over a default (OmegaConf's ``???`` does not override a set value).

    Raises:
        UserError: always, with `hint` (what to give); reached only when the value was
            not overridden.
    """
    raise UserError(f"required but not set: {hint}")


def register_plugin_configs() -> None:
    """Add each plugin's config directory to Hydra's ConfigStore (once per process), and
    register genframe's config resolvers (`required_value`)."""
    global _STORED
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("genframe.required"):
        OmegaConf.register_new_resolver("genframe.required", required_value)
    if _STORED is not None:
        return
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from genframe.plugins import get_registry, on_registry_reset

    on_registry_reset(reset_config_store)
    cs = ConfigStore.instance()
    stored = []
    for plugin, root in get_registry().config_dirs:
        for path in sorted(root.rglob("*.yaml")):
            rel = path.relative_to(root)
            group = "/".join(rel.parts[:-1]) or None
            package = _package_header(path)
            node = OmegaConf.load(path)
            cs.store(name=path.stem, node=node, group=group, package=package, provider=plugin)
            stored.append((group, path.stem))
    _STORED = stored


def reset_config_store() -> None:
    """Forget the plugin configs stored so far (after the registry changed)."""
    global _STORED
    if _STORED is None:
        return
    from hydra.core.config_store import ConfigStore

    repo = ConfigStore.instance().repo
    for group, name in _STORED:
        node = repo
        for part in (group.split("/") if group else []):
            node = node.get(part, {})
        node.pop(f"{name}.yaml", None)
    _STORED = None


def _package_header(path: Path) -> str | None:
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not text
        for line in f:
            line = line.strip()
            if not line.startswith("#"):
                break
            if line.startswith("# @package"):
                return line.split(maxsplit=2)[2].strip()
    return None


def compose(task: str, overrides: Sequence[str] = (), *, return_hydra_config: bool = False):
    """Compose a task's config as `genframe <task> overrides...` would (for tests and notebooks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_plugin_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(
            config_name=task, overrides=list(overrides), return_hydra_config=return_hydra_config
        )


# -- constructor-argument checks ---------------------------------------------------------

_MISSING = inspect.Parameter.empty


def check_kwargs(
    target: Callable, kwargs: Mapping[str, Any], *, where: str, source: Callable[[str], str] | None = None,
    ignore: Sequence[str] = (),
) -> dict[str, Any]:
    """Check `kwargs` against `target`'s signature; return them as a plain dict.

    Args:
        target: a class or function whose parameters are the valid keys.
        kwargs: the (resolved, plain) config values.
        where: the config path of the node, e.g. ``"model"``; used in messages.
        source: maps a key to where it was set ("the command line", "model/vae.yaml").
        ignore: parameters that are not config keys (neither valid keys nor required).
    """
    fn = target.__init__ if inspect.isclass(target) else target
    sig = inspect.signature(fn)
    params = {n: p for n, p in sig.parameters.items()
              if n != "self" and n not in ignore and p.kind not in (p.VAR_POSITIONAL,)}
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind != p.VAR_KEYWORD}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: skip type checks, keep key checks
        hints = {}

    def origin(key: str) -> str:
        return f" (set in {source(key)})" if source else ""

    for key, value in kwargs.items():
        if key not in named:
            if accepts_any:
                continue
            raise UserError(
                f"{where}.{key}: unknown key{origin(key)}.{did_you_mean(key, named)}"
                f" Valid keys of {where}: {valid_list(named)}"
            )
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise UserError(
                f"{where}.{key}: expected {_type_name(hint)}, got {value!r}"
                f" ({type(value).__name__}){origin(key)}"
            )
    missing = [n for n, p in named.items() if p.default is _MISSING and n not in kwargs]
    if missing:
        raise UserError(
            f"{where}: missing required {'key' if len(missing) == 1 else 'keys'} {', '.join(missing)}"
            + (f" (the config came from {source(missing[0])})" if source else "")
        )
    return dict(kwargs)


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` (plain YAML data) fits the type hint `hint`; unknown hints pass."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    org = typing.get_origin(hint)
    args = typing.get_args(hint)
    if org in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if org is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if org in (list, tuple, Sequence, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if org is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],)
        if not args:
            return True
        if len(args) == 1:
            return all(_fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args))
    if org in (dict, Mapping, typing.Mapping) or hint is dict:
        return isinstance(value, Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint) if hint.__module__ == "builtins" else True
    return True


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if hint in names:
        return names[hint]
    org = typing.get_origin(hint)
    if org in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None)) + (
            " or null" if type(None) in typing.get_args(hint) else ""
        )
    if org is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if org in (list, tuple, Sequence):
        args = typing.get_args(hint)
        return f"a list of {_type_name(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    return getattr(hint, "__name__", str(hint))
