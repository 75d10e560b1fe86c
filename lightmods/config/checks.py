"""Small validators used in the schemas' ``__post_init__``: each raises one uniform ConfigError."""

from __future__ import annotations

from collections.abc import Iterable

from lightmods.errors import config_error


def one_of(key: str, value, choices: Iterable) -> None:
    choices = list(choices)
    if value not in choices:
        raise config_error(key, value, "one of " + ", ".join(repr(c) for c in choices))


def positive(key: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise config_error(key, value, "a number > 0" + (" or null" if allow_none else ""))


def non_negative(key: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < 0:
        raise config_error(key, value, "a number >= 0" + (" or null" if allow_none else ""))


def ratio(key: str, value, closed_right: bool = False) -> None:
    """A fraction in [0, 1) (or [0, 1] when ``closed_right``)."""
    ok = value is not None and 0 <= value and (value <= 1 if closed_right else value < 1)
    if not ok:
        raise config_error(key, value, "a number in [0, 1]" if closed_right else "a number in [0, 1)")
