"""The typed-key tables behind :mod:`harvester.config`: one mechanism for every section.

A :class:`_Key` says how one key is read (from TOML or an override) and what it
accepts; :func:`_validate`, :func:`_read` and :func:`_section` apply a section's
table. Split from :mod:`harvester.config` to keep each module small.

Dependency rule: :mod:`harvester.errors` and :mod:`harvester.targets` only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .targets import Size, parse_size

__all__ = ["BadValue"]


class BadValue(ConfigError):
    """A key's value has the wrong type or range. ``key`` is ``section.key``;
    ``problem`` (``"wanted an integer from 1 to 256"``) names neither key nor value,
    for messages that name them their own way (a flag). Secret values are never shown.
    """

    def __init__(self, key: str, value: Any, problem: str, secret: bool = False) -> None:
        shown = "" if secret else f": {_show(value)}"
        super().__init__(f"bad value for {key}{shown} ({problem})")
        self.key, self.value, self.problem, self.secret = key, value, problem, secret


def _show(value: Any) -> str:
    return repr(str(value)) if isinstance(value, Path) else repr(value)


# ---- the typed-key table: one mechanism for every section ---------------------------


@dataclass(frozen=True)
class _Key:
    """How one key is read (TOML, an override) and what it accepts: ``read`` makes the
    field's type (a list a tuple) or leaves the value, or raises ValueError; then
    ``accepts`` judges (None passes an ``optional`` key), ``more`` may add a problem."""

    wanted: str
    accepts: Callable[[Any], bool]
    read: Callable[[Any], Any] = lambda v: v
    more: Callable[[Any], str | None] | None = None
    optional: bool = False
    secret: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if not self.accepts(value):
            return f"wanted {self.wanted}"
        return None if self.more is None else self.more(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _int(low: int | None = None, high: int | None = None) -> _Key:
    wanted = "an integer" + ("" if low is None else f" >= {low}")
    if low is not None and high is not None:
        wanted = f"an integer from {low} to {high}"
    ok = lambda v: _integer(v) and (low is None or v >= low) and (high is None or v <= high)  # noqa: E731
    return _Key(wanted, ok)


def _float(value: Any) -> Any:
    return float(value) if _number(value) else value


def _num(low: float, *, above: bool = False, zero: bool = False) -> _Key:
    wanted = ("0 or " if zero else "") + f"a number {'>' if above else '>='} {low:g}"
    ok = lambda v: _number(v) and (v > low if above else v >= low or (zero and v == 0))  # noqa: E731
    return _Key(wanted, ok, _float)


def _choice(*values: str, **kw: Any) -> _Key:
    wanted = "one of " + ", ".join(repr(v) for v in values)
    return _Key(wanted, lambda v: isinstance(v, str) and v in values, **kw)


def _text(wanted: str = "a non-empty string", **kw: Any) -> _Key:
    return _Key(wanted, lambda v: isinstance(v, str) and v.strip() != "", **kw)


def _split_names(value: Any, letters: bool) -> Any:
    """``"g,r,i"``, ``"g r i"`` (and, with ``letters``, ``"gri"``) or a list: a tuple."""
    if isinstance(value, str):
        parts = [v for v in value.replace(",", " ").split() if v]
        if letters and len(parts) == 1 and len(parts[0]) > 1:
            parts = list(parts[0])  # "griz" is four bands
        return tuple(parts)
    return tuple(value) if isinstance(value, list | tuple) else value


def _names(wanted: str, ok: Callable[[tuple[str, ...]], bool], **kw: Any) -> _Key:
    """A tuple of non-empty strings that ``ok`` accepts (TOML: a list, or "a,b")."""
    letters = kw.pop("letters", False)
    return _Key(
        wanted,
        lambda v: isinstance(v, tuple) and all(isinstance(x, str) and x for x in v) and ok(v),
        lambda v: _split_names(v, letters),
        **kw,
    )


def _path(wanted: str, **kw: Any) -> _Key:
    read = lambda v: Path(v) if isinstance(v, str | os.PathLike) and str(v) else v  # noqa: E731
    return _Key(wanted, lambda v: isinstance(v, Path), read, **kw)


def _not_a_folder(path: Path) -> str | None:
    """Why ``path`` cannot be an output folder, or None: it, or a parent, is a file."""
    for where in (path, *path.parents):
        if where.exists() or where.is_symlink():
            if where.is_dir():
                return None
            named = "" if where == path else f"{str(where)!r} "
            return f"{named}exists and is not a folder"
    return None


def _instance(cls: type) -> _Key:
    return _Key(f"a {cls.__name__}", lambda v: isinstance(v, cls))


def _read_size(value: Any) -> Any:
    if isinstance(value, Size | bool) or not isinstance(value, str | int | float):
        return value
    return parse_size(value)  # ValueError: its reason joins the message


def _flag() -> _Key:
    return _Key("true or false", lambda v: isinstance(v, bool))


def _on_off(v: Any) -> Any:
    return ("on" if v else "off") if isinstance(v, bool) else v  # `multirange = true`


#: ``[targets]``: column names (:class:`~harvester.targets.ColumnNames` is not ours).
_COLUMN_KEYS = {
    name: _text("a column name (a non-empty string)", optional=True)
    for name in ("id", "ra", "dec", "size", "bands")
}


def _validate(section: str, keys: Mapping[str, _Key], obj: Any) -> None:
    """Check every field of a config value object against its section's table."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        problem = keys[f.name].problem(value)
        if problem is not None:
            raise BadValue(f"{section}.{f.name}", value, problem, keys[f.name].secret)


def _read(section: str, keys: Mapping[str, _Key], key: str, value: Any) -> Any:
    """One key's value from TOML or an override, converted and checked."""
    spec = keys[key]
    try:
        converted = spec.read(value)
    except (TypeError, ValueError) as exc:
        reason = f"wanted {spec.wanted}; {exc}"
        raise BadValue(f"{section}.{key}", value, reason, spec.secret) from None
    problem = spec.problem(converted)
    if problem is not None:
        raise BadValue(f"{section}.{key}", value, problem, spec.secret)
    return converted


def _section(section: str, keys: Mapping[str, _Key], data: Any) -> dict[str, Any]:
    """A TOML table's keys, each converted and checked; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{section}] must be a table of keys, got {data!r}")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ConfigError(f"unknown key {section}.{unknown[0]} (known: {', '.join(sorted(keys))})")
    return {key: _read(section, keys, key, value) for key, value in data.items()}
