"""The config-line check: keys must be constructor arguments, values must fit the hints."""

from __future__ import annotations

from typing import Literal

import pytest

from genframe.config import check_kwargs
from genframe.errors import UserError


def target(width: int, depth: int = 2, lr: float = 1e-3, name: str | None = None,
           sizes: list[int] = (1,), mode: Literal["a", "b"] = "a", flag: bool = False):
    return None


@pytest.mark.parametrize("kwargs", [
    {"width": 3},
    {"width": 3, "lr": 1, "name": None, "sizes": [1, 2], "mode": "b", "flag": True},
])
def test_valid_kwargs_pass(kwargs):
    assert check_kwargs(target, kwargs, where="model") == kwargs


@pytest.mark.parametrize("kwargs,fragment", [
    ({"width": 3, "dpeth": 1}, "Did you mean 'depth'"),
    ({"width": "3"}, "expected an integer"),
    ({"width": 3, "lr": "fast"}, "expected a number"),
    ({"width": 3, "flag": 1}, "true or false"),
    ({"width": 3, "sizes": [1, "x"]}, "model.sizes"),
    ({"width": 3, "mode": "c"}, "one of 'a', 'b'"),
    ({"width": True}, "model.width"),
    ({}, "missing required key width"),
])
def test_invalid_kwargs_fail_with_the_key(kwargs, fragment):
    with pytest.raises(UserError) as info:
        check_kwargs(target, kwargs, where="model", source=lambda k: "model/x.yaml")
    assert fragment in str(info.value)


def test_source_is_named():
    with pytest.raises(UserError, match=r"set in the command line: model.width=x"):
        check_kwargs(target, {"width": "x"}, where="model",
                     source=lambda k: "the command line: model.width=x")
