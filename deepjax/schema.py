"""What every config dataclass shares: `ConfigError`, type checks / parsing driven by the field annotations, the
finite check of every float field (`check_finite`), and the range helpers (`positive`, `within`).

Each concern defines its config beside its code and validates itself there (`ModelConfig` in deepjax/model/config.py,
`MeshConfig` in deepjax/parallel/sharding.py, `DataConfig`, `OptimConfig` / `TrainConfig`, `RLConfig` in their
packages' config.py); deepjax/config.py composes them into the run `Config`. Standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any


from deepjax.errors import ConfigError  # noqa: F401  (re-exported: config modules import it from here)


def bad(name: str, value: Any, why: str) -> ConfigError:
    """The one error format: `section.field=value: why`."""
    return ConfigError(f"{name}={value!r}: {why}")


def hints(cls) -> dict:
    """The class's resolved field types (a fresh dict; `typing.get_type_hints` runs once per class: it was about half
    of every `load_config`)."""
    return dict(_hints(cls))


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def unwrap_optional(tp) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _tuple_item(tp):
    """The item type of `tuple[X, ...]`, else None."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


def parse_scalar(tp, raw: str, name: str):
    """A command-line string as a field of type `tp` (bool: true/false/1/0/yes/no; tuple[X, ...]: comma-separated
    X values, empty for ())."""
    s = raw.strip()
    item = _tuple_item(tp)
    if item is not None:
        return tuple(parse_scalar(item, x, name) for x in s.split(",") if x.strip()) if s else ()
    try:
        if tp is bool:
            if s.lower() in ("true", "1", "yes"):
                return True
            if s.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp is int:
            return int(s)
        if tp is float:
            return float(s)
        if tp is str:
            return s
    except ValueError:
        pass
    raise ConfigError(f"{name}: expected {tp.__name__}, got {raw!r}")


def coerce(cls, name: str, value: Any, prefix: str = "model."):
    """Type-checks a value given in Python (config files, HF json); ints are accepted for floats."""
    tp, optional = unwrap_optional(hints(cls)[name])
    full = prefix + name
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{full}: None is not allowed")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{full}: expected {tp.__name__}, got {value!r}")
    item = _tuple_item(tp)
    if item is not None:
        if isinstance(value, list):
            value = tuple(value)
        is_item = (lambda x: isinstance(x, bool)) if item is bool else (  # noqa: E731
            lambda x: isinstance(x, item) and not isinstance(x, bool))
        if not isinstance(value, tuple) or not all(is_item(x) for x in value):
            raise ConfigError(f"{full}: expected a tuple of {item.__name__}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{full}: expected bool, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{full}: expected int, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{full}: expected {tp.__name__}, got {value!r}")
    return value


def check_types(obj, prefix: str) -> None:
    """Every field of a config dataclass (nested ones too) has its annotated type."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        coerce(type(obj), f.name, v, prefix)
        if dataclasses.is_dataclass(v):
            check_types(v, f"{prefix}{f.name}.")


def checker(obj, section: str):
    """`fail(field, why)` raising the error for `section.field` with the field's value."""

    def fail(field: str, why: str):
        raise bad(f"{section}.{field}", getattr(obj, field), why)

    return fail


def check_finite(obj, prefix: str) -> None:
    """Every float field of a config dataclass (nested ones too, None allowed) is finite: NaN and inf pass most
    range checks (`nan > 0` is False, `inf > 0` True) and would stop a run steps later without naming the field."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            check_finite(v, f"{prefix}{f.name}.")
        elif isinstance(v, float) and not math.isfinite(v):
            raise bad(prefix + f.name, v, "must be a finite number")


def within(obj, section: str, fields, low: float, high: float, high_open: bool = False) -> None:
    """Each field in [low, high] (or [low, high) with high_open); NaN fails."""
    fail = checker(obj, section)
    for f in fields:
        v = getattr(obj, f)
        if not (low <= v < high if high_open else low <= v <= high):
            fail(f, f"must be in [{low:g}, {high:g}{')' if high_open else ']'}")


def positive(obj, section: str, fields, strict: bool = True) -> None:
    """Each field > 0 (strict) or >= 0; NaN fails both."""
    fail = checker(obj, section)
    for f in fields:
        v = getattr(obj, f)
        if not (v > 0 if strict else v >= 0):
            fail(f, "must be positive" if strict else "must be >= 0")
