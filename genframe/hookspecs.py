"""The whole extension surface of genframe: four pluggy hooks.

A plugin is a module (or object) with functions marked ``@hookimpl`` and listed under the
``genframe`` entry-point group of its distribution::

    [project.entry-points.genframe]
    mymodel = "genframe_mymodel"

Each hook receives a ``register`` callback; call it once per thing you add. Keep the
plugin module light (no torch import at top level): give targets as ``"module:Class"``
strings and genframe imports them only when a task needs them, so the CLI stays fast.

The plugin module declares the plugin API it was written for, ``GENFRAME_PLUGIN_API = 1``
(`PLUGIN_API_VERSION`); `genframe plugins` reports a plugin that declares another
version, or none.
"""

from __future__ import annotations

import pluggy

#: The plugin API this genframe provides (the hooks below and the `GenerativeModule`
#: contract). It changes when a plugin written for the old one would break.
PLUGIN_API_VERSION = 1

hookspec = pluggy.HookspecMarker("genframe")
hookimpl = pluggy.HookimplMarker("genframe")


@hookspec
def genframe_register_models(register):
    """Add model classes: ``register(name, target, *, tiny=None, description="")``.

    `target` is a `GenerativeModule` subclass or a ``"module:Class"`` string; `name` is
    the CLI choice (``model=name``) and must match the ``name:`` key of the model's YAML;
    `tiny` holds constructor arguments of a preset that trains a step on CPU in well under
    a second (the contract test in `genframe.testing` uses it).
    """


@hookspec
def genframe_register_data(register):
    """Add data modules: ``register(name, target, *, description="")``.

    `target` is a `GenerativeDataModule` subclass or a ``"module:Class"`` string; it is
    selected by the ``name:`` key of a ``data`` config.
    """


@hookspec
def genframe_register_configs(register):
    """Add a config directory: ``register(path)``.

    The directory is laid out like genframe's ``conf/`` (``model/foo.yaml`` adds the
    choice ``model=foo``); its files join Hydra's config store, so no edit to genframe
    is needed to select them.
    """


@hookspec
def genframe_register_samplers(register):
    """Add samplers for diffusion-style models: ``register(name, target, *, description="")``.

    `target` is a `genframe.samplers.Sampler` subclass or a ``"module:Class"`` string; it
    is chosen at generate time with ``sampler=name`` and its constructor arguments
    (``sampler.steps=50``), without retraining.
    """
