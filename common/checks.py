"""Field checks for the settings dataclasses: one line naming the field, its value and what is allowed.

Every config dataclass calls these from `__post_init__`, so settings are checked once, where they
are built, whether they came from defaults, a YAML file or flags.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

from patchscope.common.errors import InputError


def _refuse(name: str, value: Any, expected: str) -> InputError:
    return InputError(f"setting {name}={value!r}: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _bounds(low: float | None, high: float | None, low_open: bool = False) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"<= {high}")
    return " and ".join(parts)


def check_int(config: Any, name: str, low: int | None = None, high: int | None = None, *,
              optional: bool = False, even: bool = False) -> None:
    """`config.name` is an integer within [low, high] (None: unbounded; `optional`: None allowed)."""
    value = getattr(config, name)
    if value is None and optional:
        return
    expected = " ".join(filter(None, ["an even integer" if even else "an integer", _bounds(low, high),
                                      "or null" if optional else ""]))
    if (not _is_int(value) or (low is not None and value < low) or (high is not None and value > high)
            or (even and value % 2)):
        raise _refuse(name, value, expected)


def check_float(config: Any, name: str, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """`config.name` is a finite number within its bounds (`*_open`: the bound itself excluded)."""
    value = getattr(config, name)
    if value is None and optional:
        return
    bounds = _bounds(low, high, low_open)
    if high_open:
        bounds = bounds.replace(f"<= {high}", f"< {high}")
    expected = " ".join(filter(None, ["a finite number", bounds, "or null" if optional else ""]))
    if not _is_number(value):
        raise _refuse(name, value, expected)
    if low is not None and (value < low or (low_open and value == low)):
        raise _refuse(name, value, expected)
    if high is not None and (value > high or (high_open and value == high)):
        raise _refuse(name, value, expected)


def check_choice(config: Any, name: str, choices: Collection[Any], *, optional: bool = False) -> None:
    """`config.name` is one of `choices`."""
    value = getattr(config, name)
    if value is None and optional:
        return
    if value not in choices:
        raise _refuse(name, value, "one of " + ", ".join(str(c) for c in choices) + (" or null" if optional else ""))


def _check_kind(config: Any, name: str, fits: Callable[[Any], bool], expected: str, optional: bool) -> None:
    value = getattr(config, name)
    if value is None and optional:
        return
    if not fits(value):
        raise _refuse(name, value, expected + (" or null" if optional else ""))


def check_bool(config: Any, name: str, *, optional: bool = False) -> None:
    _check_kind(config, name, lambda v: isinstance(v, bool), "true or false", optional)


def check_text(config: Any, name: str, *, optional: bool = False) -> None:
    """`config.name` is a string (a path or a name); emptiness is the caller's business."""
    _check_kind(config, name, lambda v: isinstance(v, str), "a string", optional)


def check_counts(config: Any, name: str, *, optional: bool = False) -> None:
    """`config.name` maps split names to image counts >= 0."""
    _check_kind(config, name, lambda v: isinstance(v, dict) and all(isinstance(k, str) and _is_int(n) and n >= 0
                                                                     for k, n in v.items()),
                "a mapping of split names to image counts >= 0", optional)


def require(config: Any, name: str, flag: str | None = None) -> None:
    """Refuse a run whose required input `name` is empty; for the start of a command, not construction
    (a config with defaults is still a valid thing to print or update)."""
    if not getattr(config, name):
        raise InputError(f"no {flag or '--' + name.replace('_', '-')} given")


def check_numbers(config: Any, name: str) -> None:
    """`config.name` is a non-empty list of finite numbers."""
    value = getattr(config, name)
    if not isinstance(value, (list, tuple)) or not value or not all(_is_number(v) for v in value):
        raise _refuse(name, value, "a non-empty list of finite numbers")


def check_mapping(config: Any, name: str, *, optional: bool = False) -> None:
    """`config.name` is a mapping of settings (checked in turn by the config it becomes)."""
    _check_kind(config, name, lambda v: isinstance(v, dict), "a mapping of settings", optional)
