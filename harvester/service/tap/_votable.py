"""TAP answers as VOTable: results (TABLEDATA) and ERROR documents (DALI).

A result puts ``INFO name="QUERY_STATUS" value="OK"`` in the results RESOURCE
before the TABLE and, when rows were cut at MAXREC, ``value="OVERFLOW"`` after
it (DALI 1.1 §4.4.1: pyvo reads the last one). Cells are written per column
type: numbers as PostgreSQL spells them (shortest round-trip text; a ``real``
keeps its float32 spelling; ``NaN`` as such), NULL as an empty cell, booleans
``T``/``F``, pg_sphere values as numbers in degrees, ``s_region`` as
``POLYGON ICRS ...`` like SIA.

Dependency rule: the standard library, the service's VOTable helpers and
:mod:`._query`'s value types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._votable import votable_open, xml_attr, xml_text
from ._query import Polygon, ResultField

__all__ = ["VOTABLE_TYPE", "error_document", "result_document"]

#: What TAP results are sent as.
VOTABLE_TYPE = "application/x-votable+xml"


_INF = float("inf")
_NON_FINITE = {"Infinity": "+Inf", "-Infinity": "-Inf"}


def _numbers(values: tuple[Any, ...]) -> Sequence[str]:
    # Numbers arrive as PostgreSQL's text and go out as they came (NaN included):
    # only NULLs and infinities need a look, and `in` finds out at C speed.
    if None in values or "Infinity" in values or "-Infinity" in values:
        return ["" if v is None else _NON_FINITE.get(v, v) for v in values]
    return values


def _booleans(values: tuple[Any, ...]) -> list[str]:
    return ["" if v is None else ("T" if v else "F") for v in values]


def _number(v: Any) -> str:
    f = float(v)
    if f != f:
        return "NaN"
    if f in (_INF, -_INF):
        return "+Inf" if f > 0 else "-Inf"
    return repr(f)


def _arrays(values: tuple[Any, ...]) -> list[str]:
    return ["" if v is None else " ".join(map(_number, v)) for v in values]


def _texts(values: tuple[Any, ...]) -> list[str]:
    out = []
    for v in values:
        if v is None:
            out.append("")
        elif isinstance(v, Polygon):  # s_region: as SIA writes it
            out.append("POLYGON ICRS " + " ".join(f"{x:.6f}" for x in v))
        else:
            out.append(xml_text(str(v)))
    return out


def _cells(f: ResultField) -> Callable[[tuple[Any, ...]], Sequence[str]]:
    if f.xtype in ("point", "circle", "polygon") or (f.arraysize and f.datatype != "char"):
        return _arrays
    if f.datatype == "boolean":
        return _booleans
    if f.datatype == "char":
        return _texts
    return _numbers


def field_xml(f: ResultField) -> str:
    attrs = [f"name={xml_attr(f.name)}", f"datatype={xml_attr(f.datatype)}"]
    for key in ("arraysize", "xtype", "unit", "ucd", "utype"):
        value = getattr(f, key)
        if value:
            attrs.append(f"{key}={xml_attr(value)}")
    inner = ""
    if f.description:
        inner += f"<DESCRIPTION>{xml_text(f.description)}</DESCRIPTION>"
    if f.null is not None:
        inner += f"<VALUES null={xml_attr(f.null)}/>"
    head = f"   <FIELD {' '.join(attrs)}"
    return f"{head}>{inner}</FIELD>\n" if inner else f"{head}/>\n"


def _rows(fields: list[ResultField], rows: list[tuple[Any, ...]]) -> list[str]:
    """``TR`` lines: each column's cells made text at once, each row one join.

    A NULL is an empty cell (``<TD></TD>``).
    """
    if not rows or not fields:
        return []
    columns = [_cells(f)(values) for f, values in zip(fields, zip(*rows, strict=True), strict=True)]
    return ["<TR><TD>" + "</TD><TD>".join(r) + "</TD></TR>\n" for r in zip(*columns, strict=True)]


def result_document(
    fields: list[ResultField],
    rows: list[tuple[Any, ...]],
    overflow: bool,
    infos: Iterable[tuple[str, str]] = (),
) -> bytes:
    """A TAP result VOTable (1.4, TABLEDATA)."""
    parts = [votable_open("1.4"), ' <RESOURCE type="results">\n']
    parts.append('  <INFO name="QUERY_STATUS" value="OK"/>\n')
    parts += [f"  <INFO name={xml_attr(k)} value={xml_attr(v)}/>\n" for k, v in infos]
    parts.append("  <TABLE>\n")
    parts += [field_xml(f) for f in fields]
    parts.append("   <DATA><TABLEDATA>\n")
    parts += _rows(fields, rows)
    parts.append("   </TABLEDATA></DATA>\n  </TABLE>\n")
    if overflow:
        parts.append('  <INFO name="QUERY_STATUS" value="OVERFLOW"/>\n')
    parts.append(" </RESOURCE>\n</VOTABLE>\n")
    return "".join(parts).encode()


def error_document(message: str) -> bytes:
    """A DALI error VOTable: ``QUERY_STATUS=ERROR`` with the message."""
    return (
        votable_open("1.4") + ' <RESOURCE type="results">\n'
        f'  <INFO name="QUERY_STATUS" value="ERROR">{xml_text(message)}</INFO>\n'
        " </RESOURCE>\n</VOTABLE>\n"
    ).encode()
