"""Range checks for method configs' `__post_init__`: each raises a one-line ConfigError naming
`section.name` (e.g. "lora.lr must be a finite number > 0, got -1.0").

A leaf module (it imports only `fsbench.errors`), so that methods validate their configs without importing
the config loader, and the loader imports methods without a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fsbench.errors import ConfigError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(section: str, name: str, rule: str, value: Any) -> ConfigError:
    return ConfigError(f"{section}.{name} must be {rule}, got {value!r}")


def check_positive(section: str, name: str, value: Any) -> None:
    """A finite number > 0 (learning rates, logit scales, epsilons)."""
    if not (_is_number(value) and value > 0):
        raise _fail(section, name, "a finite number > 0", value)


def check_non_negative(section: str, name: str, value: Any) -> None:
    """A finite number >= 0 (weight decays, schedule floors, blending weights)."""
    if not (_is_number(value) and value >= 0):
        raise _fail(section, name, "a finite number >= 0", value)


def check_at_least(section: str, name: str, value: Any, minimum: int) -> None:
    """An integer >= `minimum` (batch sizes >= 1, epochs >= 0, ranks >= 1)."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise _fail(section, name, f"an integer >= {minimum}", value)


def check_fraction(section: str, name: str, value: Any, *, one: bool = False) -> None:
    """A number in [0, 1) (momentum, dropout), or in [0, 1] with `one`."""
    if not (_is_number(value) and 0 <= value and (value <= 1 if one else value < 1)):
        raise _fail(section, name, "a number in [0, 1]" if one else "a number in [0, 1)", value)


def check_betas(section: str, name: str, value: Any) -> None:
    """Adam's betas: two numbers in [0, 1)."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(
            _is_number(b) and 0 <= b < 1 for b in value)):
        raise _fail(section, name, "two numbers in [0, 1), e.g. [0.9, 0.999]", value)


def check_crop_scale(section: str, name: str, value: Any) -> None:
    """RandomResizedCrop's scale: [low, high] with 0 < low <= high <= 1."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)
            and 0 < value[0] <= value[1] <= 1):
        raise _fail(section, name, "[low, high] with 0 < low <= high <= 1, e.g. [0.08, 1.0]", value)


def check_list(section: str, name: str, values: Any, rule: str, ok: Callable[[Any], bool],
               length: int | None = None) -> None:
    """A non-empty list (of exactly `length` items if given) whose items all satisfy `ok`;
    `rule` says what an item must be ("numbers > 0")."""
    size = f"a list of {length}" if length is not None else "a non-empty list of"
    if not (isinstance(values, (list, tuple)) and values and (length is None or len(values) == length)
            and all(ok(v) for v in values)):
        raise _fail(section, name, f"{size} {rule}", values)


def positive(value: Any) -> bool:
    """A finite number > 0 (a predicate for `check_list`)."""
    return _is_number(value) and value > 0
