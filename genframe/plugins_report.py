"""`genframe plugins`: what is loaded, from which distribution, and what it registered."""

from __future__ import annotations

from genframe.hookspecs import PLUGIN_API_VERSION
from genframe.plugins import ALLOW_ENV, AUTOLOAD_ENV, get_registry


def config_problems(plugin: str) -> list[str]:
    """Mistakes in a plugin's model configs that would only show when a task runs: a
    ``model/<file>.yaml`` whose ``name:`` is not its file name, or names no registered
    model (the file name, the ``name:`` key and the registered name must agree)."""
    from omegaconf import OmegaConf

    registry = get_registry()
    problems = []
    for owner, root in registry.config_dirs:
        if owner != plugin:
            continue
        for path in sorted((root / "model").glob("*.yaml")):
            try:
                name = OmegaConf.load(path).get("name")
            except Exception as exc:  # a broken YAML file: say which
                problems.append(f"{path}: not readable YAML ({type(exc).__name__})")
                continue
            if name != path.stem:
                problems.append(f"{path}: name: {name!r} differs from the file name "
                                f"'{path.stem}' (model={path.stem} would build '{name}')")
            elif name not in registry.models:
                problems.append(f"{path}: name: {name!r} is no registered model (registered: "
                                f"{', '.join(sorted(registry.models))})")
    return problems


def plugins_as_dicts() -> list[dict]:
    return [
        {"plugin": p.name, "module": p.module, "distribution": p.distribution,
         "version": p.version, "registered": list(p.registered), "plugin_api": p.api,
         "problem": p.api_problem, "config_problems": config_problems(p.name)}
        for p in get_registry().plugins.values()
    ]


def print_plugins(as_json: bool = False) -> None:
    """Print the loaded plugins as a table (or JSON with `as_json`)."""
    if as_json:
        import json

        print(json.dumps(plugins_as_dicts(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    registry = get_registry()
    table = Table(title="genframe plugins", show_lines=False)
    for col in ("plugin", "distribution", "version", "API", "registered"):
        table.add_column(col)
    for info in registry.plugins.values():
        regs = [r for r in info.registered if not r.startswith("configs=")]
        confs = [r.removeprefix("configs=") for r in info.registered if r.startswith("configs=")]
        text = ", ".join(regs) + (f"\nconfigs: {', '.join(confs)}" if confs else "")
        api = "?" if info.api is None else str(info.api)
        api = api if info.api_problem is None else f"[yellow]{api}[/yellow]"
        table.add_row(info.name, info.distribution, info.version, api, text or "(nothing)")
    console = Console()
    console.print(table)
    for info in registry.plugins.values():
        if info.api_problem is not None:
            console.print(f"[yellow]warning:[/yellow] plugin '{info.name}' {info.api_problem}")
        for problem in config_problems(info.name):
            console.print(f"[yellow]warning:[/yellow] plugin '{info.name}': {problem}",
                          soft_wrap=True)
    console.print(
        f"[dim]plugin API of this genframe: {PLUGIN_API_VERSION}. {ALLOW_ENV}=a,b loads only "
        f"a and b; {AUTOLOAD_ENV}=1 loads no entry-point plugin.[/dim]"
    )
