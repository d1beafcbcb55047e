"""Turn Hydra's and OmegaConf's exceptions into one short message for the user.

`explain` returns None for exceptions that are not a user's config mistake, so the CLI
keeps their traceback. Each message names the override (or file) at fault and the fix:
the key where it really lives, the quoting Hydra needs, the group choice that exists.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Iterator
from typing import Any

from genframe.errors import GenframeError, closest, did_you_mean, valid_list

# Keys of a task's config that hold new entries when given a `_target_` (``+callbacks.x``).
_TARGET_GROUPS = {"callbacks": "callback", "logger": "logger"}
# How alike a key must be to another to be offered as its spelling (difflib's ratio).
_NEAR = 0.7
# The arguments of `GenerativeModule.sample` that are not sampling options.
_NOT_OPTIONS = ("self", "num_samples", "condition", "generator")


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
        return _parse_error(text, task, overrides)
    if isinstance(exc, ConfigCompositionException):
        cause = exc.__cause__
        if isinstance(cause, (ConfigKeyError, AttributeError)) and "not in struct" in str(cause):
            return _unknown_key(cause, overrides, task)
        first = text.splitlines()[0] if text else type(exc).__name__
        special = _defaults_error(first, task, overrides)
        if special:
            return special
        detail = f": {str(cause).splitlines()[0]}" if cause else ""
        return f"{first}{detail}" + _choice_hint(text)
    if isinstance(exc, MissingMandatoryValue):
        key = getattr(exc, "full_key", "") or "?"
        return f"{key} is required but not set. Give it on the command line: {key}=..."
    if isinstance(exc, InterpolationResolutionError):
        key = getattr(exc, "full_key", "") or ""
        if not key:  # read outside its node: name the override holding an interpolation
            key = next((o for o in overrides if "${" in o), "a value with ${...}")
        return f"{key}: cannot resolve its value: {text.splitlines()[0]}"
    if isinstance(exc, ValidationError):
        key = getattr(exc, "full_key", "") or "?"
        return f"{key}: {text.splitlines()[0]}"
    if isinstance(exc, (ConfigKeyError, AttributeError)) and "not in struct" in text:
        return _key_gone(exc, task, overrides)
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return text.splitlines()[0] if text else type(exc).__name__
    return None


# -- overrides ---------------------------------------------------------------------------


def override_key(override: str) -> str:
    """The key or group an override sets: ``+model.lr=1`` -> ``model.lr``,
    ``~model`` -> ``model``, ``model@x=vae`` -> ``model``."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _given(overrides: Iterable[str], key: str) -> str | None:
    return next((o for o in overrides if override_key(o) == key), None)


def _value(override: str | None) -> str:
    return override.split("=", 1)[1] if override and "=" in override else "..."


def shell_quoted(key: str, value: str) -> str:
    """``key=value`` as one shell word in which Hydra sees a double-quoted string:
    ``'prompt="<user> hi"'``."""
    inner = value.replace("\\", "\\\\").replace('"', '\\"')
    return shlex.quote(f'{key}="{inner}"')


# -- unknown keys ------------------------------------------------------------------------


def _unknown_key(cause, overrides: list[str], task: str) -> str:
    full_key = str(getattr(cause, "full_key", None) or getattr(cause, "key", "?"))
    key = str(getattr(cause, "key", None) or full_key.rpartition(".")[2])
    parent = getattr(cause, "parent_node", None)
    valid = [str(k) for k in (parent.keys() if parent is not None else []) if k != "hydra"]
    root = _root_of(parent)
    node = full_key.rpartition(".")[0]
    given = _given(overrides, full_key)
    if given is None:  # `sampling.temperature=0.5` where the task has no `sampling` at all
        given = next((o for o in overrides if override_key(o).startswith(full_key + ".")), None)
        if given is not None:
            full_key = override_key(given)
            key, node = full_key.rpartition(".")[2], ""
    value = _value(given)
    origin = f" (command line: {given})" if given else ""
    where = f"'{node}'" if node else "the top level"
    if node and not valid and given is not None:
        # A null mapping (chat's chat_template): its keys are added, or it is given whole.
        return (f"{full_key}: {node} is null, so it has no keys to set (command line: {given}). "
                f"Add them with +{full_key}={value} (one '+' per key), or give {node} whole: "
                f"'{node}={{{key}: {value}}}'")
    if task == "finetune" and full_key.startswith("feedback.") and key not in valid:
        hint = (f" {full_key} is a setting of learning from feedback: add finetune=feedback "
                "(see conf/finetune/feedback.yaml).")
    elif task == "finetune" and full_key.startswith("model."):
        hint = (f" finetune keeps the run's model; change a hyperparameter with "
                f"finetune.hparams.{full_key.removeprefix('model.')}={value}.")
    elif given is not None and key in valid and override_key(given) != key:
        hint = _did_you_mean([f"{key}={value}"])  # sampling.temperature -> temperature
    else:
        hint = _where_it_lives(key, node, value, valid, root, task) or _other_task_hint(key, task)
    return (
        f"{full_key}: unknown key{origin}.{hint}"
        f" Keys at {where}: {valid_list(valid)}.{_add_hint(full_key)}"
    )


# What a user of one task reaches for that another task has.
_TASK_NOTES = {
    ("chat", "prompt"): "chat reads your messages from the terminal or standard input "
                        "(echo 'hi' | genframe chat run=DIR), or starts from a template "
                        "(template=qa template.vars.question=...)",
    ("chat", "prompt_file"): "chat reads one message per line of standard input "
                             "(genframe chat run=DIR < messages.txt)",
}


def _other_task_hint(key: str, task: str) -> str:
    """' prompt is a key of generate, not of chat: ...' when another task has `key`."""
    from omegaconf import OmegaConf

    from genframe.config import conf_dir

    note = _TASK_NOTES.get((task, key))
    owners = []
    for path in sorted(conf_dir().glob("*.yaml")):
        if path.stem == task:
            continue
        try:
            keys = OmegaConf.load(path).keys()
        except Exception:
            continue
        if key in keys and key not in ("defaults", "task_name"):
            owners.append(path.stem)
    if not owners and not note:
        return ""
    text = f" '{key}' is a key of {', '.join(owners)}, not of {task}" if owners else ""
    if note:
        text += ("; " if text else " ") + note
    return text + "."


def _root_of(node) -> Any:
    if node is None:
        return None
    try:
        return node._get_root()
    except Exception:  # not an OmegaConf node: no nested keys to search
        return None


def _where_it_lives(key: str, node: str, value: str, valid: list[str], root, task: str) -> str:
    """' Did you mean data.batch_size=8?' naming where `key` exists, or ''."""
    here = f"{node}." if node else ""
    renamed = _renamed_argument(node, key, root)
    if renamed:
        return f" {node}.{key} was renamed to {renamed}: use {node}.{renamed}={value}."
    paths = [p for p in _leaf_paths(root) if p.rpartition(".")[2] == key and p != here + key]
    if paths:
        return _did_you_mean([f"{p}={value}" for p in paths])
    options = _sampling_options() if root is not None and "sampling" in root else {}
    if key in options:
        return _did_you_mean([f"sampling.{key}={value} ({_options_of(options[key])})"])
    elsewhere = [f"{group}={choice} {path}={value}"
                 for group, choice, path in _keys_of_other_choices(task, root) if path.rpartition(".")[2] == key]
    if elsewhere:
        return _did_you_mean(elsewhere[:3])
    # Nothing by that name: the closest keys at this level, then anywhere, then options.
    same_level = closest(key, valid, cutoff=_NEAR)
    if same_level:
        return did_you_mean(key, same_level)
    near = []
    if root is not None:
        leaves = {p.rpartition(".")[2]: p for p in _leaf_paths(root)}
        near = [f"{leaves[k]}={value}" for k in closest(key, leaves, n=2, cutoff=_NEAR)
                if leaves[k] != here + key]
    if not near and options:
        near = [f"sampling.{k}={value}" for k in closest(key, options, n=2, cutoff=_NEAR)]
    return _did_you_mean(near)


def _renamed_argument(node: str, key: str, root) -> str | None:
    """The new name of `key` when it is an old constructor argument of the chosen model
    (the class's ``renamed_arguments``), else None."""
    if node != "model" or root is None:
        return None
    try:
        from genframe.plugins import get_registry

        cls = get_registry().model(str(root.model.name)).load()
    except Exception:  # no model chosen or loadable: no rename to report
        return None
    return (getattr(cls, "renamed_arguments", None) or {}).get(key)


def _did_you_mean(candidates: list[str]) -> str:
    return " Did you mean " + " or ".join(candidates) + "?" if candidates else ""


def _options_of(models: list[str]) -> str:
    names = ", ".join(f"'{m}'" for m in models)
    return f"a sampling option of model{'s' if len(models) > 1 else ''} {names}"


def _leaf_paths(root, prefix: str = "") -> list[str]:
    """Dotted paths of every key under `root` (a DictConfig or dict), not under hydra."""
    if root is None:
        return []
    from omegaconf import DictConfig, OmegaConf

    if isinstance(root, DictConfig):
        try:
            root = OmegaConf.to_container(root, resolve=False)
        except Exception:
            return []
    return list(_walk(root, prefix))


def _walk(node: Any, prefix: str) -> Iterator[str]:
    if not isinstance(node, dict):
        return
    for k, v in node.items():
        if not prefix and k == "hydra":
            continue
        path = f"{prefix}{k}"
        yield path
        yield from _walk(v, path + ".")


def _add_hint(full_key: str) -> str:
    """The `+key` hint, only where an added key is used: a new callback or logger."""
    node, _, key = full_key.rpartition(".")
    if node in _TARGET_GROUPS:
        what = _TARGET_GROUPS[node]
        return (f" To add a new {what} use +{node}.{key}._target_=<class> "
                f"(its arguments as +{node}.{key}.<argument>=...).")
    return ""


def _key_gone(exc, task: str, overrides: list[str]) -> str:
    key = str(getattr(exc, "full_key", None) or getattr(exc, "key", "?"))
    removed = _given([o for o in overrides if o.startswith("~")], key)
    if removed:
        return (f"{key}: {task} needs this key, but {removed} removed it (command line). "
                f"Leave it in, or change it with {key}=...")
    return f"{key}: {task} needs this key, but the config has none"


# -- what plugins and config files offer -------------------------------------------------


def _sampling_options() -> dict[str, list[str]]:
    """Sampling option -> the models whose `sample` takes it, read without importing the
    models' modules (no torch) where the registration names its class by a string."""
    try:
        from genframe.plugins import get_registry

        models = get_registry().models
    except GenframeError:  # plugins failed to load: that error is reported elsewhere
        return {}
    found: dict[str, list[str]] = {}
    seen = set()
    for name, registration in sorted(models.items()):
        target = registration.target
        if isinstance(target, str) and target in seen:  # an alias of a model named already
            continue
        seen.add(target if isinstance(target, str) else name)
        for option in _sample_arguments(target):
            found.setdefault(option, []).append(name)
    return found


def _sample_arguments(target: Any) -> list[str]:
    import inspect

    if not isinstance(target, str):
        try:
            params = inspect.signature(target.sample).parameters
        except (AttributeError, TypeError, ValueError):
            return []
        return [n for n, p in params.items() if n not in _NOT_OPTIONS
                and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    import ast
    import importlib.util
    from pathlib import Path

    module, _, cls_name = target.partition(":")
    try:
        spec = importlib.util.find_spec(module)
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except Exception:  # no source to read: say nothing rather than import torch
        return []
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    seen = set()
    while cls_name in classes and cls_name not in seen:  # follow bases within the module
        seen.add(cls_name)
        cls = classes[cls_name]
        for item in cls.body:
            if isinstance(item, ast.FunctionDef) and item.name == "sample":
                args = [*item.args.args, *item.args.kwonlyargs]
                return [a.arg for a in args if a.arg not in _NOT_OPTIONS]
        bases = [b.id for b in cls.bases if isinstance(b, ast.Name)]
        cls_name = bases[0] if bases else ""
    return []


def _task_groups(task: str) -> list[str]:
    """The config groups in a task's defaults list (``model``, ``data``, ...)."""
    from omegaconf import OmegaConf

    from genframe.config import conf_dir

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / f"{task}.yaml"))
    except Exception:
        return []
    groups = []
    for entry in cfg.get("defaults", []) if isinstance(cfg, dict) else []:
        if isinstance(entry, dict):
            groups.append(str(next(iter(entry))).lstrip("/").split("@")[0].removeprefix("override "))
    return groups


def _group_choices(group: str) -> dict[str, Any]:
    """Choice name -> its YAML file, for genframe's configs and every plugin's."""
    from pathlib import Path

    from genframe.config import conf_dir

    roots = [conf_dir()]
    try:
        from genframe.plugins import get_registry

        roots += [Path(r) for _, r in get_registry().config_dirs]
    except GenframeError:  # the plugins' own error is reported by the command itself
        roots = roots[:1]
    found = {}
    for root in roots:
        folder = Path(root) / group
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return found


def _keys_of_other_choices(task: str, root) -> list[tuple[str, str, str]]:
    """(group, choice, full dotted key) for the keys of the task's group choices that are not
    the chosen ones (``sampler=ddim`` holds ``steps`` when generate has no sampler)."""
    from omegaconf import OmegaConf

    found = []
    for group in _task_groups(task):
        if group in ("hydra", "experiment", "debug", "paths"):
            continue
        chosen = root.get(group) if root is not None and hasattr(root, "get") else None
        chosen_name = chosen.get("name") if hasattr(chosen, "get") else None
        for choice, path in _group_choices(group).items():
            if choice == chosen_name:
                continue
            try:
                text = path.read_text(encoding="utf-8")
                if "@package _global_" in text:
                    continue
                node = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
            except Exception:
                continue
            # A choice packaged elsewhere (method=lora is `# @package finetune`) sets keys
            # under that package, not under its group's name.
            package = re.search(r"^#\s*@package\s+(\S+)", text, flags=re.M)
            prefix = package.group(1) if package else group
            found += [(group, choice, f"{prefix}.{p}") for p in _walk(node, "")]
    return found


# -- group choices and the defaults list -------------------------------------------------


def _missing_choice(text: str, task: str, overrides: list[str]) -> str:
    m = re.search(r"Could not find '([^']+)'", text)
    if not m:
        return text.splitlines()[0]
    path = m.group(1)
    listed = re.search(r"Available options in '([^']+)'", text)
    if listed and path.startswith(listed.group(1) + "/"):
        group, choice = listed.group(1), path[len(listed.group(1)) + 1:]
    else:
        group, _, choice = path.rpartition("/")
    options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
    if not group:
        return f"no primary config named '{path}'"
    given = _given(overrides, group)
    if given:
        where = f"(command line: {given})"
    else:
        parent = re.search(r"In '([^']+)'", text)
        parent_name = parent.group(1) if parent else task
        where = f"(from {parent_name}.yaml)"
        experiment = _value(_given(overrides, "experiment"))
        if parent_name == task and experiment != "...":
            where = f"(from {task}.yaml or experiment/{experiment}.yaml)"
    if not options:
        if given and "," not in _value(given):
            choice = _value(given)
        hint = ""
        if group == "model":
            hint = (" No model plugin is loaded: check `genframe plugins`, "
                    "GENFRAME_PLUGINS and GENFRAME_DISABLE_PLUGIN_AUTOLOAD.")
        return f"{group}={choice}: config group '{group}' has no choices at all {where}.{hint}"
    moved = _MOVED_CHOICES.get((group, choice))
    if moved:
        return f"{group}={choice}: {moved} {where}. Valid choices of {group}: {valid_list(options)}"
    return (
        f"{group}={choice}: no such choice in config group '{group}' {where}."
        f"{did_you_mean(choice, options)} Valid choices: {valid_list(options)}"
    )


# Choices that moved to another group: (group, choice) -> where they are now.
_MOVED_CHOICES = {
    ("finetune", "lora"): "how fine-tuning trains is now its own group: use method=lora "
                          "(finetune= says what is learned: data or subject)",
    ("finetune", "full"): "how fine-tuning trains is now its own group: use method=full "
                          "(the default; finetune= says what is learned: data or subject)",
}


def _defaults_error(first: str, task: str, overrides: list[str]) -> str | None:
    """Hydra's defaults-list complaints, said with the override and the fix."""
    m = re.match(r"Could not override '([^']+)'\. No match in the defaults list", first)
    if m:
        group = m.group(1)
        given = _given(overrides, group) or group
        groups = [g for g in _task_groups(task) if g != "hydra"]
        why = ""
        if group in ("model", "data") and group not in groups:
            why = (f" {task} takes the model, as it was trained, from run=DIR or ckpt=FILE."
                   if group == "model" else f" {task} reads no data.")
        return (f"{given}: {task} has no config group '{group}'.{why}{did_you_mean(group, groups)}"
                f" Groups of {task}: {valid_list(groups)}")
    m = re.match(r"(\S+) appears more than once in the final defaults list", first)
    if m:
        group = m.group(1)
        added = next((o for o in overrides if o.startswith("+") and override_key(o) == group), None)
        if added:
            plain = added.lstrip("+")
            return (f"{added}: '{group}' is chosen already (in {task}.yaml or an experiment); "
                    f"choose another with {plain} (no '+')")
        return f"{group}: chosen twice on the command line; give one {group}=<choice>"
    m = re.match(r"Multiple values for (\S+)\. To override a value use 'override \S+: ([^']*)'", first)
    if m:
        group, choice = m.group(1), m.group(2)
        given = _given(overrides, group) or f"+{group}={choice}"
        return (f"{given}: '{group}' is in {task}.yaml's defaults already; choose it with "
                f"{group}={choice} (no '+')")
    m = re.match(r"force-add of config groups is not supported: '([^']+)'", first)
    if m:
        return f"{m.group(1)}: '++' adds keys, not config groups; choose with {m.group(1).lstrip('+')}"
    m = re.match(r"Ambiguous value for argument '([^']+)'", first)
    if m:
        given = m.group(1)
        key, _, value = given.partition("=")
        return (f"{given}: a value with commas is a sweep. Add -m to run one job per value, "
                f"write a list as {key}=[{value}], or quote a string: {shell_quoted(key, value)}")
    return None


def _choice_hint(text: str) -> str:
    options = re.findall(r"^\t(\S+)$", text, flags=re.M)
    return f" Valid choices: {valid_list(options)}" if options else ""


# -- the override grammar ----------------------------------------------------------------


def _parse_error(text: str, task: str, overrides: list[str]) -> str:
    bad = _unparsable(overrides)
    if bad is None:
        return f"cannot parse a command-line override: {text.splitlines()[0]}" + _grammar_hint()
    if "=" not in bad and not bad.startswith("~"):
        at = overrides.index(bad)
        before = overrides[at - 1] if at > 0 else ""
        if "=" in before and not before.startswith("-"):
            # `prompt=The for statement` reached genframe as three words.
            words = [bad]
            for word in overrides[at + 1:]:
                if "=" in word or word.startswith("-"):
                    break
                words.append(word)
            key, _, value = before.partition("=")
            whole = " ".join([value, *words])
            return (f"'{bad}': not an override; the shell split a value with spaces. Quote "
                    f"the whole override: {shell_quoted(key, whole)}")
        key = bad.lstrip("+")
        choices = _group_choices(key) if key in _task_groups(task) else {}
        if choices:
            return (f"'{bad}': no value. Choose one with {key}=<choice>; "
                    f"choices of {key}: {valid_list(choices)}")
        return f"'{bad}': no value. Give one with {key}=<value>" + _grammar_hint()
    key, _, value = bad.partition("=")
    if not re.fullmatch(r"[+~]{0,2}[\w./@-]+", key):
        return f"'{bad}': '{key}' is not a key (a key is a dotted name like model.lr)" + _grammar_hint()
    call = re.match(r"\s*(\w+)\(", value)
    if call and call.group(1) in _SWEEP_FUNCTIONS:
        return (f"'{bad}': cannot parse the value {value!r}: the arguments of {call.group(1)}() "
                "must be values Hydra reads, e.g. range(1,5), choice(a,b), interval(0.1,1.0) "
                "(sweep them with -m)")
    return (f"'{bad}': cannot parse the value {value!r} (Hydra's override grammar). To pass it "
            "as a string, quote it so that Hydra sees the quotes; in the shell: "
            f"{shell_quoted(key, value)}" + (f" (a list is written {key}=[a,b])"
                                               if value.lstrip().startswith(("[", "{")) else ""))


_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp",
                     "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")
_SWEEP_FUNCTIONS = ("range", "choice", "interval", "glob", "shuffle", "sort", "tag",
                    "str", "int", "float", "bool", "json_str", "extend_list")


def _unparsable(overrides: list[str]) -> str | None:
    """The first override Hydra's grammar refuses, or None."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    skip = False
    for override in overrides:
        if skip or override.startswith("-"):  # a flag, or the value of the flag before
            skip = override.split("=")[0] in _FLAGS_WITH_VALUE
            continue
        try:
            parser.parse_overrides([override])
        except Exception:
            return override
    return None


def _grammar_hint() -> str:
    return " (overrides look like key=value, group=choice, +new_key=value, ~key)"
