"""Turn Hydra's and OmegaConf's exceptions into one short message for the user.

`explain` returns None for exceptions that are not a user's config mistake, so the CLI
keeps their traceback.
"""

from __future__ import annotations

import re

from genframe.errors import did_you_mean, valid_list


def explain(exc: BaseException, task: str, overrides: list[str]) -> str | None:
    from hydra.errors import (
        ConfigCompositionException,
        HydraException,
        MissingConfigException,
        OverrideParseException,
    )
    from omegaconf.errors import (
        ConfigKeyError,
        InterpolationResolutionError,
        MissingMandatoryValue,
        OmegaConfBaseException,
        ValidationError,
    )

    text = str(exc)
    if isinstance(exc, MissingConfigException):
        return _missing_choice(text, task, overrides)
    if isinstance(exc, OverrideParseException):
        return f"cannot parse a command-line override: {text.splitlines()[0]}" + _grammar_hint()
    if isinstance(exc, ConfigCompositionException):
        cause = exc.__cause__
        if isinstance(cause, (ConfigKeyError, AttributeError)) and "not in struct" in str(cause):
            return _unknown_key(cause, overrides)
        first = text.splitlines()[0] if text else type(exc).__name__
        detail = f": {str(cause).splitlines()[0]}" if cause else ""
        return f"{first}{detail}" + _choice_hint(text)
    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", "") or "?"
        return f"{key} is required but not set. Give it on the command line: {key}=..."
    if isinstance(exc, InterpolationResolutionError):
        key = getattr(exc, "full_key", "") or "?"
        return f"{key}: cannot resolve its value: {text.splitlines()[0]}"
    if isinstance(exc, ValidationError):
        key = getattr(exc, "full_key", "") or "?"
        return f"{key}: {text.splitlines()[0]}"
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def _missing_choice(text: str, task: str, overrides: list[str]) -> str:
    m = re.search(r"Could not find '([^']+)'", text)
    if not m:
        return text.splitlines()[0]
    path = m.group(1)
    group, _, choice = path.rpartition("/")
    options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
    if not group:
        return f"no primary config named '{path}'"
    origin = next((o for o in overrides if o.lstrip("+~") == f"{group}={choice}"), None)
    where = f"(from the command line: {origin})" if origin else f"(from the defaults of {task}.yaml or an experiment)"
    if not options:
        # Hydra names the default it failed on first; the user's own choice, if they
        # gave one, is the one to talk about.
        given = next((o for o in overrides if o.lstrip("+~").split("=")[0] == group), None)
        if given:
            choice, where = given.split("=", 1)[1], f"(from the command line: {given})"
        hint = ""
        if group == "model":
            hint = (" No model plugin is loaded: check `genframe plugins`, "
                    "GENFRAME_PLUGINS and GENFRAME_DISABLE_PLUGIN_AUTOLOAD.")
        return f"{group}={choice}: config group '{group}' has no choices at all {where}.{hint}"
    return (
        f"{group}={choice}: no such choice in config group '{group}' {where}."
        f"{did_you_mean(choice, options)} Valid choices: {valid_list(options)}"
    )


def _unknown_key(cause, overrides: list[str]) -> str:
    full_key = getattr(cause, "full_key", None) or getattr(cause, "key", "?")
    key = str(getattr(cause, "key", full_key))
    parent = getattr(cause, "parent_node", None)
    valid = [k for k in (parent.keys() if parent is not None else []) if k != "hydra"]
    node = full_key.rpartition(".")[0]
    origin = next((o for o in overrides if o.split("=")[0].lstrip("+~") == full_key), full_key)
    where = f"'{node}'" if node else "the top level"
    return (
        f"{full_key}: unknown key (command line: {origin}).{did_you_mean(key, valid)}"
        f" Keys at {where}: {valid_list(valid)}. To add a new key on purpose use +{full_key}=..."
    )


def _choice_hint(text: str) -> str:
    options = re.findall(r"^\t(\S+)$", text, flags=re.M)
    return f" Valid choices: {valid_list(options)}" if options else ""


def _grammar_hint() -> str:
    return " (overrides look like key=value, group=choice, +new_key=value, ~key)"
