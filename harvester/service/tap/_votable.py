"""TAP answers as VOTable: results (TABLEDATA) and ERROR documents (DALI).

A result puts ``INFO name="QUERY_STATUS" value="OK"`` in the results RESOURCE
before the TABLE and, when rows were cut at MAXREC, ``value="OVERFLOW"`` after
it (DALI 1.1 §4.4.1: pyvo reads the last one). Cells are written per column
type: floats with ``repr`` (round-trip exact; a ``real`` keeps its float32
spelling), NaN as an empty (null) cell, booleans ``T``/``F``, pg_sphere values as
numbers in degrees, ``s_region`` as ``POLYGON ICRS ...`` like SIA.

Dependency rule: the standard library, the service's VOTable helpers and
:mod:`._query`'s value types.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from .._votable import votable_open, xml_attr, xml_text
from ._query import Polygon, ResultField

__all__ = ["VOTABLE_TYPE", "error_document", "result_document"]

#: What TAP results are sent as.
VOTABLE_TYPE = "application/x-votable+xml"


def _float(v: Any) -> str:
    f = float(v)
    if math.isnan(f):
        return ""
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    return repr(f)


def _bool(v: Any) -> str:
    return "T" if v else "F"


def _text(v: Any) -> str:
    return xml_text(str(v))


def _numbers(v: Any) -> str:
    return " ".join(_float(x) for x in v)


def _region(v: Any) -> str:
    if isinstance(v, Polygon):
        return "POLYGON ICRS " + " ".join(f"{x:.6f}" for x in v)
    return xml_text(str(v))


def _formatter(f: ResultField) -> Callable[[Any], str]:
    if f.xtype in ("point", "circle", "polygon"):
        return _numbers
    if f.datatype in ("float", "double"):
        return _float if f.arraysize is None else _numbers
    if f.datatype == "boolean":
        return _bool
    if f.datatype == "char":
        return _region
    return str


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


def _rows(fields: list[ResultField], rows: Iterable[tuple[Any, ...]]) -> Iterable[str]:
    fmts = [_formatter(f) for f in fields]

    def cell(fmt: Callable[[Any], str], v: Any) -> str:
        if v is None:
            return "<TD/>"
        return f"<TD>{fmt(v)}</TD>"

    for row in rows:
        yield "<TR>" + "".join(map(cell, fmts, row)) + "</TR>\n"


def result_document(
    fields: list[ResultField],
    rows: Iterable[tuple[Any, ...]],
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
