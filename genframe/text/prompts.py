"""Prompt templates: text with ``{name}`` fields filled from named variables.

The syntax is Python's ``str.format`` with named fields only: ``{question}`` is a
variable, ``{{`` and ``}}`` are literal braces. Templates ship in the ``template`` config
group (``conf/template/qa.yaml``: ``text`` and ``vars``), so a prompt is chosen and filled
on the command line::

    genframe generate run=DIR template=qa template.vars.question="What is a tuple?"

`render_prompt` is strict both ways: a field without a value and a value without a field
are `UserError`s, so a typo in a variable name never yields a half-filled prompt.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

from genframe.errors import UserError, did_you_mean, valid_list

_FORMATTER = string.Formatter()


def template_fields(template: str, *, where: str = "template.text") -> list[str]:
    """The variable names used in `template`, in order of first use.

    Refuses what ``str.format`` would misread: an unmatched brace, a positional field
    (``{}`` or ``{0}``), and attribute or index access (``{a.b}``, ``{a[0]}``).
    """
    if not isinstance(template, str):
        raise UserError(f"{where}: expected a string, got {type(template).__name__}")
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise UserError(f"{where}: {exc} in {template!r}; write {{{{ and }}}} for literal "
                        "braces") from None
    names: list[str] = []
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        if not field.isidentifier():
            what = "a positional field" if field == "" or field.isdigit() else f"field {{{field}}}"
            raise UserError(f"{where}: {what} in {template!r}; use named fields such as "
                            "{question} (and {{ }} for literal braces)")
        if spec and "{" in spec:
            raise UserError(f"{where}: nested field in {{{field}:{spec}}}; not supported")
        if field not in names:
            names.append(field)
    return names


def render_prompt(template: str, variables: Mapping[str, Any], *, where: str = "template") -> str:
    """Fill the ``{name}`` fields of `template` with `variables`.

    Args:
        template: ``str.format``-style text with named fields (``{{``/``}}`` for braces).
        variables: a value for every field; a ``None`` value counts as not given.
        where: the config path used in messages (``template`` gives ``template.vars.x``).

    Raises:
        UserError: a field has no value (naming it and the variables given), or a variable
            is given that the template does not use (with the closest field names).
    """
    fields = template_fields(template, where=f"{where}.text")
    given = {str(k): v for k, v in variables.items() if v is not None}
    unused = [k for k in given if k not in fields]
    if unused:
        name = unused[0]
        raise UserError(
            f"{where}.vars.{name}: the template does not use this variable."
            f"{did_you_mean(name, fields)} Its fields: {valid_list(fields) if fields else 'none'}"
        )
    missing = [f for f in fields if f not in given]
    if missing:
        shown = ", ".join(f"{where}.vars.{m}" for m in missing)
        raise UserError(
            f"{where}: no value for {shown} (the template {template!r} uses "
            f"{valid_list(fields)}; given: {valid_list(given) if given else 'none'}). "
            f"Set it, e.g. {where}.vars.{missing[0]}=\"...\""
        )
    try:
        return template.format_map(given)
    except (ValueError, TypeError) as exc:  # a format spec that does not fit the value
        raise UserError(f"{where}.text: cannot fill {template!r}: {exc}") from None


def render_template_config(node: Mapping[str, Any] | None, *, where: str = "template") -> str | None:
    """The prompt of a ``template`` config node (``{"text": ..., "vars": {...}}``), or
    ``None`` when no template is chosen."""
    if node is None:
        return None
    if not isinstance(node, Mapping):
        raise UserError(f"{where}: expected a mapping with text and vars, got {node!r}")
    unknown = [k for k in node if k not in ("text", "vars")]
    if unknown:
        raise UserError(f"{where}.{unknown[0]}: unknown key.{did_you_mean(str(unknown[0]), ['text', 'vars'])}"
                        f" Valid keys of {where}: text, vars")
    text = node.get("text")
    if text is None:
        raise UserError(f"{where}: no text. Choose a template ({where}=qa) or set "
                        f"{where}.text=\"...\"")
    variables = node.get("vars") or {}
    if not isinstance(variables, Mapping):
        raise UserError(f"{where}.vars: expected a mapping of variable names to values, "
                        f"got {variables!r}")
    return render_prompt(text, variables, where=where)
