"""TAP request parameters (DALI: names case-insensitive, values as given).

Dependency rule: the service's :class:`~harvester.service._http.Params` only.
"""

from __future__ import annotations

from .._http import Params

__all__ = ["UsageFault", "check_query", "maxrec_value", "query_params"]

_LANGS = {"ADQL", "ADQL-2.0", "ADQL-2.1"}
_FORMATS = {
    "votable",
    "application/x-votable+xml",
    "text/xml",
    "application/xml",
    "votable/td",
    "application/x-votable+xml;serialization=tabledata",
}
_SINGLE = ("QUERY", "LANG", "MAXREC", "REQUEST", "RESPONSEFORMAT")


class UsageFault(Exception):
    """A bad TAP parameter; the message names it and its value."""


def query_params(params: Params, check: bool = True) -> dict[str, str]:
    """A query's parameters by upper-case name; checked unless ``check`` is False.

    An async job is created whatever its parameters (UWS), and checked when it
    runs: :func:`check_query`.

    Raises
    ------
    UsageFault
    """
    out: dict[str, str] = {}
    for name, value in params.items:
        if check and name in out and name in _SINGLE:
            raise UsageFault(f"{name} may be given only once")
        out[name] = value
    if check:
        check_query(out)
    return out


def check_query(out: dict[str, str]) -> None:
    """Raise :class:`UsageFault` for a parameter a query cannot run with.

    ``LANG`` (ADQL) and ``QUERY`` are required, ``REQUEST`` may only be
    ``doQuery``, ``RESPONSEFORMAT`` must name VOTable, ``UPLOAD`` is refused.
    """
    request = out.get("REQUEST")
    if request is not None and request != "doQuery":
        raise UsageFault(f"REQUEST={request!r} is not supported; use doQuery")
    lang = out.get("LANG")
    if lang is None:
        raise UsageFault("LANG is required (LANG=ADQL)")
    if lang.upper() not in _LANGS:
        raise UsageFault(f"LANG={lang!r} is not supported; use ADQL")
    if not out.get("QUERY", "").strip():
        raise UsageFault("QUERY is required")
    fmt = out.get("RESPONSEFORMAT", out.get("FORMAT"))
    if fmt is not None and fmt.replace(" ", "").lower() not in _FORMATS:
        raise UsageFault(f"RESPONSEFORMAT={fmt!r} is not supported; this service writes VOTable")
    if "UPLOAD" in out:
        raise UsageFault("UPLOAD is not supported by this service")
    if "MAXREC" in out:
        maxrec_value(out["MAXREC"], 1)


def maxrec_value(text: str | None, hard: int, default: int = 0) -> int:
    """MAXREC as an integer in ``[0, hard]``; ``default`` when not given."""
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageFault(f"MAXREC must be an integer, not {text!r}") from None
    if value < 0:
        raise UsageFault(f"MAXREC must be >= 0, not {value}")
    return min(value, hard)
