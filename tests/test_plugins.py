"""Plugin discovery: entry points, allow-list and autoload switches, attribution."""

from __future__ import annotations

import pytest

from genframe import plugins
from genframe.errors import UserError
from genframe.hookspecs import hookimpl


def test_builtins_come_through_entry_points():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="genframe")}
    assert "vae" in names
    registry = plugins.build_registry()
    assert registry.models["vae"].plugin == "vae"
    assert registry.plugins["vae"].distribution == "genframe"
    assert "model=vae" in registry.plugins["vae"].registered


def test_disable_autoload(monkeypatch):
    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "1")
    registry = plugins.build_registry()
    assert "vae" not in registry.models
    assert "digits" in registry.data  # the core's data modules are not plugins


def test_allow_list(monkeypatch):
    monkeypatch.setenv(plugins.AUTOLOAD_ENV, "1")
    monkeypatch.setenv(plugins.ALLOW_ENV, "vae")
    assert "vae" in plugins.build_registry().models


def test_allow_list_unknown_name(monkeypatch):
    monkeypatch.setenv(plugins.ALLOW_ENV, "vea")
    with pytest.raises(UserError, match="Did you mean 'vae'"):
        plugins.build_registry()


class _Twice:
    @staticmethod
    @hookimpl
    def genframe_register_models(register):
        register("vae", "genframe_plugins.vae.model:VAE")


def test_duplicate_names_are_refused():
    with pytest.raises(UserError, match="registered twice"):
        plugins.build_registry([("twice", _Twice)])


def test_unknown_model_name_suggests():
    registry = plugins.build_registry()
    with pytest.raises(UserError, match="Did you mean 'vae'"):
        registry.model("vea")


def test_cli_plugins_lists_what_each_registered(cli):
    result = cli("plugins")
    assert result.returncode == 0, result.stderr
    assert "vae" in result.stdout and "model=vae" in result.stdout
    assert "digits" in result.stdout


def test_cli_with_autoload_off_has_no_vae(cli):
    result = cli("train", "--cfg", "job", env={plugins.AUTOLOAD_ENV: "1"})
    assert result.returncode == 2
    assert "model=vae" in result.stderr


def test_a_plugin_module_that_does_not_import_names_the_plugin(tmp_path, monkeypatch):
    (tmp_path / "broken_model_mod.py").write_text("def oops(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class Broken:
        @staticmethod
        @hookimpl
        def genframe_register_models(register):
            register("broken", "broken_model_mod:Model")

    plugins.add_plugin("brokenplugin", Broken)
    try:
        with pytest.raises(UserError, match=r"model 'broken' from plugin 'brokenplugin' cannot "
                                            r"be loaded: broken_model_mod:Model \(SyntaxError"):
            plugins.get_registry().model("broken").load()
    finally:
        plugins.remove_plugin("brokenplugin")


def test_a_plugin_that_fails_to_import_stops_no_command(monkeypatch, capsys):
    """One broken third-party plugin: a warning naming it, the other models still work,
    `genframe plugins` shows it, and asking for a missing model mentions it."""
    from importlib.metadata import EntryPoint

    from genframe.cli import main

    real = list(plugins.entry_points(group="genframe"))
    broken = EntryPoint(name="shiny", value="genframe_shiny_missing_module:plugin", group="genframe")
    monkeypatch.setattr(plugins, "entry_points", lambda group: [*real, broken])
    plugins.reset_registry()
    try:
        registry = plugins.get_registry()
        assert "vae" in registry.models
        info = registry.plugins["shiny"]
        assert "ModuleNotFoundError" in info.load_error and "failed to import" in info.api_problem
        with pytest.raises(UserError, match="plugin shiny failed to import"):
            registry.model("shiny")
        assert main(["plugins"]) == 0
        out = capsys.readouterr()
        assert "shiny" in out.out and "failed to import" in out.out + out.err
    finally:
        monkeypatch.undo()
        plugins.reset_registry()
