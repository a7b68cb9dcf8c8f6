"""The VOTables the remote sources read: rows, service descriptors, query status.

:func:`parse_votable` reads TABLEDATA itself (BINARY serialisations through
astropy) into a :class:`VoTable`; :func:`fault` turns a service's fault text (a
``QUERY_STATUS`` message or a DataLink ``error_message``) into the error to raise.

Dependency rule: numpy, astropy, :mod:`harvester.errors` and :mod:`._client`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import HarvesterError, TransientError, UsageError
from ._client import first_line

__all__ = ["VoTable", "fault", "parse_votable"]


@dataclass(frozen=True)
class VoTable:
    """The parts of a VOTable the client reads: rows, service descriptors, status."""

    fields: list[str]
    rows: list[dict[str, str | None]]
    status: str  # QUERY_STATUS value, "OK" when absent
    status_text: str
    services: dict[str, dict[str, Any]]  # adhoc:service resources by ID


def _tag(e: ET.Element) -> str:
    return e.tag.rsplit("}", 1)[-1]


def parse_votable(xml: bytes) -> VoTable:
    """Parse a VOTable (TABLEDATA; BINARY through astropy) for the fields we read.

    Raises
    ------
    UsageError
        If the document is not a VOTable.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise UsageError(f"not a VOTable: {exc}: {first_line(xml)}") from exc
    if _tag(root) != "VOTABLE":
        raise UsageError(f"not a VOTable: <{_tag(root)}>")
    status, status_text = "OK", ""
    fields: list[str] = []
    rows: list[dict[str, str | None]] = []
    services: dict[str, dict[str, Any]] = {}
    for res in root.iter():
        if _tag(res) != "RESOURCE":
            continue
        if res.get("type") == "meta" and res.get("utype") == "adhoc:service":
            services[res.get("ID") or res.get("name") or ""] = _descriptor(res)
            continue
        for child in res:
            if _tag(child) == "INFO" and child.get("name") == "QUERY_STATUS":
                status = child.get("value", "OK")
                status_text = (child.text or "").strip()
            if _tag(child) == "TABLE" and not fields:
                fields, rows = _table(child, xml)
                for info in child:
                    if _tag(info) == "INFO" and info.get("name") == "QUERY_STATUS":
                        status = info.get("value", "OK")
                        status_text = (info.text or "").strip()
    return VoTable(fields, rows, status, status_text, services)


def _table(table: ET.Element, xml: bytes) -> tuple[list[str], list[dict[str, str | None]]]:
    names = [f.get("name", "") for f in table if _tag(f) == "FIELD"]
    rows: list[dict[str, str | None]] = []
    for data in table:
        if _tag(data) != "DATA":
            continue
        for body in data:
            if _tag(body) == "TABLEDATA":
                for tr in body:
                    values = [td.text for td in tr if _tag(td) == "TD"]
                    rows.append(dict(zip(names, values, strict=False)))
            else:  # BINARY / BINARY2 / FITS: let astropy decode the rows
                rows = _astropy_rows(xml)
    return names, rows


def _astropy_rows(xml: bytes) -> list[dict[str, str | None]]:
    import io
    import warnings

    from astropy.io import votable

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = votable.parse(io.BytesIO(xml)).get_first_table().to_table()
    out: list[dict[str, str | None]] = []
    for row in table:
        out.append(
            {
                name: None if np.ma.is_masked(row[name]) else _text(row[name])
                for name in table.colnames
            }
        )
    return out


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _descriptor(res: ET.Element) -> dict[str, Any]:
    params: dict[str, str] = {}
    inputs: list[tuple[str, str, str | None]] = []  # (name, value, ref)
    for child in res:
        if _tag(child) == "PARAM":
            params[child.get("name", "")] = child.get("value", "")
        elif _tag(child) == "GROUP" and child.get("name") == "inputParams":
            for p in child:
                if _tag(p) == "PARAM":
                    inputs.append((p.get("name", ""), p.get("value", ""), p.get("ref")))
    return {"params": params, "inputs": inputs}


def fault(where: str, text: str) -> HarvesterError:
    """A service's fault text as the error to raise (``TransientFault``: transient)."""
    if text.startswith("TransientFault"):
        return TransientError(f"{where}: {text}")
    return UsageError(f"{where}: {text or 'QUERY_STATUS=ERROR'}")
