"""Plugin loading and the registry of models, data modules and config directories.

Plugins are found through the ``genframe`` entry-point group (the built-in models too).
Two environment variables control loading:

- ``GENFRAME_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugin except those named
  in ``GENFRAME_PLUGINS``.
- ``GENFRAME_PLUGINS=a,b``: load only the entry points named ``a`` and ``b``.

Nothing here imports torch: targets are imported when a task asks for them.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from genframe import hookspecs
from genframe.errors import UserError, did_you_mean, valid_list

AUTOLOAD_ENV = "GENFRAME_DISABLE_PLUGIN_AUTOLOAD"
ALLOW_ENV = "GENFRAME_PLUGINS"

log = logging.getLogger("genframe")


@dataclass
class Registration:
    """One model or data module a plugin registered."""

    kind: str  # "model" or "data"
    name: str
    target: Any  # a class or a "module:Class" string
    plugin: str
    description: str = ""
    tiny: dict[str, Any] | None = None

    def load(self) -> type:
        """Import and return the registered class."""
        if not isinstance(self.target, str):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)
        except Exception as exc:  # ImportError, AttributeError, a SyntaxError in the plugin
            raise UserError(
                f"{self.kind} '{self.name}' from plugin '{self.plugin}' cannot be loaded: "
                f"{self.target} ({type(exc).__name__}: {exc})"
            ) from exc


@dataclass
class PluginInfo:
    """A loaded plugin: where it came from, the plugin API it declares, what it added."""

    name: str
    module: str
    distribution: str
    version: str
    registered: list[str] = field(default_factory=list)
    #: ``GENFRAME_PLUGIN_API`` of the plugin module (None: not declared).
    api: Any = None
    #: Why the plugin could not be imported (None: it was); such a plugin registers nothing.
    load_error: str | None = None

    @property
    def api_problem(self) -> str | None:
        """Why the plugin may not work with this genframe, or None when it declares the
        plugin API this genframe provides."""
        if self.load_error is not None:
            return f"failed to import, so it registered nothing: {self.load_error}"
        if self.api == hookspecs.PLUGIN_API_VERSION:
            return None
        if isinstance(self.api, bool) or not isinstance(self.api, int) and self.api is not None:
            return (f"declares GENFRAME_PLUGIN_API = {self.api!r} ({type(self.api).__name__}); "
                    f"expected the integer {hookspecs.PLUGIN_API_VERSION}")
        if self.api is None:
            return (f"declares no plugin API version (add GENFRAME_PLUGIN_API = "
                    f"{hookspecs.PLUGIN_API_VERSION} to {self.module} once it follows the "
                    "current plugin guide)")
        return (f"written for plugin API {self.api!r}; this genframe provides "
                f"{hookspecs.PLUGIN_API_VERSION} (see the README's plugin guide)")


@dataclass
class Registry:
    models: dict[str, Registration] = field(default_factory=dict)
    data: dict[str, Registration] = field(default_factory=dict)
    samplers: dict[str, Registration] = field(default_factory=dict)
    config_dirs: list[tuple[str, Path]] = field(default_factory=list)
    plugins: dict[str, PluginInfo] = field(default_factory=dict)

    def model(self, name: str) -> Registration:
        return self._lookup(self.models, "model", name)

    def data_module(self, name: str) -> Registration:
        return self._lookup(self.data, "data", name)

    def sampler(self, name: str) -> Registration:
        return self._lookup(self.samplers, "sampler", name)

    def _lookup(self, table: dict[str, Registration], kind: str, name: str) -> Registration:
        if name not in table:
            broken = [p.name for p in self.plugins.values() if p.load_error is not None]
            also = (f"; plugin{'s' if len(broken) > 1 else ''} {valid_list(broken)} failed to "
                    "import and registered nothing" if broken else "")
            raise UserError(
                f"{kind}.name: no {kind} named '{name}' is registered.{did_you_mean(name, table)}"
                f" Registered: {valid_list(table)} (see `genframe plugins`{also})"
            )
        return table[name]


class _Collector:
    """Hands each plugin `register` callbacks that record who registered what."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def _add(self, kind: str, table: dict, plugin: str, name: str, target: Any, **extra) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise UserError(f"plugin '{plugin}': {kind} name {name!r} must be an identifier")
        if name in table:
            raise UserError(
                f"{kind} '{name}' is registered twice: by plugin '{table[name].plugin}' "
                f"and by plugin '{plugin}'. Uninstall one of them or allow-list plugins "
                f"with {ALLOW_ENV}."
            )
        table[name] = Registration(kind, name, target, plugin, **extra)
        self.registry.plugins[plugin].registered.append(f"{kind}={name}")

    def callbacks(self, plugin: str) -> dict[str, Any]:
        def register_model(name, target, *, tiny=None, description=""):
            self._add("model", self.registry.models, plugin, name, target,
                      tiny=tiny, description=description)

        def register_data(name, target, *, description=""):
            self._add("data", self.registry.data, plugin, name, target, description=description)

        def register_sampler(name, target, *, description=""):
            self._add("sampler", self.registry.samplers, plugin, name, target, description=description)

        def register_configs(path):
            path = Path(path)
            if not path.is_dir():
                raise UserError(f"plugin '{plugin}' registered a missing config directory: {path}")
            self.registry.config_dirs.append((plugin, path))
            self.registry.plugins[plugin].registered.append(f"configs={path}")

        return {"model": register_model, "data": register_data, "sampler": register_sampler,
                "configs": register_configs}


def _selected_entry_points() -> list:
    eps = list(entry_points(group="genframe"))
    allow = [p.strip() for p in os.environ.get(ALLOW_ENV, "").split(",") if p.strip()]
    autoload = os.environ.get(AUTOLOAD_ENV, "").lower() not in ("1", "true", "yes")
    names = {ep.name for ep in eps}
    for wanted in allow:
        if wanted not in names:
            raise UserError(
                f"{ALLOW_ENV}: no installed plugin named '{wanted}'.{did_you_mean(wanted, names)}"
                f" Installed: {valid_list(names)}"
            )
    if allow:
        return [ep for ep in eps if ep.name in allow]
    return eps if autoload else []


def build_registry(extra_plugins: list[tuple[str, Any]] = ()) -> Registry:
    """Load the core, the entry-point plugins and `extra_plugins`, and collect registrations.

    Args:
        extra_plugins: (name, module-or-object) pairs registered in-process, for tests and
            for embedding genframe in another program.
    """
    pm = pluggy.PluginManager("genframe")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    loaded: list[tuple[str, Any]] = []

    from genframe import __version__
    from genframe.data import builtin as core_data
    from genframe.samplers import builtin as core_samplers

    # genframe's own data modules and samplers register through the same hooks.
    for core in (core_data, core_samplers):
        name = core.__name__.removesuffix(".builtin")
        loaded.append((name, core))
        registry.plugins[name] = PluginInfo(name, core.__name__, "genframe", __version__,
                                            api=hookspecs.PLUGIN_API_VERSION)
    for ep in _selected_entry_points():
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, ep.value, dist.metadata["Name"] if dist else "?",
                          dist.version if dist else "?")
        registry.plugins[ep.name] = info
        try:
            obj = ep.load()
        except Exception as exc:
            # One broken third-party plugin must not stop every command (nor
            # `genframe plugins`, which shows it): say who it is, go on without it.
            info.load_error = f"{type(exc).__name__}: {exc}"
            log.warning("genframe: warning: plugin '%s' (%s, from %s) failed to import: %s; "
                        "its models are unavailable. Fix or uninstall it, or set %s to load "
                        "only the plugins you need.", ep.name, ep.value, info.distribution,
                        info.load_error, ALLOW_ENV)
            continue
        info.api = getattr(obj, "GENFRAME_PLUGIN_API", None)
        loaded.append((ep.name, obj))
    for name, obj in extra_plugins:
        registry.plugins[name] = PluginInfo(name, getattr(obj, "__name__", repr(obj)), "(in-process)", "",
                                            api=getattr(obj, "GENFRAME_PLUGIN_API", None))
        loaded.append((name, obj))

    collector = _Collector(registry)
    for name, obj in loaded:
        if pm.is_registered(obj):
            continue
        pm.register(obj, name=name)
        cbs = collector.callbacks(name)
        # Call each plugin's hooks on their own so registrations are attributed to it.
        caller = pm.subset_hook_caller
        others = [p for p in pm.get_plugins() if p is not obj]
        caller("genframe_register_models", others)(register=cbs["model"])
        caller("genframe_register_data", others)(register=cbs["data"])
        caller("genframe_register_samplers", others)(register=cbs["sampler"])
        caller("genframe_register_configs", others)(register=cbs["configs"])
    return registry


_REGISTRY: Registry | None = None
_EXTRA: list[tuple[str, Any]] = []


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry(_EXTRA)
    return _REGISTRY


def add_plugin(name: str, plugin: Any) -> None:
    """Register an in-process plugin (tests, notebooks) and rebuild the registry."""
    _EXTRA.append((name, plugin))
    reset_registry()


def remove_plugin(name: str) -> None:
    _EXTRA[:] = [(n, p) for n, p in _EXTRA if n != name]
    reset_registry()


_ON_RESET: list[Callable[[], None]] = []


def on_registry_reset(callback: Callable[[], None]) -> None:
    """Call `callback` whenever the registry is reset (the config store forgets the
    plugin configs it took from the old registry)."""
    if callback not in _ON_RESET:
        _ON_RESET.append(callback)


def reset_registry() -> None:
    """Forget the registry; the next `get_registry` loads the plugins again."""
    global _REGISTRY
    _REGISTRY = None
    for callback in list(_ON_RESET):
        callback()
